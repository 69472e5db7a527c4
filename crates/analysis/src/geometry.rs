//! Weight-only feature properties: direct logit effects, decoder-cosine neighbours, the 2-D map.

use rayon::prelude::*;
use saekit_model::linalg::matmul_transposed;

/// Rows of features per GEMM block: bounds the `[block, vocab]` / `[block, d_sae]` scratch.
fn block_rows(cols: usize) -> usize {
    ((32usize << 20) / cols.max(1)).clamp(16, 1024)
}

/// (token, logit) pairs, best first.
pub type TokenScores = Vec<(u32, f32)>;

/// `(top k promoted, top k suppressed)` tokens per feature: logits of `W_U · (w_dec_j ⊙ gain)`.
/// `gain` is the final RMSNorm weight (the linearisation sae_vis and Neuronpedia use; `None` for
/// models without one, e.g. LayerNorm-final GPT-2, where the direction is used as is).
pub fn direct_logit_effects(
    w_dec: &[f32],
    d: usize,
    unembed: &[f32],
    vocab: usize,
    gain: Option<&[f32]>,
    k: usize,
) -> Vec<(TokenScores, TokenScores)> {
    let n = w_dec.len() / d;
    let br = block_rows(vocab);
    let mut out = Vec::with_capacity(n);
    let mut logits = vec![0f32; br * vocab];
    for r0 in (0..n).step_by(br) {
        let rows = br.min(n - r0);
        let mut u = w_dec[r0 * d..(r0 + rows) * d].to_vec();
        if let Some(g) = gain {
            u.chunks_mut(d).for_each(|row| row.iter_mut().zip(g).for_each(|(a, b)| *a *= b));
        }
        matmul_transposed(&u, rows, d, unembed, vocab, &mut logits[..rows * vocab]);
        let part: Vec<_> =
            logits[..rows * vocab].par_chunks(vocab).map(|l| (extreme(l, k, true), extreme(l, k, false))).collect();
        out.extend(part);
    }
    out
}

/// The k largest (or smallest) entries of `v`, best first (ties: lower index first). One pass with a
/// small sorted buffer: almost every entry fails the first comparison, so this is ~1 ns per entry.
fn extreme(v: &[f32], k: usize, largest: bool) -> Vec<(u32, f32)> {
    let k = k.min(v.len());
    if k == 0 {
        return Vec::new();
    }
    let sign = if largest { 1.0f32 } else { -1.0 };
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    let mut floor = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        let s = sign * x;
        if best.len() == k && s <= floor {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= s);
        best.insert(at, (i as u32, s));
        if best.len() > k {
            best.pop();
        }
        if best.len() == k {
            floor = best[k - 1].1;
        }
    }
    best.into_iter().map(|(i, s)| (i, sign * s)).collect()
}

fn unit_rows(w: &[f32], d: usize) -> Vec<f32> {
    let mut u = w.to_vec();
    u.par_chunks_mut(d).for_each(|r| {
        let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            r.iter_mut().for_each(|x| *x /= n);
        }
    });
    u
}

/// Exact nearest features by decoder cosine similarity up to this many features; an IVF index
/// (k-means cells, several probed) beyond.
pub(crate) const EXACT_NEIGHBOURS_MAX: usize = 100_000;

/// The `k` nearest features of each feature by decoder cosine, excluding itself, and a description
/// of the method used.
pub fn nearest_neighbours(w_dec: &[f32], d: usize, k: usize) -> (Vec<Vec<(u32, f32)>>, String) {
    let n = w_dec.len() / d;
    let u = unit_rows(w_dec, d);
    if n <= EXACT_NEIGHBOURS_MAX {
        (exact_neighbours(&u, d, &u, None, k), "exact decoder cosine (blocked GEMM)".into())
    } else {
        ivf_neighbours(&u, d, k)
    }
}

/// For each row of `q`, the k best rows of `base` (or of `base` restricted to `subset`).
fn exact_neighbours(q: &[f32], d: usize, base: &[f32], self_offset: Option<usize>, k: usize) -> Vec<Vec<(u32, f32)>> {
    let nq = q.len() / d;
    let nb = base.len() / d;
    let br = block_rows(nb);
    let mut out = Vec::with_capacity(nq);
    let mut sims = vec![0f32; br * nb];
    for r0 in (0..nq).step_by(br) {
        let rows = br.min(nq - r0);
        matmul_transposed(&q[r0 * d..(r0 + rows) * d], rows, d, base, nb, &mut sims[..rows * nb]);
        let part: Vec<_> = sims[..rows * nb]
            .par_chunks_mut(nb)
            .enumerate()
            .map(|(i, s)| {
                let me = self_offset.unwrap_or(0) + r0 + i;
                if self_offset.is_some() || q.as_ptr() == base.as_ptr() {
                    if let Some(v) = s.get_mut(me) {
                        *v = f32::NEG_INFINITY;
                    }
                }
                extreme(s, k, true)
            })
            .collect();
        out.extend(part);
    }
    out
}

/// IVF: k-means (a few Lloyd iterations on a deterministic sample) into ~sqrt(n) cells; each
/// feature is compared exactly with the members of its `probe` nearest cells.
fn ivf_neighbours(u: &[f32], d: usize, k: usize) -> (Vec<Vec<(u32, f32)>>, String) {
    let n = u.len() / d;
    let n_cells = ((n as f64).sqrt() as usize).max(2);
    let probe = 8usize;
    // deterministic init: evenly strided rows
    let mut cent: Vec<f32> = (0..n_cells).flat_map(|c| u[(c * n / n_cells) * d..][..d].to_vec()).collect();
    let sample: Vec<usize> = (0..n).step_by((n / (n_cells * 64)).max(1)).collect();
    let sample_rows: Vec<f32> = sample.iter().flat_map(|&i| u[i * d..(i + 1) * d].to_vec()).collect();
    for _ in 0..6 {
        let assign = nearest_cells(&sample_rows, d, &cent, 1);
        let mut sum = vec![0f32; n_cells * d];
        for (i, a) in assign.iter().enumerate() {
            let c = a[0] as usize;
            for (s, x) in sum[c * d..(c + 1) * d].iter_mut().zip(&sample_rows[i * d..(i + 1) * d]) {
                *s += x;
            }
        }
        for c in 0..n_cells {
            let row = &mut sum[c * d..(c + 1) * d];
            let nn = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            if nn > 0.0 {
                row.iter_mut().for_each(|x| *x /= nn);
                cent[c * d..(c + 1) * d].copy_from_slice(row);
            }
        }
    }
    // each feature joins its nearest cell; each cell is compared (one GEMM) with the members of the
    // `probe` cells nearest to its centroid
    let assign = nearest_cells(u, d, &cent, 1);
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); n_cells];
    for (i, a) in assign.iter().enumerate() {
        members[a[0] as usize].push(i as u32);
    }
    let cell_probe = nearest_cells(&cent, d, &cent, probe.min(n_cells));
    let mut out: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
    let gather = |ids: &[u32]| -> Vec<f32> {
        ids.iter().flat_map(|&i| u[i as usize * d..(i as usize + 1) * d].to_vec()).collect()
    };
    for c in 0..n_cells {
        let q_ids = &members[c];
        if q_ids.is_empty() {
            continue;
        }
        let cand_ids: Vec<u32> = cell_probe[c].iter().flat_map(|&p| members[p as usize].iter().copied()).collect();
        let (q, cand) = (gather(q_ids), gather(&cand_ids));
        let mut sims = vec![0f32; q_ids.len() * cand_ids.len()];
        matmul_transposed(&q, q_ids.len(), d, &cand, cand_ids.len(), &mut sims);
        let rows: Vec<Vec<(u32, f32)>> = sims
            .par_chunks_mut(cand_ids.len())
            .zip(q_ids.par_iter())
            .map(|(s, &me)| {
                for (v, &id) in s.iter_mut().zip(&cand_ids) {
                    if id == me {
                        *v = f32::NEG_INFINITY;
                    }
                }
                extreme(s, k, true).into_iter().map(|(i, v)| (cand_ids[i as usize], v)).collect()
            })
            .collect();
        for (&me, r) in q_ids.iter().zip(rows) {
            out[me as usize] = r;
        }
    }
    (
        out,
        format!("approximate: IVF over {n_cells} k-means cells of decoder directions, {probe} nearest cells searched"),
    )
}

fn nearest_cells(x: &[f32], d: usize, cent: &[f32], p: usize) -> Vec<Vec<u32>> {
    let nc = cent.len() / d;
    let mut sims = vec![0f32; (x.len() / d) * nc];
    let mut out = Vec::new();
    let br = block_rows(nc);
    for r0 in (0..x.len() / d).step_by(br) {
        let rows = br.min(x.len() / d - r0);
        matmul_transposed(&x[r0 * d..(r0 + rows) * d], rows, d, cent, nc, &mut sims[..rows * nc]);
        out.extend(
            sims[..rows * nc]
                .par_chunks(nc)
                .map(|s| extreme(s, p, true).into_iter().map(|(i, _)| i).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
        );
    }
    out
}

/// A 2-D map of the features: projection of the unit decoder directions on their two principal
/// components (power iteration on the d x d covariance; deterministic). Coordinates are scaled to
/// [-1, 1] on the larger axis.
pub(crate) fn pca_map(w_dec: &[f32], d: usize) -> Vec<(f32, f32)> {
    let n = w_dec.len() / d;
    if n == 0 {
        return Vec::new();
    }
    let u = unit_rows(w_dec, d);
    let mut mean = vec![0f64; d];
    for r in u.chunks(d) {
        for (m, x) in mean.iter_mut().zip(r) {
            *m += *x as f64;
        }
    }
    let mean: Vec<f32> = mean.iter().map(|m| (m / n as f64) as f32).collect();
    // covariance = Xcᵀ Xc, built from the transposed centred matrix
    let mut xt = vec![0f32; d * n];
    for (i, r) in u.chunks(d).enumerate() {
        for c in 0..d {
            xt[c * n + i] = r[c] - mean[c];
        }
    }
    let mut cov = vec![0f32; d * d];
    matmul_transposed(&xt, d, n, &xt, d, &mut cov);
    let mut comps: Vec<Vec<f32>> = Vec::new();
    for c in 0..2 {
        let mut v: Vec<f32> = (0..d).map(|i| (((i * 7919 + c * 104_729) % 1000) as f32 / 1000.0) - 0.5).collect();
        for _ in 0..200 {
            let mut w: Vec<f32> =
                (0..d).map(|i| cov[i * d..(i + 1) * d].iter().zip(&v).map(|(a, b)| a * b).sum()).collect();
            for p in &comps {
                let dot: f32 = w.iter().zip(p).map(|(a, b)| a * b).sum();
                w.iter_mut().zip(p).for_each(|(a, b)| *a -= dot * b);
            }
            let nn = w.iter().map(|x| x * x).sum::<f32>().sqrt();
            if nn == 0.0 {
                break;
            }
            w.iter_mut().for_each(|x| *x /= nn);
            v = w;
        }
        // sign convention: largest-magnitude entry positive, so the map does not flip between runs
        let big = v.iter().cloned().fold(0f32, |a, b| if b.abs() > a.abs() { b } else { a });
        if big < 0.0 {
            v.iter_mut().for_each(|x| *x = -*x);
        }
        comps.push(v);
    }
    let pts: Vec<(f32, f32)> = u
        .par_chunks(d)
        .map(|r| {
            let p = |c: &[f32]| r.iter().zip(c).zip(&mean).map(|((x, w), m)| (x - m) * w).sum::<f32>();
            (p(&comps[0]), p(&comps[1]))
        })
        .collect();
    let scale = pts.iter().map(|p| p.0.abs().max(p.1.abs())).fold(0f32, f32::max);
    let s = if scale > 0.0 { 1.0 / scale } else { 1.0 };
    pts.into_iter().map(|(x, y)| (x * s, y * s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_find_the_closest_direction() {
        // rows: e0, e1, e0 + 0.1 e1, -e0
        let w = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.1, 0.0, -1.0, 0.0, 0.0];
        let (nn, _) = nearest_neighbours(&w, 3, 2);
        assert_eq!(nn[0][0].0, 2);
        assert_eq!(nn[2][0].0, 0);
        assert!(nn[0].iter().all(|&(i, _)| i != 0));
        assert_eq!(nn[3].last().map(|x| x.0), Some(2));
    }

    #[test]
    fn ivf_agrees_with_exact_on_clustered_directions() {
        let d = 8;
        let n = 400;
        let mut w = vec![0f32; n * d];
        for i in 0..n {
            let c = i % 10;
            for j in 0..d {
                w[i * d + j] =
                    if j == c % d { 1.0 } else { 0.0 } + (((i * 31 + j * 17) % 97) as f32 / 97.0 - 0.5) * 0.05;
            }
        }
        let u = unit_rows(&w, d);
        let exact = exact_neighbours(&u, d, &u, None, 3);
        let (ivf, _) = ivf_neighbours(&u, d, 3);
        let agree = exact.iter().zip(&ivf).filter(|(a, b)| a.first().map(|x| x.0) == b.first().map(|x| x.0)).count();
        assert!(agree as f64 / n as f64 > 0.9, "ivf recall@1 {agree}/{n}");
    }

    #[test]
    fn logit_effects_pick_the_aligned_token() {
        // vocab of 3 tokens in 2-D; feature 0 points at token 1
        let unembed = vec![1.0, 0.0, 0.0, 1.0, -1.0, -1.0];
        let r = direct_logit_effects(&[0.0, 2.0], 2, &unembed, 3, Some(&[1.0, 1.0]), 1);
        assert_eq!(r[0].0[0].0, 1);
        assert_eq!(r[0].1[0].0, 2);
    }

    #[test]
    fn map_is_deterministic_and_bounded() {
        let w: Vec<f32> = (0..64 * 6).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let a = pca_map(&w, 6);
        let b = pca_map(&w, 6);
        assert_eq!(a, b);
        assert!(a.iter().all(|p| p.0.abs() <= 1.0 + 1e-5 && p.1.abs() <= 1.0 + 1e-5));
    }
}
