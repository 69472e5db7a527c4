//! The portable path: scalar code over the packed data, so the packing and the driver are checked
//! on CPUs without AMX or AVX512-BF16.

use crate::pack::{bf16_to_f32, BLOCK, TILE};

/// `c[32, 32] (+)= a[32, 32 kt] · B` for one strip pair of `B`.
///
/// # Safety
/// `a` holds a 32-row block of [`crate::PackedA`] (`kt` k tiles), `b` `2 kt` tiles, `c` a 32x32 block
/// of row stride `ldc`.
pub(crate) unsafe fn block_32x32(a: *const u16, b: *const u16, kt: usize, c: *mut f32, ldc: usize, load_c: bool) {
    for i in 0..BLOCK {
        for j in 0..BLOCK {
            let (h, col) = (j / 16, j % 16);
            // SAFETY: (i, j) lies in the 32x32 block the caller vouches for.
            let out = unsafe { &mut *c.add(i * ldc + j) };
            let mut acc = if load_c { *out } else { 0.0 };
            for kb in 0..kt {
                for r in 0..16 {
                    for e in 0..2 {
                        // SAFETY: kb < kt and the tile index is < 2 kt.
                        let (x, w) = unsafe {
                            (
                                *a.add((kb * BLOCK + i) * BLOCK + 2 * r + e),
                                *b.add((kb * 2 + h) * TILE + r * 32 + col * 2 + e),
                            )
                        };
                        acc += bf16_to_f32(x) * bf16_to_f32(w);
                    }
                }
            }
            *out = acc;
        }
    }
}
