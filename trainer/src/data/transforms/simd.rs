//! Runtime dispatch for the hot loops: the same plain Rust body compiled twice, once for the
//! baseline target and once with AVX2 enabled, picked by CPU detection. The kernels are written as
//! simple slice loops so LLVM vectorizes them; AVX2 doubles the lanes over the x86-64 baseline
//! (SSE2) that release builds target by default.

/// Define `fn $name(..)` whose body runs AVX2-compiled when the CPU supports it.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: `avx2` only differs from `body` in the instructions it may use, and the
                    // check above proved this CPU has them.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// `x` clamped to `[lo, hi]` and truncated toward zero, as C's `(int)` after a clip. Plain `as`
/// casts saturate, which LLVM vectorizes poorly; after the clamp the value is always in range,
/// so the unchecked conversion is exact and vectorizes to one instruction.
#[inline(always)]
pub(crate) fn clamp_trunc_f32(x: f32, lo: f32, hi: f32) -> i32 {
    let x = x.max(lo).min(hi);
    debug_assert!(lo >= i32::MIN as f32 && hi <= i32::MAX as f32);
    // SAFETY: `max`/`min` return the non-NaN operand, so `x` is finite and within [lo, hi],
    // which callers keep inside the i32 range.
    unsafe { x.to_int_unchecked::<i32>() }
}

/// [`clamp_trunc_f32`] for doubles.
#[inline(always)]
pub(crate) fn clamp_trunc_f64(x: f64, lo: f64, hi: f64) -> i32 {
    let x = x.max(lo).min(hi);
    debug_assert!(lo >= i32::MIN as f64 && hi <= i32::MAX as f64);
    // SAFETY: as in `clamp_trunc_f32`: finite and within [lo, hi] inside the i32 range.
    unsafe { x.to_int_unchecked::<i32>() }
}
