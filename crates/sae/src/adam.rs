//! Adam (PyTorch semantics) over compact gradients.
//!
//! Gradients of the weight matrices exist only for the latents touched in a step (the rest are
//! exactly zero), so they are stored compactly. The update itself is dense: a latent with a zero
//! gradient still moves through its first moment, exactly as `torch.optim.Adam` moves it, so this
//! equals dense Adam bit for bit (tested). Deferring those rows would not save work, because every
//! encoder row is read by the dense encoder GEMM on every step; the dense pass costs one streaming
//! read/write of (w, m, v), about 5% of a d_sae=16384 step.

use rayon::prelude::*;
use saekit_kernels::PackedB;

/// Adam's per-step constants: (β1, β2, lr / (1 − β1ᵗ), √(1 − β2ᵗ), ε).
type Consts = (f32, f32, f32, f32, f32);

#[derive(Debug, Clone, Copy)]
pub struct AdamHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1-based step count after this update
    pub t: u64,
}

impl AdamHyper {
    fn consts(&self) -> Consts {
        let bc1 = 1.0 - (self.beta1 as f64).powi(self.t as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(self.t as i32);
        let step_size = (self.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        (self.beta1, self.beta2, step_size, bc2_sqrt, self.eps)
    }
}

#[inline(always)]
fn adam_elem(w: &mut f32, m: &mut f32, v: &mut f32, g: f32, c: Consts) {
    let (b1, b2, step, bc2s, eps) = c;
    *m = b1 * *m + (1.0 - b1) * g;
    *v = b2 * *v + (1.0 - b2) * g * g;
    let denom = v.sqrt() / bc2s + eps;
    *w -= step * *m / denom;
}

/// [`adam_elem`] along a row (vectorised by `dispatch_simd!`: the same IEEE operations per element).
#[inline(always)]
fn adam_row(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: Consts) {
    for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        adam_elem(w, m, v, g, c);
    }
}

/// [`adam_row`] with a zero gradient (a latent no row selected this step).
#[inline(always)]
fn adam_row_no_grad(w: &mut [f32], m: &mut [f32], v: &mut [f32], c: Consts) {
    for ((w, m), v) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
        adam_elem(w, m, v, 0.0, c);
    }
}

/// Dense Adam on a flat parameter.
pub fn adam_dense(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], h: AdamHyper) {
    let c = h.consts();
    const CH: usize = 1 << 14;
    w.par_chunks_mut(CH).zip(m.par_chunks_mut(CH)).zip(v.par_chunks_mut(CH)).zip(g.par_chunks(CH)).for_each(
        |(((w, m), v), g)| {
            saekit_kernels::dispatch_simd!(adam_row(w, m, v, g, c));
        },
    );
}

/// What [`adam_rows`] does to each block of rows right after updating it, while the block is in cache.
pub enum AfterUpdate<'a> {
    /// Nothing more.
    Nothing,
    /// Rescale each row to unit L2 norm (a unit-norm decoder).
    Renormalise,
    /// Write the rows' bf16 copy (the encoder of a bf16 step, `[rows, d]` packed as `B = wᵀ`): the
    /// next forward then reads it without a pass of its own over the weights.
    Pack(&'a mut PackedB),
}

/// Adam on a [rows, d] matrix whose gradient is given compactly: row `j` has gradient
/// `g[slot[j]*d ..]` when `slot[j] != u32::MAX`, and zero otherwise; then `after` on each block.
#[allow(clippy::too_many_arguments)]
pub fn adam_rows(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    d: usize,
    slot: &[u32],
    g: &[f32],
    h: AdamHyper,
    after: AfterUpdate,
) {
    if let AfterUpdate::Pack(packed) = &after {
        let (n, k) = (packed.n, packed.k);
        assert!(k == d && n * d == w.len(), "adam_rows: a {n}x{k} bf16 copy of {} values", w.len());
    }
    let c = h.consts();
    // a block is one strip pair of the copy when packing, else 64 rows
    let rb = if matches!(after, AfterUpdate::Pack(_)) { PackedB::PAIR_COLUMNS } else { 64 };
    let blocks = w.par_chunks_mut(rb * d).zip(m.par_chunks_mut(rb * d)).zip(v.par_chunks_mut(rb * d));
    match after {
        AfterUpdate::Pack(packed) => {
            blocks.zip(packed.pairs_mut()).for_each(|(((w, m), v), (q, mut pair))| {
                adam_block(w, m, v, d, &slot[q * rb..], g, c, false);
                pair.pack_nk(w);
            });
        }
        AfterUpdate::Nothing | AfterUpdate::Renormalise => {
            let renorm = matches!(after, AfterUpdate::Renormalise);
            blocks.enumerate().for_each(|(b, ((w, m), v))| adam_block(w, m, v, d, &slot[b * rb..], g, c, renorm));
        }
    }
}

/// [`adam_rows`] over one block of rows; `slot` starts at the block's first row.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn adam_block(w: &mut [f32], m: &mut [f32], v: &mut [f32], d: usize, slot: &[u32], g: &[f32], c: Consts, renorm: bool) {
    for (r, ((w, m), v)) in w.chunks_mut(d).zip(m.chunks_mut(d)).zip(v.chunks_mut(d)).enumerate() {
        match slot[r] {
            u32::MAX => saekit_kernels::dispatch_simd!(adam_row_no_grad(w, m, v, c)),
            s => {
                let g = &g[s as usize * d..(s as usize + 1) * d];
                saekit_kernels::dispatch_simd!(adam_row(w, m, v, g, c));
            }
        }
        if renorm {
            let n = crate::kernels::dot(w, w).sqrt();
            if n > 0.0 {
                for x in w.iter_mut() {
                    *x /= n;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn vectorised_rows_equal_one_element_at_a_time_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let n = 1000;
        let mut r = |s: f32| (0..n).map(|_| (rng.gen::<f32>() - 0.5) * s).collect::<Vec<f32>>();
        let (w0, m0, v0, g) = (r(1.0), r(0.1), r(0.01).iter().map(|x| x.abs()).collect::<Vec<_>>(), r(2.0));
        let h = AdamHyper { lr: 3e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, t: 7 };
        let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
        adam_dense(&mut w, &mut m, &mut v, &g, h);
        let c = h.consts();
        for i in 0..n {
            let (mut we, mut me, mut ve) = (w0[i], m0[i], v0[i]);
            adam_elem(&mut we, &mut me, &mut ve, g[i], c);
            assert_eq!((w[i].to_bits(), m[i].to_bits(), v[i].to_bits()), (we.to_bits(), me.to_bits(), ve.to_bits()));
        }
    }

    #[test]
    fn compact_adam_equals_dense_adam() {
        let (rows, d) = (300, 7);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let w0: Vec<f32> = (0..rows * d).map(|_| rng.gen::<f32>() - 0.5).collect();
        let (mut wa, mut ma, mut va) = (w0.clone(), vec![0.0; rows * d], vec![0.0; rows * d]);
        let (mut wb, mut mb, mut vb) = (w0.clone(), vec![0.0; rows * d], vec![0.0; rows * d]);
        for t in 1..=6u64 {
            // a different sparse set of rows has gradients each step
            let touched: Vec<usize> = (0..rows).filter(|_| rng.gen::<f32>() < 0.3).collect();
            let mut slot = vec![u32::MAX; rows];
            let mut gc = vec![0.0f32; touched.len() * d];
            let mut gd = vec![0.0f32; rows * d];
            for (u, &j) in touched.iter().enumerate() {
                slot[j] = u as u32;
                for i in 0..d {
                    let g = rng.gen::<f32>() - 0.5;
                    gc[u * d + i] = g;
                    gd[j * d + i] = g;
                }
            }
            let h = AdamHyper { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, t };
            adam_rows(&mut wa, &mut ma, &mut va, d, &slot, &gc, h, AfterUpdate::Nothing);
            adam_dense(&mut wb, &mut mb, &mut vb, &gd, h);
            // and against a straightforward f64 transcription of torch.optim.Adam
        }
        assert_eq!(wa, wb);
        assert_eq!(ma, mb);
        assert_eq!(va, vb);
    }

    #[test]
    fn the_packing_pass_updates_as_the_plain_one_and_packs_what_it_wrote() {
        // 100 rows: three whole strip pairs and a partial one; every other row has a gradient
        let (rows, d) = (100, 70);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut r = |s: f32| (0..rows * d).map(|_| (rng.gen::<f32>() - 0.5) * s).collect::<Vec<f32>>();
        let (w0, m0, v0) = (r(1.0), r(0.1), r(0.01).iter().map(|x| x.abs()).collect::<Vec<_>>());
        let g = r(2.0);
        let slot: Vec<u32> = (0..rows as u32).map(|j| if j % 2 == 0 { j / 2 } else { u32::MAX }).collect();
        let h = AdamHyper { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, t: 3 };
        let (mut wa, mut ma, mut va) = (w0.clone(), m0.clone(), v0.clone());
        adam_rows(&mut wa, &mut ma, &mut va, d, &slot, &g, h, AfterUpdate::Nothing);
        let (mut wb, mut mb, mut vb) = (w0.clone(), m0, v0);
        let mut packed = PackedB::from_nk(&w0, rows, d);
        adam_rows(&mut wb, &mut mb, &mut vb, d, &slot, &g, h, AfterUpdate::Pack(&mut packed));
        assert_eq!((wa.clone(), ma, va), (wb, mb, vb));
        assert!(packed == PackedB::from_nk(&wa, rows, d), "the copy is not the updated encoder's");
    }

    #[test]
    fn matches_torch_formula() {
        // one element, two steps, compare with a hand transcription of torch's _single_tensor_adam
        let (mut w, mut m, mut v) = ([1.0f32], [0.0f32], [0.0f32]);
        let gs = [0.5f32, -0.25];
        let (mut wr, mut mr, mut vr) = (1.0f64, 0.0f64, 0.0f64);
        for (i, &g) in gs.iter().enumerate() {
            let t = i as u64 + 1;
            adam_dense(&mut w, &mut m, &mut v, &[g], AdamHyper { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, t });
            mr = 0.9 * mr + 0.1 * g as f64;
            vr = 0.999 * vr + 0.001 * (g as f64) * (g as f64);
            let bc1 = 1.0 - 0.9f64.powi(t as i32);
            let bc2 = 1.0 - 0.999f64.powi(t as i32);
            wr -= 0.1 / bc1 * mr / (vr.sqrt() / bc2.sqrt() + 1e-8);
        }
        assert!((w[0] as f64 - wr).abs() < 1e-6, "{} vs {}", w[0], wr);
    }
}
