//! Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2): RMSNorm, rotary attention with grouped
//! key/value heads, SwiGLU MLP. Hook points sit exactly where TransformerLens puts them.

use anyhow::Result;

use crate::attention::{attend, AttnShape, KvCache};
use crate::config::ModelConfig;
use crate::hooks::{HookContext, HookPoint, Hooks};
use crate::linalg::{add_assign, linear, rms_norm, silu, Matrix, Rope};
use crate::weights::WeightSource;
use crate::Logits;

struct Block {
    attn_norm: Vec<f32>,
    /// `[d_model, q_dim + 2 * kv_dim]`: Q, K and V in one GEMM.
    wqkv: Matrix,
    bqkv: Option<Vec<f32>>,
    wo: Matrix,
    mlp_norm: Vec<f32>,
    /// `[d_model, 2 * d_ff]`: gate then up, in one GEMM.
    w_gate_up: Matrix,
    w_down: Matrix,
}

pub(crate) struct Llama {
    cfg: ModelConfig,
    /// `[vocab, d_model]`, also the unembedding when the head is tied.
    embed: Vec<f32>,
    /// `[vocab, d_model]` when the model has its own LM head.
    lm_head: Option<Vec<f32>>,
    blocks: Vec<Block>,
    final_norm: Vec<f32>,
    rope: Rope,
}

/// Tensor names differ between GGUF and Hugging Face checkpoints; the layout is the same.
struct Names {
    gguf: bool,
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
                "mlp_norm" => "ffn_norm",
                "gate" => "ffn_gate",
                "up" => "ffn_up",
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
    pub(crate) fn load(cfg: &ModelConfig, src: &WeightSource) -> Result<Self> {
        let names = Names { gguf: matches!(src, WeightSource::Gguf { .. }) };
        let (d, v, ff) = (cfg.d_model, cfg.vocab_size, cfg.d_ff);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let lin = |name: String, out: usize, inp: usize| -> Result<Matrix> {
            let w = src.get(&format!("{name}.weight"), &[out, inp])?;
            Ok(Matrix::from_out_in(&w, out, inp))
        };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
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
            blocks.push(Block {
                attn_norm: src.get(&format!("{}.weight", n("attn_norm")), &[d])?,
                wqkv: Matrix::concat_cols(&[lin(n("q"), qd, d)?, lin(n("k"), kvd, d)?, lin(n("v"), kvd, d)?]),
                bqkv,
                wo: lin(n("o"), d, qd)?,
                mlp_norm: src.get(&format!("{}.weight", n("mlp_norm")), &[d])?,
                w_gate_up: Matrix::concat_cols(&[lin(n("gate"), ff, d)?, lin(n("up"), ff, d)?]),
                w_down: lin(n("down"), d, ff)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed: src.get(names.embed(), &[v, d])?,
            lm_head: src.get_opt(names.head(), &[v, d])?,
            blocks,
            final_norm: src.get(names.final_norm(), &[d])?,
            rope: Rope::new(cfg.head_dim, cfg.rope_theta, cfg.max_positions, cfg.rope_interleaved),
        })
    }

    pub(crate) fn unembedding(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
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
        let ctx = |point| HookContext { point, batch, seq, pos_offset, d_model: d };

        let mut x = vec![0f32; rows * d];
        for (row, &t) in x.chunks_mut(d).zip(tokens) {
            row.copy_from_slice(&self.embed[t as usize * d..][..d]);
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
        let shape = AttnShape { batch, seq, pos_offset, n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: hd };
        for (l, blk) in self.blocks.iter().enumerate().take(n_blocks) {
            hooks.run(&ctx(HookPoint::ResidPre(l)), &mut x)?;
            rms_norm(&x, &blk.attn_norm, c.norm_eps, &mut h);
            linear(&h, rows, &blk.wqkv, blk.bqkv.as_deref(), &mut qkv);
            self.rotate(&mut qkv, seq, pos_offset);
            attend(cache, l, &qkv, &shape, &mut attn);
            linear(&attn, rows, &blk.wo, None, &mut delta);
            hooks.run(&ctx(HookPoint::AttnOut(l)), &mut delta)?;
            add_assign(&mut x, &delta, d);
            hooks.run(&ctx(HookPoint::ResidMid(l)), &mut x)?;

            rms_norm(&x, &blk.mlp_norm, c.norm_eps, &mut h);
            linear(&h, rows, &blk.w_gate_up, None, &mut gu);
            swiglu(&gu, c.d_ff, &mut act);
            linear(&act, rows, &blk.w_down, None, &mut delta);
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
        Ok(crate::project_logits(&h, batch, seq, d, self.unembedding(), c.vocab_size, logits))
    }

    /// Rotate the query and key heads of every row in place.
    fn rotate(&self, qkv: &mut [f32], seq: usize, pos_offset: usize) {
        use rayon::prelude::*;
        let c = &self.cfg;
        let hd = c.head_dim;
        let width = c.q_dim() + 2 * c.kv_dim();
        let n_rot = c.n_heads + c.n_kv_heads;
        qkv.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
            let pos = pos_offset + r % seq;
            for head in row[..n_rot * hd].chunks_mut(hd) {
                self.rope.apply(head, pos);
            }
        });
    }
}

fn swiglu(gu: &[f32], d_ff: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    out.par_chunks_mut(d_ff).zip(gu.par_chunks(2 * d_ff)).for_each(|(o, gu)| {
        let (g, u) = gu.split_at(d_ff);
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = silu(*g) * u;
        }
    });
}
