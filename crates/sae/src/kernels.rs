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

/// The encoder weights `w_enc` ([d_sae, d_in]) in one precision, ready for products with any rows:
/// as stored in f32, or rounded to bf16 and packed. Only [`EncoderWeights::prepare`] and
/// [`EncoderWeights::packed`] make one, so a bf16 product always has its packed weights.
pub(crate) enum EncoderWeights<'a> {
    F32 { w_enc: &'a [f32], d_in: usize },
    Bf16 { path: Bf16Path, w_enc: Cow<'a, PackedB> },
}

impl<'a> EncoderWeights<'a> {
    /// `w_enc` in `precision`, packed for bf16 into `slot`, whose buffer is reused from step to step
    /// (the weights change every step, their shape does not); f32 empties the slot.
    pub(crate) fn prepare(
        precision: Precision,
        w_enc: &'a [f32],
        (d_sae, d_in): (usize, usize),
        slot: &'a mut Option<PackedB>,
    ) -> Self {
        let Some(path) = precision.bf16_path() else {
            *slot = None;
            return EncoderWeights::F32 { w_enc, d_in };
        };
        let packed = match slot.take() {
            Some(mut p) if p.n == d_sae && p.k == d_in => {
                p.repack_nk(w_enc);
                p
            }
            _ => PackedB::from_nk(w_enc, d_sae, d_in),
        };
        EncoderWeights::Bf16 { path, w_enc: Cow::Borrowed(slot.insert(packed)) }
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
    /// Latents per chunk: bf16 chunks start on the packed weight's 32-column blocks.
    pub(crate) fn chunk_width(&self, chunk: usize) -> usize {
        match self {
            EncoderProduct::F32 { .. } => chunk,
            EncoderProduct::Bf16 { .. } => (chunk / 32 * 32).max(32),
        }
    }

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

#[inline(always)]
fn dot_body<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    // 16 independent accumulators in fixed order -> vectorised and deterministic
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] = if FMA { x[l].mul_add(y[l], acc[l]) } else { acc[l] + x[l] * y[l] };
        }
    }
    let mut s = 0.0f32;
    for l in 0..8 {
        s += acc[l] + acc[l + 8];
    }
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn axpy_body<const FMA: bool>(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = if FMA { alpha.mul_add(*xi, *yi) } else { *yi + alpha * xi };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    dot_body::<true>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_fma(alpha: f32, x: &[f32], y: &mut [f32]) {
    axpy_body::<true>(alpha, x, y)
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

/// Dot product (AVX2+FMA when the CPU has it; the choice is per machine, so results are
/// reproducible on one machine whatever the thread count).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU supports avx2 and fma (checked above).
        return unsafe { dot_fma(a, b) };
    }
    dot_body::<false>(a, b)
}

/// `y += alpha · x`.
#[inline]
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU supports avx2 and fma (checked above).
        return unsafe { axpy_fma(alpha, x, y) };
    }
    axpy_body::<false>(alpha, x, y)
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

/// The running top-k of one row of a chunk: blocks of 32 in which no value beats the current k-th
/// are skipped whole. The test is an OR of comparisons, which vectorises; a running maximum would not
/// (a float max folded in order is a chain LLVM must keep), and it skips exactly the same blocks.
#[inline(always)]
fn select_row(row: &[f32], b: &[f32], j0: usize, vals: &mut [f32], idx: &mut [u32]) {
    let k = vals.len();
    let mut thr = vals[k - 1];
    const BW: usize = 32;
    for (bi, (pb, bbk)) in row.chunks(BW).zip(b.chunks(BW)).enumerate() {
        let mut any_above = false;
        for (&p, &bb) in pb.iter().zip(bbk) {
            any_above |= p + bb > thr;
        }
        if !any_above {
            continue;
        }
        for (jj, (&p, &bb)) in pb.iter().zip(bbk).enumerate() {
            let v = p + bb;
            if v > thr {
                topk_insert(vals, idx, v, (j0 + bi * BW + jj) as u32);
                thr = vals[k - 1];
            }
        }
    }
}

/// Reset selection state: value 0 with index u32::MAX means an empty slot (ReLU: only strictly
/// positive pre-activations can be selected).
pub(crate) fn reset_selection(vals: &mut [f32], idx: &mut [u32]) {
    vals.fill(0.0);
    idx.fill(u32::MAX);
}

/// AuxK's running selection: per row the top `k` pre-activations among the latents flagged dead.
pub(crate) struct DeadSelection<'a> {
    pub dead: &'a [bool],
    pub k: usize,
    pub val: &'a mut [f32],
    pub idx: &'a mut [u32],
}

/// Fused bias + ReLU + running top-k over one latent chunk `[j0, j0+width)` of the pre-activation
/// buffer (`pre` has row stride `ld`). `sel_*` has `k` slots per row. If `aux` is given, also keeps
/// the top `k_aux` pre-activations among latents flagged dead.
#[allow(clippy::too_many_arguments)]
pub(crate) fn select_topk_chunk(
    pre: &[f32],
    ld: usize,
    rows: usize,
    j0: usize,
    width: usize,
    b_enc: &[f32],
    k: usize,
    sel_val: &mut [f32],
    sel_idx: &mut [u32],
    aux: Option<DeadSelection<'_>>,
) {
    let b = &b_enc[j0..j0 + width];
    match aux {
        None => {
            sel_val[..rows * k].par_chunks_mut(k).zip(sel_idx[..rows * k].par_chunks_mut(k)).enumerate().for_each(
                |(r, (vals, idx))| {
                    let row = &pre[r * ld..r * ld + width];
                    saekit_kernels::dispatch_simd!(select_row(row, b, j0, vals, idx))
                },
            );
        }
        Some(DeadSelection { dead, k: ka, val: aval, idx: aidx }) => {
            let dead = &dead[j0..j0 + width];
            sel_val[..rows * k]
                .par_chunks_mut(k)
                .zip(sel_idx[..rows * k].par_chunks_mut(k))
                .zip(aval[..rows * ka].par_chunks_mut(ka).zip(aidx[..rows * ka].par_chunks_mut(ka)))
                .enumerate()
                .for_each(|(r, ((vals, idx), (av, ai)))| {
                    let row = &pre[r * ld..r * ld + width];
                    let mut thr = vals[k - 1];
                    let mut athr = av[ka - 1];
                    for (jj, (&p, &bb)) in row.iter().zip(b).enumerate() {
                        let v = p + bb;
                        if v > thr {
                            topk_insert(vals, idx, v, (j0 + jj) as u32);
                            thr = vals[k - 1];
                        }
                        if dead[jj] && v > athr {
                            topk_insert(av, ai, v, (j0 + jj) as u32);
                            athr = av[ka - 1];
                        }
                    }
                });
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
    out.par_chunks_mut(d).enumerate().for_each(|(t, o)| {
        match bias {
            Some(b) => o.copy_from_slice(&b[..d]),
            None => o.fill(0.0),
        }
        for s in 0..k {
            let j = sel_idx[t * k + s];
            let v = sel_val[t * k + s];
            if j != u32::MAX && v != 0.0 {
                let j = j as usize;
                axpy(v, &w[j * d..(j + 1) * d], o);
            }
        }
    });
}

/// One active (token, latent) pair, ordered by latent then token in [`LatentMajor`].
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

    pub fn build(&mut self, d_sae: usize, lists: &[(&[u32], &[f32], usize, u8)]) {
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

/// The whole sparse backward of the touched latents, latent-major, in one pass per latent:
/// `ga = <dy_src[t], W_dec[j]>` (ReLU' = 1 on selected latents), then
/// `g_enc[u] = Σ ga · xin[t]`, `g_benc[u] = Σ ga`, `g_dec[u] = Σ a · dy_src[t]`.
/// `l1 = (λ/B, ‖W_dec‖)` adds ReLU+L1's terms: λ/B·‖W_dec,j‖ to each `ga`, and
/// λ/B·(Σ_t a_tj)·W_dec,j/‖W_dec,j‖ to `g_dec[u]`.
/// The decoder row stays in L1 while its tokens stream by; the dy / xin rows it reads
/// ([batch, d_in] each) fit in the last-level cache, unlike the [d_sae, d_in] decoder.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused_sparse_backward(
    lm: &LatentMajor,
    (d_in, d_out): (usize, usize),
    dy: &[&[f32]],
    xin: &[f32],
    w_dec: &[f32],
    g_enc: &mut [f32],
    g_dec: &mut [f32],
    g_benc: &mut [f32],
    l1: Option<(f32, &[f32])>,
) {
    let n = lm.touched.len();
    const BLK: usize = 16;
    g_enc[..n * d_in]
        .par_chunks_mut(d_in * BLK)
        .zip(g_dec[..n * d_out].par_chunks_mut(d_out * BLK))
        .zip(g_benc[..n].par_chunks_mut(BLK))
        .enumerate()
        .for_each(|(bi, ((ge, gd), gb))| {
            for (uu, gbv) in gb.iter_mut().enumerate() {
                let u = bi * BLK + uu;
                let j = lm.touched[u] as usize;
                let w = &w_dec[j * d_out..(j + 1) * d_out];
                let ge = &mut ge[uu * d_in..(uu + 1) * d_in];
                let gd = &mut gd[uu * d_out..(uu + 1) * d_out];
                ge.fill(0.0);
                gd.fill(0.0);
                // ReLU + λ·a‖W_dec,j‖: dL/dpre gains λ‖W_dec,j‖ on every active entry
                let (c, norm) = l1.map_or((0.0, 0.0), |(cb, n)| (cb * n[j], n[j]));
                let (mut sb, mut sa) = (0.0f32, 0.0f32);
                for e in &lm.entries[lm.offsets[u]..lm.offsets[u + 1]] {
                    let t = e.t as usize;
                    let dyt = &dy[e.src as usize][t * d_out..(t + 1) * d_out];
                    let ga = dot(dyt, w) + c;
                    axpy(ga, &xin[t * d_in..(t + 1) * d_in], ge);
                    sb += ga;
                    sa += e.a;
                    axpy(e.a, dyt, gd);
                }
                if let Some((cb, _)) = l1 {
                    if norm > 0.0 {
                        // ∂/∂W_dec,j of λ·Σ_t a_tj‖W_dec,j‖
                        axpy(cb * sa / norm, w, gd);
                    }
                }
                *gbv = sb;
            }
        });
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

/// Σ f(row) over rows in fixed blocks, f64 accumulation.
pub(crate) fn row_reduce<F: Fn(usize) -> f64 + Sync>(rows: usize, f: F) -> f64 {
    let parts: Vec<f64> = (0..rows.div_ceil(64))
        .into_par_iter()
        .map(|b| (b * 64..((b + 1) * 64).min(rows)).map(&f).sum::<f64>())
        .collect();
    parts.iter().sum()
}
