//! Hand-written CPU kernels: the dense encoder GEMM (gemm crate), fused bias+ReLU+top-k selection,
//! sparse decoder gathers and the latent-major gradient scatters.
//!
//! Every reduction runs in a fixed order that does not depend on the number of rayon threads,
//! so results are bit-identical with 1 or N threads.

use gemm::Parallelism;
use rayon::prelude::*;
use saekit_kernels::{gemm_bf16_packed, Bf16Path, PackedA, PackedB, Precision};
use std::borrow::Cow;
use std::ops::Range;

pub(crate) fn parallelism() -> Parallelism {
    let n = rayon::current_num_threads();
    if n <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(n)
    }
}

/// `c = a · b` (or `c += a · b` when `accumulate`) for `c` with unit column stride and row stride
/// `c_rs`; `a` and `b` are given by their (column, row) strides.
///
/// # Safety
/// The pointers must cover every element the strides address for these m, n, k; `c` must not alias.
unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    (c, c_rs, accumulate): (*mut f32, isize, bool),
    (a, a_cs, a_rs): (*const f32, isize, isize),
    (b, b_cs, b_rs): (*const f32, isize, isize),
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs,
            accumulate,
            a,
            a_cs,
            a_rs,
            b,
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism(),
        );
    }
}

/// `c[m, n] (row stride ldc) = a[m, k] (row stride lda) · bᵀ` where `b` is row-major `[n, k]`.
/// This is `x · W_encᵀ` with the encoder stored latent-major like `nn.Linear`.
#[allow(clippy::too_many_arguments)] // BLAS's sgemm shape: sizes, then each matrix with its stride
pub(crate) fn gemm_abt(m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: &[f32], c: &mut [f32], ldc: usize) {
    assert!(m == 0 || a.len() >= (m - 1) * lda + k);
    assert!(n == 0 || b.len() >= n * k);
    assert!(m == 0 || c.len() >= (m - 1) * ldc + n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: bounds asserted above; the three buffers are distinct borrows.
    unsafe {
        gemm_strided(
            (m, n, k),
            (c.as_mut_ptr(), ldc as isize, false),
            (a.as_ptr(), 1, lda as isize),
            (b.as_ptr(), k as isize, 1),
        )
    }
}

/// The encoder's bf16 copy, kept from step to step (its shape does not change, its values do).
///
/// A bf16 step's forward packs it from `W_enc`, unless the optimizer step that last wrote `W_enc`
/// also wrote the copy, in the same pass (`AfterUpdate::Pack`): then the forward reads the copy as
/// it is, once, if `W_enc` still matches the [`Sample`] taken when the update finished. Debug builds
/// also check that each copy they trust equals a fresh packing.
#[derive(Debug, Default)]
pub(crate) struct EncoderCopy {
    packed: Option<PackedB>,
    /// `W_enc` as the update that wrote the copy left it.
    written_for: Option<Sample>,
}

impl EncoderCopy {
    /// The copy for an update to write as it writes `W_enc` (`None` when the step ran in f32);
    /// call [`EncoderCopy::written`] once it has.
    pub(crate) fn for_update(&mut self) -> Option<&mut PackedB> {
        self.written_for = None;
        self.packed.as_mut()
    }

    /// The update wrote `w_enc`, and the copy along with it if there is one: the next forward may
    /// use the copy as it is, if `w_enc` is still what it was here.
    pub(crate) fn written(&mut self, w_enc: &[f32]) {
        self.written_for = self.packed.is_some().then(|| Sample::of(w_enc));
    }
}

/// Where a matrix lives, its length and 64 of its values spread over it: what a forward checks
/// before it trusts the update's copy of `W_enc`. It does not prove the matrix unchanged (a change
/// to a few rows can pass), but moving, resizing, reloading or rescaling it fails the check, and
/// taking it costs no pass over the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    addr: usize,
    len: usize,
    bits: [u32; 64],
}

impl Sample {
    fn of(w: &[f32]) -> Sample {
        let mut bits = [0u32; 64];
        if !w.is_empty() {
            for (i, b) in bits.iter_mut().enumerate() {
                *b = w[i * w.len() / 64 + w.len() / 128].to_bits();
            }
        }
        Sample { addr: w.as_ptr() as usize, len: w.len(), bits }
    }
}

/// The encoder weights `w_enc` ([d_sae, d_in]) in one precision, ready for products with any rows:
/// as stored in f32, or rounded to bf16 and packed. Only [`EncoderWeights::prepare`] and
/// [`EncoderWeights::packed`] make one, so a bf16 product always has its packed weights.
pub(crate) enum EncoderWeights<'a> {
    F32 { w_enc: &'a [f32], d_in: usize },
    Bf16 { path: Bf16Path, w_enc: Cow<'a, PackedB> },
}

impl<'a> EncoderWeights<'a> {
    /// `w_enc` in `precision`; for bf16 the copy in `copy`, packed here unless the last update
    /// wrote it ([`EncoderCopy`]); f32 drops the copy.
    pub(crate) fn prepare(
        precision: Precision,
        w_enc: &'a [f32],
        (d_sae, d_in): (usize, usize),
        copy: &'a mut EncoderCopy,
    ) -> Self {
        let Some(path) = precision.bf16_path() else {
            *copy = EncoderCopy::default();
            return EncoderWeights::F32 { w_enc, d_in };
        };
        let current = copy.written_for.take() == Some(Sample::of(w_enc));
        let packed = match copy.packed.take() {
            Some(mut p) if p.n == d_sae && p.k == d_in => {
                if current {
                    debug_assert!(p == PackedB::from_nk(w_enc, d_sae, d_in), "the update's bf16 copy is stale");
                } else {
                    p.repack_nk(w_enc);
                }
                p
            }
            _ => PackedB::from_nk(w_enc, d_sae, d_in),
        };
        EncoderWeights::Bf16 { path, w_enc: Cow::Borrowed(copy.packed.insert(packed)) }
    }

    /// Whether a row's products have the same bits whatever other rows are multiplied with it: true
    /// of the bf16 kernels (fixed 32x32 blocks, k in a fixed order), not of the gemm crate, which picks
    /// its kernel and blocking by shape (a row multiplied alone or among 4,096 can differ in the last bit).
    pub(crate) fn rows_independent(&self) -> bool {
        matches!(self, EncoderWeights::Bf16 { .. })
    }

    /// `w_enc` in `precision`, packed for bf16 into a copy of its own (weights encoded many times
    /// without changing: [`crate::Sae::encoder`]).
    pub(crate) fn packed(precision: Precision, w_enc: &'a [f32], (d_sae, d_in): (usize, usize)) -> Self {
        match precision.bf16_path() {
            None => EncoderWeights::F32 { w_enc, d_in },
            Some(path) => EncoderWeights::Bf16 { path, w_enc: Cow::Owned(PackedB::from_nk(w_enc, d_sae, d_in)) },
        }
    }

    /// The product with the `rows` rows of `xin` ([rows, d_in]); bf16 rounds the rows here, once
    /// for all its chunks.
    pub(crate) fn product(&self, xin: &[f32], rows: usize) -> EncoderProduct<'_> {
        match self {
            EncoderWeights::F32 { w_enc, d_in } => EncoderProduct::F32 { w_enc, d_in: *d_in },
            EncoderWeights::Bf16 { path, w_enc } => {
                let d_in = w_enc.k;
                EncoderProduct::Bf16 { path: *path, w_enc, rows: PackedA::new(xin, rows, d_in, d_in) }
            }
        }
    }
}

/// The encoder product `xin · W_encᵀ` one latent chunk at a time, in the weights' precision: f32 on
/// the gemm crate, or bf16 with f32 accumulation on rows rounded once for all chunks. Made by
/// [`EncoderWeights::product`].
pub(crate) enum EncoderProduct<'a> {
    F32 { w_enc: &'a [f32], d_in: usize },
    Bf16 { path: Bf16Path, w_enc: &'a PackedB, rows: PackedA },
}

impl EncoderProduct<'_> {
    /// `pre[rows, latents.len()] = xin · W_enc[latents]ᵀ`.
    pub(crate) fn chunk(&self, xin: &[f32], rows: usize, latents: Range<usize>, pre: &mut [f32]) {
        let w = latents.len();
        match self {
            EncoderProduct::F32 { w_enc, d_in: d } => {
                gemm_abt(rows, w, *d, xin, *d, &w_enc[latents.start * d..latents.end * d], pre, w)
            }
            EncoderProduct::Bf16 { path, w_enc, rows: packed_rows } => {
                debug_assert_eq!(packed_rows.rows(), rows);
                gemm_bf16_packed(*path, packed_rows, w_enc, latents, pre, w, false)
            }
        }
    }

    /// `visit(&mut states[r], values, j0)` for every row `r` and latent panel, `values` being the row's
    /// pre-activations `xin_r · W_enc[j]ᵀ` over latents `j0..j0 + values.len()`: panels in ascending
    /// order cover `latents`, and a row's panels all go to one thread (a running selection per row
    /// needs no lock and meets the latents in order).
    ///
    /// bf16 hands over each panel from L2 as the kernel makes it ([`saekit_kernels::gemm_bf16_rows`]).
    /// f32 multiplies chunks of [`crate::Sae::latent_chunk`] latents into `pre` first: there the
    /// product is bound by the FMAs, not by the pre-activations' trip through memory.
    pub(crate) fn for_each_row<S: Send>(
        &self,
        xin: &[f32],
        latents: Range<usize>,
        pre: &mut Vec<f32>,
        states: &mut [S],
        visit: impl Fn(&mut S, &[f32], usize) + Sync,
    ) {
        let rows = states.len();
        if let EncoderProduct::Bf16 { path, w_enc, rows: packed_rows } = self {
            debug_assert_eq!(packed_rows.rows(), rows);
            return saekit_kernels::gemm_bf16_rows(*path, packed_rows, w_enc, latents, states, visit);
        }
        let chunk = crate::Sae::latent_chunk(latents.len(), rows).max(1);
        if pre.len() < rows * chunk {
            pre.resize(rows * chunk, 0.0);
        }
        for j0 in latents.clone().step_by(chunk) {
            let w = chunk.min(latents.end - j0);
            self.chunk(xin, rows, j0..j0 + w, pre);
            states.par_iter_mut().zip(pre.par_chunks(w)).for_each(|(state, values)| visit(state, values, j0));
        }
    }
}

/// `c[m, n] += a[m, k] · bᵀ` where `b` is row-major `[n, k]`, all contiguous (a skip transcoder's
/// `x · W_skipᵀ` added to its output).
pub(crate) fn gemm_abt_add(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: bounds asserted above; the three buffers are distinct borrows.
    unsafe {
        gemm_strided(
            (m, n, k),
            (c.as_mut_ptr(), n as isize, true),
            (a.as_ptr(), 1, k as isize),
            (b.as_ptr(), k as isize, 1),
        )
    }
}

/// `c[m, n] = a[m, k] · b[k, n]`, all row-major and contiguous.
pub(crate) fn gemm_ab(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: bounds asserted above.
    unsafe {
        gemm_strided(
            (m, n, k),
            (c.as_mut_ptr(), n as isize, accumulate),
            (a.as_ptr(), 1, k as isize),
            (b.as_ptr(), 1, n as isize),
        )
    }
}

/// `c[m, n] = aᵀ · b` with `a` row-major `[k, m]` and `b` row-major `[k, n]`.
pub(crate) fn gemm_atb(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: bounds asserted above.
    unsafe {
        gemm_strided(
            (m, n, k),
            (c.as_mut_ptr(), n as isize, accumulate),
            (a.as_ptr(), m as isize, 1),
            (b.as_ptr(), 1, n as isize),
        )
    }
}

/// An element of a row the sparse kernels read: f32, or bf16 bits ([`Bf16`]) widened to f32 exactly
/// as they are read. A kernel over bf16 rows is then the f32 kernel over the rounded rows, bit for
/// bit, with half the bytes to fetch.
pub(crate) trait RowElem: Copy + Default + Send + Sync + 'static {
    /// Whether the element is bf16 bits (picks the vector load).
    const BF16: bool;
    /// The value as f32 (exact).
    fn widen(self) -> f32;
}

impl RowElem for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

/// A bf16 value's bits (round to nearest even from f32: [`Bf16::round`]).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub(crate) struct Bf16(pub u16);

impl Bf16 {
    /// `x` rounded to bf16.
    #[inline]
    pub(crate) fn round(x: f32) -> Bf16 {
        Bf16(saekit_kernels::bf16_bits(x))
    }
}

impl RowElem for Bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

/// `rows` rounded to bf16 into `out` (resized to fit), in parallel.
pub(crate) fn round_rows(rows: &[f32], out: &mut Vec<Bf16>) {
    out.resize(rows.len(), Bf16::default());
    out.par_chunks_mut(4096).zip(rows.par_chunks(4096)).for_each(|(o, r)| {
        o.iter_mut().zip(r).for_each(|(o, &x)| *o = Bf16::round(x));
    });
}

/// 16 values at `p` as f32 lanes.
///
/// # Safety
/// The CPU must have AVX-512F; 16 elements must lie at `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load16<E: RowElem>(p: *const E) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: forwarded from the caller.
    unsafe {
        if E::BF16 {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()))))
        } else {
            _mm512_loadu_ps(p.cast())
        }
    }
}

#[inline(always)]
fn axpy_body<const FMA: bool, E: RowElem>(alpha: f32, x: &[E], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        let xi = xi.widen();
        *yi = if FMA { alpha.mul_add(xi, *yi) } else { *yi + alpha * xi };
    }
}

/// Dot products of `N` rows with one `w`, each over 16 lanes in a fixed order (FMAs when `FMA`, else
/// a multiply and an add), the lanes then summed in a fixed order: deterministic, and the same at
/// any vector width. `N` rows at once give `N` independent chains to hide the FMA latency and load
/// `w` once for all of them, without changing any row's result.
#[inline(always)]
fn dot_rows_body<const N: usize, const FMA: bool, R: RowElem, W: RowElem>(rows: [&[R]; N], w: &[W]) -> [f32; N] {
    let n = rows.iter().map(|r| r.len()).fold(w.len(), usize::min);
    let full = n / 16 * 16;
    let mut acc = [[0.0f32; 16]; N];
    for c in (0..full).step_by(16) {
        for (a, r) in acc.iter_mut().zip(&rows) {
            for l in 0..16 {
                let (x, y) = (r[c + l].widen(), w[c + l].widen());
                a[l] = if FMA { x.mul_add(y, a[l]) } else { a[l] + x * y };
            }
        }
    }
    finish_dots(acc, rows, w, full, n)
}

/// [`dot_rows_body`] with each row's 16 lanes in one AVX-512 register, written with intrinsics
/// because LLVM split the portable loop into 128-bit pieces: the same FMAs in the same order.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_rows_avx512<const N: usize, R: RowElem, W: RowElem>(rows: [&[R]; N], w: &[W]) -> [f32; N] {
    use std::arch::x86_64::*;
    let n = rows.iter().map(|r| r.len()).fold(w.len(), usize::min);
    let full = n / 16 * 16;
    let mut acc = [_mm512_setzero_ps(); N];
    for c in (0..full).step_by(16) {
        // SAFETY: c + 16 <= n, within w and every row.
        let wc = unsafe { load16(w.as_ptr().add(c)) };
        for (a, r) in acc.iter_mut().zip(&rows) {
            // SAFETY: as above.
            *a = _mm512_fmadd_ps(unsafe { load16(r.as_ptr().add(c)) }, wc, *a);
        }
    }
    let lanes = acc.map(|a| {
        let mut l = [0.0f32; 16];
        // SAFETY: l holds 16 values.
        unsafe { _mm512_storeu_ps(l.as_mut_ptr(), a) };
        l
    });
    finish_dots(lanes, rows, w, full, n)
}

/// The 16 lanes of each row summed in a fixed order, plus the tail past `full`.
#[inline(always)]
fn finish_dots<const N: usize, R: RowElem, W: RowElem>(
    acc: [[f32; 16]; N],
    rows: [&[R]; N],
    w: &[W],
    full: usize,
    n: usize,
) -> [f32; N] {
    std::array::from_fn(|i| {
        let mut s = 0.0f32;
        for l in 0..8 {
            s += acc[i][l] + acc[i][l + 8];
        }
        for (x, y) in rows[i][full..n].iter().zip(&w[full..n]) {
            s += x.widen() * y.widen();
        }
        s
    })
}

/// `[dot(rows[0], w), ..]`, bit for bit: AVX-512 where the CPU has it, else the portable loop
/// compiled for AVX2 + FMA, else unfused.
#[inline]
fn dot_rows<const N: usize, R: RowElem, W: RowElem>(rows: [&[R]; N], w: &[W]) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<const N: usize, R: RowElem, W: RowElem>(rows: [&[R]; N], w: &[W]) -> [f32; N] {
            dot_rows_body::<N, true, R, W>(rows, w)
        }
        if has_fma() {
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (and FMA, which the lane-wise FMAs need).
                return unsafe { dot_rows_avx512(rows, w) };
            }
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2(rows, w) };
        }
    }
    dot_rows_body::<N, false, R, W>(rows, w)
}

#[inline]
fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Dot product (FMA when the CPU has it; the choice is per machine, so results are reproducible on
/// one machine whatever the thread count).
#[inline]
pub(crate) fn dot<R: RowElem, W: RowElem>(a: &[R], b: &[W]) -> f32 {
    dot_rows([a], b)[0]
}

/// `[dot(rows[0], w), ..]` for four rows, bit for bit, faster than one at a time.
#[inline]
pub(crate) fn dot4<R: RowElem, W: RowElem>(rows: [&[R]; 4], w: &[W]) -> [f32; 4] {
    dot_rows(rows, w)
}

/// `y += alpha · x`.
#[inline]
pub(crate) fn axpy<E: RowElem>(alpha: f32, x: &[E], y: &mut [f32]) {
    #[inline(always)]
    fn fused<E: RowElem>(alpha: f32, x: &[E], y: &mut [f32]) {
        axpy_body::<true, E>(alpha, x, y)
    }
    if has_fma() {
        return saekit_kernels::dispatch_simd!(fma: fused(alpha, x, y));
    }
    axpy_body::<false, E>(alpha, x, y)
}

/// `y += Σ_i alpha[i] · x[i]`, the terms added in order, each with one FMA: bit for bit [`axpy`]
/// term by term, but with `y` held in registers 64 columns at a time instead of loaded and stored
/// once per term.
pub(crate) fn add_scaled<E: RowElem>(terms: &[(f32, &[E])], y: &mut [f32]) {
    if has_fma() {
        return saekit_kernels::dispatch_simd!(fma: add_scaled_fused(terms, y));
    }
    for &(a, x) in terms {
        axpy_body::<false, E>(a, x, y);
    }
}

#[inline(always)]
fn add_scaled_fused<E: RowElem>(terms: &[(f32, &[E])], y: &mut [f32]) {
    const W: usize = 64;
    for (c, yc) in y.chunks_mut(W).enumerate() {
        if let Ok(yc) = <&mut [f32; W]>::try_from(&mut *yc) {
            let mut acc = *yc;
            for &(a, x) in terms {
                let xc: &[E; W] = x[c * W..][..W].try_into().expect("a full chunk");
                for i in 0..W {
                    acc[i] = a.mul_add(xc[i].widen(), acc[i]);
                }
            }
            *yc = acc;
        } else {
            for &(a, x) in terms {
                axpy_body::<true, E>(a, &x[c * W..], yc);
            }
        }
    }
}

/// Running top-k of one row, kept sorted in descending value order (ties: lower latent first).
#[inline]
pub(crate) fn topk_insert(vals: &mut [f32], idx: &mut [u32], v: f32, j: u32) {
    let k = vals.len();
    // caller guarantees v > vals[k-1]
    let mut p = k - 1;
    while p > 0 && vals[p - 1] < v {
        vals[p] = vals[p - 1];
        idx[p] = idx[p - 1];
        p -= 1;
    }
    vals[p] = v;
    idx[p] = j;
}

/// The running top-k of one row of a chunk, in two passes. The first takes the maximum of each
/// block of 32 and from them a floor: the k-th largest block maximum, which k values of the chunk
/// reach, so nothing below it can be among the top k. The second inserts, in latent order, only
/// values above both the running k-th and the floor, from blocks whose maximum is. Scanning in order
/// with the running k-th alone inserted and evicted hundreds of early values per row (half the
/// selection's time, `perf annotate`); the result is the same top k, ties to the lower latent, since
/// every value skipped is below the final k-th.
#[inline(always)]
fn select_row(
    row: &[f32],
    b: &[f32],
    j0: usize,
    (vals, idx): (&mut [f32], &mut [u32]),
    scratch: &mut [Vec<f32>; 2],
    hint: f32,
) {
    let k = vals.len();
    let [maxima, sorted] = scratch;
    maxima.resize(row.len().div_ceil(BW), 0.0);
    block_maxima(row, b, maxima);
    sorted.clone_from(maxima);
    let floor = kth_largest_or_min(sorted, k).max(hint);
    let mut thr = vals[k - 1];
    for (bi, (pb, bbk)) in row.chunks(BW).zip(b.chunks(BW)).enumerate() {
        let m = maxima[bi];
        if !(m > thr && m >= floor) {
            continue;
        }
        // candidates against the k-th as the block starts; each is checked again as it rises
        let mask = candidates(pb, bbk, thr, floor);
        insert_candidates((pb, bbk), mask, j0 + bi * BW, (&mut *vals, &mut *idx), &mut thr);
    }
}

/// Insert the values `p[i] + b[i]` at the set bits `i` of `mask` (latents `first + i`) that beat the
/// running k-th `thr`, each checked against it as it rises.
#[inline(always)]
fn insert_candidates(
    (p, b): (&[f32], &[f32]),
    mut mask: u32,
    first: usize,
    (vals, idx): (&mut [f32], &mut [u32]),
    thr: &mut f32,
) {
    let k = vals.len();
    while mask != 0 {
        let i = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        let v = p[i] + b[i];
        if v > *thr {
            topk_insert(vals, idx, v, (first + i) as u32);
            *thr = vals[k - 1];
        }
    }
}

/// [`select_row`] over a panel of fewer than k blocks, where no block maximum bounds the k-th
/// value: one pass that compares each block against the running k-th and inserts what beats it.
/// The row's first panels insert most of what they hold; from there on few values pass.
#[inline(always)]
fn select_row_narrow(row: &[f32], b: &[f32], j0: usize, (vals, idx): (&mut [f32], &mut [u32]), floor: f32) {
    let mut thr = vals[vals.len() - 1];
    for (bi, (pb, bbk)) in row.chunks(BW).zip(b.chunks(BW)).enumerate() {
        let mask = candidates(pb, bbk, thr, floor);
        insert_candidates((pb, bbk), mask, j0 + bi * BW, (&mut *vals, &mut *idx), &mut thr);
    }
}

/// [`select_row_narrow`], on AVX-512 where the CPU has it.
fn select_narrow(row: &[f32], b: &[f32], j0: usize, sel: (&mut [f32], &mut [u32]), floor: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { select_row_narrow_avx512(row, b, j0, sel, floor) };
    }
    saekit_kernels::dispatch_simd!(select_row_narrow(row, b, j0, sel, floor))
}

/// [`select_row_narrow`] in AVX-512 registers: one compare per 16 values against a limit that
/// folds the running k-th and the floor together (`v > thr` is `v >= thr.next_up()`), and the
/// limit is only rebuilt after an insertion, where the portable form checks the CPU's features and
/// compares twice per half block. A bf16 encoder of 16,384 latents hands over 64 panels per row;
/// three alternating rounds of `bench_train --precision bf16` ran 31.3-31.9k tok/s before, 32.5-32.6k after.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn select_row_narrow_avx512(
    row: &[f32],
    b: &[f32],
    j0: usize,
    (vals, idx): (&mut [f32], &mut [u32]),
    floor: f32,
) {
    use std::arch::x86_64::*;
    let n = row.len().min(b.len());
    let mut thr = vals[vals.len() - 1];
    let mut limit = _mm512_set1_ps(thr.next_up().max(floor));
    let mut c = 0;
    while c + 32 <= n {
        // SAFETY: c + 32 <= n values lie at both pointers.
        let (lo, hi) = unsafe {
            let (p, q) = (row.as_ptr().add(c), b.as_ptr().add(c));
            (
                _mm512_add_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(q)),
                _mm512_add_ps(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(q.add(16))),
            )
        };
        // ordered compares: a NaN never passes
        let mask = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(lo, limit) as u32
            | (_mm512_cmp_ps_mask::<_CMP_GE_OQ>(hi, limit) as u32) << 16;
        if mask != 0 {
            // every set bit is at least the floor (the limit is); each is checked against the k-th as it rises
            insert_candidates((&row[c..], &b[c..]), mask, j0 + c, (&mut *vals, &mut *idx), &mut thr);
            limit = _mm512_set1_ps(thr.next_up().max(floor));
        }
        c += 32;
    }
    let tail = candidates(&row[c..n], &b[c..n], thr, floor);
    insert_candidates((&row[c..], &b[c..]), tail, j0 + c, (vals, idx), &mut thr);
}

/// Values per block of [`select_row`].
const BW: usize = 32;

/// `maxima[i]` = [`block_max`] of block `i`: AVX-512 where the CPU has it (the portable loop came
/// out as 64-bit loads and 128-bit maxima), else the portable loop.
#[inline(always)]
fn block_maxima(row: &[f32], b: &[f32], maxima: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { block_maxima_avx512(row, b, maxima) };
    }
    for (m, (pb, bbk)) in maxima.iter_mut().zip(row.chunks(BW).zip(b.chunks(BW))) {
        *m = block_max(pb, bbk);
    }
}

/// How far ahead (in values: 8 KiB) [`block_maxima_avx512`] asks for the pre-activations. The scan
/// waits on memory (`perf annotate` puts its samples on the loads); this took the selection from a
/// median of 16.4 to 13.4 ms per 4096 x 16384 batch (5 paired runs; 1,024 and 3,072 did no better).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 2048;

/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_maxima_avx512(row: &[f32], b: &[f32], maxima: &mut [f32]) {
    use std::arch::x86_64::*;
    let full = row.len().min(b.len()) / BW;
    for (i, m) in maxima.iter_mut().enumerate().take(full) {
        let (p, bb) = (row[i * BW..].as_ptr(), b[i * BW..].as_ptr());
        // past the row's end this reaches into the next row, which this thread most often takes next;
        // a prefetch never faults
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD).cast());
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD + 16).cast());
        // SAFETY: block i is whole (i < full), so 32 values lie at p and bb.
        let (v0, v1) = unsafe {
            (
                _mm512_add_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(bb)),
                _mm512_add_ps(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(bb.add(16))),
            )
        };
        // vmaxps returns its second operand when either is NaN: a NaN never replaces a number
        let lanes = _mm512_max_ps(v1, _mm512_max_ps(v0, _mm512_set1_ps(f32::NEG_INFINITY)));
        *m = _mm512_reduce_max_ps(lanes);
    }
    if let Some(m) = maxima.get_mut(full) {
        *m = block_max(&row[full * BW..], &b[full * BW..row.len()]);
    }
}

/// The largest `p + b` of one block, -inf when every value is NaN (NaN is never selected).
#[inline(always)]
fn block_max(pb: &[f32], bbk: &[f32]) -> f32 {
    // `if a > b` rather than `f32::max`: with `b` never NaN it never takes a NaN, and it is one
    // `vmaxps` where max's NaN rule adds a compare and a blend
    #[inline(always)]
    fn larger(a: f32, b: f32) -> f32 {
        if a > b {
            a
        } else {
            b
        }
    }
    let (Ok(p), Ok(b)) = (<&[f32; BW]>::try_from(pb), <&[f32; BW]>::try_from(bbk)) else {
        return pb.iter().zip(bbk).fold(f32::NEG_INFINITY, |m, (&p, &bb)| larger(p + bb, m));
    };
    // lane-wise, then a tree: both vectorise, unlike a running maximum
    let mut lanes = [f32::NEG_INFINITY; 16];
    for i in 0..16 {
        lanes[i] = larger(p[i] + b[i], larger(p[i + 16] + b[i + 16], lanes[i]));
    }
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            lanes[i] = larger(lanes[i + w], lanes[i]);
        }
    }
    lanes[0]
}

/// Bit `i` set where value `i` of the block is above `thr` and at least `floor`.
#[inline(always)]
fn candidates(pb: &[f32], bbk: &[f32], thr: f32, floor: f32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if let (Ok(p), Ok(b), true) =
        (<&[f32; BW]>::try_from(pb), <&[f32; BW]>::try_from(bbk), std::arch::is_x86_feature_detected!("avx512f"))
    {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { candidates_avx512(p, b, thr, floor) };
    }
    let mut mask = 0u32;
    for (i, (&p, &bb)) in pb.iter().zip(bbk).enumerate() {
        let v = p + bb;
        mask |= ((v > thr && v >= floor) as u32) << i;
    }
    mask
}

/// [`candidates`] of a whole block: two compares into mask registers, where the portable loop came
/// out as lane shifts and a horizontal OR.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn candidates_avx512(p: &[f32; BW], b: &[f32; BW], thr: f32, floor: f32) -> u32 {
    use std::arch::x86_64::*;
    let (thr, floor) = (_mm512_set1_ps(thr), _mm512_set1_ps(floor));
    let half = |o: usize| {
        // SAFETY: o + 16 <= BW values lie at p and b.
        let v = unsafe { _mm512_add_ps(_mm512_loadu_ps(p.as_ptr().add(o)), _mm512_loadu_ps(b.as_ptr().add(o))) };
        // ordered compares: false for NaN, as `v > thr && v >= floor` is
        let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, thr);
        _mm512_mask_cmp_ps_mask::<_CMP_GE_OQ>(above, v, floor) as u32
    };
    half(0) | half(16) << 16
}

/// The `k`-th largest of `maxima` (reordering them), or -inf when there are fewer than `k`.
fn kth_largest_or_min(maxima: &mut [f32], k: usize) -> f32 {
    if maxima.len() < k {
        return f32::NEG_INFINITY;
    }
    let (_, kth, _) = maxima.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    *kth
}

thread_local! {
    /// [`select_row`]'s block maxima and their reordered copy, one pair per thread.
    static BLOCK_MAXIMA: std::cell::RefCell<[Vec<f32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Reset selection state: value 0 with index u32::MAX means an empty slot (ReLU: only strictly
/// positive pre-activations can be selected).
pub(crate) fn reset_selection(vals: &mut [f32], idx: &mut [u32]) {
    vals.fill(0.0);
    idx.fill(u32::MAX);
}

/// One row's running selections over the latents, panel after panel: the top `val.len()` of
/// `pre + b_enc` (strictly positive, ties to the lower latent) and, for AuxK, the top `aux.0.len()`
/// among the dead latents.
///
/// `floor` (a [`SelectionFloor`]) skips every value below it without a look: the selection is then
/// exact if it fills all its slots, and must be made again without the floor if not.
pub(crate) struct RowSelection<'a> {
    pub val: &'a mut [f32],
    pub idx: &'a mut [u32],
    pub aux: Option<(&'a mut [f32], &'a mut [u32])>,
    pub floor: f32,
}

impl RowSelection<'_> {
    /// Fused bias + ReLU + running top-k over one panel: `values` are the row's pre-activations of
    /// latents `j0..j0 + values.len()`; `dead` lists AuxK's dead latents, ascending.
    pub(crate) fn add_panel(&mut self, values: &[f32], j0: usize, b_enc: &[f32], dead: &[u32]) {
        let b = &b_enc[j0..j0 + values.len()];
        let (sel, floor) = ((&mut *self.val, &mut *self.idx), self.floor);
        if values.len() >= sel.0.len() * BW {
            BLOCK_MAXIMA.with_borrow_mut(|scratch| {
                saekit_kernels::dispatch_simd!(select_row(values, b, j0, sel, scratch, floor))
            });
        } else {
            select_narrow(values, b, j0, sel, floor);
        }
        if let Some((val, idx)) = &mut self.aux {
            let from = dead.partition_point(|&j| (j as usize) < j0);
            let to = dead.partition_point(|&j| (j as usize) < j0 + values.len());
            select_among(values, b, j0, &dead[from..to], val, idx);
        }
    }
}

/// Each row's [`RowSelection`] over `rows` rows of `k` slots (and `aux`'s `k_aux` slots), all from `floor`.
pub(crate) fn row_selections<'a>(
    (val, idx): (&'a mut [f32], &'a mut [u32]),
    k: usize,
    aux: Option<(&'a mut [f32], &'a mut [u32], usize)>,
    rows: usize,
    floor: SelectionFloor,
) -> Vec<RowSelection<'a>> {
    let main = val[..rows * k].chunks_mut(k).zip(idx[..rows * k].chunks_mut(k));
    let floor = floor.0;
    match aux {
        None => main.map(|(val, idx)| RowSelection { val, idx, aux: None, floor }).collect(),
        Some((av, ai, ka)) => main
            .zip(av[..rows * ka].chunks_mut(ka).zip(ai[..rows * ka].chunks_mut(ka)))
            .map(|((val, idx), aux)| RowSelection { val, idx, aux: Some(aux), floor })
            .collect(),
    }
}

/// A floor for the next batch's selections, from this batch's: most rows' k-th value lies above
/// the 1st percentile of this batch's k-th values, so a selection that skips everything below it
/// inserts a few dozen values per row where one from zero inserts a few hundred, and about one row
/// in a hundred must be selected again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SelectionFloor(pub f32);

impl Default for SelectionFloor {
    fn default() -> Self {
        SelectionFloor(f32::NEG_INFINITY)
    }
}

impl SelectionFloor {
    /// From the k-th (last) slot of each row's selection of width `k` (0 where a row has fewer
    /// than k values: its floor is then none).
    pub(crate) fn from_selection(val: &[f32], k: usize) -> SelectionFloor {
        let mut kth: Vec<f32> = val.chunks_exact(k).map(|row| row[k - 1]).collect();
        if kth.is_empty() {
            return SelectionFloor::default();
        }
        let at = kth.len() / 100;
        let (_, v, _) = kth.select_nth_unstable_by(at, f32::total_cmp);
        SelectionFloor(if *v > 0.0 { *v } else { f32::NEG_INFINITY })
    }
}

/// The running top-`k` (`k = vals.len()`) of `row + b` over the latents `among` (ids in the panel
/// `j0..j0 + row.len()`, ascending), strictly positive values only, ties to the lower latent
/// ([`topk_insert`]'s rule).
fn select_among(row: &[f32], b: &[f32], j0: usize, among: &[u32], vals: &mut [f32], idx: &mut [u32]) {
    let k = vals.len();
    let mut thr = vals[k - 1];
    for &j in among {
        let jj = j as usize - j0;
        let v = row[jj] + b[jj];
        if v > thr {
            topk_insert(vals, idx, v, j);
            thr = vals[k - 1];
        }
    }
}

/// `out[t] = bias + Σ_s val[t,s] · W[idx[t,s]]` over the `k` slots of each row (empty slots skipped).
pub(crate) fn sparse_decode(
    sel_val: &[f32],
    sel_idx: &[u32],
    k: usize,
    w: &[f32],
    d: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    out.par_chunks_mut(d).enumerate().for_each_init(Vec::new, |terms, (t, o)| {
        match bias {
            Some(b) => o.copy_from_slice(&b[..d]),
            None => o.fill(0.0),
        }
        terms.clear();
        for s in t * k..(t + 1) * k {
            let (j, v) = (sel_idx[s], sel_val[s]);
            if j != u32::MAX && v != 0.0 {
                terms.push((v, &w[j as usize * d..][..d]));
            }
        }
        add_scaled(terms, o);
    });
}

/// One active (token, latent) pair, ordered by latent, then source, then token in [`LatentMajor`].
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Entry {
    pub t: u32,
    /// activation value (multiplies the residual gradient for dW_dec)
    pub a: f32,
    /// 0 = main reconstruction, 1 = auxiliary (AuxK / Multi-TopK) residual
    pub src: u8,
}

/// Active pairs transposed to latent-major order (counting sort, stable in token order), so the
/// weight-gradient scatters can be split by latent across threads without races and in a
/// thread-count-independent order.
#[derive(Default)]
pub(crate) struct LatentMajor {
    pub counts: Vec<u32>,
    pub touched: Vec<u32>,
    /// start offset of each touched latent's run in `entries` (len touched+1)
    pub offsets: Vec<usize>,
    pub entries: Vec<Entry>,
    /// slot of each latent in `touched`, u32::MAX if untouched
    pub slot: Vec<u32>,
}

impl LatentMajor {
    /// Every latent touched, slot = latent (dense gradients).
    pub fn set_dense(&mut self, d_sae: usize) {
        if self.counts.len() != d_sae {
            self.counts = vec![0; d_sae];
            self.slot = vec![u32::MAX; d_sae];
        }
        for &j in &self.touched {
            self.counts[j as usize] = 0;
        }
        self.touched = (0..d_sae as u32).collect();
        self.slot.clone_from(&self.touched);
        self.offsets.clear();
        self.entries.clear();
    }

    /// The active pairs of `lists`, each `(latent ids, values, slots per row, source)` over rows in order
    /// with `u32::MAX` for an empty slot, given in ascending source order: each latent's entries then run
    /// by source, then token (what [`fused_sparse_backward`]'s grouped walk relies on).
    pub fn build(&mut self, d_sae: usize, lists: &[(&[u32], &[f32], usize, u8)]) {
        debug_assert!(lists.windows(2).all(|w| w[0].3 < w[1].3), "lists out of source order");
        if self.counts.len() != d_sae {
            self.counts = vec![0; d_sae];
            self.slot = vec![u32::MAX; d_sae];
        }
        // undo the previous step's marks (touched-only reset, O(active) not O(d_sae))
        for &j in &self.touched {
            self.counts[j as usize] = 0;
            self.slot[j as usize] = u32::MAX;
        }
        self.touched.clear();
        let mut total = 0usize;
        for (idx, val, _, _) in lists {
            for (&j, &v) in idx.iter().zip(val.iter()) {
                if j != u32::MAX && v != 0.0 {
                    if self.counts[j as usize] == 0 {
                        self.touched.push(j);
                    }
                    self.counts[j as usize] += 1;
                    total += 1;
                }
            }
        }
        self.touched.sort_unstable();
        self.offsets.clear();
        let mut acc = 0usize;
        for (u, &j) in self.touched.iter().enumerate() {
            self.offsets.push(acc);
            self.slot[j as usize] = u as u32;
            acc += self.counts[j as usize] as usize;
        }
        self.offsets.push(acc);
        self.entries.clear();
        self.entries.resize(total, Entry::default());
        let mut cursor: Vec<usize> = self.offsets[..self.touched.len()].to_vec();
        for (idx, val, k, src) in lists {
            for (p, (&j, &v)) in idx.iter().zip(val.iter()).enumerate() {
                if j != u32::MAX && v != 0.0 {
                    let u = self.slot[j as usize] as usize;
                    self.entries[cursor[u]] = Entry { t: (p / k) as u32, a: v, src: *src };
                    cursor[u] += 1;
                }
            }
        }
    }
}

/// Latents with at least this many entries in a step take [`heavy_group_backward`]'s row-major walk:
/// AuxK's dead latents enter about half the rows of a batch, and a frequent latent of any kind can.
const HEAVY_ENTRIES: usize = 256;
/// How many heavy latents one walk serves: their gradient and decoder rows (3 x 32 rows of `d` floats)
/// stay in L2 while each batch row they share is read from the last-level cache once for all of them.
/// 32 cut the backward of AuxK's dead latents by a third on SmolLM2's width (8 and 16 by less; BENCHMARKS.md).
const HEAVY_GROUP: usize = 32;

/// The whole sparse backward of the touched latents, per latent:
/// `ga = <dy_src[t], W_dec[j]>` (ReLU' = 1 on selected latents), then
/// `g_enc[u] = Σ ga · xin[t]`, `g_benc[u] = Σ ga`, `g_dec[u] = Σ a · dy_src[t]`, each sum in the
/// order of the latent's entries.
/// `l1 = (λ/B, ‖W_dec‖)` adds ReLU+L1's terms: λ/B·‖W_dec,j‖ to each `ga`, and
/// λ/B·(Σ_t a_tj)·W_dec,j/‖W_dec,j‖ to `g_dec[u]`.
/// A latent with few entries is done in one pass over them, its decoder row in L1 while its tokens'
/// rows stream by. Latents with many entries ([`HEAVY_ENTRIES`]) are walked [`HEAVY_GROUP`] at a time in
/// token order instead, so that a batch row is read once for the group rather than once per latent;
/// every sum is the same FMAs in the same order either way.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused_sparse_backward<E: RowElem>(
    lm: &LatentMajor,
    (d_in, d_out): (usize, usize),
    dy: &[&[E]],
    xin: &[E],
    w_dec: &[f32],
    g_enc: &mut [f32],
    g_dec: &mut [f32],
    g_benc: &mut [f32],
    l1: Option<(f32, &[f32])>,
) {
    let inputs = BackwardInputs { lm, d_in, d_out, dy, xin, w_dec, l1 };
    backward_by_weight(&inputs, g_enc, g_dec, g_benc, HEAVY_ENTRIES);
}

/// What every latent's backward reads.
struct BackwardInputs<'a, E> {
    lm: &'a LatentMajor,
    d_in: usize,
    d_out: usize,
    /// The output gradient of each entry source (main, AuxK, Multi-TopK), [rows, d_out] each.
    dy: &'a [&'a [E]],
    xin: &'a [E],
    w_dec: &'a [f32],
    l1: Option<(f32, &'a [f32])>,
}

impl<'a, E: RowElem> BackwardInputs<'a, E> {
    fn entries(&self, u: usize) -> &'a [Entry] {
        &self.lm.entries[self.lm.offsets[u]..self.lm.offsets[u + 1]]
    }

    fn dy_row(&self, src: u8, t: u32) -> &'a [E] {
        &self.dy[src as usize][t as usize * self.d_out..][..self.d_out]
    }

    fn x_row(&self, t: u32) -> &'a [E] {
        &self.xin[t as usize * self.d_in..][..self.d_in]
    }

    fn w_dec_row(&self, u: usize) -> &'a [f32] {
        let j = self.lm.touched[u] as usize;
        &self.w_dec[j * self.d_out..][..self.d_out]
    }

    /// ReLU+L1's `λ/B · ‖W_dec,j‖`, which every entry's `ga` gains (0 without L1).
    fn l1_ga(&self, u: usize) -> f32 {
        self.l1.map_or(0.0, |(cb, norms)| cb * norms[self.lm.touched[u] as usize])
    }

    /// The last of a latent's gradients once its entries are summed (`sums` = (Σ ga, Σ a)): L1's decoder
    /// term into `gd`; returns `g_benc`.
    fn finish(&self, u: usize, (sum_ga, sum_a): (f32, f32), gd: &mut [f32]) -> f32 {
        if let Some((cb, norms)) = self.l1 {
            let norm = norms[self.lm.touched[u] as usize];
            if norm > 0.0 {
                // ∂/∂W_dec,j of λ·Σ_t a_tj‖W_dec,j‖
                axpy(cb * sum_a / norm, self.w_dec_row(u), gd);
            }
        }
        sum_ga
    }
}

/// One touched latent's gradient rows.
struct LatentGrads<'g> {
    enc: &'g mut [f32],
    dec: &'g mut [f32],
    b_enc: &'g mut f32,
}

/// [`fused_sparse_backward`] with latents of at least `heavy_from` entries walked in groups.
fn backward_by_weight<E: RowElem>(
    inputs: &BackwardInputs<'_, E>,
    g_enc: &mut [f32],
    g_dec: &mut [f32],
    g_benc: &mut [f32],
    heavy_from: usize,
) {
    const BLK: usize = 16;
    let n = inputs.lm.touched.len();
    let (mut light, mut heavy) = (Vec::with_capacity(n), Vec::new());
    let rows = g_enc[..n * inputs.d_in].chunks_mut(inputs.d_in).zip(g_dec[..n * inputs.d_out].chunks_mut(inputs.d_out));
    for (u, ((enc, dec), b_enc)) in rows.zip(&mut g_benc[..n]).enumerate() {
        let side = if inputs.entries(u).len() >= heavy_from { &mut heavy } else { &mut light };
        side.push((u, LatentGrads { enc, dec, b_enc }));
    }
    rayon::join(
        || light.par_chunks_mut(BLK).for_each(|block| light_block_backward(inputs, block)),
        || heavy.par_chunks_mut(HEAVY_GROUP).for_each(|group| heavy_group_backward(inputs, group)),
    );
}

/// Latent after latent, each in one pass over its entries: the decoder row stays in L1 while the dy / xin
/// rows of its tokens ([batch, d] each, in the last-level cache) stream by.
fn light_block_backward<'a, E: RowElem>(inputs: &BackwardInputs<'a, E>, block: &mut [(usize, LatentGrads<'_>)]) {
    let mut ga = Vec::new();
    let mut terms: Vec<(f32, &'a [E])> = Vec::new();
    for i in 0..block.len() {
        if let Some(&(next, _)) = block.get(i + 1) {
            // the next latent's rows are scattered over the batch: start fetching them now
            for e in inputs.entries(next) {
                prefetch(inputs.dy_row(e.src, e.t));
                prefetch(inputs.x_row(e.t));
            }
        }
        let (u, g) = &mut block[i];
        let entries = inputs.entries(*u);
        entry_dots(entries, |e| inputs.dy_row(e.src, e.t), inputs.w_dec_row(*u), &mut ga);
        let c = inputs.l1_ga(*u);
        ga.iter_mut().for_each(|g| *g += c);
        terms.clear();
        terms.extend(ga.iter().zip(entries).map(|(&g, e)| (g, inputs.x_row(e.t))));
        g.enc.fill(0.0);
        add_scaled(&terms, g.enc);
        terms.clear();
        terms.extend(entries.iter().map(|e| (e.a, inputs.dy_row(e.src, e.t))));
        g.dec.fill(0.0);
        add_scaled(&terms, g.dec);
        let sums = ga.iter().zip(entries).fold((0.0f32, 0.0f32), |(sb, sa), (&g, e)| (sb + g, sa + e.a));
        *g.b_enc = inputs.finish(*u, sums, g.dec);
    }
}

/// Up to [`HEAVY_GROUP`] latents at once, in token order: each batch row any of them selected is read
/// once, dotted with their decoder rows (four at a time, each bit for bit [`dot`]) and added into
/// their gradient rows (each bit for bit [`add_scaled`]'s FMA for that term). A latent's entries are
/// ordered by source, then token ([`LatentMajor::build`]), so walking source by source, token by token
/// visits each latent's entries in their order.
fn heavy_group_backward<E: RowElem>(inputs: &BackwardInputs<'_, E>, group: &mut [(usize, LatentGrads<'_>)]) {
    let m = group.len();
    let entries: Vec<&[Entry]> = group.iter().map(|(u, _)| inputs.entries(*u)).collect();
    let w: Vec<&[f32]> = group.iter().map(|(u, _)| inputs.w_dec_row(*u)).collect();
    let l1_ga: Vec<f32> = group.iter().map(|(u, _)| inputs.l1_ga(*u)).collect();
    let (mut next, mut sums) = (vec![0usize; m], vec![(0.0f32, 0.0f32); m]);
    for (_, g) in group.iter_mut() {
        g.enc.fill(0.0);
        g.dec.fill(0.0);
    }
    let at = |next: &[usize], i: usize, src: u8| entries[i].get(next[i]).filter(|e| e.src == src).map(|e| e.t);
    let mut members = Vec::with_capacity(m);
    for src in 0..inputs.dy.len() as u8 {
        while let Some(t) = (0..m).filter_map(|i| at(&next, i, src)).min() {
            members.clear();
            members.extend((0..m).filter(|&i| at(&next, i, src) == Some(t)));
            let (dy, x) = (inputs.dy_row(src, t), inputs.x_row(t));
            let mut ga = [0.0f32; HEAVY_GROUP];
            for (quad, out) in members.chunks(4).zip(ga.chunks_mut(4)) {
                if let [a, b, c, d] = *quad {
                    out.copy_from_slice(&dot4([w[a], w[b], w[c], w[d]], dy));
                } else {
                    out.iter_mut().zip(quad).for_each(|(o, &i)| *o = dot(w[i], dy));
                }
            }
            for (&i, &g) in members.iter().zip(&ga) {
                let (e, g) = (entries[i][next[i]], g + l1_ga[i]);
                axpy(g, x, group[i].1.enc);
                axpy(e.a, dy, group[i].1.dec);
                sums[i] = (sums[i].0 + g, sums[i].1 + e.a);
                next[i] += 1;
            }
        }
    }
    for (i, (u, g)) in group.iter_mut().enumerate() {
        debug_assert_eq!(next[i], entries[i].len(), "entries not in (source, token) order");
        *g.b_enc = inputs.finish(*u, sums[i], g.dec);
    }
}

/// Ask the CPU to bring every cache line of `row` into L1 (a hint: no effect on results).
#[inline(always)]
fn prefetch<E>(row: &[E]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(64 / std::mem::size_of::<E>()) {
        // SAFETY: a prefetch reads nothing architecturally; the address is inside `row`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
    }
}

/// `ga[i] = <dy of entries[i], w>`, four entries at a time (each bit for bit [`dot`]).
fn entry_dots<'a, E: RowElem>(entries: &[Entry], dy_of: impl Fn(&Entry) -> &'a [E], w: &[f32], ga: &mut Vec<f32>) {
    ga.clear();
    let mut quads = entries.chunks_exact(4);
    for q in &mut quads {
        ga.extend(dot4([dy_of(&q[0]), dy_of(&q[1]), dy_of(&q[2]), dy_of(&q[3])], w));
    }
    ga.extend(quads.remainder().iter().map(|e| dot(dy_of(e), w)));
}

/// Sum over rows of a [rows, d] matrix, in fixed 64-row blocks (thread-count independent).
pub(crate) fn column_sum(m: &[f32], d: usize, out: &mut [f32]) {
    let rows = m.len() / d;
    let blocks: Vec<Vec<f64>> = (0..rows.div_ceil(64))
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0.0f64; d];
            for r in b * 64..((b + 1) * 64).min(rows) {
                for (a, &v) in acc.iter_mut().zip(&m[r * d..(r + 1) * d]) {
                    *a += v as f64;
                }
            }
            acc
        })
        .collect();
    let mut tot = vec![0.0f64; d];
    for b in blocks {
        for (t, v) in tot.iter_mut().zip(b) {
            *t += v;
        }
    }
    for (o, t) in out.iter_mut().zip(tot) {
        *o = t as f32;
    }
}

/// Rows per block of [`row_reduce`]: each block is summed in row order, then the blocks in order.
pub(crate) const REDUCE_ROWS: usize = 64;

/// Σ f(row) over rows in fixed blocks, f64 accumulation.
pub(crate) fn row_reduce<F: Fn(usize) -> f64 + Sync>(rows: usize, f: F) -> f64 {
    let parts: Vec<f64> = (0..rows.div_ceil(REDUCE_ROWS))
        .into_par_iter()
        .map(|b| (b * REDUCE_ROWS..((b + 1) * REDUCE_ROWS).min(rows)).map(&f).sum::<f64>())
        .collect();
    parts.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_the_update_wrote_is_packed_again_when_the_encoder_changed_since() {
        let (n, k) = (40, 24);
        let mut w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let precision = Precision::Bf16(Bf16Path::Reference);
        let mut copy = EncoderCopy::default();
        EncoderWeights::prepare(precision, &w, (n, k), &mut copy);
        let packed = copy.for_update().expect("a bf16 forward keeps its copy");
        *packed = PackedB::from_nk(&w, n, k);
        copy.written(&w);
        // rescaled after the update (as folding a scale into the weights does): trusting the
        // update's copy would encode with the old weights (and trip the debug check)
        w.iter_mut().for_each(|v| *v *= 2.0);
        EncoderWeights::prepare(precision, &w, (n, k), &mut copy);
        assert!(copy.packed == Some(PackedB::from_nk(&w, n, k)), "the stale copy was used");
        // untouched since the update: trusted, and only once
        let packed = copy.for_update().unwrap();
        *packed = PackedB::from_nk(&w, n, k);
        copy.written(&w);
        assert!(copy.written_for.is_some());
        EncoderWeights::prepare(precision, &w, (n, k), &mut copy);
        assert!(copy.written_for.is_none(), "a copy is trusted once");
    }

    /// Per row, the top `k` of `pre + b` above 0 by value, ties to the lower latent, padded with empty
    /// slots: sorted outright, no running threshold, no blocks.
    fn sorted_top_k(pre: &[f32], b: &[f32], width: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
        sorted_top_k_among(pre, b, width, k, |_| true)
    }

    /// [`sorted_top_k`] over the latents `keep` accepts.
    fn sorted_top_k_among(
        pre: &[f32],
        b: &[f32],
        width: usize,
        k: usize,
        keep: impl Fn(usize) -> bool,
    ) -> (Vec<f32>, Vec<u32>) {
        let (mut vals, mut idx) = (Vec::new(), Vec::new());
        for row in pre.chunks(width) {
            let mut all: Vec<(f32, u32)> = row
                .iter()
                .zip(b)
                .enumerate()
                .filter(|&(j, _)| keep(j))
                .map(|(j, (&p, &bb))| (p + bb, j as u32))
                .filter(|&(v, _)| v > 0.0)
                .collect();
            all.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            all.resize(k, (0.0, u32::MAX));
            all.truncate(k);
            vals.extend(all.iter().map(|p| p.0));
            idx.extend(all.iter().map(|p| p.1));
        }
        (vals, idx)
    }

    #[test]
    fn selection_panel_by_panel_equals_a_full_sort_with_ties_nans_sparse_rows_and_dead_latents() {
        let (rows, width) = (7, 5000);
        // values on a coarse grid (many ties), a NaN every 97th, and row 3 almost all negative
        let pre: Vec<f32> = (0..rows * width)
            .map(|i| {
                let (r, j) = (i / width, i % width);
                let v = ((j * 7919 + r * 104_729) % 4001) as f32 / 200.0 - 10.0;
                if j % 97 == 5 {
                    f32::NAN
                } else if r == 3 && j % 400 != 0 {
                    -v.abs() - 1.0
                } else {
                    v
                }
            })
            .collect();
        let b: Vec<f32> = (0..width).map(|j| ((j % 13) as f32 - 6.0) / 8.0).collect();
        // AuxK's dead latents: a scattered few, and a run at the start of the second 700-wide chunk
        let dead: Vec<bool> = (0..width).map(|j| j % 37 == 3 || (700..760).contains(&j)).collect();
        for (k, ka) in [(1, 1), (5, 64), (32, 7), (200, 30)] {
            let (want_v, want_i) = sorted_top_k(&pre, &b, width, k);
            let (want_av, want_ai) = sorted_top_k_among(&pre, &b, width, ka, |j| dead[j]);
            for chunk in [width, 700, 64] {
                for with_aux in [false, true] {
                    let (mut vals, mut idx) = (vec![0.0; rows * k], vec![0u32; rows * k]);
                    let (mut av, mut ai) = (vec![0.0; rows * ka], vec![0u32; rows * ka]);
                    reset_selection(&mut vals, &mut idx);
                    reset_selection(&mut av, &mut ai);
                    let dead_ids: Vec<u32> = (0..width as u32).filter(|&j| dead[j as usize]).collect();
                    let aux = with_aux.then_some((&mut av[..], &mut ai[..], ka));
                    let mut rows_sel = row_selections((&mut vals, &mut idx), k, aux, rows, SelectionFloor::default());
                    for j0 in (0..width).step_by(chunk) {
                        let w = chunk.min(width - j0);
                        for (r, sel) in rows_sel.iter_mut().enumerate() {
                            sel.add_panel(&pre[r * width + j0..][..w], j0, &b, &dead_ids);
                        }
                    }
                    drop(rows_sel);
                    assert_eq!(idx, want_i, "k {k}, chunks of {chunk}, aux {with_aux}");
                    assert_eq!(vals, want_v, "k {k}, chunks of {chunk}, aux {with_aux}");
                    if with_aux {
                        assert_eq!(ai, want_ai, "k_aux {ka}, chunks of {chunk}");
                        assert_eq!(av, want_av, "k_aux {ka}, chunks of {chunk}");
                    }
                }
            }
        }
    }

    /// The bits of the gradients [`backward_by_weight`] writes for `n` touched latents.
    fn grads_bits<E: RowElem>(inputs: &BackwardInputs<'_, E>, n: usize, heavy_from: usize) -> [Vec<u32>; 3] {
        let (d_in, d_out) = (inputs.d_in, inputs.d_out);
        let (mut ge, mut gd, mut gb) = (vec![f32::NAN; n * d_in], vec![f32::NAN; n * d_out], vec![f32::NAN; n]);
        backward_by_weight(inputs, &mut ge, &mut gd, &mut gb, heavy_from);
        [ge, gd, gb].map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
    }

    #[test]
    fn grouped_walk_of_heavy_latents_equals_the_per_latent_pass_bit_for_bit_in_f32_and_bf16_rows() {
        // widths off the 16- and 64-lane blocks; three sources as TopK + AuxK + Multi-TopK give them
        let (rows, d_in, d_out, d_sae) = (300, 70, 83, 40);
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut rnd = |n: usize| (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect::<Vec<f32>>();
        let (xin, w_dec, norms) = (rnd(rows * d_in), rnd(d_sae * d_out), rnd(d_sae));
        let dys = [rnd(rows * d_out), rnd(rows * d_out), rnd(rows * d_out)];
        // per row: latents 0-5 (heavy: nearly every row in the aux list), a few scattered light ones,
        // some empty slots and zero values (both skipped)
        let mut list = |k: usize, heavy: bool| {
            let (mut idx, mut val) = (Vec::new(), Vec::new());
            for r in 0..rows {
                for s in 0..k {
                    let h = rng.gen_range(-1.0f32..1.0);
                    let j = if heavy && s < 6 && h > -0.9 { s as u32 } else { ((h + 1.0) * 17.0) as u32 + 6 };
                    let empty = h > 0.95 || (s > 0 && idx[r * k..].contains(&j));
                    idx.push(if empty { u32::MAX } else { j });
                    val.push(if (h * 100.0) as i32 == 3 { 0.0 } else { h.abs() + 0.1 });
                }
            }
            (idx, val)
        };
        let (main, aux, multi) = (list(4, false), list(8, true), list(5, true));
        let mut lm = LatentMajor::default();
        lm.build(d_sae, &[(&main.0, &main.1, 4, 0), (&aux.0, &aux.1, 8, 1), (&multi.0, &multi.1, 5, 2)]);
        let n = lm.touched.len();
        let heavy = (0..n).filter(|&u| lm.offsets[u + 1] - lm.offsets[u] >= 200).count();
        assert!(heavy >= 5 && heavy < n, "{heavy} heavy of {n}");
        let dy: Vec<&[f32]> = dys.iter().map(|d| &d[..]).collect();
        // the same rows rounded to bf16, as bf16 bits and widened back to f32
        let round = |v: &[f32]| v.iter().map(|&x| Bf16::round(x)).collect::<Vec<_>>();
        let widen = |v: &[Bf16]| v.iter().map(|b| b.widen()).collect::<Vec<_>>();
        let (x16, dys16) = (round(&xin), dys.each_ref().map(|d| round(d)));
        let (x16_f32, dys16_f32) = (widen(&x16), dys16.each_ref().map(|d| widen(d)));
        let dy16: Vec<&[Bf16]> = dys16.iter().map(|d| &d[..]).collect();
        let dy16_f32: Vec<&[f32]> = dys16_f32.iter().map(|d| &d[..]).collect();
        assert!(x16_f32 != xin, "the rounding changed nothing");
        for l1 in [None, Some((0.01f32, &norms[..]))] {
            let inputs = BackwardInputs { lm: &lm, d_in, d_out, dy: &dy, xin: &xin, w_dec: &w_dec, l1 };
            let run = |heavy_from: usize| grads_bits(&inputs, n, heavy_from);
            let per_latent = run(usize::MAX);
            for heavy_from in [1, 200] {
                assert_eq!(run(heavy_from), per_latent, "heavy from {heavy_from} entries, l1 {}", l1.is_some());
            }
            // bf16 rows: both walks give the f32 pass over the rounded rows, bit for bit
            let bf16 = BackwardInputs { lm: &lm, d_in, d_out, dy: &dy16, xin: &x16, w_dec: &w_dec, l1 };
            let rounded = BackwardInputs { lm: &lm, d_in, d_out, dy: &dy16_f32, xin: &x16_f32, w_dec: &w_dec, l1 };
            let want = grads_bits(&rounded, n, usize::MAX);
            for heavy_from in [usize::MAX, 1, 200] {
                assert_eq!(grads_bits(&bf16, n, heavy_from), want, "bf16 rows, heavy from {heavy_from}");
            }
            // and the per-latent pass itself against a plain f64 sum of one heavy latent's encoder gradient
            let u = (0..n).find(|&u| lm.offsets[u + 1] - lm.offsets[u] >= 200).expect("a heavy latent");
            let c = l1.map_or(0.0, |(cb, nr)| (cb * nr[lm.touched[u] as usize]) as f64);
            let w = &w_dec[lm.touched[u] as usize * d_out..][..d_out];
            for col in [0, 37, d_in - 1] {
                let want: f64 = lm.entries[lm.offsets[u]..lm.offsets[u + 1]]
                    .iter()
                    .map(|e| {
                        let dyr = &dys[e.src as usize][e.t as usize * d_out..][..d_out];
                        let ga = dyr.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() + c;
                        ga * xin[e.t as usize * d_in + col] as f64
                    })
                    .sum();
                let got = f32::from_bits(per_latent[0][u * d_in + col]) as f64;
                assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "col {col}: {got} vs {want}");
            }
        }
    }
}
