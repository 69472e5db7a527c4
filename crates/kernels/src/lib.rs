//! bf16 matrix products with f32 accumulation on the CPU, the way oneDNN and llama.cpp run them:
//! weights converted to bf16 once into a packed layout ([`PackedB`]), the other operand converted
//! per call, every product accumulated in f32.
//!
//! Three paths compute the same thing, picked at run time ([`Bf16Path`]):
//! - [`Bf16Path::Amx`]: Intel AMX tiles (`tdpbf16ps`, Sapphire Rapids and later), through inline
//!   `asm!` because stable Rust has no AMX intrinsics; Linux must grant the tile state
//!   (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which [`Bf16Path::available`] asks for once.
//! - [`Bf16Path::Avx512Bf16`]: `vdpbf16ps` (Intel Cooper Lake, AMD Zen 4 and later).
//! - [`Bf16Path::Reference`]: portable scalar code over the same packed data, for checking the
//!   packing on any CPU; never picked for speed.
//!
//! Where an f32 intermediate would only feed the next product, it is made in bf16 directly, in cache:
//! [`PackedA::from_fn`] rounds rows as a row-wise op (a norm) writes them, and [`gemm_bf16_glu`] runs a
//! gated MLP's first product, its activation and the rounding for the down projection as one pass.
//! A product read once, value by value, need not be stored at all: [`gemm_bf16_rows`] hands each row's
//! values to the caller panel by panel, from L2 (an SAE encoder's TopK selection).
//!
//! [`vmath`] holds the forward pass's elementwise hot loops (`exp`, SiLU, softmax) over slices.
//!
//! This crate owns the bf16 conversion, the packed layout and the kernels. It must not know what
//! the matrices mean: callers (the model's linear layers, the SAE encoder) decide when bf16 is
//! good enough and keep their f32 paths.
//!
//! ```
//! use saekit_kernels::{gemm_bf16, Bf16Path, PackedB};
//! // c[2, 3] = a[2, 4] · wᵀ with w stored [3, 4] (an nn.Linear weight)
//! let a = [1.0f32, 2.0, 3.0, 4.0, 0.5, 0.25, 0.0, -1.0];
//! let w = [1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
//! let packed = PackedB::from_nk(&w, 3, 4);
//! let mut c = [0f32; 6];
//! let path = Bf16Path::fastest().unwrap_or(Bf16Path::Reference);
//! gemm_bf16(path, &a, 2, 4, &packed, &mut c, 3, false);
//! assert_eq!(c, [1.0, 2.0, 10.0, 0.5, 0.25, -0.25]);
//! ```
#![deny(missing_docs)]

mod amx;
mod avx512;
mod driver;
mod pack;
mod precision;
mod reference;
mod simd;
pub mod vmath;

pub use driver::{gemm_bf16, gemm_bf16_glu, gemm_bf16_packed, gemm_bf16_rows, GluFn};
pub use pack::{bf16_bits, bf16_to_f32, round_to_bf16, PackedA, PackedB, StripPair};
pub use precision::{auto_cache_file, auto_precision, Precision, PrecisionChoice, PrecisionError, AUTO_MIN_SPEEDUP};

/// One way of running [`gemm_bf16`] on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bf16Path {
    /// Intel AMX tiles: 16x16 f32 accumulators fed by 16x32 bf16 tiles.
    Amx,
    /// AVX-512 with the BF16 extension: `vdpbf16ps` on 512-bit registers.
    Avx512Bf16,
    /// Scalar code: the same rounding and packing, for tests on CPUs without either extension.
    Reference,
}

impl Bf16Path {
    /// Every path, fastest first.
    pub const ALL: [Bf16Path; 3] = [Bf16Path::Amx, Bf16Path::Avx512Bf16, Bf16Path::Reference];

    /// The name `saekit bench gemm` and the logs print.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Path::Amx => "amx-bf16",
            Bf16Path::Avx512Bf16 => "avx512-bf16",
            Bf16Path::Reference => "bf16-reference",
        }
    }

    /// Whether this CPU (and, for AMX, the operating system) can run the path.
    pub fn available(self) -> bool {
        match self {
            Bf16Path::Amx => amx::available(),
            Bf16Path::Avx512Bf16 => avx512::available(),
            Bf16Path::Reference => true,
        }
    }

    /// The fastest hardware path, or `None` where the CPU has neither AMX nor AVX512-BF16 (callers
    /// then keep f32: the reference path is far slower than an f32 GEMM).
    pub fn fastest() -> Option<Bf16Path> {
        [Bf16Path::Amx, Bf16Path::Avx512Bf16].into_iter().find(|p| p.available())
    }

    /// Every path this machine can run, fastest first.
    pub fn available_paths() -> Vec<Bf16Path> {
        Self::ALL.into_iter().filter(|p| p.available()).collect()
    }
}
