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
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
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

/// A weight matrix `B[k, n]` in bf16, packed for [`crate::gemm_bf16`].
#[derive(Debug, Clone)]
pub struct PackedB {
    /// Inner dimension (the input width).
    pub k: usize,
    /// Output columns.
    pub n: usize,
    pub(crate) k_pad: usize,
    pub(crate) data: Vec<u16>,
}

impl PackedB {
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
        let (kt, pair_len) = (self.k_pad / BLOCK, self.pair_len());
        if pair_len == 0 {
            return;
        }
        // One row of w (a column of B) at a time: 32 contiguous k values go to 16 tile rows, two each.
        self.data.par_chunks_mut(pair_len).enumerate().for_each(|(q, pair)| {
            for (col, nn) in (q * BLOCK..(q * BLOCK + BLOCK).min(n)).enumerate() {
                let (h, c) = (col / 16, col % 16);
                let row = &w[nn * k..(nn + 1) * k];
                for (kb, ks) in row.chunks(BLOCK).enumerate() {
                    let tile = &mut pair[(kb * 2 + h) * TILE..][..TILE];
                    for (p, two) in ks.chunks(2).enumerate() {
                        tile[p * 32 + c * 2] = bf16_bits(two[0]);
                        tile[p * 32 + c * 2 + 1] = two.get(1).map_or(0, |&x| bf16_bits(x));
                    }
                }
                debug_assert!(row.len().div_ceil(BLOCK) <= kt);
            }
        });
    }

    fn zeros(k: usize, n: usize) -> Self {
        let (k_pad, n_pad) = (round_up(k, BLOCK), round_up(n, BLOCK));
        Self { k, n, k_pad, data: vec![0; k_pad * n_pad] }
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
        self.data.par_chunks_mut(pair_len).enumerate().for_each(|(q, pair)| {
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

/// Rows `a[m, k]` rounded to bf16 for [`crate::gemm_bf16_packed`]: rows padded to a multiple of 32 and
/// `k` to the packed weight's padding, with zeros. Packing once lets one input feed several weights.
#[derive(Debug)]
pub struct PackedA {
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) data: Vec<u16>,
}

impl PackedA {
    /// Round `a[m, k]` (row stride `lda`) to bf16.
    pub fn new(a: &[f32], m: usize, k: usize, lda: usize) -> Self {
        assert!(lda >= k, "PackedA::new: lda {lda} < k {k}");
        assert!(m == 0 || a.len() >= (m - 1) * lda + k, "PackedA::new: {} values for {m}x{k} rows", a.len());
        let k_pad = round_up(k, BLOCK);
        // the last call's buffer: a fresh one costs more in page faults than the conversion itself
        let mut data = SPARE_ROWS.with(|spare| std::mem::take(&mut *spare.borrow_mut()));
        data.clear();
        data.resize(round_up(m, BLOCK) * k_pad, 0);
        if k_pad > 0 {
            data.par_chunks_mut(k_pad).take(m).enumerate().for_each(|(i, row)| {
                for (o, &x) in row.iter_mut().zip(&a[i * lda..i * lda + k]) {
                    *o = bf16_bits(x);
                }
            });
        }
        Self { m, k, data }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }
}

thread_local! {
    /// One [`PackedA`] buffer per thread, reused by the next `PackedA::new` on it.
    static SPARE_ROWS: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for PackedA {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        // keep the larger buffer; `try_with` because a thread's locals may already be gone at its exit
        let _ = SPARE_ROWS.try_with(|spare| {
            let mut spare = spare.borrow_mut();
            if data.capacity() > spare.capacity() {
                *spare = data;
            }
        });
    }
}
