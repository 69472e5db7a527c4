//! Hook points named as in TransformerLens, and the hooks that read or rewrite them during a forward pass.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};

/// A place in the residual stream, named as TransformerLens names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// `hook_embed`: token embeddings (plus position embeddings for GPT-2).
    Embed,
    /// `blocks.{L}.hook_resid_pre`: the residual stream entering block L.
    ResidPre(usize),
    /// `blocks.{L}.hook_attn_out`: what block L's attention adds to the residual stream.
    AttnOut(usize),
    /// `blocks.{L}.hook_resid_mid`: the residual stream after attention, before the MLP.
    ResidMid(usize),
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
            | HookPoint::AttnOut(l)
            | HookPoint::ResidMid(l)
            | HookPoint::MlpOut(l)
            | HookPoint::ResidPost(l) => Some(l),
        }
    }

    /// The number of blocks a forward pass must run to reach this point.
    pub fn blocks_needed(&self, n_layers: usize) -> usize {
        match *self {
            HookPoint::Embed | HookPoint::ResidPre(0) => 0,
            HookPoint::ResidPre(l) => l,
            HookPoint::FinalNorm => n_layers,
            p => p.layer().map_or(n_layers, |l| l + 1),
        }
    }

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
                HookPoint::AttnOut(l),
                HookPoint::ResidMid(l),
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
                "hook_attn_out" => HookPoint::AttnOut(l),
                "hook_resid_mid" => HookPoint::ResidMid(l),
                "hook_mlp_out" => HookPoint::MlpOut(l),
                "hook_resid_post" => HookPoint::ResidPost(l),
                _ => return None,
            })
        });
        parsed.ok_or_else(|| {
            anyhow::anyhow!(
                "unknown hook point '{s}'; expected hook_embed, blocks.L.hook_resid_pre, blocks.L.hook_attn_out, \
                 blocks.L.hook_resid_mid, blocks.L.hook_mlp_out, blocks.L.hook_resid_post or ln_final.hook_normalized"
            )
        })
    }
}

/// Where a hook's rows sit: `rows = batch * seq`, row `b * seq + t` is token `t` of sequence `b`, whose
/// absolute position is `pos_offset + t` (non-zero while generating with a KV cache).
#[derive(Debug, Clone, Copy)]
pub struct HookContext {
    pub point: HookPoint,
    pub batch: usize,
    pub seq: usize,
    pub pos_offset: usize,
    pub d_model: usize,
}

type HookFn<'a> = Box<dyn FnMut(&HookContext, &mut [f32]) -> Result<()> + Send + 'a>;

/// The hooks of one forward pass. Each receives the activation at its point as a mutable
/// `[batch * seq, d_model]` row-major slice: reading it captures, writing it replaces, adds or edits.
#[derive(Default)]
pub struct Hooks<'a> {
    entries: Vec<(HookPoint, HookFn<'a>)>,
}

impl<'a> Hooks<'a> {
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
            if direction.len() != ctx.d_model {
                bail!("steering vector has {} dims, the model has d_model {}", direction.len(), ctx.d_model);
            }
            for row in x.chunks_mut(ctx.d_model) {
                for (v, d) in row.iter_mut().zip(&direction) {
                    *v += scale * d;
                }
            }
            Ok(())
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

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

/// Activations captured by [`crate::Model::run_with_cache`], each `[batch * seq, d_model]`.
#[derive(Debug, Default)]
pub struct ActivationCache {
    pub batch: usize,
    pub seq: usize,
    pub d_model: usize,
    acts: HashMap<HookPoint, Vec<f32>>,
}

impl ActivationCache {
    pub(crate) fn new(batch: usize, seq: usize, d_model: usize, acts: HashMap<HookPoint, Vec<f32>>) -> Self {
        Self { batch, seq, d_model, acts }
    }

    pub fn get(&self, point: &HookPoint) -> Option<&[f32]> {
        self.acts.get(point).map(|v| v.as_slice())
    }

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
        assert_eq!(HookPoint::ResidPre(15).blocks_needed(30), 15);
        assert_eq!(HookPoint::FinalNorm.blocks_needed(30), 30);
    }
}
