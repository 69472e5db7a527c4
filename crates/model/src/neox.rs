//! GPT-NeoX / Pythia: LayerNorm with bias, fused per-head Q/K/V with biases, rotary embedding on the first
//! `rotary_pct` of each head, GELU MLP with biases, an untied unembedding (`embed_out`). With
//! `use_parallel_residual` (every Pythia) attention and MLP both read the block's input and their outputs
//! are added together, so the block has no `hook_resid_mid`, as in TransformerLens.

use std::borrow::Cow;

use anyhow::Result;

use crate::attention::{attend, rotate_qk, AttnShape, KvCache};
use crate::config::ModelConfig;
use crate::hooks::{HookContext, HookPoint, Hooks};
use crate::linalg::{add_assign, gelu_in_place, layer_norm, linear, Bf16Weight, Linears, Matrix, Rope};
use crate::llama::lin;
use crate::weights::{Table, WeightSource};
use crate::Logits;
use crate::Precision;

struct Block {
    ln1: (Vec<f32>, Vec<f32>),
    /// `[d_model, 3 * d_model]` as `[all q heads | all k heads | all v heads]`.
    wqkv: Matrix,
    bqkv: Vec<f32>,
    wo: Matrix,
    bo: Vec<f32>,
    ln2: (Vec<f32>, Vec<f32>),
    w_up: Matrix,
    b_up: Vec<f32>,
    w_down: Matrix,
    b_down: Vec<f32>,
}

impl Linears for Block {
    fn linears(&mut self) -> [&mut Matrix; 4] {
        [&mut self.wqkv, &mut self.wo, &mut self.w_up, &mut self.w_down]
    }
}

pub(crate) struct GptNeox {
    cfg: ModelConfig,
    embed: Table,
    /// `[vocab, d_model]`.
    unembed: Vec<f32>,
    blocks: Vec<Block>,
    ln_f: (Vec<f32>, Vec<f32>),
    rope: Rope,
    /// The unembedding in bf16 (`Model::set_precision`).
    unembed_bf16: Option<Bf16Weight>,
}

/// GPT-NeoX stores `query_key_value` rows head by head (`[h0: q k v | h1: q k v | ...]`); reorder them to
/// the `[q heads | k heads | v heads]` layout the shared attention reads. `rows` has `3 * n_heads * hd`
/// chunks of `width` values.
fn heads_to_qkv(rows: &[f32], n_heads: usize, hd: usize, width: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows.len()];
    for h in 0..n_heads {
        for part in 0..3 {
            let from = (h * 3 + part) * hd * width;
            let to = (part * n_heads + h) * hd * width;
            out[to..to + hd * width].copy_from_slice(&rows[from..from + hd * width]);
        }
    }
    out
}

impl GptNeox {
    pub(crate) fn load(cfg: &ModelConfig, src: &WeightSource, n_blocks: usize, precision: Precision) -> Result<Self> {
        let (d, v) = (cfg.d_model, cfg.vocab_size);
        let names = Names { gguf: matches!(src, WeightSource::Gguf { .. }) };
        let blocks = (0..n_blocks)
            .map(|l| load_block(cfg, src, &names, l).map(|b| b.at(precision)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            // without the head the embedding is only looked up: it stays in the file
            embed: src.table(names.top("embed"), &[v, d], n_blocks < cfg.n_layers)?,
            unembed: src.get(names.top("unembed"), &[v, d])?,
            blocks,
            ln_f: layer_norm_params(src, names.top("final_norm"), d)?,
            rope: Rope::new(cfg.details.rotary_dims, cfg.rope_theta, cfg.max_positions, false),
            unembed_bf16: None,
        })
    }

    /// Pack (bf16) or drop (f32) the bf16 copies of every linear weight and of the unembedding.
    pub(crate) fn set_precision(&mut self, precision: Precision) {
        self.blocks.iter_mut().for_each(|b| b.set_precision(precision));
        self.unembed_bf16 =
            crate::pack_unembedding(&self.cfg, self.blocks.len(), || Cow::Borrowed(&self.unembed), precision);
    }

    pub(crate) fn unembedding(&self) -> Cow<'_, [f32]> {
        Cow::Borrowed(&self.unembed)
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
        crate::check_positions(pos_offset + seq, self.rope.max_pos())?;
        let ctx = |point| HookContext::new(point, batch, seq, pos_offset, c);

        let mut x = vec![0f32; rows * d];
        for (row, &t) in x.chunks_mut(d).zip(tokens) {
            self.embed.row_into(t as usize, row);
        }
        hooks.run(&ctx(HookPoint::Embed), &mut x)?;

        let mut h = vec![0f32; rows * d];
        let mut qkv = vec![0f32; rows * 3 * d];
        let mut attn = vec![0f32; rows * d];
        let mut attn_out = vec![0f32; rows * d];
        let mut mlp_out = vec![0f32; rows * d];
        let mut up = vec![0f32; rows * c.d_ff];
        let shape = AttnShape::causal(batch, seq, pos_offset, c.n_heads, c.n_heads, c.head_dim);
        let parallel = c.details.parallel_residual;
        for (l, blk) in self.blocks.iter().enumerate().take(n_blocks) {
            hooks.run(&ctx(HookPoint::ResidPre(l)), &mut x)?;
            layer_norm(&x, &blk.ln1.0, &blk.ln1.1, c.norm_eps, &mut h);
            hooks.run(&ctx(HookPoint::Ln1Normalized(l)), &mut h)?;
            linear(&h, rows, &blk.wqkv, Some(&blk.bqkv), &mut qkv);
            rotate_qk(&mut qkv, &self.rope, c, seq, pos_offset);
            attend(cache, l, &qkv, &shape, &mut attn);
            linear(&attn, rows, &blk.wo, Some(&blk.bo), &mut attn_out);
            hooks.run(&ctx(HookPoint::AttnOut(l)), &mut attn_out)?;
            if !parallel {
                add_assign(&mut x, &attn_out, d);
                hooks.run(&ctx(HookPoint::ResidMid(l)), &mut x)?;
            }

            layer_norm(&x, &blk.ln2.0, &blk.ln2.1, c.norm_eps, &mut h);
            hooks.run(&ctx(HookPoint::Ln2Normalized(l)), &mut h)?;
            linear(&h, rows, &blk.w_up, Some(&blk.b_up), &mut up);
            hooks.run(&ctx(HookPoint::MlpPre(l)), &mut up)?;
            gelu_in_place(&mut up, c.details.gelu_exact);
            hooks.run(&ctx(HookPoint::MlpPost(l)), &mut up)?;
            linear(&up, rows, &blk.w_down, Some(&blk.b_down), &mut mlp_out);
            hooks.run(&ctx(HookPoint::MlpOut(l)), &mut mlp_out)?;
            if parallel {
                // transformers adds mlp + attn first, then the residual.
                add_assign(&mut mlp_out, &attn_out, d);
            }
            add_assign(&mut x, &mlp_out, d);
            hooks.run(&ctx(HookPoint::ResidPost(l)), &mut x)?;
        }
        cache.advance(seq, n_blocks == c.n_layers);
        if n_blocks < c.n_layers {
            return Ok(Vec::new());
        }
        layer_norm(&x, &self.ln_f.0, &self.ln_f.1, c.norm_eps, &mut h);
        hooks.run(&ctx(HookPoint::FinalNorm), &mut h)?;
        Ok(crate::project_logits(&h, batch, seq, d, (&self.unembed, self.unembed_bf16.as_ref()), c.vocab_size, logits))
    }
}

/// Tensor names as transformers (`gpt_neox.layers.L.attention.query_key_value`) or llama.cpp's converter
/// (`blk.L.attn_qkv`) spell them; each name below is given without its `.weight` / `.bias` suffix.
struct Names {
    gguf: bool,
}

impl Names {
    fn top(&self, what: &str) -> &'static str {
        match (what, self.gguf) {
            ("embed", false) => "gpt_neox.embed_in.weight",
            ("embed", true) => "token_embd.weight",
            ("unembed", false) => "embed_out.weight",
            ("unembed", true) => "output.weight",
            ("final_norm", false) => "gpt_neox.final_layer_norm",
            _ => "output_norm",
        }
    }

    fn block(&self, l: usize, what: &str) -> String {
        if !self.gguf {
            return format!("gpt_neox.layers.{l}.{what}");
        }
        let gguf = match what {
            "input_layernorm" => "attn_norm",
            "attention.query_key_value" => "attn_qkv",
            "attention.dense" => "attn_output",
            "post_attention_layernorm" => "ffn_norm",
            "mlp.dense_h_to_4h" => "ffn_up",
            _ => "ffn_down",
        };
        format!("blk.{l}.{gguf}")
    }
}

fn layer_norm_params(src: &WeightSource, name: &str, d: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok((src.get(&format!("{name}.weight"), &[d])?, src.get(&format!("{name}.bias"), &[d])?))
}

fn load_block(cfg: &ModelConfig, src: &WeightSource, names: &Names, l: usize) -> Result<Block> {
    let (d, ff, hd, nh) = (cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.n_heads);
    let n = |p: &str| names.block(l, p);
    let bias = |p: &str, len: usize| src.get(&format!("{}.bias", n(p)), &[len]);
    let qkv_name = n("attention.query_key_value");
    let mut w = src.get(&format!("{qkv_name}.weight"), &[3 * nh * hd, d])?;
    let mut b = src.get(&format!("{qkv_name}.bias"), &[3 * nh * hd])?;
    if !names.gguf {
        // llama.cpp's converter already stores them as all q, all k, all v
        (w, b) = (heads_to_qkv(&w, nh, hd, d), heads_to_qkv(&b, nh, hd, 1));
    }
    Ok(Block {
        ln1: layer_norm_params(src, &n("input_layernorm"), d)?,
        wqkv: Matrix::from_out_in(&w, 3 * nh * hd, d),
        bqkv: b,
        wo: lin(src, &n("attention.dense"), d, nh * hd)?,
        bo: bias("attention.dense", d)?,
        ln2: layer_norm_params(src, &n("post_attention_layernorm"), d)?,
        w_up: lin(src, &n("mlp.dense_h_to_4h"), ff, d)?,
        b_up: bias("mlp.dense_h_to_4h", ff)?,
        w_down: lin(src, &n("mlp.dense_4h_to_h"), d, ff)?,
        b_down: bias("mlp.dense_4h_to_h", d)?,
    })
}
