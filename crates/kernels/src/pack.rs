//! bf16 rounding and the packed layouts every path reads.
//!
//! `B` (the weight) is packed once into the layout of an AMX `B` tile, which is also what
//! `vdpbf16ps` wants: for each pair of k and each column, the two bf16 values side by side
//! ("VNNI" order). Columns go in pairs of 16-wide strips so one 32x32 output block reads both of
//! its strips at a fixed distance (1 KiB), and each strip pair is contiguous over k:
//!
//! `data[(((q * kt + kb) * 2 + h) * 16 + r) * 32 + c * 2 + e]` holds `B[k, n]` with
//! `n = 32q + 16h + c` and `k = 32kb + 2r + e`; `K` and `N` are padded with zeros to multiples of 32.

use rayon::prelude::*;

/// Rows and columns of one output block, and the `k` of one tile.
pub(crate) const BLOCK: usize = 32;
/// `u16` values in one 16-row x 64-byte tile.
pub(crate) const TILE: usize = 512;

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits; NaN stays a (quiet) NaN.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    // a select, not a branch, so a loop of conversions vectorises
    (if x.is_nan() { (bits >> 16) | 0x40 } else { rounded }) as u16
}

/// The f32 value of a bf16 given by its bits (exact).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `x` rounded to bf16 and back: the value a bf16 path computes with.
#[inline(always)]
pub fn round_to_bf16(x: f32) -> f32 {
    bf16_to_f32(bf16_bits(x))
}

pub(crate) fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// 32 bf16 values on one 64-byte cache line.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C, align(64))]
struct CacheLine([u16; 32]);

/// A zero-initialised `[u16]` that starts on a cache line. A tile load whose 64-byte rows straddle two
/// lines runs ~4x slower (measured: 1.45 TFLOP/s per core aligned, 0.31 at a 16-byte offset), and
/// `Vec<u16>` only promises 2-byte alignment.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct AlignedBuf {
    lines: Vec<CacheLine>,
    len: usize,
}

impl AlignedBuf {
    /// `len` zeros.
    fn zeros(len: usize) -> Self {
        let mut buf = Self::default();
        buf.reset(len);
        buf
    }

    /// Become `len` zeros, keeping the allocation when it is large enough.
    fn reset(&mut self, len: usize) {
        self.lines.clear();
        self.resize_for_overwrite(len);
    }

    /// Become `len` values, keeping the allocation and whatever it held: for a caller that writes
    /// every value (zeroing first would cost as much as the conversion).
    fn resize_for_overwrite(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(32), CacheLine::default());
        self.len = len;
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.lines.capacity() * 32
    }

    pub(crate) fn as_ptr(&self) -> *const u16 {
        self.lines.as_ptr().cast()
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u16 {
        self.lines.as_mut_ptr().cast()
    }

    pub(crate) fn as_slice(&self) -> &[u16] {
        // SAFETY: as in `as_mut_slice`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u16] {
        // SAFETY: the lines are `len.div_ceil(32)` initialised, padding-free arrays of 32 `u16`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// A weight matrix `B[k, n]` in bf16, packed for [`crate::gemm_bf16`].
#[derive(Debug, Clone, PartialEq)]
pub struct PackedB {
    /// Inner dimension (the input width).
    pub k: usize,
    /// Output columns.
    pub n: usize,
    pub(crate) k_pad: usize,
    pub(crate) data: AlignedBuf,
}

impl PackedB {
    /// Columns of `B` in one strip pair (rows of a latent-major `w[n, k]`): see [`PackedB::pairs_mut`].
    pub const PAIR_COLUMNS: usize = BLOCK;

    /// Pack `w[n, k]` (row-major, an `nn.Linear` weight or a latent-major encoder) as `B = wᵀ`.
    pub fn from_nk(w: &[f32], n: usize, k: usize) -> Self {
        let mut packed = Self::zeros(k, n);
        packed.repack_nk(w);
        packed
    }

    /// Pack `w[k, n]` (row-major, input-major) as `B = w`.
    pub fn from_kn(w: &[f32], k: usize, n: usize) -> Self {
        assert!(w.len() >= k * n, "PackedB::from_kn: {} values for a {k}x{n} matrix", w.len());
        let mut packed = Self::zeros(k, n);
        packed.fill(|kk, nn| w[kk * n + nn]);
        packed
    }

    /// Repack from `w[n, k]` into the same allocation (the encoder after each optimizer step).
    pub fn repack_nk(&mut self, w: &[f32]) {
        let (k, n) = (self.k, self.n);
        assert!(w.len() >= n * k, "PackedB::repack_nk: {} values for a {n}x{k} matrix", w.len());
        self.pairs_mut().for_each(|(q, mut pair)| pair.pack_nk(&w[q * BLOCK * k..((q + 1) * BLOCK).min(n) * k]));
    }

    /// Each strip pair (32 columns of `B`, 32 rows of a latent-major `w[n, k]`), in order, to be
    /// packed in parallel: by [`PackedB::repack_nk`], or row block by row block in the same pass
    /// that writes the rows (an optimizer step).
    pub fn pairs_mut(&mut self) -> impl IndexedParallelIterator<Item = (usize, StripPair<'_>)> {
        let (k, pair_len) = (self.k, self.pair_len().max(1));
        self.data.as_mut_slice().par_chunks_mut(pair_len).map(move |data| StripPair { data, k }).enumerate()
    }

    /// `B` back as `w[k, n]` in f32: exactly the packed values (a weight whose values were already
    /// bf16, as published models store them, comes back bit for bit).
    pub fn to_kn(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0f32; k * n];
        let data = self.data.as_slice();
        w.par_chunks_mut(n.max(1)).enumerate().for_each(|(kk, row)| {
            for (nn, v) in row.iter_mut().enumerate() {
                *v = bf16_to_f32(data[self.index(kk, nn)]);
            }
        });
        w
    }

    /// Where `B[kk, nn]` lies in `data`: strip pair `nn / 32`, k tile `kk / 32`, then the VNNI order
    /// [`PackedB::fill`] writes (two consecutive k per 32-bit lane).
    fn index(&self, kk: usize, nn: usize) -> usize {
        let (q, h, c) = (nn / BLOCK, (nn % BLOCK) / 16, nn % 16);
        let (kb, r, e) = (kk / BLOCK, (kk % BLOCK) / 2, kk % 2);
        q * self.pair_len() + (kb * 2 + h) * TILE + r * 32 + c * 2 + e
    }

    fn zeros(k: usize, n: usize) -> Self {
        let (k_pad, n_pad) = (round_up(k, BLOCK), round_up(n, BLOCK));
        Self { k, n, k_pad, data: AlignedBuf::zeros(k_pad * n_pad) }
    }

    /// Bytes of packed data (what the bf16 copy of a weight costs in memory).
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// Values of one strip pair: 32 columns over all of (padded) k.
    pub(crate) fn pair_len(&self) -> usize {
        self.k_pad * BLOCK
    }

    fn fill(&mut self, value: impl Fn(usize, usize) -> f32 + Sync) {
        let (k, n, kt) = (self.k, self.n, self.k_pad / BLOCK);
        let pair_len = self.pair_len();
        if pair_len == 0 {
            return;
        }
        self.data.as_mut_slice().par_chunks_mut(pair_len).enumerate().for_each(|(q, pair)| {
            for kb in 0..kt {
                for h in 0..2 {
                    let tile = &mut pair[(kb * 2 + h) * TILE..][..TILE];
                    for c in 0..16 {
                        let nn = q * BLOCK + h * 16 + c;
                        for r in 0..16 {
                            for e in 0..2 {
                                let kk = kb * BLOCK + 2 * r + e;
                                let v = if nn < n && kk < k { bf16_bits(value(kk, nn)) } else { 0 };
                                tile[r * 32 + c * 2 + e] = v;
                            }
                        }
                    }
                }
            }
        });
    }
}

/// One strip pair of a [`PackedB`]: 32 columns of `B` over all of (padded) `k`.
pub struct StripPair<'a> {
    data: &'a mut [u16],
    k: usize,
}

impl StripPair<'_> {
    /// Pack the pair's columns from `rows` (`w[n, k]`'s rows `32q ..`, at most 32, row-major):
    /// each row's bf16 values go two by two (VNNI order) down a 16-row tile column. Columns past
    /// `rows` and values past `k` keep the zeros the packing was made with.
    pub fn pack_nk(&mut self, rows: &[f32]) {
        crate::dispatch_simd!(pack_pair_nk(rows, self.k, self.data))
    }
}

/// [`StripPair::pack_nk`]: a row's 32-value tile segment is rounded in one (vectorised) pass, then
/// written as 16 pairs down its tile column.
#[inline(always)]
fn pack_pair_nk(rows: &[f32], k: usize, pair: &mut [u16]) {
    if k == 0 {
        return;
    }
    debug_assert!(rows.len() <= BLOCK * k);
    for (col, row) in rows.chunks_exact(k).enumerate() {
        let (h, c) = (col / 16, col % 16);
        for (kb, ks) in row.chunks(BLOCK).enumerate() {
            let mut v = [0u16; BLOCK];
            v.iter_mut().zip(ks).for_each(|(o, &x)| *o = bf16_bits(x));
            let tile = &mut pair[(kb * 2 + h) * TILE..][..TILE];
            for (r, two) in v.chunks_exact(2).enumerate() {
                tile[r * 32 + c * 2..][..2].copy_from_slice(two);
            }
        }
    }
}

/// Rows `a[m, k]` rounded to bf16 for [`crate::gemm_bf16_packed`], in the layout of AMX `A` tiles: each
/// block of 32 rows is stored k tile by k tile, 32 rows of 32 values each (two 1 KiB tiles), so a tile
/// load reads 1 KiB of consecutive bytes and a block's rows stay together in L1 while it meets every
/// strip of `B`. Rows are padded to a multiple of 32 and `k` to the packed weight's padding, with zeros:
///
/// `data[((ib * kt + kb) * 32 + r) * 32 + e]` holds `a[32 ib + r, 32 kb + e]`.
///
/// Packing once lets one input feed several weights.
#[derive(Debug)]
pub struct PackedA {
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) data: AlignedBuf,
}

impl PackedA {
    /// Round `a[m, k]` (row stride `lda`) to bf16.
    pub fn new(a: &[f32], m: usize, k: usize, lda: usize) -> Self {
        assert!(lda >= k, "PackedA::new: lda {lda} < k {k}");
        assert!(m == 0 || a.len() >= (m - 1) * lda + k, "PackedA::new: {} values for {m}x{k} rows", a.len());
        let mut packed = Self::for_overwrite(m, k);
        let (data, k_pad) = (&mut packed.data, round_up(k, BLOCK));
        if k_pad > 0 {
            data.as_mut_slice().par_chunks_mut(BLOCK * k_pad).enumerate().for_each(|(ib, block)| {
                let rows = &a[ib * BLOCK * lda..];
                let n_rows = BLOCK.min(m - ib * BLOCK);
                crate::dispatch_simd!(round_block(rows, lda, n_rows, k, block))
            });
        }
        packed
    }

    /// Rows `0..m` of width `k` that `row(i, out)` writes in f32, rounded to bf16 as [`PackedA::new`]
    /// rounds them: each 32-row block is made in a scratch that stays in cache, so a row-wise op
    /// feeding a product (a norm) never writes its f32 result to memory.
    pub fn from_fn(m: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        let mut packed = Self::for_overwrite(m, k);
        let k_pad = round_up(k, BLOCK);
        if k_pad > 0 {
            packed.data.as_mut_slice().par_chunks_mut(BLOCK * k_pad).enumerate().for_each(|(ib, block)| {
                let n_rows = BLOCK.min(m - ib * BLOCK);
                let mut rows = vec![0f32; n_rows * k];
                for (r, out) in rows.chunks_mut(k).enumerate() {
                    row(ib * BLOCK + r, out);
                }
                crate::dispatch_simd!(round_block(&rows, k, n_rows, k, block))
            });
        }
        packed
    }

    /// `m` rows of width `k` whose every value (padding included) the caller will write: an earlier
    /// call's buffer when one is spare, since a fresh one costs more in page faults than the values.
    pub(crate) fn for_overwrite(m: usize, k: usize) -> Self {
        let len = round_up(m, BLOCK) * round_up(k, BLOCK);
        let mut data = SPARE_ROWS.with(|spares| {
            let mut spares = spares.borrow_mut();
            // the smallest spare that holds `len`, else the largest (to grow)
            let fits = (0..spares.len()).filter(|&i| spares[i].capacity() >= len).min_by_key(|&i| spares[i].capacity());
            let pick = fits.or_else(|| (0..spares.len()).max_by_key(|&i| spares[i].capacity()));
            pick.map(|i| spares.swap_remove(i)).unwrap_or_default()
        });
        data.resize_for_overwrite(len);
        Self { m, k, data }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }
}

/// One 32-row block of [`PackedA`] from `n_rows` rows of width `k` (row stride `lda`): every value
/// written, padding rows and columns as zeros.
#[inline(always)]
pub(crate) fn round_block(rows: &[f32], lda: usize, n_rows: usize, k: usize, block: &mut [u16]) {
    // row by row: each row of `a` is read once, in order; the block (32 x k bf16) sits in L1
    for r in 0..BLOCK {
        for (kb, tile) in block.chunks_exact_mut(BLOCK * BLOCK).enumerate() {
            let out = &mut tile[r * BLOCK..][..BLOCK];
            if r < n_rows {
                let (k0, width) = (kb * BLOCK, BLOCK.min(k - kb * BLOCK));
                for (o, &x) in out.iter_mut().zip(&rows[r * lda + k0..][..width]) {
                    *o = bf16_bits(x);
                }
                out[width..].fill(0);
            } else {
                out.fill(0);
            }
        }
    }
}

/// Buffers a thread keeps for its next [`PackedA`]s: a layer's forward holds two at once (its input
/// rows and the gated MLP's activations), of different widths.
const SPARE_BUFFERS: usize = 4;

thread_local! {
    /// Dropped [`PackedA`] buffers of this thread, reused by the next ones made on it.
    static SPARE_ROWS: std::cell::RefCell<Vec<AlignedBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for PackedA {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        // keep the largest few; `try_with` because a thread's locals may already be gone at its exit
        let _ = SPARE_ROWS.try_with(|spares| {
            let mut spares = spares.borrow_mut();
            spares.push(data);
            if spares.len() > SPARE_BUFFERS {
                let smallest = (0..spares.len()).min_by_key(|&i| spares[i].capacity()).unwrap_or(0);
                spares.swap_remove(smallest);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_made_in_place_are_packed_as_rows_given() {
        let (m, k) = (45, 70);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 89) as f32 - 44.0) / 16.0).collect();
        let made = PackedA::from_fn(m, k, |i, out| out.copy_from_slice(&a[i * k..][..k]));
        // a differently shaped buffer first: the spare taken must be overwritten everywhere
        drop(PackedA::new(&vec![7.0; 64 * 96], 64, 96, 96));
        let given = PackedA::new(&a, m, k, k);
        assert!(made.data == given.data && (made.m, made.k) == (m, k));
        let again = PackedA::from_fn(m, k, |i, out| out.copy_from_slice(&a[i * k..][..k]));
        assert!(again.data == given.data, "a reused buffer kept old values");
    }

    #[test]
    fn packed_buffers_start_on_a_cache_line_whatever_their_size() {
        for (m, k, n) in [(1, 1, 1), (33, 70, 65), (300, 576, 1000)] {
            let b = PackedB::from_kn(&vec![0.5; k * n], k, n);
            let a = PackedA::new(&vec![0.25; m * k], m, k, k);
            assert_eq!(b.data.as_ptr() as usize % 64, 0, "B of {k}x{n}");
            assert_eq!(a.data.as_ptr() as usize % 64, 0, "A of {m}x{k}");
        }
    }

    #[test]
    fn a_packed_weight_unpacks_to_its_bf16_values() {
        // Odd sizes cross every padding edge: k and n not multiples of 32 or 16.
        for (k, n) in [(1, 1), (33, 70), (70, 33), (64, 96)] {
            let w: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.731).sin() * 3.0).collect();
            let want: Vec<f32> = w.iter().map(|&v| round_to_bf16(v)).collect();
            assert_eq!(PackedB::from_kn(&w, k, n).to_kn(), want, "{k}x{n} from k-major");
            let w_nk: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            assert_eq!(PackedB::from_nk(&w_nk, n, k).to_kn(), want, "{k}x{n} from n-major");
        }
    }

    #[test]
    fn repacking_rows_in_place_gives_every_bit_of_a_fresh_element_by_element_packing() {
        // The pair packer (rows rounded a tile segment at a time) against `fill` (one value at a
        // time from its index), padding included, after the weights change in place.
        for (k, n) in [(1, 1), (33, 70), (70, 33), (576, 100)] {
            let w = |s: f32| (0..n * k).map(|i| (i as f32 * s).sin() * 3.0).collect::<Vec<f32>>();
            let mut packed = PackedB::from_nk(&w(0.731), n, k);
            let changed = w(0.377);
            packed.repack_nk(&changed);
            let mut by_index = PackedB::zeros(k, n);
            by_index.fill(|kk, nn| changed[nn * k + kk]);
            assert_eq!(packed.data.as_slice(), by_index.data.as_slice(), "{n}x{k}");
        }
    }
}
