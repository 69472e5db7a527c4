//! Hook points named as in TransformerLens, and the hooks that read or rewrite them during a forward pass.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};

use crate::config::ModelConfig;

/// A place in the residual stream, named as TransformerLens names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// `hook_embed`: token embeddings (plus position embeddings for GPT-2).
    Embed,
    /// `blocks.{L}.hook_resid_pre`: the residual stream entering block L.
    ResidPre(usize),
    /// `blocks.{L}.ln1.hook_normalized`: the attention's input, the pre-attention norm's output (gain included:
    /// the activation the attention reads, as transformers' `input_layernorm` returns it).
    Ln1Normalized(usize),
    /// `blocks.{L}.hook_attn_out`: what block L's attention adds to the residual stream.
    AttnOut(usize),
    /// `blocks.{L}.hook_resid_mid`: the residual stream after attention, before the MLP.
    ResidMid(usize),
    /// `blocks.{L}.ln2.hook_normalized`: the MLP's input, the pre-MLP norm's output (gain included: what a
    /// transcoder reads; transformers' `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`).
    Ln2Normalized(usize),
    /// `blocks.{L}.mlp.hook_pre`: the MLP's hidden pre-activation, `[.., d_mlp]` (the gate's, for gated MLPs).
    MlpPre(usize),
    /// `blocks.{L}.mlp.hook_post`: the MLP's hidden activation after the nonlinearity (times the up
    /// projection for gated MLPs), `[.., d_mlp]`: the down projection's input.
    MlpPost(usize),
    /// `blocks.{L}.hook_mlp_out`: what block L's MLP adds.
    MlpOut(usize),
    /// `blocks.{L}.hook_resid_post`: the residual stream leaving block L.
    ResidPost(usize),
    /// `ln_final.hook_normalized`: the final norm's output, the unembedding's input.
    FinalNorm,
}

impl HookPoint {
    /// The block this point belongs to; `None` for the embedding and the final norm.
    pub fn layer(&self) -> Option<usize> {
        match *self {
            HookPoint::Embed | HookPoint::FinalNorm => None,
            HookPoint::ResidPre(l)
            | HookPoint::Ln1Normalized(l)
            | HookPoint::Ln2Normalized(l)
            | HookPoint::MlpPre(l)
            | HookPoint::MlpPost(l)
            | HookPoint::AttnOut(l)
            | HookPoint::ResidMid(l)
            | HookPoint::MlpOut(l)
            | HookPoint::ResidPost(l) => Some(l),
        }
    }

    /// The blocks a pass capturing all of `points` runs, when that does not depend on the model's depth
    /// (`None` when one of them is `ln_final.hook_normalized`): what a partial load
    /// ([`crate::LoadOptions::blocks`]) must hold.
    pub fn blocks_for(points: &[HookPoint]) -> Option<usize> {
        points.iter().try_fold(0, |most, p| (*p != HookPoint::FinalNorm).then(|| most.max(p.blocks_needed(0))))
    }

    /// The number of blocks a forward pass must run to reach this point. `hook_resid_pre` runs at the top
    /// of its own block (the stream it sees equals the previous block's `hook_resid_post`), so it counts it.
    pub fn blocks_needed(&self, n_layers: usize) -> usize {
        match *self {
            HookPoint::Embed => 0,
            HookPoint::FinalNorm => n_layers,
            p => p.layer().map_or(n_layers, |l| l + 1),
        }
    }

    /// The width of one row at this point: `d_mlp` inside the MLP, `d_model` everywhere else.
    pub fn width(&self, d_model: usize, d_mlp: usize) -> usize {
        match self {
            HookPoint::MlpPre(_) | HookPoint::MlpPost(_) => d_mlp,
            _ => d_model,
        }
    }

    /// Refuse a hook point past the model's last block (`n_layers` blocks).
    pub fn check(&self, n_layers: usize) -> Result<()> {
        if let Some(l) = self.layer() {
            if l >= n_layers {
                bail!("hook point '{self}' is out of range: the model has {n_layers} blocks (0..{})", n_layers - 1);
            }
        }
        Ok(())
    }

    /// Every hook point of a model with `n_layers` blocks, in forward order.
    pub fn all(n_layers: usize) -> Vec<HookPoint> {
        let mut v = vec![HookPoint::Embed];
        for l in 0..n_layers {
            v.extend([
                HookPoint::ResidPre(l),
                HookPoint::Ln1Normalized(l),
                HookPoint::AttnOut(l),
                HookPoint::ResidMid(l),
                HookPoint::Ln2Normalized(l),
                HookPoint::MlpPre(l),
                HookPoint::MlpPost(l),
                HookPoint::MlpOut(l),
                HookPoint::ResidPost(l),
            ]);
        }
        v.push(HookPoint::FinalNorm);
        v
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Embed => write!(f, "hook_embed"),
            HookPoint::ResidPre(l) => write!(f, "blocks.{l}.hook_resid_pre"),
            HookPoint::Ln1Normalized(l) => write!(f, "blocks.{l}.ln1.hook_normalized"),
            HookPoint::Ln2Normalized(l) => write!(f, "blocks.{l}.ln2.hook_normalized"),
            HookPoint::MlpPre(l) => write!(f, "blocks.{l}.mlp.hook_pre"),
            HookPoint::MlpPost(l) => write!(f, "blocks.{l}.mlp.hook_post"),
            HookPoint::AttnOut(l) => write!(f, "blocks.{l}.hook_attn_out"),
            HookPoint::ResidMid(l) => write!(f, "blocks.{l}.hook_resid_mid"),
            HookPoint::MlpOut(l) => write!(f, "blocks.{l}.hook_mlp_out"),
            HookPoint::ResidPost(l) => write!(f, "blocks.{l}.hook_resid_post"),
            HookPoint::FinalNorm => write!(f, "ln_final.hook_normalized"),
        }
    }
}

impl FromStr for HookPoint {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        match s {
            "hook_embed" => return Ok(HookPoint::Embed),
            "ln_final.hook_normalized" => return Ok(HookPoint::FinalNorm),
            _ => {}
        }
        let parsed = s.strip_prefix("blocks.").and_then(|rest| {
            let (l, name) = rest.split_once('.')?;
            let l: usize = l.parse().ok()?;
            Some(match name {
                "hook_resid_pre" => HookPoint::ResidPre(l),
                "ln1.hook_normalized" => HookPoint::Ln1Normalized(l),
                "ln2.hook_normalized" => HookPoint::Ln2Normalized(l),
                "mlp.hook_pre" => HookPoint::MlpPre(l),
                "mlp.hook_post" => HookPoint::MlpPost(l),
                "hook_attn_out" => HookPoint::AttnOut(l),
                "hook_resid_mid" => HookPoint::ResidMid(l),
                "hook_mlp_out" => HookPoint::MlpOut(l),
                "hook_resid_post" => HookPoint::ResidPost(l),
                _ => return None,
            })
        });
        parsed.ok_or_else(|| {
            anyhow::anyhow!(
                "unknown hook point '{s}'; expected hook_embed, blocks.L.hook_resid_pre, blocks.L.ln1.hook_normalized, \
                 blocks.L.hook_attn_out, blocks.L.hook_resid_mid, blocks.L.ln2.hook_normalized, \
                 blocks.L.mlp.hook_pre, blocks.L.mlp.hook_post, blocks.L.hook_mlp_out, blocks.L.hook_resid_post \
                 or ln_final.hook_normalized"
            )
        })
    }
}

/// Where a hook's rows sit: `rows = batch * seq`, row `b * seq + t` is token `t` of sequence `b`, whose
/// absolute position is `pos_offset + t` (non-zero while generating with a KV cache). Each row is `width`
/// wide: `d_model`, except inside the MLP (`mlp.hook_pre`, `mlp.hook_post`), where it is `d_mlp`.
#[derive(Debug, Clone, Copy)]
pub struct HookContext {
    /// The hook point being run.
    pub point: HookPoint,
    /// Sequences in the pass.
    pub batch: usize,
    /// Tokens per sequence in this pass.
    pub seq: usize,
    /// Absolute position of the pass's first token (tokens already in the KV cache).
    pub pos_offset: usize,
    /// The model's residual width.
    pub d_model: usize,
    /// Width of each row at this point (`d_model`, or `d_mlp` inside the MLP).
    pub width: usize,
}

impl HookContext {
    pub(crate) fn new(point: HookPoint, batch: usize, seq: usize, pos_offset: usize, cfg: &ModelConfig) -> Self {
        let width = point.width(cfg.d_model, cfg.d_ff);
        Self { point, batch, seq, pos_offset, d_model: cfg.d_model, width }
    }
}

type HookFn<'a> = Box<dyn FnMut(&HookContext, &mut [f32]) -> Result<()> + Send + 'a>;

/// The hooks of one forward pass. Each receives the activation at its point as a mutable
/// `[batch * seq, d_model]` row-major slice: reading it captures, writing it replaces, adds or edits.
#[derive(Default)]
pub struct Hooks<'a> {
    entries: Vec<(HookPoint, HookFn<'a>)>,
}

impl<'a> Hooks<'a> {
    /// No hooks: a plain forward pass.
    pub fn new() -> Self {
        Self::default()
    }

    /// Run `f` on the activation at `point` (several hooks on one point run in the order added).
    pub fn add(
        &mut self,
        point: HookPoint,
        f: impl FnMut(&HookContext, &mut [f32]) -> Result<()> + Send + 'a,
    ) -> &mut Self {
        self.entries.push((point, Box::new(f)));
        self
    }

    /// Add `direction * scale` to every row at `point`.
    pub fn add_vector(&mut self, point: HookPoint, direction: Vec<f32>, scale: f32) -> &mut Self {
        self.add(point, move |ctx, x| {
            if direction.len() != ctx.width {
                bail!("steering vector has {} dims, rows at {} have {}", direction.len(), ctx.point, ctx.width);
            }
            for row in x.chunks_mut(ctx.width) {
                for (v, d) in row.iter_mut().zip(&direction) {
                    *v += scale * d;
                }
            }
            Ok(())
        })
    }

    /// Whether any hook reads or writes `point` (lets a forward skip copying an activation nobody looks at).
    pub fn has(&self, point: HookPoint) -> bool {
        self.entries.iter().any(|(p, _)| *p == point)
    }

    /// Whether no hook was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The points hooks were added at, in the order added (repeats kept).
    pub fn points(&self) -> impl Iterator<Item = HookPoint> + '_ {
        self.entries.iter().map(|(p, _)| *p)
    }

    /// Call the hooks registered at `ctx.point`, if any.
    pub fn run(&mut self, ctx: &HookContext, x: &mut [f32]) -> Result<()> {
        for (p, f) in self.entries.iter_mut() {
            if *p == ctx.point {
                f(ctx, x)?;
            }
        }
        Ok(())
    }

    /// The deepest block any hook needs; used to stop a forward pass early.
    pub fn blocks_needed(&self, n_layers: usize) -> usize {
        self.entries.iter().map(|(p, _)| p.blocks_needed(n_layers)).max().unwrap_or(0)
    }
}

/// Run the hooks at `ctx.point` on the first `ctx.width` columns of each `stride`-wide row of `buf` (the gate
/// half of a fused gate/up product), copying them out and back only when a hook is there.
pub(crate) fn run_on_columns(hooks: &mut Hooks, ctx: &HookContext, buf: &mut [f32], stride: usize) -> Result<()> {
    if !hooks.has(ctx.point) {
        return Ok(());
    }
    let w = ctx.width;
    let mut cols: Vec<f32> = buf.chunks(stride).flat_map(|r| r[..w].iter().copied()).collect();
    hooks.run(ctx, &mut cols)?;
    for (row, c) in buf.chunks_mut(stride).zip(cols.chunks(w)) {
        row[..w].copy_from_slice(c);
    }
    Ok(())
}

/// Activations captured by [`crate::Model::run_with_cache`], each `[batch * seq, width]` (`d_model`, or `d_mlp`
/// at `mlp.hook_pre` / `mlp.hook_post`).
#[derive(Debug, Default)]
pub struct ActivationCache {
    /// Sequences in the pass.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// The model's residual width.
    pub d_model: usize,
    acts: HashMap<HookPoint, Vec<f32>>,
}

impl ActivationCache {
    pub(crate) fn new(batch: usize, seq: usize, d_model: usize, acts: HashMap<HookPoint, Vec<f32>>) -> Self {
        Self { batch, seq, d_model, acts }
    }

    /// The rows captured at `point`, if it was asked for.
    pub fn get(&self, point: &HookPoint) -> Option<&[f32]> {
        self.acts.get(point).map(|v| v.as_slice())
    }

    /// The rows captured at `point`, moved out of the cache.
    pub fn take(&mut self, point: &HookPoint) -> Option<Vec<f32>> {
        self.acts.remove(point)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in HookPoint::all(3) {
            let back: HookPoint = p.to_string().parse().unwrap();
            assert_eq!(back, p);
        }
        assert!("blocks.x.hook_resid_post".parse::<HookPoint>().is_err());
        assert!("blocks.1.hook_nope".parse::<HookPoint>().is_err());
        assert!(HookPoint::ResidPost(30).check(30).is_err());
        assert_eq!(HookPoint::ResidPost(15).blocks_needed(30), 16);
        assert_eq!(HookPoint::ResidPre(15).blocks_needed(30), 16, "its hook runs inside block 15");
        assert_eq!(HookPoint::FinalNorm.blocks_needed(30), 30);
        assert_eq!(HookPoint::MlpPost(3).blocks_needed(30), 4);
        assert_eq!("blocks.2.ln2.hook_normalized".parse::<HookPoint>().unwrap(), HookPoint::Ln2Normalized(2));
        assert_eq!(HookPoint::MlpPre(0).width(64, 256), 256);
        assert_eq!(HookPoint::Ln1Normalized(0).width(64, 256), 64);
    }
}
