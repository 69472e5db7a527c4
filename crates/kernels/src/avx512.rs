//! AVX-512 with the BF16 extension: `vdpbf16ps` adds, in each of 16 f32 lanes, the products of two
//! bf16 pairs. A packed `B` tile row is exactly one such register (16 columns x one k pair), so the
//! kernel broadcasts one k pair of `A` and multiplies it with two strips, 8 rows at a time, as
//! llama.cpp's AVX512-BF16 path does.

/// Whether the CPU has AVX512-BF16 (and the OS saves the 512-bit registers).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[32, 32] (+)= a[32, 32 kt] · B` for one strip pair of `B`.
///
/// # Safety
/// AVX512-BF16 must be available; `a` holds a 32-row block of [`crate::PackedA`] (`kt` k tiles), `b`
/// `2 kt` tiles, `c` a 32x32 block of row stride `ldc`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn block_32x32(a: *const u16, b: *const u16, kt: usize, c: *mut f32, ldc: usize, load_c: bool) {
    for i0 in (0..32).step_by(ROWS) {
        // SAFETY: rows i0..i0 + 8 lie in the caller's block.
        unsafe { rows_8x32(a.add(i0 * 32), b, kt, c.add(i0 * ldc), ldc, load_c) };
    }
}

const ROWS: usize = 8;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn rows_8x32(a: *const u16, b: *const u16, kt: usize, c: *mut f32, ldc: usize, load_c: bool) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    // SAFETY (this block and the loops below): every address lies in the caller's a rows, b tiles and
    // c block; unaligned loads and stores are used throughout.
    unsafe {
        if load_c {
            for (i, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(c.add(i * ldc));
                row[1] = _mm512_loadu_ps(c.add(i * ldc + 16));
            }
        }
        for kb in 0..kt {
            let tiles = b.add(kb * 1024);
            for r in 0..16 {
                let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(tiles.add(r * 32).cast()));
                let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(tiles.add(512 + r * 32).cast()));
                for (i, row) in acc.iter_mut().enumerate() {
                    let pair = a.add(kb * 1024 + i * 32 + 2 * r).cast::<i32>().read_unaligned();
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    row[0] = _mm512_dpbf16_ps(row[0], x, w0);
                    row[1] = _mm512_dpbf16_ps(row[1], x, w1);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(i * ldc), row[0]);
            _mm512_storeu_ps(c.add(i * ldc + 16), row[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn block_32x32(_: *const u16, _: *const u16, _: usize, _: *mut f32, _: usize, _: bool) {
    unreachable!("AVX512-BF16 is never available off x86_64")
}
