//! The few dense kernels a forward pass needs, over row-major f32 slices.
//!
//! Weights are stored transposed at load time (`[d_in, d_out]`) so every linear layer is one
//! `gemm` call with contiguous operands: that is what keeps the forward pass near the machine's GEMM rate.
//!
//! A weight may also carry a bf16 copy ([`Matrix::set_precision`]); [`linear`] then runs it through
//! saekit-kernels (bf16 products, f32 accumulation) instead of the f32 GEMM.

use std::borrow::Cow;

use rayon::prelude::*;
use saekit_kernels::vmath::sum_squares;
use saekit_kernels::{gemm_bf16, gemm_bf16_glu, gemm_bf16_packed, Bf16Path, GluFn, PackedA, PackedB, Precision};

/// A weight packed in bf16 and the path its products run on.
#[derive(Debug, Clone)]
pub(crate) struct Bf16Weight {
    packed: PackedB,
    path: Bf16Path,
}

impl Bf16Weight {
    /// Pack `w[n, k]` (an unembedding) for `x · wᵀ`, or nothing at f32 precision.
    pub(crate) fn pack_nk(w: &[f32], n: usize, k: usize, precision: Precision) -> Option<Self> {
        precision.bf16_path().map(|path| Self { packed: PackedB::from_nk(w, n, k), path })
    }

    /// `y[m, n] = x[m, k] · B`, for any number of rows: a model set to bf16 multiplies every call in
    /// bf16, so what a harvest records as bf16 is bf16 in every row (the kernels pad a short call to a
    /// 32-row block; generation, where one-row calls are the rule, runs its model at f32).
    fn run(&self, x: &[f32], m: usize, y: &mut [f32], accumulate: bool) {
        let (k, n) = (self.packed.k, self.packed.n);
        gemm_bf16(self.path, x, m, k, &self.packed, y, n, accumulate);
    }

    /// `y (+)= a · B` for rows already in bf16.
    fn run_packed(&self, a: &PackedA, y: &mut [f32], accumulate: bool) {
        let n = self.packed.n;
        gemm_bf16_packed(self.path, a, &self.packed, 0..n, y, n, accumulate);
    }
}

/// A dense weight matrix stored as `[rows = d_in, cols = d_out]`, row-major.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Input width (`d_in`).
    pub rows: usize,
    /// Output width (`d_out`).
    pub cols: usize,
    /// `rows * cols` values, row-major; empty while the weight is held in bf16 alone (see
    /// [`Matrix::set_precision`]).
    data: Vec<f32>,
    /// The same weight in bf16, when [`Matrix::set_precision`] asked for it.
    bf16: Option<Bf16Weight>,
}

impl Matrix {
    /// The bf16 copy that rows packed for it ([`Rows::Bf16`]) must meet.
    ///
    /// # Panics
    /// If the weight has none: such rows come only from [`glu_bf16`], which checks.
    fn bf16_of_packed(&self) -> &Bf16Weight {
        self.bf16.as_ref().expect("rows packed in bf16 for a weight held in f32")
    }

    /// Take a `[d_out, d_in]` weight (PyTorch `nn.Linear` and GGUF layout) and store it transposed.
    pub fn from_out_in(out_in: &[f32], d_out: usize, d_in: usize) -> Self {
        let mut data = vec![0f32; d_out * d_in];
        // Blocked transpose, in parallel over bands of B output rows: keeps both sides cache-friendly for
        // the 49k x 576 embedding, and a 2B model's 9216 x 2304 weights load at both cores' speed.
        const B: usize = 64;
        data.par_chunks_mut(B * d_out.max(1)).enumerate().for_each(|(band, rows)| {
            let i0 = band * B;
            for o0 in (0..d_out).step_by(B) {
                for (di, row) in rows.chunks_mut(d_out).enumerate() {
                    for o in o0..(o0 + B).min(d_out) {
                        row[o] = out_in[o * d_in + i0 + di];
                    }
                }
            }
        });
        Self { rows: d_in, cols: d_out, data, bf16: None }
    }

    /// Take a weight already stored as `[d_in, d_out]` (GPT-2's Conv1D layout).
    pub fn from_in_out(data: Vec<f32>, d_in: usize, d_out: usize) -> Self {
        debug_assert_eq!(data.len(), d_in * d_out);
        Self { rows: d_in, cols: d_out, data, bf16: None }
    }

    /// Concatenate matrices with the same `rows` along the output dimension (fused QKV, gate+up).
    pub fn concat_cols(parts: &[Matrix]) -> Self {
        let rows = parts[0].rows;
        let cols: usize = parts.iter().map(|p| p.cols).sum();
        let values: Vec<Cow<'_, [f32]>> = parts.iter().map(Matrix::values).collect();
        let mut data = vec![0f32; rows * cols];
        for r in 0..rows {
            let mut off = r * cols;
            for (p, v) in parts.iter().zip(&values) {
                data[off..off + p.cols].copy_from_slice(&v[r * p.cols..(r + 1) * p.cols]);
                off += p.cols;
            }
        }
        Self { rows, cols, data, bf16: None }
    }

    /// The values, `[rows, cols]` row-major: borrowed, or unpacked from the bf16 copy when that is
    /// all the weight holds (exactly the same numbers, see [`Matrix::set_precision`]).
    pub fn values(&self) -> Cow<'_, [f32]> {
        match &self.bf16 {
            Some(b) if self.data.is_empty() && self.rows * self.cols > 0 => Cow::Owned(b.packed.to_kn()),
            _ => Cow::Borrowed(&self.data),
        }
    }

    /// Run [`linear`] on this weight at `precision`. bf16 packs a copy; when every value is already a
    /// bf16 number (weights published in bf16, as most are) the f32 values are dropped, since the copy
    /// holds them exactly: a bf16 model is then held once, at half the f32 size. f32 restores the f32
    /// values and drops the copy, so `linear` is again bit for bit the f32 GEMM.
    pub fn set_precision(&mut self, precision: Precision) {
        if self.precision() == precision {
            return;
        }
        let Some(path) = precision.bf16_path() else {
            if self.data.is_empty() {
                self.data = self.values().into_owned();
            }
            self.bf16 = None;
            return;
        };
        self.bf16 = Some(match self.bf16.take() {
            Some(b) if self.data.is_empty() => Bf16Weight { packed: b.packed, path },
            _ => Bf16Weight { packed: PackedB::from_kn(&self.data, self.rows, self.cols), path },
        });
        if self.data.par_iter().all(|&v| saekit_kernels::round_to_bf16(v).to_bits() == v.to_bits()) {
            self.data = Vec::new();
        }
    }

    /// The precision [`linear`] runs this weight at.
    pub fn precision(&self) -> Precision {
        self.bf16.as_ref().map_or(Precision::F32, |b| Precision::Bf16(b.path))
    }

    /// Bytes this weight holds in memory (f32 values and bf16 copy).
    pub fn bytes(&self) -> usize {
        self.data.len() * 4 + self.bf16.as_ref().map_or(0, |b| b.packed.bytes())
    }
}

/// A block's four linear weights, so every architecture loads and switches precision the same way.
pub(crate) trait Linears: Sized {
    /// The weights `linear` multiplies by (attention in and out, MLP in and out).
    fn linears(&mut self) -> [&mut Matrix; 4];

    /// Every linear weight at `precision` ([`Matrix::set_precision`]).
    fn set_precision(&mut self, precision: Precision) {
        self.linears().into_iter().for_each(|w| w.set_precision(precision));
    }

    /// This block at `precision`, as it is loaded.
    fn at(mut self, precision: Precision) -> Self {
        self.set_precision(precision);
        self
    }
}

fn threads() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(rayon::current_num_threads())
}

/// `y[m, w.cols] = x[m, w.rows] · w` (+ `bias`), overwriting `y`: in bf16 with f32 accumulation when
/// the weight carries a bf16 copy, else the f32 GEMM.
pub fn linear(x: &[f32], m: usize, w: &Matrix, bias: Option<&[f32]>, y: &mut [f32]) {
    match &w.bf16 {
        Some(b) => b.run(x, m, y, false),
        None => matmul(x, m, w.rows, &w.data, w.cols, y, false),
    }
    if let Some(b) = bias {
        add_bias(y, b);
    }
}

/// `y[i, :] += b` for every row `i`.
fn add_bias(y: &mut [f32], b: &[f32]) {
    y.par_chunks_mut(b.len()).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
}

/// The input of a linear layer: `m` rows of f32, or rows already in bf16 for the layer's bf16 weight
/// (made by [`rms_norm_bf16`] or [`glu_bf16`] in the pass that computed them).
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    F32(&'a [f32], usize),
    Bf16(&'a PackedA),
}

impl Rows<'_> {
    /// How many rows.
    pub(crate) fn count(&self) -> usize {
        match self {
            Rows::F32(_, m) => *m,
            Rows::Bf16(a) => a.rows(),
        }
    }
}

/// Where a step that may run fused put its output rows: in bf16 for the next weight, or in the f32
/// buffer its caller gave (when a hook had to see them, or a weight is f32).
pub(crate) enum Produced {
    /// In bf16, made in the pass that computed them.
    Bf16(PackedA),
    /// In f32, this many rows at the start of the caller's buffer.
    InBuffer(usize),
}

impl Produced {
    /// The rows, reading `buffer` for [`Produced::InBuffer`].
    pub(crate) fn rows<'a>(&'a self, buffer: &'a [f32]) -> Rows<'a> {
        match self {
            Produced::Bf16(packed) => Rows::Bf16(packed),
            Produced::InBuffer(m) => Rows::F32(buffer, *m),
        }
    }
}

/// `y[m, w.cols] = x · w` (+ `bias`), as [`linear`].
pub(crate) fn linear_rows(x: Rows, w: &Matrix, bias: Option<&[f32]>, y: &mut [f32]) {
    match x {
        Rows::F32(x, m) => linear(x, m, w, bias, y),
        Rows::Bf16(a) => {
            w.bf16_of_packed().run_packed(a, y, false);
            if let Some(b) = bias {
                add_bias(y, b);
            }
        }
    }
}

/// `resid[m, w.cols] += x · w` (a block's output added to the residual stream). A bf16 weight's
/// kernel adds its products to `resid` as it goes, so the output never makes its own trip through
/// memory, which at 1,024 rows is most of what the add costs. An f32 weight goes through `scratch`
/// and [`add_assign`], bit for bit what [`linear`] then an add give.
pub(crate) fn linear_add(x: Rows, w: &Matrix, resid: &mut [f32], scratch: &mut [f32]) {
    match (x, &w.bf16) {
        (Rows::Bf16(a), _) => w.bf16_of_packed().run_packed(a, resid, true),
        (Rows::F32(x, m), Some(b)) => b.run(x, m, resid, true),
        (Rows::F32(x, m), None) => {
            matmul(x, m, w.rows, &w.data, w.cols, scratch, false);
            add_assign(resid, scratch, w.cols);
        }
    }
}

/// A gated MLP's activations `glu(h · W_gate, h · W_up)` in bf16, ready for `down`, in one pass of
/// the kernel over `gate_up` (both halves side by side) that keeps the f32 product and activations
/// out of memory ([`gemm_bf16_glu`]); the same bits as [`linear`], the activation, then rounding.
/// `None` unless both weights run in bf16 on one path and each half is whole 32-column strips.
pub(crate) fn glu_bf16(h: Rows, gate_up: &Matrix, down: &Matrix, glu: GluFn) -> Option<PackedA> {
    let (gu, dn) = (gate_up.bf16.as_ref()?, down.bf16.as_ref()?);
    if gu.path != dn.path || !gate_up.cols.is_multiple_of(64) || down.rows * 2 != gate_up.cols {
        return None;
    }
    let rounded;
    let rows = match h {
        Rows::F32(h, m) => {
            rounded = PackedA::new(h, m, gate_up.rows, gate_up.rows);
            &rounded
        }
        Rows::Bf16(a) => a,
    };
    Some(gemm_bf16_glu(gu.path, rows, &gu.packed, glu))
}

/// `y[m, n] (+)= x[m, k] · w[k, n]`, all row-major; `accumulate` adds to `y` instead of overwriting.
pub fn matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    assert!(x.len() >= m * k && w.len() >= k * n && y.len() >= m * n, "matmul shape mismatch");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above bound every access gemm makes through these strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            threads(),
        );
    }
}

/// `y[m, n] = x[m, k] · wᵀ` with `w` stored `[n, k]` (used for logits against the tied embedding).
pub fn matmul_transposed(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, y: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= k * n && y.len() >= m * n, "matmul shape mismatch");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: as above; w is read with column stride k.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            threads(),
        );
    }
}

/// [`matmul_transposed`], or through `bf16` (the packed `w`) when given.
pub(crate) fn matmul_transposed_at(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    y: &mut [f32],
    bf16: Option<&Bf16Weight>,
) {
    match bf16 {
        Some(b) => b.run(x, m, y, false),
        None => matmul_transposed(x, m, k, w, n, y),
    }
}

/// RMSNorm as Llama computes it, in f32: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    out.par_chunks_mut(w.len()).zip(x.par_chunks(w.len())).for_each(|(o, x)| rms_norm_row(x, w, eps, o));
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = sum_squares(x) / w.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
        *o = x * inv * w;
    }
}

/// [`rms_norm`] of `x` rounded to bf16 rows for `next` in the same pass, so the f32 norm never goes to
/// memory; `None` unless `next` runs in bf16. The bits of [`rms_norm`] then [`linear`]'s rounding.
pub(crate) fn rms_norm_bf16(x: &[f32], w: &[f32], eps: f32, next: &Matrix) -> Option<PackedA> {
    next.bf16.as_ref()?;
    let d = w.len();
    Some(PackedA::from_fn(x.len() / d, d, |i, out| rms_norm_row(&x[i * d..][..d], w, eps, out)))
}

/// RMSNorm of each `w.len()`-wide piece of `x`, in place (the per-head q/k norms of Qwen3 and Gemma 3).
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for x in x.chunks_mut(d) {
        let ms = sum_squares(x) / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (x, w) in x.iter_mut().zip(w) {
            *x = *x * inv * w;
        }
    }
}

/// LayerNorm (GPT-2): `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, x)| {
        let mean = x.iter().sum::<f32>() / d as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((o, x), w), b) in o.iter_mut().zip(x).zip(w).zip(b) {
            *o = (x - mean) * inv * w + b;
        }
    });
}

/// `x += y`, in parallel over rows of width `d`.
pub(crate) fn add_assign(x: &mut [f32], y: &[f32], d: usize) {
    x.par_chunks_mut(d).zip(y.par_chunks(d)).for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(a, b)| *a += b));
}

pub use saekit_kernels::vmath::{gelu_erf, gelu_tanh};

/// GELU in place, in parallel and vectorised: the exact erf form (PyTorch's default, Pythia) or the
/// tanh approximation (GPT-2's `gelu_new`).
pub(crate) fn gelu_in_place(v: &mut [f32], exact: bool) {
    v.par_chunks_mut(ELEMENTWISE_CHUNK).for_each(|c| {
        if exact {
            saekit_kernels::vmath::gelu_erf_in_place(c);
        } else {
            saekit_kernels::vmath::gelu_tanh_in_place(c);
        }
    });
}

/// Values per parallel task of an elementwise pass: big enough to amortise the task, small enough to
/// split one row of a wide MLP between the threads.
const ELEMENTWISE_CHUNK: usize = 4096;

pub use saekit_kernels::vmath::softmax;

/// Dot product of two equal-length vectors.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler keep the FMA pipes busy.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for j in 0..8 {
            acc[j] += a[c * 8 + j] * b[c * 8 + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Positions the rotary tables cover at most: the table is sized before any input is seen, so a
/// declared context length of billions must not size it (longer sequences get a clear error).
pub const ROPE_MAX_POSITIONS: usize = 1 << 17;

/// Precomputed rotary-embedding tables, `[max_pos, head_dim / 2]`.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    pub(crate) half: usize,
    /// GGUF llama weights pair dimensions (2i, 2i+1); Hugging Face weights pair (i, i + d/2).
    pub(crate) interleaved: bool,
}

impl Rope {
    pub(crate) fn new(head_dim: usize, theta: f64, max_pos: usize, interleaved: bool) -> Self {
        Self::scaled(head_dim, theta, max_pos, interleaved, None)
    }

    /// Tables for `rot_dims` rotating dimensions, with transformers' linear scaling (inverse frequencies
    /// divided by `linear_factor`) when given.
    pub(crate) fn scaled(
        rot_dims: usize,
        theta: f64,
        max_pos: usize,
        interleaved: bool,
        linear_factor: Option<f64>,
    ) -> Self {
        let head_dim = rot_dims;
        let max_pos = max_pos.min(ROPE_MAX_POSITIONS);
        let half = head_dim / 2;
        let mut cos = vec![0f32; max_pos * half];
        let mut sin = vec![0f32; max_pos * half];
        for i in 0..half {
            // Same f32 inverse frequency HF computes; the angle itself in f64 to stay exact at long positions.
            let inv = (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32;
            let inv = linear_factor.map_or(inv, |f| inv / f as f32) as f64;
            for p in 0..max_pos {
                let a = p as f64 * inv;
                cos[p * half + i] = a.cos() as f32;
                sin[p * half + i] = a.sin() as f32;
            }
        }
        Self { cos, sin, half, interleaved }
    }

    pub(crate) fn max_pos(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotate one head vector at absolute position `pos`.
    pub(crate) fn apply(&self, x: &mut [f32], pos: usize) {
        let c = &self.cos[pos * self.half..(pos + 1) * self.half];
        let s = &self.sin[pos * self.half..(pos + 1) * self.half];
        if self.interleaved {
            for i in 0..self.half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * c[i] - b * s[i];
                x[2 * i + 1] = a * s[i] + b * c[i];
            }
        } else {
            for i in 0..self.half {
                let (a, b) = (x[i], x[i + self.half]);
                x[i] = a * c[i] - b * s[i];
                x[i + self.half] = a * s[i] + b * c[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use saekit_kernels::round_to_bf16;

    /// The hardware path where there is one, else the scalar reference (same rounding, same packing).
    fn bf16_here() -> Precision {
        Precision::Bf16(Bf16Path::fastest().unwrap_or(Bf16Path::Reference))
    }

    /// `x[m, k]` against `w[n, k]` in f64, after `round` of every input: the sums and the sums of
    /// absolute products (the scale any rounding error is relative to).
    fn reference(x: &[f32], w_nk: &[f32], m: usize, k: usize, n: usize, round: fn(f32) -> f32) -> Vec<(f64, f64)> {
        let mut out = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|t| round(x[i * k + t]) as f64 * round(w_nk[j * k + t]) as f64);
                out.push(terms.fold((0.0, 0.0), |(s, a), p| (s + p, a + p.abs())));
            }
        }
        out
    }

    /// Shapes off every multiple of 32 (the kernels' block), so the padding is exercised.
    fn case(seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, usize, usize, usize) {
        let (m, k, n) = (40, 72, 50);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut draw = |len: usize| (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect::<Vec<_>>();
        (draw(m * k), draw(n * k), draw(n), m, k, n)
    }

    #[test]
    fn bf16_linear_is_the_product_of_rounded_inputs_summed_in_f32() {
        let (x, w_nk, bias, m, k, n) = case(7);
        let f32_w = Matrix::from_out_in(&w_nk, n, k);
        let mut w = f32_w.clone();
        w.set_precision(bf16_here());
        assert_eq!(w.precision(), bf16_here());
        let (mut y, mut y32) = (vec![0f32; m * n], vec![0f32; m * n]);
        linear(&x, m, &w, Some(&bias), &mut y);
        linear(&x, m, &f32_w, Some(&bias), &mut y32);
        let exact = reference(&x, &w_nk, m, k, n, round_to_bf16);
        let mut moved = 0f64;
        for (idx, &(sum, abs)) in exact.iter().enumerate() {
            let got = y[idx] as f64 - bias[idx % n] as f64;
            // f32 accumulation over k = 72 products: far below 1e-5 of their absolute sum
            assert!((got - sum).abs() <= 1e-5 * abs, "[{idx}] {got} vs {sum} (scale {abs})");
            // against f32: each product off by at most ~2^-8 relative from rounding both factors
            let d = (y[idx] - y32[idx]).abs() as f64;
            assert!(d <= abs / 128.0, "[{idx}] bf16 {} vs f32 {} (scale {abs})", y[idx], y32[idx]);
            moved = moved.max(d);
        }
        assert!(moved > 0.0, "the bf16 weight gave the f32 result bit for bit: its copy was not used");
    }

    /// `glu_bf16` runs wherever both weights are bf16 and the halves are whole strips, and gives the
    /// bits of `linear`, SwiGLU over each row and rounding; `linear_add` adds a product into its target.
    #[test]
    fn bf16_gated_mlp_in_one_pass_matches_its_parts_and_adds_into_the_residual() {
        let (m, d, ff) = (40, 72, 64);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut draw = |len: usize| (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect::<Vec<_>>();
        let (h, gate_up_nk, down_nk, resid) = (draw(m * d), draw(2 * ff * d), draw(d * ff), draw(m * d));
        let (mut gate_up, mut down) =
            (Matrix::from_out_in(&gate_up_nk, 2 * ff, d), Matrix::from_out_in(&down_nk, d, ff));
        let silu = saekit_kernels::vmath::silu_mul;
        assert!(glu_bf16(Rows::F32(&h, m), &gate_up, &down, silu).is_none(), "f32 weights have no bf16 pass");
        gate_up.set_precision(bf16_here());
        down.set_precision(bf16_here());
        let fused = glu_bf16(Rows::F32(&h, m), &gate_up, &down, silu).expect("bf16 weights of whole strips run fused");

        let mut gu = vec![0f32; m * 2 * ff];
        linear(&h, m, &gate_up, None, &mut gu);
        let mut act = vec![0f32; m * ff];
        for (row, out) in gu.chunks(2 * ff).zip(act.chunks_mut(ff)) {
            silu(&row[..ff], &row[ff..], out);
        }
        let (mut from_fused, mut from_parts) = (vec![0f32; m * d], vec![0f32; m * d]);
        linear_rows(Rows::Bf16(&fused), &down, None, &mut from_fused);
        linear(&act, m, &down, None, &mut from_parts);
        assert_eq!(from_fused, from_parts, "the fused activations differ from their parts'");

        let (mut added, mut scratch) = (resid.clone(), vec![0f32; m * d]);
        linear_add(Rows::Bf16(&fused), &down, &mut added, &mut scratch);
        let scales = reference(&act, &down_nk, m, ff, d, round_to_bf16);
        for (idx, &(_, abs)) in scales.iter().enumerate() {
            let (a, r, p) = (added[idx], resid[idx], from_parts[idx]);
            // the f32 sums in another order: far below 1e-5 of the terms' absolute sum
            assert!(((a - (r + p)) as f64).abs() <= 1e-5 * (r.abs() as f64 + abs), "{a} != {r} + {p}");
        }
    }

    #[test]
    fn bf16_logits_projection_packs_the_vocab_major_matrix() {
        let (x, w_nk, _, m, k, n) = case(11);
        let packed = Bf16Weight::pack_nk(&w_nk, n, k, bf16_here());
        let mut y = vec![0f32; m * n];
        matmul_transposed_at(&x, m, k, &w_nk, n, &mut y, packed.as_ref());
        for (idx, &(sum, abs)) in reference(&x, &w_nk, m, k, n, round_to_bf16).iter().enumerate() {
            assert!((y[idx] as f64 - sum).abs() <= 1e-5 * abs, "[{idx}] {} vs {sum}", y[idx]);
        }
        assert!(Bf16Weight::pack_nk(&w_nk, n, k, Precision::F32).is_none());
    }

    #[test]
    fn every_row_count_runs_bf16_and_f32_precision_is_the_f32_gemm_bit_for_bit() {
        let (x, w_nk, bias, _, k, n) = case(13);
        let f32_w = Matrix::from_out_in(&w_nk, n, k);
        let mut w = f32_w.clone();
        w.set_precision(bf16_here());
        let run = |w: &Matrix, m: usize| {
            let mut y = vec![0f32; m * n];
            linear(&x, m, w, Some(&bias), &mut y);
            y
        };
        assert_ne!(run(&w, 1), run(&f32_w, 1), "one row runs in bf16 too");
        w.set_precision(Precision::F32);
        assert_eq!(w.precision(), Precision::F32);
        assert_eq!(run(&w, 40), run(&f32_w, 40), "back at f32, linear is the f32 GEMM again");
    }

    #[test]
    fn matmul_matches_naive() {
        let (m, k, n) = (5, 7, 3);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w_out_in: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let w = Matrix::from_out_in(&w_out_in, n, k);
        let mut y = vec![0f32; m * n];
        linear(&x, m, &w, None, &mut y);
        let mut yt = vec![0f32; m * n];
        matmul_transposed(&x, m, k, &w_out_in, n, &mut yt);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * w_out_in[j * k + t] as f64).sum();
                assert!((y[i * n + j] as f64 - want).abs() < 1e-5);
                assert!((yt[i * n + j] as f64 - want).abs() < 1e-5);
            }
        }
    }
}
