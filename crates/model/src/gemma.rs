//! Gemma 2 and Gemma 3 (text) decoders, as transformers runs them: the embedding scaled by sqrt(d_model),
//! RMSNorms with a (1 + w) gain before *and* after attention and MLP, GeGLU (tanh GELU), attention scaled by
//! `query_pre_attn_scalar^-1/2`, sliding-window layers interleaved with global ones (Gemma 2 every other
//! layer, Gemma 3 five local : one global with its own rotary base), tied embeddings. Gemma 2 soft-caps
//! attention scores and the final logits; Gemma 3 normalises each query and key head instead.
//!
//! Hook points follow TransformerLens (`use_normalization_before_and_after`): `hook_embed` is the scaled
//! embedding, `hook_attn_out` / `hook_mlp_out` are taken after the post-norms, i.e. what is added to the
//! residual stream.

use std::borrow::Cow;

use anyhow::Result;

use crate::attention::{attend, rotate_qk, AttnShape, KvCache};
use crate::config::{Arch, ModelConfig};
use crate::hooks::{HookContext, HookPoint, Hooks};
use crate::linalg::{add_assign, linear, linear_rows, rms_norm, Bf16Weight, Linears, Matrix, Rope};
use crate::llama::{gated_mlp_act, lin, norm_qk_heads, normed};
use crate::weights::{Table, WeightSource};
use crate::Logits;
use crate::Precision;
use saekit_kernels::vmath::gelu_tanh_mul;
use saekit_kernels::GluFn;

/// Norm gains are stored as `1 + w`, the factor Gemma's RMSNorm multiplies by.
struct Block {
    attn_norm: Vec<f32>,
    /// `[d_model, q_dim + 2 * kv_dim]`.
    wqkv: Matrix,
    /// Gemma 3's per-head query and key norms.
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    wo: Matrix,
    post_attn_norm: Vec<f32>,
    pre_mlp_norm: Vec<f32>,
    /// `[d_model, 2 * d_ff]`: gate then up.
    w_gate_up: Matrix,
    w_down: Matrix,
    post_mlp_norm: Vec<f32>,
    sliding: bool,
}

pub(crate) struct Gemma {
    cfg: ModelConfig,
    /// `[vocab, d_model]`, unscaled: also the unembedding.
    embed: Table,
    embed_scale: f32,
    blocks: Vec<Block>,
    final_norm: Vec<f32>,
    rope_global: Rope,
    /// Gemma 3's sliding-window layers rotate with their own base.
    rope_local: Option<Rope>,
    /// The unembedding in bf16 (`Model::set_precision`).
    unembed_bf16: Option<Bf16Weight>,
}

/// Tensor names as transformers (`model.layers.L.self_attn.q_proj`) or llama.cpp's converter
/// (`blk.L.attn_q`) spell them.
struct Names {
    gguf: bool,
}

impl Names {
    fn top(&self, hf: &'static str) -> &'static str {
        match (hf, self.gguf) {
            (hf, false) => hf,
            ("model.embed_tokens.weight", true) => "token_embd.weight",
            _ => "output_norm.weight",
        }
    }

    /// Block `l`'s tensor `hf` (transformers' name inside the layer).
    fn block(&self, l: usize, hf: &str) -> String {
        if !self.gguf {
            return format!("model.layers.{l}.{hf}");
        }
        let gguf = match hf {
            "input_layernorm.weight" => "attn_norm.weight",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm.weight" => "attn_q_norm.weight",
            "self_attn.k_norm.weight" => "attn_k_norm.weight",
            "post_attention_layernorm.weight" => "post_attention_norm.weight",
            "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
            "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            _ => "ffn_down",
        };
        format!("blk.{l}.{gguf}")
    }

    /// An RMSNorm's gain: transformers stores w and multiplies by 1 + w; llama.cpp's converter stores 1 + w.
    fn gain(&self, src: &WeightSource, name: &str, n: usize) -> Result<Vec<f32>> {
        let w = src.get(name, &[n])?;
        Ok(if self.gguf { w } else { w.into_iter().map(|w| 1.0 + w).collect() })
    }
}

impl Gemma {
    pub(crate) fn load(cfg: &ModelConfig, src: &WeightSource, n_blocks: usize, precision: Precision) -> Result<Self> {
        let (d, v) = (cfg.d_model, cfg.vocab_size);
        let names = Names { gguf: matches!(src, WeightSource::Gguf { .. }) };
        let blocks = (0..n_blocks)
            .map(|l| load_block(cfg, src, &names, l).map(|b| b.at(precision)))
            .collect::<Result<Vec<_>>>()?;
        let det = &cfg.details;
        let rope_global = Rope::scaled(cfg.head_dim, cfg.rope_theta, cfg.max_positions, false, det.rope_linear_factor);
        let rope_local = det.rope_local_theta.map(|t| Rope::new(cfg.head_dim, t, cfg.max_positions, false));
        Ok(Self {
            cfg: cfg.clone(),
            // without the head the embedding is only looked up: it stays in the file
            embed: src.table(names.top("model.embed_tokens.weight"), &[v, d], n_blocks < cfg.n_layers)?,
            // transformers rounds sqrt(d_model) to the activation dtype before multiplying.
            embed_scale: (d as f64).sqrt() as f32,
            blocks,
            final_norm: names.gain(src, names.top("model.norm.weight"), d)?,
            rope_global,
            rope_local,
            unembed_bf16: None,
        })
    }

    /// Pack (bf16) or drop (f32) the bf16 copies of every linear weight and of the unembedding.
    pub(crate) fn set_precision(&mut self, precision: Precision) {
        self.blocks.iter_mut().for_each(|b| b.set_precision(precision));
        self.unembed_bf16 = crate::pack_unembedding(&self.cfg, self.blocks.len(), || self.embed.values(), precision);
    }

    pub(crate) fn unembedding(&self) -> Cow<'_, [f32]> {
        self.embed.values()
    }

    /// The final norm's effective gain, `1 + w`.
    pub(crate) fn final_norm_gain(&self) -> &[f32] {
        &self.final_norm
    }

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
        crate::check_positions(pos_offset + seq, self.rope_global.max_pos())?;
        let ctx = |point| HookContext::new(point, batch, seq, pos_offset, c);

        let mut x = vec![0f32; rows * d];
        for (row, &t) in x.chunks_mut(d).zip(tokens) {
            self.embed.row_into(t as usize, row);
            row.iter_mut().for_each(|v| *v *= self.embed_scale);
        }
        hooks.run(&ctx(HookPoint::Embed), &mut x)?;

        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let mut h = vec![0f32; rows * d];
        let mut qkv = vec![0f32; rows * (qd + 2 * kvd)];
        let mut attn = vec![0f32; rows * qd];
        let mut raw = vec![0f32; rows * d];
        let mut delta = vec![0f32; rows * d];
        let mut gu = vec![0f32; rows * 2 * c.d_ff];
        let mut act = vec![0f32; rows * c.d_ff];
        let mut shape = AttnShape::causal(batch, seq, pos_offset, c.n_heads, c.n_kv_heads, c.head_dim);
        shape.scale = c.details.query_pre_attn_scalar.map_or(shape.scale, |s| s.powf(-0.5) as f32);
        shape.softcap = c.details.attn_softcap;
        for (l, blk) in self.blocks.iter().enumerate().take(n_blocks) {
            hooks.run(&ctx(HookPoint::ResidPre(l)), &mut x)?;
            let ln1 =
                normed(hooks, &ctx(HookPoint::Ln1Normalized(l)), (&x, &blk.attn_norm, c.norm_eps), &blk.wqkv, &mut h)?;
            linear_rows(ln1.rows(&h), &blk.wqkv, None, &mut qkv);
            if let Some((qn, kn)) = &blk.qk_norm {
                norm_qk_heads(&mut qkv, qd, kvd, qn, kn, c.norm_eps);
            }
            let rope =
                if blk.sliding { self.rope_local.as_ref().unwrap_or(&self.rope_global) } else { &self.rope_global };
            rotate_qk(&mut qkv, rope, c, seq, pos_offset);
            shape.window = c.details.sliding_window.filter(|_| blk.sliding);
            attend(cache, l, &qkv, &shape, &mut attn);
            linear(&attn, rows, &blk.wo, None, &mut raw);
            rms_norm(&raw, &blk.post_attn_norm, c.norm_eps, &mut delta);
            hooks.run(&ctx(HookPoint::AttnOut(l)), &mut delta)?;
            add_assign(&mut x, &delta, d);
            hooks.run(&ctx(HookPoint::ResidMid(l)), &mut x)?;

            let ln2 = normed(
                hooks,
                &ctx(HookPoint::Ln2Normalized(l)),
                (&x, &blk.pre_mlp_norm, c.norm_eps),
                &blk.w_gate_up,
                &mut h,
            )?;
            let (pre, post) = (ctx(HookPoint::MlpPre(l)), ctx(HookPoint::MlpPost(l)));
            let mlp = (&blk.w_gate_up, &blk.w_down, gelu_tanh_mul as GluFn);
            let mlp_act = gated_mlp_act(hooks, (&pre, &post), ln2.rows(&h), mlp, &mut gu, &mut act)?;
            linear_rows(mlp_act.rows(&act), &blk.w_down, None, &mut raw);
            rms_norm(&raw, &blk.post_mlp_norm, c.norm_eps, &mut delta);
            hooks.run(&ctx(HookPoint::MlpOut(l)), &mut delta)?;
            add_assign(&mut x, &delta, d);
            hooks.run(&ctx(HookPoint::ResidPost(l)), &mut x)?;
        }
        cache.advance(seq, n_blocks == c.n_layers);
        if n_blocks < c.n_layers {
            return Ok(Vec::new());
        }
        rms_norm(&x, &self.final_norm, c.norm_eps, &mut h);
        hooks.run(&ctx(HookPoint::FinalNorm), &mut h)?;
        let mut out = crate::project_logits(
            &h,
            batch,
            seq,
            d,
            (&self.embed.values(), self.unembed_bf16.as_ref()),
            c.vocab_size,
            logits,
        );
        if let Some(cap) = c.details.final_softcap {
            out.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
        Ok(out)
    }
}

fn load_block(cfg: &ModelConfig, src: &WeightSource, names: &Names, l: usize) -> Result<Block> {
    let (d, ff, hd) = (cfg.d_model, cfg.d_ff, cfg.head_dim);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let n = |p: &str| names.block(l, p);
    let gain = |p: &str, len: usize| names.gain(src, &n(p), len);
    let qk_norm = if cfg.arch == Arch::Gemma3 {
        Some((gain("self_attn.q_norm.weight", hd)?, gain("self_attn.k_norm.weight", hd)?))
    } else {
        None
    };
    Ok(Block {
        attn_norm: gain("input_layernorm.weight", d)?,
        wqkv: Matrix::concat_cols(&[
            lin(src, &n("self_attn.q_proj"), qd, d)?,
            lin(src, &n("self_attn.k_proj"), kvd, d)?,
            lin(src, &n("self_attn.v_proj"), kvd, d)?,
        ]),
        qk_norm,
        wo: lin(src, &n("self_attn.o_proj"), d, qd)?,
        post_attn_norm: gain("post_attention_layernorm.weight", d)?,
        pre_mlp_norm: gain("pre_feedforward_layernorm.weight", d)?,
        w_gate_up: Matrix::concat_cols(&[lin(src, &n("mlp.gate_proj"), ff, d)?, lin(src, &n("mlp.up_proj"), ff, d)?]),
        w_down: lin(src, &n("mlp.down_proj"), d, ff)?,
        post_mlp_norm: gain("post_feedforward_layernorm.weight", d)?,
        sliding: cfg.details.sliding_layers.get(l).copied().unwrap_or(false),
    })
}

impl Linears for Block {
    fn linears(&mut self) -> [&mut Matrix; 4] {
        [&mut self.wqkv, &mut self.wo, &mut self.w_gate_up, &mut self.w_down]
    }
}
