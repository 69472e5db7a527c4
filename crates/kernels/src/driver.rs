//! Splits `C` into jobs for rayon and hands each 32x32 block to the chosen path's kernel.

use crate::pack::{round_block, AlignedBuf, PackedA, PackedB, BLOCK};
use crate::{amx, avx512, reference, Bf16Path};
use rayon::prelude::*;
use std::ops::Range;

/// Rows of `C` in one job. Small: a job's bf16 `A` rows (64 x k) stay in L1 while it walks its
/// columns, and the many jobs balance the two cores; 64 beat 256 on every shape of
/// `scripts/bench-gemm-bf16.sh` (BENCHMARKS.md, "bf16 on the CPU").
const JOB_ROWS: usize = 64;
/// Columns of `C` in one job: its packed strips (256 x k) stay in L2 while it walks its rows.
const JOB_COLS: usize = 256;
/// Packed weight columns larger than this (about an L2 cache) are walked column panel by column panel: each
/// job's strips stay in L2 while the rows stream past, instead of the whole weight streaming from L3
/// once per 64 rows. Smaller weights stay in L2 either way and go row job by row job. Measured best of
/// five on `saekit bench gemm`: 1.5x at 1024x576x3072 and 4096x576x16384, a loss at 1024x1536x576.
const PANEL_ORDER_BYTES: usize = 2 << 20;
/// k tiles of 32 in one pass of the AVX512-BF16 kernel over a job whose k is longer than
/// [`AVX512_ONE_PASS_TILES`]: 288 values, at which a 32-row block of `A` and a strip pair of `B`
/// (18 KiB each) fit in L1 together. Unsplit, a 32-row block at k = 9,216 (Gemma-2-2B's down
/// projection) is 576 KiB and streams from L3 once per 8 rows. Measured on Zen 5 (`saekit bench
/// gemm`, three alternating rounds): 512x9216x2304 went from 293-503 to 560-661 GFLOP/s; passes of 6,
/// 12 and 18 tiles did no better.
const AVX512_PASS_TILES: usize = 9;
/// The longest k (in tiles of 32: 2,304 values) that goes in one pass. At k = 2,304 passes lost
/// 3-10% on 128-row products (Gemma-2-2B's q/k/v and gate/up at batch 1) and gained nothing at 512.
const AVX512_ONE_PASS_TILES: usize = 72;

/// `c[m, n] = a[m, k] · B` (or `c += a · B` when `accumulate`), with `B` packed in bf16 and `a`
/// rounded to bf16 here; every product is accumulated in f32. `a` has row stride `lda`, `c` row stride
/// `ldc`, both unit column stride.
///
/// # Panics
/// If `path` is not available on this CPU, or a slice is too short for its shape and stride.
#[allow(clippy::too_many_arguments)] // BLAS's sgemm shape: A with its stride, B, C with its stride
pub fn gemm_bf16(
    path: Bf16Path,
    a: &[f32],
    m: usize,
    lda: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let a = PackedA::new(a, m, b.k, lda);
    gemm_bf16_packed(path, &a, b, 0..b.n, c, ldc, accumulate);
}

/// `c[m, cols.len()] (+)= a · B[:, cols]`: [`gemm_bf16`] on rows packed once and a range of the
/// weight's columns (one latent chunk of an encoder). `cols.start` must be a multiple of 32.
///
/// # Panics
/// If `path` is not available, the shapes disagree, `cols` is out of range or misaligned, or `c` is
/// too short.
pub fn gemm_bf16_packed(
    path: Bf16Path,
    a: &PackedA,
    b: &PackedB,
    cols: Range<usize>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (m, n) = (a.m, cols.len());
    check_operands("gemm_bf16", path, a, b, &cols);
    assert!(ldc >= n && (m == 0 || c.len() >= (m - 1) * ldc + n), "gemm_bf16: c is too short for {m}x{n}");
    if m == 0 || n == 0 {
        return;
    }
    if b.k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    let c = SendPtr(c.as_mut_ptr());
    let job = Job { path, a: &a.data, b, m, first_pair: cols.start / BLOCK, n, c, c_row0: 0, ldc, accumulate };
    let panel_bytes = n.div_ceil(BLOCK) * b.pair_len() * 2;
    for_each_job(m.div_ceil(JOB_ROWS), n.div_ceil(JOB_COLS), panel_bytes, |rj, cj| job.run(rj, cj));
}

/// Rows of `A` one job of [`gemm_bf16_rows`] owns: its bf16 rows (256 x k: 288 KiB at k = 576) stay
/// in L2 while the whole weight streams past once, from L3, per job.
const ROWS_JOB: usize = 256;
/// Columns of one panel of [`gemm_bf16_rows`]: the job's `256 x 256` f32 products (256 KiB) and the
/// panel's strips stay in L2 for the caller to read back.
const ROWS_PANEL: usize = 256;

/// `a · B[:, cols]` handed to `visit` row by row instead of stored: for each row `i` and each panel of
/// columns (ascending, the last one shorter), `visit(&mut states[i], values, col)` gets the row's
/// values in columns `col..col + values.len()` of `B`. A row's panels all go to one thread, in order.
///
/// The values are [`gemm_bf16_packed`]'s, bit for bit. What a caller does with every value of a
/// product (TopK's selection over an SAE's latents) then reads it from L2 just after it is made: stored
/// whole, `4096 x 16384` f32 values are 256 MiB written to memory and read back.
///
/// # Panics
/// As [`gemm_bf16_packed`], or if `states` does not hold one state per row of `a`.
pub fn gemm_bf16_rows<S: Send>(
    path: Bf16Path,
    a: &PackedA,
    b: &PackedB,
    cols: Range<usize>,
    states: &mut [S],
    visit: impl Fn(&mut S, &[f32], usize) + Sync,
) {
    check_operands("gemm_bf16_rows", path, a, b, &cols);
    assert!(states.len() == a.m, "gemm_bf16_rows: {} states for {} rows", states.len(), a.m);
    let n = cols.len();
    states.par_chunks_mut(ROWS_JOB).enumerate().for_each(|(rj, states)| {
        let rows = rj * ROWS_JOB..rj * ROWS_JOB + states.len();
        let _tiles = (path == Bf16Path::Amx).then(amx::Tiles::configure);
        let mut panel = vec![0f32; states.len() * ROWS_PANEL.min(n)];
        for p0 in (0..n).step_by(ROWS_PANEL) {
            let width = ROWS_PANEL.min(n - p0);
            let (first_pair, c) = ((cols.start + p0) / BLOCK, SendPtr(panel.as_mut_ptr()));
            let job = Job {
                path,
                a: &a.data,
                b,
                m: a.m,
                first_pair,
                n: width,
                c,
                c_row0: rows.start,
                ldc: width,
                accumulate: false,
            };
            job.run_block(rows.clone(), 0..width.div_ceil(BLOCK));
            for (state, values) in states.iter_mut().zip(panel.chunks(width)) {
                visit(state, values, cols.start + p0);
            }
        }
    });
}

/// What every product checks first: `path` runs on this CPU, `a`'s rows are as wide as `b`'s, and
/// `cols` lies in `b` from the start of a strip pair. Panics naming `product` otherwise.
fn check_operands(product: &str, path: Bf16Path, a: &PackedA, b: &PackedB, cols: &Range<usize>) {
    assert!(path.available(), "{} is not available on this CPU", path.name());
    assert!(a.k == b.k, "{product}: rows of width {} against a weight of width {}", a.k, b.k);
    assert!(cols.end <= b.n && cols.start.is_multiple_of(BLOCK), "{product}: columns {cols:?} of {}", b.n);
}

/// Runs `job(row_job, column_job)` for every job, in parallel: column panel by column panel when the
/// weight's `panel_bytes` would not stay in L2, else row job by row job.
fn for_each_job(row_jobs: usize, col_jobs: usize, panel_bytes: usize, job: impl Fn(usize, usize) + Sync) {
    if panel_bytes > PANEL_ORDER_BYTES {
        (0..row_jobs * col_jobs).into_par_iter().for_each(|j| job(j % row_jobs, j / row_jobs));
    } else {
        (0..row_jobs * col_jobs).into_par_iter().for_each(|j| job(j / col_jobs, j % col_jobs));
    }
}

/// What joins a gated MLP's two halves, elementwise: `out = act(gate) · up` (SwiGLU's
/// [`crate::vmath::silu_mul`], GeGLU's [`crate::vmath::gelu_tanh_mul`]). It must map `(0, 0)` to 0, which
/// keeps the padding rows of the result zero.
pub type GluFn = fn(gate: &[f32], up: &[f32], out: &mut [f32]);

/// A gated MLP's first product and its activation in one pass, rounded to bf16 rows for the down
/// projection: `glu(a · B[:, ..ff], a · B[:, ff..])`, where `B` holds the gate and up projections side
/// by side (`2 ff` columns, gate first, `ff` a multiple of 32). Each 32x32 block of the two halves is
/// multiplied into L1, joined and rounded there, so the `m x 2 ff` f32 product and the f32 activations
/// never go to memory: at 1,024 rows of SmolLM2 those were 19 MB written and read back per layer.
///
/// Each value equals `glu` applied to [`gemm_bf16`]'s products, rounded to bf16 as [`PackedA::new`] would.
///
/// # Panics
/// If `path` is not available, the widths disagree, or `B`'s columns are not two halves of a multiple of 32.
pub fn gemm_bf16_glu(path: Bf16Path, a: &PackedA, b: &PackedB, glu: GluFn) -> PackedA {
    check_operands("gemm_bf16_glu", path, a, b, &(0..b.n));
    let ff = b.n / 2;
    assert!(b.n == 2 * ff && ff.is_multiple_of(BLOCK), "gemm_bf16_glu: {} columns are not two halves of 32s", b.n);
    let mut out = PackedA::for_overwrite(a.m, ff);
    let (blocks, out_tiles, kt) = (a.m.div_ceil(BLOCK), ff / BLOCK, b.k_pad / BLOCK);
    if blocks == 0 || out_tiles == 0 {
        return out;
    }
    let dst = SendPtr(out.data.as_mut_ptr());
    // a job: JOB_ROWS rows and as many output columns as make JOB_COLS columns of B (both halves)
    let (job_blocks, job_tiles) = (JOB_ROWS / BLOCK, JOB_COLS / BLOCK / 2);
    let run = |rj: usize, cj: usize| {
        let _tiles = (path == Bf16Path::Amx).then(amx::Tiles::configure);
        let mut gate = [0f32; BLOCK * BLOCK];
        let mut up = [0f32; BLOCK * BLOCK];
        let mut joined = [0f32; BLOCK * BLOCK];
        for ib in rj * job_blocks..blocks.min((rj + 1) * job_blocks) {
            for q in cj * job_tiles..out_tiles.min((cj + 1) * job_tiles) {
                // SAFETY: the path was checked available above and this job holds the tiles; ib < the padded
                // row blocks of `a`, q and q + out_tiles < b's strip pairs, each scratch one whole 32x32
                // block, and (ib, q) a block of `out` that no other job writes.
                let tile = unsafe {
                    let rows = a.data.as_ptr().add(ib * BLOCK * b.k_pad);
                    let (g, u) =
                        (b.data.as_ptr().add(q * b.pair_len()), b.data.as_ptr().add((q + out_tiles) * b.pair_len()));
                    kernel(path, rows, g, kt, gate.as_mut_ptr(), BLOCK, false);
                    kernel(path, rows, u, kt, up.as_mut_ptr(), BLOCK, false);
                    std::slice::from_raw_parts_mut(dst.at((ib * out_tiles + q) * BLOCK * BLOCK), BLOCK * BLOCK)
                };
                glu(&gate, &up, &mut joined);
                // one 32x32 block of `out` is one k tile of its row block: its 32 rows of 32, in order
                crate::dispatch_simd!(round_block(&joined, BLOCK, BLOCK, BLOCK, tile));
            }
        }
    };
    for_each_job(blocks.div_ceil(job_blocks), out_tiles.div_ceil(job_tiles), b.bytes(), run);
    out
}

/// k tiles per pass over a job of `kt` tiles: all of them, unless the AVX512-BF16 kernel, which reads
/// a 32-row block of `A` and a strip pair of `B` once per 8 rows, would find them far out of L1.
fn k_tiles_per_pass(path: Bf16Path, kt: usize) -> usize {
    if path == Bf16Path::Avx512Bf16 && kt > AVX512_ONE_PASS_TILES {
        AVX512_PASS_TILES
    } else {
        kt.max(1)
    }
}

/// A raw pointer that rayon may share: each job writes disjoint blocks of `C` (see [`Job::run`]) or of a
/// [`PackedA`] (see [`gemm_bf16_glu`]).
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    /// The pointer `offset` values on (a method, so closures capture the wrapper, not the raw field).
    ///
    /// # Safety
    /// As [`pointer::add`].
    unsafe fn at(self, offset: usize) -> *mut T {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.add(offset) }
    }
}
// SAFETY: no two jobs write the same element (see the users above).
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

struct Job<'a> {
    path: Bf16Path,
    a: &'a AlignedBuf,
    b: &'a PackedB,
    m: usize,
    /// The strip pair of `B` that column 0 of `C` starts at.
    first_pair: usize,
    /// Columns of `C`.
    n: usize,
    c: SendPtr<f32>,
    /// The row of `C` that `c` points at.
    c_row0: usize,
    ldc: usize,
    accumulate: bool,
}

impl Job<'_> {
    /// The block of `C` at job row `rj`, job column `cj`.
    fn run(&self, rj: usize, cj: usize) {
        let rows = rj * JOB_ROWS..(self.m).min((rj + 1) * JOB_ROWS);
        let pairs = cj * JOB_COLS / BLOCK..self.n.div_ceil(BLOCK).min((cj + 1) * JOB_COLS / BLOCK);
        let _tiles = (self.path == Bf16Path::Amx).then(amx::Tiles::configure);
        self.run_block(rows, pairs);
    }

    /// Rows `rows` (from a multiple of 32) and strip pairs `pairs` of `C`, on a thread that holds the
    /// path's tiles.
    fn run_block(&self, rows: Range<usize>, pairs: Range<usize>) {
        // A block of rows (32 x k in bf16: 36 KiB at k = 576) stays in L1 while it meets every strip
        // pair of the job, which stream from L2; a much longer k goes in passes that keep it so
        let kt = self.b.k_pad / BLOCK;
        let pass = k_tiles_per_pass(self.path, kt);
        for k0 in (0..kt).step_by(pass) {
            let tiles = k0..(k0 + pass).min(kt);
            for i0 in rows.clone().step_by(BLOCK) {
                for q in pairs.clone() {
                    self.block(i0, q, tiles.clone());
                }
            }
        }
    }

    /// k tiles `tiles` of one 32x32 block of `C`: rows `i0..i0 + 32`, columns `32q..32q + 32`, added
    /// to what `C` holds after the first pass (f32 partial sums stored and reloaded exactly, so the
    /// passes give the bits of one). Blocks that overhang `C` go through a scratch block so the
    /// kernels only ever see whole blocks.
    fn block(&self, i0: usize, q: usize, tiles: Range<usize>) {
        let (b, k_pad) = (self.b, self.b.k_pad);
        let j0 = q * BLOCK;
        let (rows, cols) = ((self.m - i0).min(BLOCK), (self.n - j0).min(BLOCK));
        let tile_len = BLOCK * BLOCK;
        // SAFETY: i0 < m, first_pair + q < n_pad / 32 and tiles.end <= k_pad / 32, so both offsets
        // are inside the packed buffers, which hold whole blocks (rows padded to 32, k to k_pad,
        // columns to n_pad) with each 32-row block and strip pair laid out k tile by k tile.
        let (a, bp) = unsafe {
            (
                self.a.as_ptr().add(i0 * k_pad + tiles.start * tile_len),
                b.data.as_ptr().add((self.first_pair + q) * b.pair_len() + tiles.start * tile_len),
            )
        };
        let (kt, load_c) = (tiles.len(), self.accumulate || tiles.start > 0);
        if rows == BLOCK && cols == BLOCK {
            // SAFETY: the path was checked available by gemm_bf16 and `run` holds the tiles; the block lies
            // inside C (checked by gemm_bf16's asserts and rows/cols above).
            unsafe { kernel(self.path, a, bp, kt, self.c.at((i0 - self.c_row0) * self.ldc + j0), self.ldc, load_c) };
            return;
        }
        let mut scratch = [0f32; BLOCK * BLOCK];
        for r in 0..rows {
            // SAFETY: row i0 + r < m and columns j0..j0 + cols < n lie inside C.
            let c_row =
                unsafe { std::slice::from_raw_parts_mut(self.c.at((i0 + r - self.c_row0) * self.ldc + j0), cols) };
            if load_c {
                scratch[r * BLOCK..r * BLOCK + cols].copy_from_slice(c_row);
            }
        }
        // SAFETY: as above, and scratch is one whole 32x32 block.
        unsafe { kernel(self.path, a, bp, kt, scratch.as_mut_ptr(), BLOCK, load_c) };
        for r in 0..rows {
            // SAFETY: as above.
            let c_row =
                unsafe { std::slice::from_raw_parts_mut(self.c.at((i0 + r - self.c_row0) * self.ldc + j0), cols) };
            c_row.copy_from_slice(&scratch[r * BLOCK..r * BLOCK + cols]);
        }
    }
}

/// `c[32, 32] (+)= a[32, 32 kt] · B` for one strip pair, on `path`'s kernel.
///
/// # Safety
/// `path` must be available (and, for AMX, a [`amx::Tiles`] alive on this thread); `a` must hold one
/// 32-row block of [`PackedA`], `b` one strip pair of `kt` tiles, `c` a 32x32 block with row stride `ldc`.
unsafe fn kernel(path: Bf16Path, a: *const u16, b: *const u16, kt: usize, c: *mut f32, ldc: usize, load_c: bool) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match path {
            Bf16Path::Amx => amx::block_32x32(a, b, kt, c, ldc, load_c),
            Bf16Path::Avx512Bf16 => avx512::block_32x32(a, b, kt, c, ldc, load_c),
            Bf16Path::Reference => reference::block_32x32(a, b, kt, c, ldc, load_c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmath::{gelu_tanh_mul, silu_mul};

    /// The fused pass against its parts run one after another: the product, the activation over
    /// whole rows, then rounding; rows and `k` that leave padding, on every path this CPU has.
    #[test]
    fn glu_pass_gives_the_bits_of_product_activation_and_rounding() {
        let (m, k, ff) = (70, 100, 96);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
        let w: Vec<f32> = (0..2 * ff * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 128.0).collect();
        let (pa, pb) = (PackedA::new(&a, m, k, k), PackedB::from_nk(&w, 2 * ff, k));
        for path in Bf16Path::available_paths() {
            for glu in [silu_mul as GluFn, gelu_tanh_mul] {
                let mut gu = vec![0f32; m * 2 * ff];
                gemm_bf16_packed(path, &pa, &pb, 0..2 * ff, &mut gu, 2 * ff, false);
                let mut act = vec![0f32; m * ff];
                for (row, out) in gu.chunks(2 * ff).zip(act.chunks_mut(ff)) {
                    glu(&row[..ff], &row[ff..], out);
                }
                let want = PackedA::new(&act, m, ff, ff);
                let got = gemm_bf16_glu(path, &pa, &pb, glu);
                assert_eq!((got.m, got.k), (m, ff));
                assert!(got.data == want.data, "{}: the fused pass differs", path.name());
                assert!(got.data.as_slice().iter().any(|&v| v != 0), "nothing was computed");
            }
        }
    }

    /// Row by row against the stored product: rows past one job and off a 32-row block, columns
    /// starting at a later strip pair and ending inside a panel, on every path this CPU has.
    #[test]
    fn rows_visited_panel_by_panel_get_the_stored_products_bits() {
        let (m, k, n) = (ROWS_JOB + 45, 100, 32 + ROWS_PANEL + 70);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 128.0).collect();
        let (pa, pb) = (PackedA::new(&a, m, k, k), PackedB::from_nk(&w, n, k));
        let cols = 32..n;
        for path in Bf16Path::available_paths() {
            let mut want = vec![0f32; m * cols.len()];
            gemm_bf16_packed(path, &pa, &pb, cols.clone(), &mut want, cols.len(), false);
            // each row's (column, value) pairs in the order they were visited
            let mut got: Vec<Vec<(usize, f32)>> = vec![Vec::new(); m];
            gemm_bf16_rows(path, &pa, &pb, cols.clone(), &mut got, |row, values, col| {
                row.extend(values.iter().enumerate().map(|(i, &v)| (col + i, v)))
            });
            for (r, row) in got.iter().enumerate() {
                let columns: Vec<usize> = row.iter().map(|p| p.0).collect();
                assert_eq!(columns, cols.clone().collect::<Vec<_>>(), "{}: row {r}'s columns", path.name());
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let values: Vec<f32> = row.iter().map(|p| p.1).collect();
                assert_eq!(bits(&values), bits(&want[r * cols.len()..][..cols.len()]), "{}: row {r}", path.name());
            }
            assert!(want.iter().any(|&v| v != 0.0), "nothing was computed");
        }
    }

    #[test]
    fn passes_over_a_long_k_give_the_bits_of_one_pass() {
        if !Bf16Path::Avx512Bf16.available() {
            eprintln!("no AVX512-BF16 on this CPU: nothing to compare");
            return;
        }
        let (m, k, n) = (32, 3000, 32);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 32.0).collect();
        let (pa, pb) = (PackedA::new(&a, m, k, k), PackedB::from_nk(&w, n, k));
        let kt = pb.k_pad / BLOCK;
        assert!(k_tiles_per_pass(Bf16Path::Avx512Bf16, kt) < kt, "k = {k} should go in passes");
        let mut passes = vec![0f32; m * n];
        gemm_bf16_packed(Bf16Path::Avx512Bf16, &pa, &pb, 0..n, &mut passes, n, false);
        let mut one = vec![0f32; m * n];
        // SAFETY: AVX512-BF16 is available; one whole 32-row block and strip pair, a whole 32x32 C.
        unsafe { avx512::block_32x32(pa.data.as_ptr(), pb.data.as_ptr(), kt, one.as_mut_ptr(), n, false) };
        assert!(one.iter().zip(&passes).all(|(x, y)| x.to_bits() == y.to_bits()), "the passes changed some sum");
    }
}
