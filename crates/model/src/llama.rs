//! Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2, Qwen3, Phi-3): RMSNorm, rotary attention with
//! grouped key/value heads, SwiGLU MLP. Qwen3 adds an RMSNorm on every query and key head; Phi-3 stores
//! Q/K/V and gate/up fused (the layout this file fuses them into anyway). Hook points sit exactly where
//! TransformerLens puts them.

use std::borrow::Cow;

use anyhow::Result;

use crate::attention::{attend, rotate_qk, AttnShape, KvCache};
use crate::config::{Arch, ModelConfig};
use crate::hooks::{run_on_columns, HookContext, HookPoint, Hooks};
use crate::linalg::{
    add_assign, glu_bf16, linear_add, linear_rows, rms_norm, rms_norm_bf16, rms_norm_in_place, Bf16Weight, Linears,
    Matrix, Produced, Rope, Rows,
};
use crate::weights::{Table, WeightSource};
use crate::Logits;
use crate::Precision;
use saekit_kernels::vmath::silu_mul;
use saekit_kernels::GluFn;

struct Block {
    attn_norm: Vec<f32>,
    /// `[d_model, q_dim + 2 * kv_dim]`: Q, K and V in one GEMM.
    wqkv: Matrix,
    bqkv: Option<Vec<f32>>,
    /// Qwen3's per-head RMSNorm gains for queries and keys, applied before the rotary embedding.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    wo: Matrix,
    mlp_norm: Vec<f32>,
    /// `[d_model, 2 * d_ff]`: gate then up, in one GEMM.
    w_gate_up: Matrix,
    w_down: Matrix,
}

impl Linears for Block {
    fn linears(&mut self) -> [&mut Matrix; 4] {
        [&mut self.wqkv, &mut self.wo, &mut self.w_gate_up, &mut self.w_down]
    }
}

pub(crate) struct Llama {
    cfg: ModelConfig,
    /// `[vocab, d_model]`, also the unembedding when the head is tied.
    embed: Table,
    /// `[vocab, d_model]` when the model has its own LM head.
    lm_head: Option<Vec<f32>>,
    blocks: Vec<Block>,
    final_norm: Vec<f32>,
    rope: Rope,
    /// The unembedding in bf16 (`Model::set_precision`).
    unembed_bf16: Option<Bf16Weight>,
}

/// Tensor names differ between GGUF and Hugging Face checkpoints; the layout is the same.
struct Names {
    gguf: bool,
}

/// Read `{name}.weight` (`[out, in]`) as a matrix.
pub(crate) fn lin(src: &WeightSource, name: &str, out: usize, inp: usize) -> Result<Matrix> {
    let w = src.get(&format!("{name}.weight"), &[out, inp])?;
    Ok(Matrix::from_out_in(&w, out, inp))
}

impl Names {
    fn embed(&self) -> &'static str {
        if self.gguf {
            "token_embd.weight"
        } else {
            "model.embed_tokens.weight"
        }
    }
    fn final_norm(&self) -> &'static str {
        if self.gguf {
            "output_norm.weight"
        } else {
            "model.norm.weight"
        }
    }
    fn head(&self) -> &'static str {
        if self.gguf {
            "output.weight"
        } else {
            "lm_head.weight"
        }
    }
    fn block(&self, l: usize, part: &str) -> String {
        if self.gguf {
            let p = match part {
                "attn_norm" => "attn_norm",
                "q" => "attn_q",
                "k" => "attn_k",
                "v" => "attn_v",
                "o" => "attn_output",
                "qkv" => "attn_qkv",
                "q_norm" => "attn_q_norm",
                "k_norm" => "attn_k_norm",
                "mlp_norm" => "ffn_norm",
                "gate" => "ffn_gate",
                // Phi-3's fused gate and up projection keeps the up projection's name in llama.cpp
                "up" | "gate_up" => "ffn_up",
                _ => "ffn_down",
            };
            format!("blk.{l}.{p}")
        } else {
            let p = match part {
                "attn_norm" => "input_layernorm",
                "q" => "self_attn.q_proj",
                "k" => "self_attn.k_proj",
                "v" => "self_attn.v_proj",
                "o" => "self_attn.o_proj",
                "qkv" => "self_attn.qkv_proj",
                "q_norm" => "self_attn.q_norm",
                "k_norm" => "self_attn.k_norm",
                "gate_up" => "mlp.gate_up_proj",
                "mlp_norm" => "post_attention_layernorm",
                "gate" => "mlp.gate_proj",
                "up" => "mlp.up_proj",
                _ => "mlp.down_proj",
            };
            format!("model.layers.{l}.{p}")
        }
    }
}

impl Llama {
    pub(crate) fn load(cfg: &ModelConfig, src: &WeightSource, n_blocks: usize, precision: Precision) -> Result<Self> {
        let names = Names { gguf: matches!(src, WeightSource::Gguf { .. }) };
        let (d, v) = (cfg.d_model, cfg.vocab_size);
        let blocks = (0..n_blocks)
            .map(|l| load_block(cfg, src, &names, l).map(|b| b.at(precision)))
            .collect::<Result<Vec<_>>>()?;
        let rot = cfg.details.rotary_dims;
        Ok(Self {
            cfg: cfg.clone(),
            // without the head the embedding is only looked up: it stays in the file
            embed: src.table(names.embed(), &[v, d], n_blocks < cfg.n_layers)?,
            lm_head: src.get_opt(names.head(), &[v, d])?,
            blocks,
            final_norm: src.get(names.final_norm(), &[d])?,
            rope: Rope::scaled(
                rot,
                cfg.rope_theta,
                cfg.max_positions,
                cfg.rope_interleaved,
                cfg.details.rope_linear_factor,
            ),
            unembed_bf16: None,
        })
    }

    /// Pack (bf16) or drop (f32) the bf16 copies of every linear weight and of the unembedding.
    pub(crate) fn set_precision(&mut self, precision: Precision) {
        self.blocks.iter_mut().for_each(|b| b.set_precision(precision));
        self.unembed_bf16 = crate::pack_unembedding(&self.cfg, self.blocks.len(), || self.unembedding(), precision);
    }

    pub(crate) fn unembedding(&self) -> Cow<'_, [f32]> {
        self.lm_head.as_deref().map_or_else(|| self.embed.values(), Cow::Borrowed)
    }

    pub(crate) fn block_weights(&self, l: usize) -> Option<crate::RmsBlockWeights<'_>> {
        let b = self.blocks.get(l)?;
        Some(crate::RmsBlockWeights {
            ln1_gain: &b.attn_norm,
            wqkv: &b.wqkv,
            bqkv: b.bqkv.as_deref(),
            wo: &b.wo,
            ln2_gain: &b.mlp_norm,
        })
    }

    pub(crate) fn final_norm_weight(&self) -> &[f32] {
        &self.final_norm
    }

    /// Run `n_blocks` blocks over `tokens` (`batch` sequences of equal length, appended to `cache`),
    /// then the final norm and logits if `logits` asks for them.
    pub(crate) fn forward(
        &self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        hooks: &mut Hooks,
        n_blocks: usize,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (d, rows) = (c.d_model, tokens.len());
        let seq = rows / batch;
        let pos_offset = cache.len();
        crate::check_positions(pos_offset + seq, self.rope.max_pos())?;
        let ctx = |point| HookContext::new(point, batch, seq, pos_offset, c);

        let mut x = vec![0f32; rows * d];
        for (row, &t) in x.chunks_mut(d).zip(tokens) {
            self.embed.row_into(t as usize, row);
        }
        hooks.run(&ctx(HookPoint::Embed), &mut x)?;

        let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let width = qd + 2 * kvd;
        let mut h = vec![0f32; rows * d];
        let mut qkv = vec![0f32; rows * width];
        let mut attn = vec![0f32; rows * qd];
        let mut delta = vec![0f32; rows * d];
        let mut gu = vec![0f32; rows * 2 * c.d_ff];
        let mut act = vec![0f32; rows * c.d_ff];
        let mut shape = AttnShape::causal(batch, seq, pos_offset, c.n_heads, c.n_kv_heads, hd);
        shape.window = c.details.sliding_window.filter(|_| c.details.sliding_layers.iter().any(|&s| s));
        for (l, blk) in self.blocks.iter().enumerate().take(n_blocks) {
            hooks.run(&ctx(HookPoint::ResidPre(l)), &mut x)?;
            let ln1 =
                normed(hooks, &ctx(HookPoint::Ln1Normalized(l)), (&x, &blk.attn_norm, c.norm_eps), &blk.wqkv, &mut h)?;
            linear_rows(ln1.rows(&h), &blk.wqkv, blk.bqkv.as_deref(), &mut qkv);
            if let Some((qn, kn)) = &blk.qk_norm {
                norm_qk_heads(&mut qkv, qd, kvd, qn, kn, c.norm_eps);
            }
            rotate_qk(&mut qkv, &self.rope, c, seq, pos_offset);
            attend(cache, l, &qkv, &shape, &mut attn);
            add_block_output(hooks, &ctx(HookPoint::AttnOut(l)), Rows::F32(&attn, rows), &blk.wo, &mut x, &mut delta)?;
            hooks.run(&ctx(HookPoint::ResidMid(l)), &mut x)?;

            let ln2 = normed(
                hooks,
                &ctx(HookPoint::Ln2Normalized(l)),
                (&x, &blk.mlp_norm, c.norm_eps),
                &blk.w_gate_up,
                &mut h,
            )?;
            let (pre, post) = (ctx(HookPoint::MlpPre(l)), ctx(HookPoint::MlpPost(l)));
            let mlp = (&blk.w_gate_up, &blk.w_down, silu_mul as GluFn);
            let mlp_act = gated_mlp_act(hooks, (&pre, &post), ln2.rows(&h), mlp, &mut gu, &mut act)?;
            add_block_output(hooks, &ctx(HookPoint::MlpOut(l)), mlp_act.rows(&act), &blk.w_down, &mut x, &mut delta)?;
            hooks.run(&ctx(HookPoint::ResidPost(l)), &mut x)?;
        }
        cache.advance(seq, n_blocks == c.n_layers);
        if n_blocks < c.n_layers {
            return Ok(Vec::new());
        }
        rms_norm(&x, &self.final_norm, c.norm_eps, &mut h);
        hooks.run(&ctx(HookPoint::FinalNorm), &mut h)?;
        Ok(crate::project_logits(
            &h,
            batch,
            seq,
            d,
            (&self.unembedding(), self.unembed_bf16.as_ref()),
            c.vocab_size,
            logits,
        ))
    }
}

/// `x += input · w`, the attention's or the MLP's output added to the residual stream. A hook at its
/// output point (`ctx`) sees and may edit the output first, in `delta`; without one the output goes
/// straight into `x` ([`linear_add`]).
fn add_block_output(
    hooks: &mut Hooks,
    ctx: &HookContext,
    input: Rows,
    w: &Matrix,
    x: &mut [f32],
    delta: &mut [f32],
) -> Result<()> {
    if hooks.has(ctx.point) {
        linear_rows(input, w, None, delta);
        hooks.run(ctx, delta)?;
        add_assign(x, delta, w.cols);
    } else {
        linear_add(input, w, x, delta);
    }
    Ok(())
}

/// Load block `l`: Q/K/V and gate/up fused into one matrix each, whether the checkpoint stores them apart
/// (Llama, Qwen) or together (Phi-3).
fn load_block(cfg: &ModelConfig, src: &WeightSource, names: &Names, l: usize) -> Result<Block> {
    let (d, ff, hd) = (cfg.d_model, cfg.d_ff, cfg.head_dim);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let n = |p: &str| names.block(l, p);
    let (bq, bk, bv) = (
        src.get_opt(&format!("{}.bias", n("q")), &[qd])?,
        src.get_opt(&format!("{}.bias", n("k")), &[kvd])?,
        src.get_opt(&format!("{}.bias", n("v")), &[kvd])?,
    );
    let bqkv = match (bq, bk, bv) {
        (Some(q), Some(k), Some(v)) => Some([q, k, v].concat()),
        (None, None, None) => None,
        _ => anyhow::bail!("{}: block {l} has biases on only some of q/k/v", src.describe()),
    };
    let phi3 = cfg.arch == Arch::Phi3;
    let wqkv = if phi3 {
        lin(src, &n("qkv"), qd + 2 * kvd, d)?
    } else {
        Matrix::concat_cols(&[lin(src, &n("q"), qd, d)?, lin(src, &n("k"), kvd, d)?, lin(src, &n("v"), kvd, d)?])
    };
    let w_gate_up = if phi3 {
        lin(src, &n("gate_up"), 2 * ff, d)?
    } else {
        Matrix::concat_cols(&[lin(src, &n("gate"), ff, d)?, lin(src, &n("up"), ff, d)?])
    };
    let qk_norm = if cfg.arch == Arch::Qwen3 {
        Some((src.get(&format!("{}.weight", n("q_norm")), &[hd])?, src.get(&format!("{}.weight", n("k_norm")), &[hd])?))
    } else {
        None
    };
    Ok(Block {
        attn_norm: src.get(&format!("{}.weight", n("attn_norm")), &[d])?,
        wqkv,
        bqkv,
        qk_norm,
        wo: lin(src, &n("o"), d, qd)?,
        mlp_norm: src.get(&format!("{}.weight", n("mlp_norm")), &[d])?,
        w_gate_up,
        w_down: lin(src, &n("down"), d, ff)?,
    })
}

/// RMSNorm each query head with `qn` and each key head with `kn` (`qkv` rows are `[q | k | v]`).
pub(crate) fn norm_qk_heads(qkv: &mut [f32], qd: usize, kvd: usize, qn: &[f32], kn: &[f32], eps: f32) {
    use rayon::prelude::*;
    qkv.par_chunks_mut(qd + 2 * kvd).for_each(|row| {
        let (q, rest) = row.split_at_mut(qd);
        rms_norm_in_place(q, qn, eps);
        rms_norm_in_place(&mut rest[..kvd], kn, eps);
    });
}

/// The RMSNorm of the residual stream `x` (`(x, weight, eps)`) as the input of `next`: computed and
/// rounded to bf16 in one pass when `next` runs in bf16 and nothing hooks the normalised rows (`ctx`),
/// else written to `h` in f32 and run through the hook.
pub(crate) fn normed(
    hooks: &mut Hooks,
    ctx: &HookContext,
    norm: (&[f32], &[f32], f32),
    next: &Matrix,
    h: &mut [f32],
) -> Result<Produced> {
    let (x, w, eps) = norm;
    if !hooks.has(ctx.point) {
        if let Some(packed) = rms_norm_bf16(x, w, eps, next) {
            return Ok(Produced::Bf16(packed));
        }
    }
    rms_norm(x, w, eps, h);
    hooks.run(ctx, h)?;
    Ok(Produced::InBuffer(x.len() / w.len()))
}

/// A gated MLP's activations on `h`, ready for its down projection: rows in bf16 from one kernel pass
/// ([`glu_bf16`]) when nothing hooks `mlp.hook_pre` or `mlp.hook_post` (`hook_at`) and the weights
/// (`(gate_up, down, glu)`) run in bf16; else in `act`, from the product, its hooks and `glu` one by one.
pub(crate) fn gated_mlp_act(
    hooks: &mut Hooks,
    hook_at: (&HookContext, &HookContext),
    h: Rows,
    mlp: (&Matrix, &Matrix, GluFn),
    gu: &mut [f32],
    act: &mut [f32],
) -> Result<Produced> {
    use rayon::prelude::*;
    let ((pre, post), (w_gate_up, w_down, glu)) = (hook_at, mlp);
    if !hooks.has(pre.point) && !hooks.has(post.point) {
        if let Some(packed) = glu_bf16(h, w_gate_up, w_down, glu) {
            return Ok(Produced::Bf16(packed));
        }
    }
    let d_ff = w_down.rows;
    linear_rows(h, w_gate_up, None, gu);
    run_on_columns(hooks, pre, gu, 2 * d_ff)?;
    act.par_chunks_mut(d_ff).zip(gu.par_chunks(2 * d_ff)).for_each(|(o, gu)| {
        let (g, u) = gu.split_at(d_ff);
        glu(g, u, o);
    });
    hooks.run(post, act)?;
    Ok(Produced::InBuffer(h.count()))
}
