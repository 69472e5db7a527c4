//! Interventions on graph nodes, run through the real model (not the linearisation) to check a circuit's claim.
//!
//! Setting feature `f` of layer `L`'s transcoder at position `P` to `v` adds `(v − a_f(x)) · W_dec[f]` to
//! that MLP's output at `P`, where `a_f(x)` is the feature's activation on the input the MLP receives in this
//! pass. The real MLP keeps running (its transcoder's error is kept), attention and norms are recomputed,
//! and downstream features respond: circuit-tracer's intervention on the replacement model with error terms.
//! Ablation is `v = 0`.

use std::str::FromStr;
use std::sync::Mutex;

use anyhow::anyhow;
use saekit_model::{HookPoint, Hooks, Logits, Model};

use crate::error::{bad_input, bail_input, CircuitsError, CircuitsResult};
use crate::replacement::check_set;
use crate::transcoder::TranscoderSet;

/// Set feature `feature` of layer `layer` at position `pos` to `value`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Intervention {
    /// The feature's index in its transcoder.
    pub feature: usize,
    /// The transcoder's layer.
    pub layer: usize,
    /// The prompt position.
    pub pos: usize,
    /// The activation it is set to (0 ablates it).
    pub value: f32,
}

impl FromStr for Intervention {
    type Err = CircuitsError;

    /// `F@L:P` (ablate: value 0) or `F@L:P=V` (clamp).
    fn from_str(s: &str) -> CircuitsResult<Self> {
        let bad = || bad_input!("intervention {s:?}: expected FEATURE@LAYER:POSITION or FEATURE@LAYER:POSITION=VALUE");
        let (node, value) = match s.split_once('=') {
            Some((n, v)) => (n, v.trim().parse::<f32>().map_err(|_| bad())?),
            None => (s, 0.0),
        };
        let (f, rest) = node.trim().split_once('@').ok_or_else(bad)?;
        let (l, p) = rest.split_once(':').ok_or_else(bad)?;
        let num = |x: &str| x.trim().parse::<usize>().map_err(|_| bad());
        if !value.is_finite() {
            bail_input!("intervention {s:?}: the value must be finite");
        }
        Ok(Intervention { feature: num(f)?, layer: num(l)?, pos: num(p)?, value })
    }
}

/// The most likely next tokens after the last position: `(token, probability)`.
pub fn top_tokens(last_logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = last_logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let z: f64 = last_logits.iter().map(|v| ((v - max) as f64).exp()).sum();
    let mut idx: Vec<usize> = (0..last_logits.len()).collect();
    idx.sort_by(|&a, &b| last_logits[b].total_cmp(&last_logits[a]));
    idx.into_iter().take(k).map(|i| (i as u32, (((last_logits[i] - max) as f64).exp() / z) as f32)).collect()
}

/// The last position's logits of the real model on `tokens` with `edits` applied.
pub fn intervene(
    model: &Model,
    set: &TranscoderSet,
    tokens: &[u32],
    edits: &[Intervention],
) -> CircuitsResult<Vec<f32>> {
    check_set(model, set)?;
    let seq = tokens.len();
    for e in edits {
        let t = set.layers.get(e.layer).ok_or_else(|| bad_input!("{e:?}: no transcoder at layer {}", e.layer))?;
        if e.feature >= t.d_sae || e.pos >= seq {
            bail_input!("{e:?}: the transcoder has {} features and the prompt {seq} positions", t.d_sae);
        }
    }
    let inputs: Vec<Mutex<Vec<f32>>> = set.layers.iter().map(|_| Mutex::new(Vec::new())).collect();
    let mut hooks = Hooks::new();
    for (l, t) in set.layers.iter().enumerate() {
        let mine: Vec<Intervention> = edits.iter().copied().filter(|e| e.layer == l).collect();
        if mine.is_empty() {
            continue;
        }
        let inp = &inputs[l];
        hooks.add(t.input_hook, move |_, x| {
            *inp.lock().map_err(|_| anyhow!("hook lock poisoned"))? = x.to_vec();
            Ok(())
        });
        hooks.add(HookPoint::MlpOut(l), move |ctx, out| {
            let x = inp.lock().map_err(|_| anyhow!("hook lock poisoned"))?;
            let d = ctx.width;
            for e in &mine {
                let row = &x[e.pos * t.d_in..][..t.d_in];
                let now = t.encode(row)[e.feature];
                let delta = e.value - now;
                let dec = &t.w_dec[e.feature * t.d_out..][..t.d_out];
                out[e.pos * d..][..d].iter_mut().zip(dec).for_each(|(o, w)| *o += delta * w);
            }
            Ok(())
        });
    }
    Ok(model.forward(tokens, 1, &mut model.new_cache(1), &mut hooks, Logits::Last)?)
}
