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
///
/// `dispatch_simd!(fma: f(args))` is the form for a loop written with `mul_add`, which must compile to one
/// fused multiply-add per element: it also enables FMA, and falls back to plain code (where `mul_add` is
/// libm's `fmaf`: the same results, slowly) on a CPU without it. Callers that want speed there check
/// for FMA first and run an unfused loop instead.
///
/// ```
/// #[inline(always)]
/// fn axpy(a: f32, x: &[f32], y: &mut [f32]) { y.iter_mut().zip(x).for_each(|(y, &x)| *y = a.mul_add(x, *y)) }
/// let mut y = [1.0f32, 1.0];
/// saekit_kernels::dispatch_simd!(fma: axpy(0.1, &[3.0, 1.0e-8], &mut y));
/// assert_eq!(y, [0.1f32.mul_add(3.0, 1.0), 0.1f32.mul_add(1.0e-8, 1.0)]);
/// ```
#[macro_export]
macro_rules! dispatch_simd {
    (fma: $f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R { f() }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R { f() }
            let fma = std::arch::is_x86_feature_detected!("fma");
            if fma && std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F and FMA (checked above).
                unsafe { avx512(|| $f($($arg),*)) }
            } else if fma && std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
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
