//! Analytic gradients of every architecture against f64 central finite differences.

use crate::config::{Arch, JumpReluSparsity};
use crate::params::Params;
use crate::sae::{Activation, Sae};
use crate::step::{forward_backward, LossParams, SingleProcess, Workspace};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The SAE's (or transcoder's) parameters in f64 (the reference computations' precision).
pub(crate) struct P64 {
    /// Input width.
    pub d: usize,
    /// Output width (`d` for an SAE).
    pub o: usize,
    pub n: usize,
    /// Subtract b_dec from the input (SAEs; transcoders do not).
    pub apply_b_dec: bool,
    pub params: Params<Vec<f64>>,
}

impl P64 {
    fn from(s: &Sae) -> P64 {
        P64 {
            d: s.d_in,
            o: s.d_out(),
            n: s.d_sae,
            apply_b_dec: s.apply_b_dec_to_input,
            params: s.params.map(|v| v.iter().map(|&a| a as f64).collect()),
        }
    }

    /// b_dec + Σ a·W_dec[j] over `sel` (+ x·W_skipᵀ with `skip`), `[o]`.
    fn decode(&self, sel: &[(usize, f64)], bias: bool, skip: Option<&[f64]>) -> Vec<f64> {
        let o = self.o;
        let mut out = if bias { self.params.b_dec.clone() } else { vec![0.0; o] };
        for &(j, a) in sel {
            for i in 0..o {
                out[i] += a * self.params.w_dec[j * o + i];
            }
        }
        if let Some(x) = skip.filter(|_| !self.params.w_skip.is_empty()) {
            for i in 0..o {
                out[i] += (0..self.d).map(|c| self.params.w_skip[i * self.d + c] * x[c]).sum::<f64>();
            }
        }
        out
    }
    fn get_mut(&mut self, which: usize) -> &mut Vec<f64> {
        self.params.each_mut().into_iter().nth(which).expect("parameter index")
    }
}

fn top(vals: &[(usize, f64)], k: usize) -> Vec<(usize, f64)> {
    let mut v: Vec<(usize, f64)> = vals.iter().copied().filter(|p| p.1 > 0.0).collect();
    v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
    v.truncate(k);
    v
}

/// Σ‖x_t − mean‖² in f64: the FVU denominator.
fn total_variance_f64(x: &[f64], d: usize) -> f64 {
    let rows = x.len() / d;
    let mut mean = vec![0.0; d];
    for r in 0..rows {
        for i in 0..d {
            mean[i] += x[r * d + i] / rows as f64;
        }
    }
    (0..rows * d).map(|q| (x[q] - mean[q % d]).powi(2)).sum()
}

/// The TopK loss in f64 (selection recomputed from scratch) of reconstructing the targets `y`
/// (`x` for an SAE) from the inputs `x`. `det` supplies the parameters of the detached AuxK target
/// y − ŷ.
pub(crate) fn loss_topk_ref(p: &P64, det: &P64, x: &[f32], y: &[f32], dead: &[bool], lp: &LossParams) -> f64 {
    let (d, o) = (p.d, p.o);
    let rows = x.len() / d;
    let x: Vec<f64> = x.iter().map(|&a| a as f64).collect();
    let y: Vec<f64> = y.iter().map(|&a| a as f64).collect();
    let tv = total_variance_f64(&y, o);
    let n_dead = dead.iter().filter(|&&b| b).count();
    let ka_full = o / 2;
    let use_aux = lp.auxk_alpha > 0.0 && n_dead > 0;
    let ka = ka_full.min(n_dead);
    let scale = (n_dead as f64 / ka_full as f64).min(1.0);
    let (mut l, mut laux, mut lm) = (0.0, 0.0, 0.0);
    for r in 0..rows {
        let (xr, yr) = (&x[r * d..(r + 1) * d], &y[r * o..(r + 1) * o]);
        let pre: Vec<(usize, f64)> = pre_f64(p, xr).into_iter().enumerate().collect();
        let xh = p.decode(&top(&pre, lp.k), true, Some(xr));
        let pre_d: Vec<(usize, f64)> = pre_f64(det, xr).into_iter().enumerate().collect();
        let xh_det = det.decode(&top(&pre_d, lp.k), true, Some(xr));
        l += (0..o).map(|i| (xh[i] - yr[i]).powi(2)).sum::<f64>();
        if use_aux {
            let dp: Vec<(usize, f64)> = pre.iter().copied().filter(|q| dead[q.0]).collect();
            let e = p.decode(&top(&dp, ka), false, None);
            laux += (0..o).map(|i| (e[i] - (yr[i] - xh_det[i])).powi(2)).sum::<f64>();
        }
        if lp.multi_topk {
            let xm = p.decode(&top(&pre, 4 * lp.k), true, Some(xr));
            lm += (0..o).map(|i| (xm[i] - yr[i]).powi(2)).sum::<f64>();
        }
    }
    l / tv + lp.auxk_alpha as f64 * scale * laux / tv + lm / tv / 8.0
}

/// Dense analytic gradient of parameter group `which` from the compact kernel output.
fn analytic(s: &Sae, ws: &Workspace, which: usize) -> Vec<f64> {
    let g = &ws.grads;
    let (d, o) = (s.d_in, s.d_out());
    match which {
        0..=2 => {
            let per = [d, 1, o][which];
            let mut out = vec![0.0; s.d_sae * per];
            for (u, &j) in g.touched.touched.iter().enumerate() {
                let j = j as usize;
                for i in 0..per {
                    out[j * per + i] = match which {
                        0 => g.params.w_enc[u * d + i],
                        2 => g.params.w_dec[u * o + i],
                        _ => g.params.b_enc[u],
                    } as f64;
                }
            }
            out
        }
        3 => g.params.b_dec.iter().map(|&v| v as f64).collect(),
        4 => g.params.threshold.iter().map(|&v| v as f64).collect(),
        _ => g.params.w_skip.iter().map(|&v| v as f64).collect(),
    }
}

pub(crate) fn check_grads(
    sae: &Sae,
    x: &[f32],
    since: &[u64],
    lp: &LossParams,
    groups: &[usize],
    loss_ref: &dyn Fn(&P64) -> f64,
) {
    check_grads_to(sae, x, x, since, lp, groups, loss_ref)
}

/// [`check_grads`] for a transcoder reconstructing `y` from `x`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_grads_to(
    sae: &Sae,
    x: &[f32],
    y: &[f32],
    since: &[u64],
    lp: &LossParams,
    groups: &[usize],
    loss_ref: &dyn Fn(&P64) -> f64,
) {
    let mut ws = Workspace::default();
    forward_backward(sae, &mut ws, x, y, since, lp, &SingleProcess).unwrap();
    let base = P64::from(sae);
    let h = 1e-5;
    for &which in groups {
        let ga = analytic(sae, &ws, which);
        let mut p = P64::from(sae);
        let len = p.get_mut(which).len();
        let mut worst = 0.0f64;
        let scale = ga.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3);
        for q in 0..len {
            let v0 = base_get(&base, which, q);
            p.get_mut(which)[q] = v0 + h;
            let lp_ = loss_ref(&p);
            p.get_mut(which)[q] = v0 - h;
            let lm_ = loss_ref(&p);
            p.get_mut(which)[q] = v0;
            let fd = (lp_ - lm_) / (2.0 * h);
            let err = (fd - ga[q]).abs() / scale;
            worst = worst.max(err);
            assert!(err < 2e-3, "param group {which} coord {q}: analytic {} vs fd {fd} (scale {scale})", ga[q]);
        }
        assert!(ga.iter().any(|v| *v != 0.0), "group {which} has an all-zero gradient: test is vacuous");
        eprintln!("group {which}: worst relative error {worst:.2e}");
    }
}

fn base_get(p: &P64, which: usize, q: usize) -> f64 {
    p.params.each()[which].1[q]
}

pub(crate) fn tiny(act: Activation, seed: u64) -> (Sae, Vec<f32>) {
    let (d, n, rows) = (8, 24, 10);
    let mut s = Sae::init(d, n, act, 1.0, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for v in s.params.b_enc.iter_mut() {
        *v = (rng.gen::<f32>() - 0.5) * 0.3;
    }
    for v in s.params.b_dec.iter_mut() {
        *v = (rng.gen::<f32>() - 0.5) * 0.3;
    }
    for v in s.params.w_enc.iter_mut() {
        *v += (rng.gen::<f32>() - 0.5) * 0.3;
    }
    let x: Vec<f32> = (0..rows * d).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
    (s, x)
}

pub(crate) fn lp(arch: Arch, k: usize) -> LossParams {
    LossParams {
        arch,
        k,
        auxk_alpha: 0.0,
        multi_topk: false,
        sparsity_coef: 0.0,
        jumprelu_bandwidth: 0.05,
        jumprelu_sparsity: JumpReluSparsity::Step,
        jumprelu_tanh_scale: 4.0,
        target_l0: 0.0,
        pre_act_loss_coef: 0.0,
        jumprelu_ste_to_input: false,
        dead_tokens: 100,
        relu_sparse_below: 0.0,
        latent_offset: 0,
        precision: saekit_kernels::Precision::F32,
    }
}

#[test]
fn topk_gradients_match_finite_differences() {
    let (s, x) = tiny(Activation::TopK { k: 3 }, 7);
    let since = vec![0u64; s.d_sae];
    let l = lp(Arch::TopK, 3);
    check_grads(&s, &x, &since, &l, &[0, 1, 2, 3], &|p| loss_topk_ref(p, &P64::from(&s), &x, &x, &[false; 24], &l));
}

#[test]
fn topk_auxk_and_multi_topk_gradients_match_finite_differences() {
    let (s, x) = tiny(Activation::TopK { k: 2 }, 11);
    // 6 dead latents > k_aux = d_in/2 = 4: scale 1, k_aux 4
    let since: Vec<u64> = (0..s.d_sae).map(|j| if j % 4 == 1 { 1000 } else { 0 }).collect();
    let dead: Vec<bool> = since.iter().map(|&t| t >= 100).collect();
    let mut l = lp(Arch::TopK, 2);
    l.auxk_alpha = 1.0 / 32.0;
    l.multi_topk = true;
    check_grads(&s, &x, &since, &l, &[0, 1, 2, 3], &|p| loss_topk_ref(p, &P64::from(&s), &x, &x, &dead, &l));
    // fewer dead latents than k_aux: scale n_dead / k_aux
    let since: Vec<u64> = (0..s.d_sae).map(|j| if j % 8 == 3 { 1000 } else { 0 }).collect();
    let dead: Vec<bool> = since.iter().map(|&t| t >= 100).collect();
    l.multi_topk = false;
    l.auxk_alpha = 0.5;
    check_grads(&s, &x, &since, &l, &[0, 1, 2, 3], &|p| loss_topk_ref(p, &P64::from(&s), &x, &x, &dead, &l));
}

/// Sparsity penalty of the dense architectures.
#[derive(Clone, Copy)]
enum Pen {
    /// ReLU + Σ a‖W_dec‖
    Relu,
    /// JumpReLU + L0
    Step,
    /// JumpReLU + Σ tanh(c·a‖W_dec‖)
    Tanh(f64),
    /// JumpReLU + 2/L0*·(L0 − L0*)²
    Quadratic(f64),
}

/// Pre-activations of one row in f64.
fn pre_f64(p: &P64, xr: &[f64]) -> Vec<f64> {
    let shift = |i: usize| if p.apply_b_dec { p.params.b_dec[i] } else { 0.0 };
    (0..p.n)
        .map(|j| (0..p.d).map(|i| (xr[i] - shift(i)) * p.params.w_enc[j * p.d + i]).sum::<f64>() + p.params.b_enc[j])
        .collect()
}

fn dec_norms(p: &P64) -> Vec<f64> {
    (0..p.n).map(|j| p.params.w_dec[j * p.o..(j + 1) * p.o].iter().map(|v| v * v).sum::<f64>().sqrt()).collect()
}

/// ReLU / JumpReLU loss in f64: mean_t ‖x − x̂‖² + coef · mean_t penalty
/// + pa · mean_t Σ_{dead j} ReLU(θ_j − pre_j)‖W_dec,j‖.
fn loss_dense_ref(p: &P64, x: &[f32], coef: f64, pen: Pen, pa: f64, dead: &[bool]) -> f64 {
    loss_dense_ref_to(p, x, x, coef, pen, pa, dead)
}

/// [`loss_dense_ref`] for a transcoder reconstructing `y` from `x`.
fn loss_dense_ref_to(p: &P64, x: &[f32], y: &[f32], coef: f64, pen: Pen, pa: f64, dead: &[bool]) -> f64 {
    let (d, o, n) = (p.d, p.o, p.n);
    let rows = x.len() / d;
    let norms = dec_norms(p);
    let mut l = 0.0;
    for r in 0..rows {
        let xr: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
        let yr: Vec<f64> = y[r * o..(r + 1) * o].iter().map(|&v| v as f64).collect();
        let pre = pre_f64(p, &xr);
        let (mut pen_sum, mut l0) = (0.0, 0.0);
        let mut sel = Vec::new();
        for j in 0..n {
            let v = pre[j];
            let a = match pen {
                Pen::Relu => v.max(0.0),
                _ if v > p.params.threshold[j] => v,
                _ => 0.0,
            };
            if a != 0.0 {
                l0 += 1.0;
                sel.push((j, a));
            }
            pen_sum += match pen {
                Pen::Relu => a * norms[j],
                Pen::Tanh(c) => (c * a * norms[j]).tanh(),
                _ => 0.0,
            };
            if dead[j] {
                l += pa * (p.params.threshold[j] - v).max(0.0) * norms[j];
            }
        }
        pen_sum += match pen {
            Pen::Step => l0,
            Pen::Quadratic(t) => 2.0 / t * (l0 - t).powi(2),
            _ => 0.0,
        };
        let xh = p.decode(&sel, true, Some(&xr));
        l += (0..o).map(|i| (xh[i] - yr[i]).powi(2)).sum::<f64>() + coef * pen_sum;
    }
    l / rows as f64
}

/// The threshold gradient by its definition (SAELens' JumpReLU and Step straight-through estimators
/// with the rectangle kernel, plus the exact derivative of the pre-activation loss), in f64.
fn threshold_grad_ref(p: &P64, x: &[f32], coef: f64, pen: Pen, pa: f64, dead: &[bool], eps: f64) -> Vec<f64> {
    let (d, n) = (p.d, p.n);
    let rows = x.len() / d;
    let (b, norms) = (rows as f64, dec_norms(p));
    let mut want = vec![0.0f64; n];
    for r in 0..rows {
        let xr: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
        let pre = pre_f64(p, &xr);
        let mut xh = p.params.b_dec.clone();
        let mut l0 = 0.0;
        for j in 0..n {
            if pre[j] > p.params.threshold[j] {
                l0 += 1.0;
                for i in 0..d {
                    xh[i] += pre[j] * p.params.w_dec[j * d + i];
                }
            }
        }
        let w_l0 = match pen {
            Pen::Step => coef / b,
            Pen::Quadratic(t) => coef / b * 4.0 / t * (l0 - t),
            _ => 0.0,
        };
        for j in 0..n {
            let a = if pre[j] > p.params.threshold[j] { pre[j] } else { 0.0 };
            // dL/da: reconstruction, plus the tanh penalty's (non-zero even at a = 0)
            let mut da: f64 = (0..d).map(|i| 2.0 * (xh[i] - xr[i]) / b * p.params.w_dec[j * d + i]).sum();
            if let Pen::Tanh(c) = pen {
                da += coef / b * c * norms[j] * (1.0 - (c * a * norms[j]).tanh().powi(2));
            }
            if ((pre[j] - p.params.threshold[j]) / eps).abs() < 0.5 {
                want[j] -= (p.params.threshold[j] / eps) * da + w_l0 / eps;
            }
            if dead[j] && p.params.threshold[j] > pre[j] {
                want[j] += pa / b * norms[j];
            }
        }
    }
    want
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert!(want.iter().any(|v| *v != 0.0), "{what}: all zero, test is vacuous");
    for j in 0..want.len() {
        assert!(
            (got[j] as f64 - want[j]).abs() < 1e-4 * (1.0 + want[j].abs()),
            "{what} {j}: {} vs {}",
            got[j],
            want[j]
        );
    }
}

#[test]
fn relu_l1_gradients_match_finite_differences() {
    let (s, x) = tiny(Activation::Relu, 5);
    let since = vec![0u64; s.d_sae];
    let mut l = lp(Arch::Relu, 0);
    l.sparsity_coef = 0.7;
    let none = vec![false; s.d_sae];
    check_grads(&s, &x, &since, &l, &[0, 1, 2, 3], &|p| loss_dense_ref(p, &x, 0.7, Pen::Relu, 0.0, &none));
}

#[test]
fn sparse_relu_path_matches_finite_differences_and_the_dense_path() {
    let (s, x) = tiny(Activation::Relu, 5);
    let since = vec![0u64; s.d_sae];
    let none = vec![false; s.d_sae];
    let mut l = lp(Arch::Relu, 0);
    l.sparsity_coef = 0.7;
    l.relu_sparse_below = 1.0; // every batch below: the sparse path
    check_grads(&s, &x, &since, &l, &[0, 1, 2, 3], &|p| loss_dense_ref(p, &x, 0.7, Pen::Relu, 0.0, &none));
    let mut sparse = Workspace::default();
    let a = forward_backward(&s, &mut sparse, &x, &x, &since, &l, &SingleProcess).unwrap();
    assert!(!sparse.grads.touched.entries.is_empty(), "the sparse path ran (latent-major entries built)");
    l.relu_sparse_below = 0.0;
    let mut dense = Workspace::default();
    let b = forward_backward(&s, &mut dense, &x, &x, &since, &l, &SingleProcess).unwrap();
    assert!(dense.grads.touched.entries.is_empty(), "the dense path ran");
    assert!((a.loss - b.loss).abs() < 1e-5 * b.loss && (a.l0 - b.l0).abs() < 1e-12, "{a:?} vs {b:?}");
    assert_eq!(sparse.fires[..s.d_sae], dense.fires[..s.d_sae]);
}

/// A JumpReLU SAE whose thresholds sit where some pre-activations fall inside the kernel window.
fn tiny_jumprelu(seed: u64) -> (Sae, Vec<f32>) {
    let (mut s, x) = tiny(Activation::JumpRelu, seed);
    for (j, t) in s.params.threshold.iter_mut().enumerate() {
        *t = 0.02 + 0.01 * (j % 5) as f32;
    }
    (s, x)
}

#[test]
fn jumprelu_step_gradients_match_finite_differences_and_the_estimator() {
    let (s, x) = tiny_jumprelu(9);
    let since = vec![0u64; s.d_sae];
    let none = vec![false; s.d_sae];
    let mut l = lp(Arch::JumpRelu, 0);
    l.sparsity_coef = 0.3; // the L0 term is piecewise constant in the weights
    check_grads(&s, &x, &since, &l, &[0, 1, 2, 3], &|p| loss_dense_ref(p, &x, 0.3, Pen::Step, 0.0, &none));
    let mut ws = Workspace::default();
    forward_backward(&s, &mut ws, &x, &x, &since, &l, &SingleProcess).unwrap();
    let want = threshold_grad_ref(&P64::from(&s), &x, 0.3, Pen::Step, 0.0, &none, 0.05);
    assert_close(&ws.grads.params.threshold, &want, "threshold (step)");

    // Gemma Scope 2's quadratic penalty around a target L0
    l.jumprelu_sparsity = JumpReluSparsity::Quadratic;
    l.target_l0 = 5.0;
    let mut ws = Workspace::default();
    forward_backward(&s, &mut ws, &x, &x, &since, &l, &SingleProcess).unwrap();
    let want = threshold_grad_ref(&P64::from(&s), &x, 0.3, Pen::Quadratic(5.0), 0.0, &none, 0.05);
    assert_close(&ws.grads.params.threshold, &want, "threshold (quadratic)");
}

#[test]
fn jumprelu_tanh_and_pre_act_gradients_match_finite_differences_and_the_estimator() {
    let (s, x) = tiny_jumprelu(21);
    // a third of the latents dead, so the pre-activation loss acts
    let since: Vec<u64> = (0..s.d_sae).map(|j| if j % 3 == 0 { 1000 } else { 0 }).collect();
    let dead: Vec<bool> = since.iter().map(|&t| t >= 100).collect();
    let mut l = lp(Arch::JumpRelu, 0);
    l.sparsity_coef = 0.4;
    l.jumprelu_sparsity = JumpReluSparsity::Tanh;
    l.jumprelu_tanh_scale = 4.0;
    l.pre_act_loss_coef = 0.2;
    let pen = Pen::Tanh(4.0);
    check_grads(&s, &x, &since, &l, &[0, 1, 2, 3], &|p| loss_dense_ref(p, &x, 0.4, pen, 0.2, &dead));
    let mut ws = Workspace::default();
    let st = forward_backward(&s, &mut ws, &x, &x, &since, &l, &SingleProcess).unwrap();
    assert!(st.pre_act_loss > 0.0 && st.n_dead == 8, "{st:?}");
    let want = threshold_grad_ref(&P64::from(&s), &x, 0.4, pen, 0.2, &dead, 0.05);
    assert_close(&ws.grads.params.threshold, &want, "threshold (tanh + pre-act)");
    let total = loss_dense_ref(&P64::from(&s), &x, 0.4, pen, 0.2, &dead);
    assert!((st.loss - total).abs() < 1e-4 * total, "reported loss {} vs f64 {total}", st.loss);
}

#[test]
fn jumprelu_ste_to_input_moves_the_estimator_onto_the_pre_activations() {
    // The estimators depend on pre − θ only, so what θ receives, the pre-activations receive negated:
    // with ste_to_input, Σ_t dL/dpre (= the b_enc gradient) gains exactly −(θ gradient).
    let (s, x) = tiny_jumprelu(9);
    let since = vec![0u64; s.d_sae];
    let mut l = lp(Arch::JumpRelu, 0);
    l.sparsity_coef = 0.3;
    let mut plain = Workspace::default();
    forward_backward(&s, &mut plain, &x, &x, &since, &l, &SingleProcess).unwrap();
    l.jumprelu_ste_to_input = true;
    let mut ste = Workspace::default();
    forward_backward(&s, &mut ste, &x, &x, &since, &l, &SingleProcess).unwrap();
    let (p, q) = (analytic(&s, &plain, 1), analytic(&s, &ste, 1));
    let want: Vec<f64> = (0..s.d_sae).map(|j| q[j] - p[j]).collect();
    let got: Vec<f32> = plain.grads.params.threshold.iter().map(|v| -v).collect();
    assert_close(&got, &want, "b_enc gain");
}

/// BatchTopK loss in f64: keep the k·rows largest positive pre-activations of the whole batch.
fn loss_batchtopk_ref(p: &P64, x: &[f32], k: usize) -> f64 {
    let d = p.d;
    let rows = x.len() / d;
    let x: Vec<f64> = x.iter().map(|&a| a as f64).collect();
    let tv = total_variance_f64(&x, d);
    let mut all: Vec<(usize, usize, f64)> = Vec::new();
    for r in 0..rows {
        for (j, v) in pre_f64(p, &x[r * d..(r + 1) * d]).into_iter().enumerate() {
            if v > 0.0 {
                all.push((r, j, v));
            }
        }
    }
    all.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap());
    all.truncate(k * rows);
    let mut xh: Vec<f64> = (0..rows * d).map(|q| p.params.b_dec[q % d]).collect();
    for (r, j, a) in all {
        for i in 0..d {
            xh[r * d + i] += a * p.params.w_dec[j * d + i];
        }
    }
    (0..rows * d).map(|q| (xh[q] - x[q]).powi(2)).sum::<f64>() / tv
}

#[test]
fn batchtopk_gradients_match_finite_differences() {
    // k = 2 with 24 latents: 4k = 8 candidates per row, so uneven rows exercise the exact re-scan
    let (s, x) = tiny(Activation::JumpRelu, 13);
    let since = vec![0u64; s.d_sae];
    let l = lp(Arch::BatchTopK, 2);
    check_grads(&s, &x, &since, &l, &[0, 1, 2, 3], &|p| loss_batchtopk_ref(p, &x, 2));
    let l = lp(Arch::BatchTopK, 7);
    check_grads(&s, &x, &since, &l, &[0, 2], &|p| loss_batchtopk_ref(p, &x, 7));
}

/// A transcoder from 8 to 6 columns with 24 latents, a random skip connection when `skip`, and
/// targets that are not a function the transcoder could know (random rows).
fn tiny_transcoder(act: Activation, seed: u64, skip: bool) -> (Sae, Vec<f32>, Vec<f32>) {
    let (d, o, n, rows) = (8, 6, 24, 10);
    let mut s = Sae::init_transcoder(d, o, n, act, 1.0, seed, skip);
    s.metadata.hook_name_out = "blocks.0.hook_mlp_out".into();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    let mut jitter = |v: &mut [f32], amp: f32| v.iter_mut().for_each(|v| *v += (rng.gen::<f32>() - 0.5) * amp);
    jitter(&mut s.params.b_enc, 0.3);
    jitter(&mut s.params.b_dec, 0.3);
    jitter(&mut s.params.w_enc, 0.3);
    jitter(&mut s.params.w_skip, 0.2);
    let x: Vec<f32> = (0..rows * d).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
    let y: Vec<f32> = (0..rows * o).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
    (s, x, y)
}

#[test]
fn transcoder_topk_gradients_with_skip_auxk_and_multi_topk_match_finite_differences() {
    let (s, x, y) = tiny_transcoder(Activation::TopK { k: 2 }, 31, true);
    assert!(!s.apply_b_dec_to_input && s.params.w_skip.len() == 6 * 8);
    // 6 dead latents > k_aux = d_out/2 = 3: scale 1
    let since: Vec<u64> = (0..s.d_sae).map(|j| if j % 4 == 1 { 1000 } else { 0 }).collect();
    let dead: Vec<bool> = since.iter().map(|&t| t >= 100).collect();
    let mut l = lp(Arch::TopK, 2);
    l.auxk_alpha = 1.0 / 32.0;
    l.multi_topk = true;
    let det = P64::from(&s);
    check_grads_to(&s, &x, &y, &since, &l, &[0, 1, 2, 3, 5], &|p| loss_topk_ref(p, &det, &x, &y, &dead, &l));
    // the reported FVU is against the targets, recomputed here in f64
    let mut ws = Workspace::default();
    let st = forward_backward(&s, &mut ws, &x, &y, &since, &lp(Arch::TopK, 2), &SingleProcess).unwrap();
    let want = loss_topk_ref(&det, &det, &x, &y, &dead, &lp(Arch::TopK, 2));
    assert!((st.fvu - want).abs() < 1e-5 * want, "fvu {} vs f64 {want}", st.fvu);
    // without a skip connection there is no W_skip gradient
    let (s, x, y) = tiny_transcoder(Activation::TopK { k: 3 }, 32, false);
    let l = lp(Arch::TopK, 3);
    let none = vec![false; s.d_sae];
    check_grads_to(&s, &x, &y, &[0; 24], &l, &[0, 1, 2, 3], &|p| loss_topk_ref(p, p, &x, &y, &none, &l));
    let mut ws = Workspace::default();
    forward_backward(&s, &mut ws, &x, &y, &[0; 24], &l, &SingleProcess).unwrap();
    assert!(ws.grads.params.w_skip.is_empty());
}

#[test]
fn transcoder_relu_and_jumprelu_gradients_with_skip_match_finite_differences() {
    let (s, x, y) = tiny_transcoder(Activation::Relu, 33, true);
    let none = vec![false; s.d_sae];
    let mut l = lp(Arch::Relu, 0);
    l.sparsity_coef = 0.7;
    let f = |p: &P64| loss_dense_ref_to(p, &x, &y, 0.7, Pen::Relu, 0.0, &none);
    check_grads_to(&s, &x, &y, &[0; 24], &l, &[0, 1, 2, 3, 5], &f);
    l.relu_sparse_below = 1.0; // the sparse path
    check_grads_to(&s, &x, &y, &[0; 24], &l, &[0, 1, 2, 3, 5], &f);

    let (mut s, x, y) = tiny_transcoder(Activation::JumpRelu, 34, true);
    for (j, t) in s.params.threshold.iter_mut().enumerate() {
        *t = 0.02 + 0.01 * (j % 5) as f32;
    }
    let mut l = lp(Arch::JumpRelu, 0);
    l.sparsity_coef = 0.3;
    let f = |p: &P64| loss_dense_ref_to(p, &x, &y, 0.3, Pen::Step, 0.0, &none);
    check_grads_to(&s, &x, &y, &[0; 24], &l, &[0, 1, 2, 3, 5], &f);
}
