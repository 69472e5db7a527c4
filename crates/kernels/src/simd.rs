//! Run-time dispatch of plain loops to the widest vector unit the CPU has.

/// Run `$f($args)` compiled for AVX-512 or AVX2 when the CPU has it, else as plain code.
///
/// `$f` should be `#[inline(always)]` and branch-free enough to vectorise; it is inlined into a
/// function with the target feature enabled, so the compiler may use the wider registers. Use it only
/// where every path computes the same result (elementwise IEEE operations, exact comparisons, sums in
/// a fixed order): no fused multiply-add is introduced that the plain path lacks.
///
/// ```
/// #[inline(always)]
/// fn double(x: &mut [f32]) { x.iter_mut().for_each(|v| *v *= 2.0) }
/// let mut v = [1.0f32, 2.0];
/// saekit_kernels::dispatch_simd!(double(&mut v));
/// assert_eq!(v, [2.0, 4.0]);
/// ```
#[macro_export]
macro_rules! dispatch_simd {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R { f() }
            #[target_feature(enable = "avx2")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R { f() }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked above).
                unsafe { avx512(|| $f($($arg),*)) }
            } else if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked above).
                unsafe { avx2(|| $f($($arg),*)) }
            } else {
                $f($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $f($($arg),*)
        }
    }};
}
