//! Elementwise functions of the forward pass over whole slices: `exp` (softmax), SiLU (SwiGLU),
//! tanh-GELU (GeGLU, GPT-2's `gelu_new`) and the exact erf GELU (Pythia).
//!
//! libm's `expf` is one call per value; over a forward pass it was 11% of the time (SiLU on every
//! MLP activation, softmax on every attention score), and libm's `tanhf` 22% of a Gemma-2-2B forward.
//! These loops are branch-free, so the compiler turns them into AVX-512 or AVX2 code, picked at run
//! time. Every path does the same additions and
//! multiplications in the same order (no fused multiply-add), so a result does not depend on which
//! one ran.

/// `e^x` rounded to f32 within 2 ulp for every finite `x`: 0 below -87.34 (where `e^x` leaves the
/// normal range) and `+inf` above 88.72; NaN stays NaN.
///
/// Cephes' `expf`: `x = n ln 2 + r` with `|r| <= ln 2 / 2` (`ln 2` split in two so `r` is exact),
/// `e^r` by a degree-6 polynomial, `2^n` written into the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MIN: f32 = -87.336_54;
    const MAX: f32 = 88.722_83;
    let xc = x.clamp(MIN, MAX);
    let n = (xc * std::f32::consts::LOG2_E).round_ties_even();
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let er = p * (r * r) + r + 1.0;
    // 2^e for an integer-valued e in [-126, 127]: adding 2^23 + 127 leaves e + 127 in the low mantissa
    // bits, which the shift moves into the exponent (an `as i32` would not vectorize: it saturates).
    // At x = MAX, n = 128, so 2^n is applied in two halves.
    let half = (n * 0.5).round_ties_even();
    let scale = |e: f32| f32::from_bits((e + (8_388_608.0 + 127.0)).to_bits() << 23);
    let y = er * scale(half) * scale(n - half);
    if x < MIN {
        0.0
    } else if x > MAX {
        f32::INFINITY
    } else {
        y
    }
}

/// `x · sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `out[i] = silu(gate[i]) · up[i]` (SwiGLU).
///
/// # Panics
/// If the three slices differ in length.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len(), "silu_mul: lengths differ");
    crate::dispatch_simd!(silu_mul_body(gate, up, out))
}

/// `x · Φ(x)` by the tanh approximation (PyTorch's `gelu(approximate="tanh")`), written as
/// `x · sigmoid(2u)` with `u = sqrt(2/π)(x + 0.044715x³)`: `(1 + tanh u) / 2 = sigmoid(2u)` exactly, and
/// the sigmoid form needs one `exp` and loses nothing to cancellation where `tanh u` nears -1.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let u = C * (x + 0.044715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// The exact GELU, `x · Φ(x) = x (1 + erf(x/√2)) / 2` (PyTorch's default `gelu`), branch-free: for
/// `|x/√2| < 1` Cephes' `erff` polynomial; beyond, Cephes' `erfcf` (`e^-z² / z · P(1/z²)`, one
/// polynomial below 2 and another above), so the left tail `x · erfc(|z|) / 2` keeps its relative
/// accuracy where `1 + erf` would cancel.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    const ERF: [f32; 7] = [
        7.853_861_4e-5,
        -8.010_193_6e-4,
        5.188_327_7e-3,
        -2.685_381_2e-2,
        1.128_358_5e-1,
        -3.761_262_6e-1,
        std::f32::consts::FRAC_2_SQRT_PI, // Cephes: 1.128379165726710
    ];
    const ERFC_1_2: [f32; 9] = [
        2.326_82e-2,
        -1.387_039_4e-1,
        3.687_424_7e-1,
        -5.824_733e-1,
        6.210_004_6e-1,
        -4.944_515_3e-1,
        3.404_88e-1,
        -2.741_127e-1,
        5.638_259_4e-1,
    ];
    const ERFC_2_UP: [f32; 8] = [
        -1.047_766_4e1,
        1.297_72e1,
        -7.495_518_7,
        2.921_019,
        -1.015_265_3,
        4.218_463_4e-1,
        -2.820_767_4e-1,
        5.641_895e-1,
    ];
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let near = 1.0 + z * horner(&ERF, z * z);
    let (q, y) = (1.0 / a, 1.0 / (a * a));
    // Every branch computed, then selected: the loop stays branch-free, so it vectorises.
    let (below_2, above_2) = (horner(&ERFC_1_2, y), horner(&ERFC_2_UP, y));
    let erfc = exp(-(a * a)) * q * if a < 2.0 { below_2 } else { above_2 };
    let far = if z > 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * if a < 1.0 { near } else { far }
}

/// `c[0] y^(N-1) + ... + c[N-1]`.
#[inline(always)]
fn horner<const N: usize>(c: &[f32; N], y: f32) -> f32 {
    let mut p = c[0];
    for &c in &c[1..] {
        p = p * y + c;
    }
    p
}

/// `v[i] = gelu_erf(v[i])`, in place.
pub fn gelu_erf_in_place(v: &mut [f32]) {
    crate::dispatch_simd!(gelu_erf_body(v))
}

/// `v[i] = gelu_tanh(v[i])`, in place.
pub fn gelu_tanh_in_place(v: &mut [f32]) {
    crate::dispatch_simd!(gelu_tanh_body(v))
}

/// `out[i] = gelu_tanh(gate[i]) · up[i]` (GeGLU).
///
/// # Panics
/// If the three slices differ in length.
pub fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len(), "gelu_tanh_mul: lengths differ");
    crate::dispatch_simd!(gelu_tanh_mul_body(gate, up, out))
}

/// In-place softmax of one row: `e^(v - max) / sum`, the sum taken in 16 lanes and then across them
/// (the same order on every path).
pub fn softmax(row: &mut [f32]) {
    crate::dispatch_simd!(softmax_body(row))
}

#[inline(always)]
fn softmax_body(row: &mut [f32]) {
    let max = lanes(row, f32::NEG_INFINITY, |a, v| if v > a { v } else { a });
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    let inv = 1.0 / lanes(row, 0.0, |a, v| a + v);
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `Σ x²`, summed in 16 lanes and then across them like [`softmax`]'s sum: one answer on every path.
/// A left-to-right sum would not vectorise: at SmolLM2's width it made RMSNorm ~10% of a bf16 forward.
pub fn sum_squares(x: &[f32]) -> f32 {
    crate::dispatch_simd!(sum_squares_body(x))
}

#[inline(always)]
fn sum_squares_body(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v * v;
        }
    }
    acc.into_iter().chain(rest.iter().map(|v| v * v)).fold(0.0, |s, v| s + v)
}

/// `row` folded by `f` in 16 interleaved lanes, the lanes then folded in order (vectorises, unlike a
/// left-to-right fold, and gives one answer on every path).
#[inline(always)]
fn lanes(row: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = f(*a, v);
        }
    }
    acc.into_iter().chain(rest.iter().copied()).fold(init, &f)
}

#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

#[inline(always)]
fn gelu_erf_body(v: &mut [f32]) {
    // A plain loop, not `for_each`: a closure this large is not inlined, and the loop would then be
    // compiled outside the `#[target_feature]` function, unvectorised.
    for v in v.iter_mut() {
        *v = gelu_erf(*v);
    }
}

#[inline(always)]
fn gelu_tanh_body(v: &mut [f32]) {
    for v in v.iter_mut() {
        *v = gelu_tanh(*v);
    }
}

#[inline(always)]
fn gelu_tanh_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = gelu_tanh(g) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` gate values spread over [-12, 12] and `len` up values in [-1, 1]: every path length of
    /// the vector loops, with values far out in both tails.
    fn gate_and_up(len: usize) -> (Vec<f32>, Vec<f32>) {
        let gate = (0..len).map(|i| (i as f32 * 0.37).sin() * 12.0).collect();
        let up = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
        (gate, up)
    }

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = (f32::from_bits(b32.abs().to_bits() + 1) - b32.abs()) as f64;
        (a as f64 - b).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64_over_the_normal_range() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            worst = worst.max(ulps(exp(x), (x as f64).exp()));
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
    }

    #[test]
    fn exp_saturates_and_keeps_nan() {
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn sum_squares_matches_f64_at_every_length() {
        for len in [0, 1, 15, 16, 17, 576, 1001] {
            let x: Vec<f32> = (0..len).map(|i| ((i * 7919 % 613) as f32 - 306.0) / 97.0).collect();
            let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let got = sum_squares(&x) as f64;
            assert!((got - want).abs() <= 1e-6 * want.max(1e-30), "len {len}: {got} vs {want}");
        }
    }

    #[test]
    fn silu_mul_matches_f64_on_every_path_length() {
        for len in [0, 1, 7, 16, 33, 1000] {
            let (gate, up) = gate_and_up(len);
            let mut out = vec![0f32; len];
            silu_mul(&gate, &up, &mut out);
            for ((&o, &g), &u) in out.iter().zip(&gate).zip(&up) {
                let want = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
                assert!((o as f64 - want).abs() <= 1e-6 * want.abs().max(1e-30), "silu({g})·{u}: {o} vs {want}");
            }
        }
    }

    /// The tanh form PyTorch evaluates, in f64; below x = -5 `1 + tanh u` cancels even in f64, so there
    /// the (identical) sigmoid form is the reference.
    fn gelu_tanh_f64(x: f64) -> f64 {
        let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
        if x > -5.0 {
            0.5 * x * (1.0 + u.tanh())
        } else {
            x / (1.0 + (-2.0 * u).exp())
        }
    }

    #[test]
    fn gelu_tanh_matches_f64() {
        let mut x = -30f32;
        while x < 30.0 {
            let want = gelu_tanh_f64(x as f64);
            let err = (gelu_tanh(x) as f64 - want).abs();
            // `u` takes ~5 roundings in f32 (< 2 ulp), which move e^-2u by up to 2|2u| ulp relative: the
            // function's own conditioning, which PyTorch's f32 tanh form shares. Below x = -10 the sigmoid flushes to 0 (e^-87 is
            // f32's normal limit), where the value is under 2e-37.
            let two_u = (2.0 * 0.797_884_6 * (x + 0.044715 * x * x * x)).abs() as f64;
            let tol = (4.0 + 2.0 * two_u) * f32::EPSILON as f64 * want.abs() + 2e-37;
            assert!(err <= tol, "gelu_tanh({x}) = {} vs {want}", gelu_tanh(x));
            x += 0.000_37;
        }
        assert_eq!(gelu_tanh(0.0), 0.0);
        assert_eq!(gelu_tanh(f32::INFINITY), f32::INFINITY);
        assert_eq!(gelu_tanh(-1e30), 0.0);
        assert!(gelu_tanh(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_erf_matches_f64() {
        let mut x = -30f32;
        let mut worst = 0f64;
        while x < 30.0 {
            let z = x as f64 * std::f64::consts::FRAC_1_SQRT_2;
            // erfc of -z, not 1 + erf(z): the reference must not cancel in the left tail either.
            let want = 0.5 * x as f64 * libm::erfc(-z);
            let err = (gelu_erf(x) as f64 - want).abs();
            // `z²` rounded to f32 moves e^-z² by up to z² ulp relative: the function's own conditioning.
            // Below x = -13 the tail flushes to 0 (e^-z² leaves f32's normal range); the value is < 1e-37.
            let tol = (8.0 + 2.0 * z * z) * f32::EPSILON as f64 * want.abs() + 1e-37;
            assert!(err <= tol, "gelu_erf({x}) = {} vs {want}", gelu_erf(x));
            if want.abs() > 1e-30 {
                worst = worst.max(err / want.abs() / f32::EPSILON as f64);
            }
            x += 0.000_41;
        }
        eprintln!("gelu_erf: worst relative error {worst:.1} eps");
        assert_eq!(gelu_erf(0.0), 0.0);
        assert_eq!(gelu_erf(f32::INFINITY), f32::INFINITY);
        assert!(gelu_erf(f32::NAN).is_nan());
        let mut v = vec![-3.0f32, -0.5, 0.0, 0.7, 1.5, 2.5, 9.0];
        let want: Vec<u32> = v.iter().map(|&x| gelu_erf(x).to_bits()).collect();
        gelu_erf_in_place(&mut v);
        assert_eq!(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want);
    }

    #[test]
    fn gelu_tanh_slices_match_the_scalar_on_every_path_length() {
        for len in [0, 1, 7, 16, 33, 1000] {
            let (gate, up) = gate_and_up(len);
            let mut out = vec![0f32; len];
            gelu_tanh_mul(&gate, &up, &mut out);
            let mut inplace = gate.clone();
            gelu_tanh_in_place(&mut inplace);
            for i in 0..len {
                assert_eq!(out[i].to_bits(), (gelu_tanh(gate[i]) * up[i]).to_bits());
                assert_eq!(inplace[i].to_bits(), gelu_tanh(gate[i]).to_bits());
            }
        }
    }

    #[test]
    fn softmax_matches_f64_at_every_tail_length() {
        for len in [1, 5, 16, 31, 77] {
            let mut row: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin() * 9.0).collect();
            let max = row.iter().copied().fold(f64::NEG_INFINITY, |m, v| m.max(v as f64));
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            softmax(&mut row);
            for (&p, &e) in row.iter().zip(&e) {
                assert!((p as f64 - e / sum).abs() <= 3e-6 * (e / sum), "len {len}: {p} vs {}", e / sum);
            }
        }
    }
}
