//! GPT-2: learned position embeddings, pre-LayerNorm blocks, fused QKV attention, GELU (tanh) MLP.
//! Hook points as in TransformerLens (`hook_embed` includes the position embedding here).

use std::borrow::Cow;

use anyhow::Result;

use crate::attention::{attend, AttnShape, KvCache};
use crate::config::ModelConfig;
use crate::hooks::{HookContext, HookPoint, Hooks};
use crate::linalg::{add_assign, gelu_in_place, layer_norm, linear, Bf16Weight, Linears, Matrix};
use crate::weights::WeightSource;
use crate::Logits;
use crate::Precision;

struct Block {
    ln1: (Vec<f32>, Vec<f32>),
    wqkv: Matrix,
    bqkv: Vec<f32>,
    wo: Matrix,
    bo: Vec<f32>,
    ln2: (Vec<f32>, Vec<f32>),
    w_fc: Matrix,
    b_fc: Vec<f32>,
    w_proj: Matrix,
    b_proj: Vec<f32>,
}

impl Linears for Block {
    fn linears(&mut self) -> [&mut Matrix; 4] {
        [&mut self.wqkv, &mut self.wo, &mut self.w_fc, &mut self.w_proj]
    }
}

pub(crate) struct Gpt2 {
    cfg: ModelConfig,
    wte: Vec<f32>,
    wpe: Vec<f32>,
    lm_head: Option<Vec<f32>>,
    blocks: Vec<Block>,
    ln_f: (Vec<f32>, Vec<f32>),
    /// The unembedding in bf16 (`Model::set_precision`).
    unembed_bf16: Option<Bf16Weight>,
}

impl Gpt2 {
    pub(crate) fn load(cfg: &ModelConfig, src: &WeightSource, n_blocks: usize, precision: Precision) -> Result<Self> {
        let gguf = matches!(src, WeightSource::Gguf { .. });
        let (d, ff, v) = (cfg.d_model, cfg.d_ff, cfg.vocab_size);
        // HF checkpoints come with or without the `transformer.` prefix (GPT2LMHeadModel vs GPT2Model).
        let prefix = if src.has("transformer.wte.weight") { "transformer." } else { "" };
        let name = |hf: &str, gg: &str| if gguf { gg.to_string() } else { format!("{prefix}{hf}") };
        // HF stores Conv1D weights as [d_in, d_out]; GGUF stores [d_out, d_in].
        let lin = |hf: &str, gg: &str, inp: usize, out: usize| -> Result<Matrix> {
            if gguf {
                Ok(Matrix::from_out_in(&src.get(&format!("{gg}.weight"), &[out, inp])?, out, inp))
            } else {
                Ok(Matrix::from_in_out(src.get(&format!("{prefix}{hf}.weight"), &[inp, out])?, inp, out))
            }
        };
        let vec = |hf: &str, gg: &str, n: usize| src.get(&name(hf, gg), &[n]);
        let mut blocks = Vec::with_capacity(n_blocks);
        for l in 0..n_blocks {
            let h = |s: &str| format!("h.{l}.{s}");
            let b = |s: &str| format!("blk.{l}.{s}");
            blocks.push(
                Block {
                    ln1: (
                        vec(&h("ln_1.weight"), &b("attn_norm.weight"), d)?,
                        vec(&h("ln_1.bias"), &b("attn_norm.bias"), d)?,
                    ),
                    wqkv: lin(&h("attn.c_attn"), &b("attn_qkv"), d, 3 * d)?,
                    bqkv: vec(&h("attn.c_attn.bias"), &b("attn_qkv.bias"), 3 * d)?,
                    wo: lin(&h("attn.c_proj"), &b("attn_output"), d, d)?,
                    bo: vec(&h("attn.c_proj.bias"), &b("attn_output.bias"), d)?,
                    ln2: (
                        vec(&h("ln_2.weight"), &b("ffn_norm.weight"), d)?,
                        vec(&h("ln_2.bias"), &b("ffn_norm.bias"), d)?,
                    ),
                    w_fc: lin(&h("mlp.c_fc"), &b("ffn_up"), d, ff)?,
                    b_fc: vec(&h("mlp.c_fc.bias"), &b("ffn_up.bias"), ff)?,
                    w_proj: lin(&h("mlp.c_proj"), &b("ffn_down"), ff, d)?,
                    b_proj: vec(&h("mlp.c_proj.bias"), &b("ffn_down.bias"), d)?,
                }
                .at(precision),
            );
        }
        let head_name = if gguf { "output.weight".to_string() } else { "lm_head.weight".to_string() };
        Ok(Self {
            cfg: cfg.clone(),
            wte: src.get(&name("wte.weight", "token_embd.weight"), &[v, d])?,
            wpe: src.get(&name("wpe.weight", "position_embd.weight"), &[cfg.max_positions, d])?,
            lm_head: src.get_opt(&head_name, &[v, d])?,
            blocks,
            ln_f: (vec("ln_f.weight", "output_norm.weight", d)?, vec("ln_f.bias", "output_norm.bias", d)?),
            unembed_bf16: None,
        })
    }

    /// Pack (bf16) or drop (f32) the bf16 copies of every linear weight and of the unembedding.
    pub(crate) fn set_precision(&mut self, precision: Precision) {
        self.blocks.iter_mut().for_each(|b| b.set_precision(precision));
        self.unembed_bf16 = crate::pack_unembedding(&self.cfg, self.blocks.len(), || self.unembedding(), precision);
    }

    pub(crate) fn unembedding(&self) -> Cow<'_, [f32]> {
        Cow::Borrowed(self.lm_head.as_deref().unwrap_or(&self.wte))
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
        crate::check_positions(pos_offset + seq, c.max_positions)?;
        let ctx = |point| HookContext::new(point, batch, seq, pos_offset, c);

        let mut x = vec![0f32; rows * d];
        for (r, (row, &t)) in x.chunks_mut(d).zip(tokens).enumerate() {
            let pos = pos_offset + r % seq;
            for ((o, e), p) in row.iter_mut().zip(&self.wte[t as usize * d..][..d]).zip(&self.wpe[pos * d..][..d]) {
                *o = e + p;
            }
        }
        hooks.run(&ctx(HookPoint::Embed), &mut x)?;

        let mut h = vec![0f32; rows * d];
        let mut qkv = vec![0f32; rows * 3 * d];
        let mut attn = vec![0f32; rows * d];
        let mut delta = vec![0f32; rows * d];
        let mut fc = vec![0f32; rows * c.d_ff];
        let shape = AttnShape::causal(batch, seq, pos_offset, c.n_heads, c.n_heads, c.head_dim);
        for (l, blk) in self.blocks.iter().enumerate().take(n_blocks) {
            hooks.run(&ctx(HookPoint::ResidPre(l)), &mut x)?;
            layer_norm(&x, &blk.ln1.0, &blk.ln1.1, c.norm_eps, &mut h);
            hooks.run(&ctx(HookPoint::Ln1Normalized(l)), &mut h)?;
            linear(&h, rows, &blk.wqkv, Some(&blk.bqkv), &mut qkv);
            attend(cache, l, &qkv, &shape, &mut attn);
            linear(&attn, rows, &blk.wo, Some(&blk.bo), &mut delta);
            hooks.run(&ctx(HookPoint::AttnOut(l)), &mut delta)?;
            add_assign(&mut x, &delta, d);
            hooks.run(&ctx(HookPoint::ResidMid(l)), &mut x)?;

            layer_norm(&x, &blk.ln2.0, &blk.ln2.1, c.norm_eps, &mut h);
            hooks.run(&ctx(HookPoint::Ln2Normalized(l)), &mut h)?;
            linear(&h, rows, &blk.w_fc, Some(&blk.b_fc), &mut fc);
            hooks.run(&ctx(HookPoint::MlpPre(l)), &mut fc)?;
            gelu_in_place(&mut fc, false);
            hooks.run(&ctx(HookPoint::MlpPost(l)), &mut fc)?;
            linear(&fc, rows, &blk.w_proj, Some(&blk.b_proj), &mut delta);
            hooks.run(&ctx(HookPoint::MlpOut(l)), &mut delta)?;
            add_assign(&mut x, &delta, d);
            hooks.run(&ctx(HookPoint::ResidPost(l)), &mut x)?;
        }
        cache.advance(seq, n_blocks == c.n_layers);
        if n_blocks < c.n_layers {
            return Ok(Vec::new());
        }
        layer_norm(&x, &self.ln_f.0, &self.ln_f.1, c.norm_eps, &mut h);
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
