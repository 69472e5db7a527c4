//! Intel AMX: eight tile registers of 16 rows x 64 bytes; `tdpbf16ps` multiplies a 16x32 bf16 tile
//! of `A` by a 16x(16 pairs) tile of `B` into a 16x16 f32 tile of `C`. One 32x32 block of `C` is four
//! accumulator tiles (tmm0-3) fed by two `A` tiles (tmm4-5) and two `B` tiles (tmm6-7), as oneDNN's
//! brgemm kernels do. Stable Rust has no AMX intrinsics, so the kernel is `asm!`.

use std::sync::OnceLock;

/// Whether the CPU has AMX-BF16 and Linux granted this process the tile state.
pub(crate) fn available() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| cpu_has_amx_bf16() && os_grants_tile_data())
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_amx_bf16() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID leaf 7, sub-leaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    #[allow(unused_unsafe)] // an unsafe fn before Rust 1.88, safe since
    let (max_leaf, edx) = unsafe { (__cpuid_count(0, 0).eax, __cpuid_count(7, 0).edx) };
    max_leaf >= 7 && (edx >> 22) & 1 == 1 && (edx >> 24) & 1 == 1
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx_bf16() -> bool {
    false
}

/// Linux keeps the 8 KiB tile state off until a process asks for it (since 5.16); without it the
/// first tile instruction faults.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn os_grants_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this arch_prctl only asks for a permission for this process; it touches no memory.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn os_grants_tile_data() -> bool {
    false
}

/// The tile configuration of this thread, loaded for the lifetime of the value; dropping it releases
/// the tiles so the kernel need not save them on a context switch.
pub(crate) struct Tiles(());

/// `ldtilecfg`'s 64-byte operand (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl Tiles {
    /// Every one of the eight tiles: 16 rows of 64 bytes.
    pub(crate) fn configure() -> Tiles {
        let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
        cfg.bytes_per_row[..8].fill(64);
        cfg.rows[..8].fill(16);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: only reached when `available()` (the driver checks the path); cfg is a valid palette-1
        // configuration that outlives the instruction.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
        }
        Tiles(())
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles were configured by `configure`.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}

/// `c[32, 32] (+)= a[32, 32 kt] · B` for one strip pair of `B`, on the configured tiles.
///
/// # Safety
/// AMX must be available and a [`Tiles`] alive on this thread; `a` holds a 32-row block of
/// [`crate::PackedA`] (`kt` k tiles), `b` `2 kt` tiles, `c` a 32x32 block of row stride `ldc`; `kt >= 1`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn block_32x32(a: *const u16, b: *const u16, kt: usize, c: *mut f32, ldc: usize, load_c: bool) {
    // SAFETY: the caller vouches for every address these registers reach.
    unsafe {
        std::arch::asm!(
            "test {load:e}, {load:e}",
            "jz 3f",
            "tileloadd tmm0, [{c0} + {ldc}*1]",
            "tileloadd tmm1, [{c0} + {ldc}*1 + 64]",
            "tileloadd tmm2, [{c1} + {ldc}*1]",
            "tileloadd tmm3, [{c1} + {ldc}*1 + 64]",
            "jmp 4f",
            "3:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "4:",
            "tileloadd tmm4, [{a} + {s64}*1]",
            "tileloadd tmm6, [{b} + {s64}*1]",
            "tileloadd tmm7, [{b} + {s64}*1 + 1024]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a} + {s64}*1 + 1024]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 2048",
            "add {b}, 2048",
            "dec {kt}",
            "jnz 4b",
            "tilestored [{c0} + {ldc}*1], tmm0",
            "tilestored [{c0} + {ldc}*1 + 64], tmm1",
            "tilestored [{c1} + {ldc}*1], tmm2",
            "tilestored [{c1} + {ldc}*1 + 64], tmm3",
            load = in(reg) load_c as u32,
            c0 = in(reg) c,
            c1 = in(reg) c.add(16 * ldc),
            ldc = in(reg) ldc * 4,
            a = inout(reg) a => _,
            b = inout(reg) b => _,
            s64 = in(reg) 64usize,
            kt = inout(reg) kt => _,
            options(nostack),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn block_32x32(_: *const u16, _: *const u16, _: usize, _: *mut f32, _: usize, _: bool) {
    unreachable!("AMX is never available off x86_64")
}
