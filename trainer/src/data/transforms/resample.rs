//! Pillow's resampling, bit for bit: separable convolution with the filter's support widened by
//! the downscale factor (antialiasing), 22-bit fixed-point weights, horizontal pass first into an
//! 8-bit intermediate, then vertical. The crop is fused: only the window is read and its edges
//! clamp like a cropped image's would, so `crop(...).resize(...)` never copies the crop.

use image::RgbImage;
use serde_yaml::Value;

use super::params::{show, Params};
use super::simd::multiversion;
use crate::data::Result;

/// Fixed-point precision of the weights (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Rounding bias added before shifting the fixed-point sum back to 8 bits.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Pillow's resampling filters, numbered as PIL and torchvision's `interpolation` ints are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Filter {
    Nearest,
    Box,
    Bilinear,
    Hamming,
    Bicubic,
    Lanczos,
}

impl Filter {
    /// Read the `interpolation` parameter: a PIL code (0 nearest, 1 lanczos, 2 bilinear,
    /// 3 bicubic, 4 box, 5 hamming) or a torchvision mode name; bilinear when absent.
    pub(crate) fn from_params(p: &Params) -> Result<Filter> {
        const KEY: &str = "interpolation";
        let Some(v) = p.raw(KEY) else {
            return Ok(Filter::Bilinear);
        };
        let by_code = |code: u64| match code {
            0 => Some(Filter::Nearest),
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            4 => Some(Filter::Box),
            5 => Some(Filter::Hamming),
            _ => None,
        };
        let by_name = |name: &str| match name.to_ascii_lowercase().as_str() {
            "nearest" => Some(Filter::Nearest),
            "lanczos" => Some(Filter::Lanczos),
            "bilinear" => Some(Filter::Bilinear),
            "bicubic" => Some(Filter::Bicubic),
            "box" => Some(Filter::Box),
            "hamming" => Some(Filter::Hamming),
            _ => None,
        };
        let found = match v {
            Value::Number(n) => n.as_u64().and_then(by_code),
            Value::String(s) => by_name(s),
            _ => None,
        };
        found.ok_or_else(|| {
            p.bad(
                KEY,
                format_args!(
                    "unknown interpolation {} (use 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)",
                    show(v)
                ),
            )
        })
    }

    fn support(self) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Filter::Nearest | Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes the constants as C floats.
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// A rectangle inside an image, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
}

impl Window {
    /// The whole of an image.
    pub(crate) fn full(img: &RgbImage) -> Window {
        Window {
            left: 0,
            top: 0,
            width: img.width() as usize,
            height: img.height() as usize,
        }
    }
}

/// Build an image from a buffer this module sized itself.
pub(crate) fn image_from(width: usize, height: usize, data: Vec<u8>) -> RgbImage {
    RgbImage::from_raw(width as u32, height as u32, data).expect("buffer sized width * height * 3")
}

/// Copy a window out of an image (PIL's `crop` for a box inside the image).
pub(crate) fn crop(src: &RgbImage, win: Window) -> RgbImage {
    let stride = src.width() as usize * 3;
    let raw = src.as_raw();
    let mut out = Vec::with_capacity(win.width * win.height * 3);
    for y in win.top..win.top + win.height {
        let start = y * stride + win.left * 3;
        out.extend_from_slice(&raw[start..start + win.width * 3]);
    }
    image_from(win.width, win.height, out)
}

/// Resize the `win` part of `src` to `out_w` x `out_h`: what PIL's `img.crop(win).resize(..)` gives.
pub(crate) fn resized_crop(
    src: &RgbImage,
    win: Window,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> RgbImage {
    debug_assert!(
        win.left + win.width <= src.width() as usize
            && win.top + win.height <= src.height() as usize
    );
    if out_w == win.width && out_h == win.height {
        return crop(src, win);
    }
    if out_w == 0 || out_h == 0 || win.width == 0 || win.height == 0 {
        return image_from(out_w, out_h, vec![0; out_w * out_h * 3]);
    }
    if filter == Filter::Nearest {
        return nearest(src, win, out_w, out_h);
    }
    let stride = src.width() as usize * 3;
    let raw = src.as_raw();
    let vert = Coeffs::new(win.height, out_h, filter);
    let (first_row, last_row) = vert.used_range();
    // The horizontal pass only produces the rows the vertical pass will read.
    let (mid, mid_w, row0) = if out_w != win.width {
        let horiz = Coeffs::new(win.width, out_w, filter);
        let mut pass = HorizontalPass::new(&horiz);
        let rows = last_row - first_row;
        let mut mid = vec![0u8; out_w * rows * 3];
        let row_in = |r: usize| {
            let start = (win.top + first_row + r) * stride + win.left * 3;
            &raw[start..start + win.width * 3]
        };
        for (pair, out_rows) in mid.chunks_mut(out_w * 3 * 2).enumerate() {
            if out_rows.len() == out_w * 3 * 2 {
                let (a, b) = out_rows.split_at_mut(out_w * 3);
                pass.run_two(row_in(2 * pair), row_in(2 * pair + 1), a, b);
            } else {
                pass.run(row_in(2 * pair), out_rows);
            }
        }
        (Some(mid), out_w, first_row)
    } else {
        (None, win.width, 0)
    };
    if out_h == win.height {
        // Only the horizontal pass was needed, and then it covered every row.
        return image_from(out_w, out_h, mid.unwrap_or_default());
    }
    let row_len = mid_w * 3;
    let row_at = |r: usize| -> &[u8] {
        match &mid {
            Some(m) => &m[(r - row0) * row_len..][..row_len],
            None => &raw[(win.top + r) * stride + win.left * 3..][..row_len],
        }
    };
    let mut out = vec![0u8; row_len * out_h];
    let mut acc = vec![0i32; row_len];
    let mut rows: Vec<&[u8]> = Vec::with_capacity(vert.taps);
    for (yy, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        let (start, weights) = vert.row(yy);
        rows.clear();
        rows.extend((start..start + vert.taps).map(row_at));
        vertical_row(&rows, weights, &mut acc, out_row);
    }
    image_from(mid_w, out_h, out)
}

/// Fixed-point weights of one resampling axis; every output reads exactly `taps` inputs from
/// `starts[i]` on (zero weights pad the short ones, so loops have a constant trip count).
struct Coeffs {
    taps: usize,
    starts: Vec<usize>,
    weights: Vec<i32>,
    /// First and one-past-last input index with a weight, over all outputs (as Pillow computes it).
    used: (usize, usize),
}

impl Coeffs {
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = (support.ceil() as usize * 2 + 1).min(in_size);
        let inv_filterscale = 1.0 / filterscale;
        let mut starts = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut used = (usize::MAX, 0);
        let mut w = Vec::with_capacity(ksize + 2);
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero; clamping happens right after as in Pillow.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64)
                .min(in_size as i64)
                .max(xmin as i64) as usize;
            w.clear();
            let mut total = 0.0;
            for x in xmin..xmax {
                let v = filter.weight((x as f64 - center + 0.5) * inv_filterscale);
                w.push(v);
                total += v;
            }
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            let scale_fixed = (1u32 << PRECISION_BITS) as f64;
            let start = xmin.min(in_size - ksize);
            let row = &mut weights[xx * ksize..(xx + 1) * ksize];
            for (i, v) in w.iter().enumerate() {
                let fixed = if *v < 0.0 {
                    (-0.5 + v * scale_fixed) as i32
                } else {
                    (0.5 + v * scale_fixed) as i32
                };
                row[xmin - start + i] = fixed;
            }
            starts.push(start);
            used = (used.0.min(xmin), used.1.max(xmax));
        }
        Coeffs {
            taps: ksize,
            starts,
            weights,
            used,
        }
    }

    fn row(&self, i: usize) -> (usize, &[i32]) {
        (
            self.starts[i],
            &self.weights[i * self.taps..(i + 1) * self.taps],
        )
    }

    /// Input rows the vertical pass reads; padding taps may extend `used`, so take the union.
    fn used_range(&self) -> (usize, usize) {
        let first = self
            .starts
            .iter()
            .copied()
            .min()
            .unwrap_or(0)
            .min(self.used.0);
        let last = self
            .starts
            .iter()
            .map(|s| s + self.taps)
            .max()
            .unwrap_or(0)
            .max(self.used.1);
        (first, last)
    }
}

#[inline(always)]
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The horizontal pass over rows: SIMD kernels when the CPU has them (AVX2 does two rows at
/// once, SSSE3 one), the portable loop otherwise.
struct HorizontalPass<'c> {
    coeffs: &'c Coeffs,
    #[cfg(target_arch = "x86_64")]
    simd: Option<x86::PairWeights>,
    #[cfg(target_arch = "x86_64")]
    avx2: bool,
    /// Input rows plus zero padding, so the SIMD kernels' 8-byte loads stay in bounds.
    padded: [Vec<u8>; 2],
}

impl<'c> HorizontalPass<'c> {
    fn new(coeffs: &'c Coeffs) -> Self {
        Self {
            coeffs,
            #[cfg(target_arch = "x86_64")]
            simd: std::arch::is_x86_feature_detected!("ssse3")
                .then(|| x86::PairWeights::new(coeffs)),
            #[cfg(target_arch = "x86_64")]
            avx2: std::arch::is_x86_feature_detected!("avx2"),
            padded: [Vec::new(), Vec::new()],
        }
    }

    /// Resample one RGB row.
    fn run(&mut self, input: &[u8], out: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(weights) = &self.simd {
            let [padded, _] = &mut self.padded;
            x86::pad_into(padded, input);
            // SAFETY: `simd` is only set when the CPU has SSSE3.
            unsafe { x86::horizontal_row(padded, out, &self.coeffs.starts, weights) };
            return;
        }
        horizontal_row(input, out, self.coeffs);
    }

    /// Resample two RGB rows of the same width.
    fn run_two(&mut self, a: &[u8], b: &[u8], out_a: &mut [u8], out_b: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(weights), true) = (&self.simd, self.avx2) {
            let [pa, pb] = &mut self.padded;
            x86::pad_into(pa, a);
            x86::pad_into(pb, b);
            // SAFETY: `avx2` is only set when the CPU has AVX2.
            unsafe { x86::horizontal_two_rows(pa, pb, out_a, out_b, &self.coeffs.starts, weights) };
            return;
        }
        self.run(a, out_a);
        self.run(b, out_b);
    }
}

/// One output row of the horizontal pass (RGB interleaved), portable version.
fn horizontal_row(input: &[u8], out: &mut [u8], c: &Coeffs) {
    // A constant tap count lets LLVM unroll the inner loop completely.
    fn fixed<const K: usize>(input: &[u8], out: &mut [u8], c: &Coeffs) {
        for (xx, px) in out.chunks_exact_mut(3).enumerate() {
            let (start, w) = c.row(xx);
            let w: &[i32; K] = w.try_into().expect("taps == K");
            let src = &input[start * 3..(start + K) * 3];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for t in 0..K {
                r += src[t * 3] as i32 * w[t];
                g += src[t * 3 + 1] as i32 * w[t];
                b += src[t * 3 + 2] as i32 * w[t];
            }
            px[0] = clip8(r);
            px[1] = clip8(g);
            px[2] = clip8(b);
        }
    }
    match c.taps {
        1 => fixed::<1>(input, out, c),
        2 => fixed::<2>(input, out, c),
        3 => fixed::<3>(input, out, c),
        4 => fixed::<4>(input, out, c),
        5 => fixed::<5>(input, out, c),
        6 => fixed::<6>(input, out, c),
        7 => fixed::<7>(input, out, c),
        8 => fixed::<8>(input, out, c),
        9 => fixed::<9>(input, out, c),
        _ => {
            for (xx, px) in out.chunks_exact_mut(3).enumerate() {
                let (start, w) = c.row(xx);
                let src = &input[start * 3..(start + c.taps) * 3];
                let mut s = [HALF; 3];
                for (p, &k) in src.chunks_exact(3).zip(w) {
                    for ch in 0..3 {
                        s[ch] += p[ch] as i32 * k;
                    }
                }
                for ch in 0..3 {
                    px[ch] = clip8(s[ch]);
                }
            }
        }
    }
}

multiversion! {
    /// One output row of the vertical pass: a weighted sum of whole input rows, lane-parallel.
    fn vertical_row(rows: &[&[u8]], weights: &[i32], acc: &mut [i32], out: &mut [u8]) {
        acc.fill(HALF);
        for (row, &k) in rows.iter().zip(weights) {
            if k == 0 {
                continue;
            }
            for (a, &v) in acc.iter_mut().zip(row.iter()) {
                *a += v as i32 * k;
            }
        }
        for (o, &a) in out.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
}

/// PIL's nearest-neighbour resize (an affine scale with accumulated source coordinates).
fn nearest(src: &RgbImage, win: Window, out_w: usize, out_h: usize) -> RgbImage {
    let stride = src.width() as usize * 3;
    let raw = src.as_raw();
    let coords = |in_size: usize, out_size: usize| -> Vec<usize> {
        let step = in_size as f64 / out_size as f64;
        let mut pos = step * 0.5;
        (0..out_size)
            .map(|_| {
                let i = (pos.max(0.0) as usize).min(in_size - 1);
                pos += step;
                i
            })
            .collect()
    };
    let xs = coords(win.width, out_w);
    let ys = coords(win.height, out_h);
    let mut out = Vec::with_capacity(out_w * out_h * 3);
    for &y in &ys {
        let row = &raw[(win.top + y) * stride + win.left * 3..][..win.width * 3];
        for &x in &xs {
            out.extend_from_slice(&row[x * 3..x * 3 + 3]);
        }
    }
    image_from(out_w, out_h, out)
}

/// The horizontal pass with SSSE3: `pmaddwd` sums two taps of all three channels at once. Its
/// 16-bit operands cannot hold Pillow's 22-bit weights, so each weight is split as
/// `hi * 2^11 + lo` and the two partial sums are recombined in 32 bits: the result is Pillow's
/// integer sum exactly.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Coeffs, HALF, PRECISION_BITS};

    /// Zero bytes appended to an input row: a tap pair reads 8 bytes from its first pixel, and
    /// an odd tap count adds a zero-weight pixel past the last one.
    pub(super) const PADDING: usize = 16;
    const SPLIT: i32 = 11;

    /// Per output pixel, per tap pair: the two weights' high and low parts as `pmaddwd`
    /// operands, already broadcast to the four 32-bit lanes.
    pub(super) struct PairWeights {
        pairs: usize,
        hi: Vec<[i32; 4]>,
        lo: Vec<[i32; 4]>,
        /// Input pixels read from an output's first tap on (2 per pair).
        reach: usize,
    }

    impl PairWeights {
        pub(super) fn new(c: &Coeffs) -> Self {
            let pairs = c.taps.div_ceil(2);
            let n = c.starts.len();
            let (mut hi, mut lo) = (Vec::with_capacity(n * pairs), Vec::with_capacity(n * pairs));
            let pack = |a: i32, b: i32| [((b as u32) << 16 | (a as u32 & 0xFFFF)) as i32; 4];
            let low = (1 << SPLIT) - 1;
            for xx in 0..n {
                let (_, w) = c.row(xx);
                for j in 0..pairs {
                    let w0 = w[2 * j];
                    let w1 = w.get(2 * j + 1).copied().unwrap_or(0);
                    hi.push(pack(w0 >> SPLIT, w1 >> SPLIT));
                    lo.push(pack(w0 & low, w1 & low));
                }
            }
            PairWeights {
                pairs,
                hi,
                lo,
                reach: 2 * pairs,
            }
        }

        /// Panic unless every load of a kernel stays inside `row` and the tables match `starts`.
        fn check(&self, row: &[u8], starts: &[usize], out: &[u8]) {
            let last_start = starts.iter().copied().max().unwrap_or(0);
            // Each tap pair loads 8 bytes from pixel `start + 2j`.
            assert!(
                (last_start + self.reach) * 3 + 2 <= row.len(),
                "horizontal pass row is not padded"
            );
            assert!(out.len() >= starts.len() * 3 && self.hi.len() == starts.len() * self.pairs);
        }
    }

    /// Copy `row` into `buf` followed by [`PADDING`] zero bytes.
    pub(super) fn pad_into(buf: &mut Vec<u8>, row: &[u8]) {
        buf.clear();
        buf.extend_from_slice(row);
        buf.resize(row.len() + PADDING, 0);
    }

    /// i16 lanes (r0 r1 g0 g1 b0 b1 0 0) from the bytes r0 g0 b0 r1 g1 b1 of two pixels.
    const GATHER: [i8; 16] = [
        0, -128, 3, -128, 1, -128, 4, -128, 2, -128, 5, -128, -128, -128, -128, -128,
    ];

    /// # Safety
    /// The CPU must support SSSE3.
    #[target_feature(enable = "ssse3")]
    pub(super) unsafe fn horizontal_row(
        input: &[u8],
        out: &mut [u8],
        starts: &[usize],
        w: &PairWeights,
    ) {
        w.check(input, starts, out);
        let gather = _mm_loadu_si128(GATHER.as_ptr() as *const __m128i);
        let half = _mm_set1_epi32(HALF);
        let ptr = input.as_ptr();
        for (xx, &start) in starts.iter().enumerate() {
            let mut acc_hi = _mm_setzero_si128();
            let mut acc_lo = _mm_setzero_si128();
            for j in 0..w.pairs {
                let k = xx * w.pairs + j;
                // SAFETY: in bounds by `check` (the row and both weight tables).
                let px = _mm_loadl_epi64(ptr.add((start + 2 * j) * 3) as *const __m128i);
                let px = _mm_shuffle_epi8(px, gather);
                let hi = _mm_loadu_si128(w.hi.as_ptr().add(k) as *const __m128i);
                let lo = _mm_loadu_si128(w.lo.as_ptr().add(k) as *const __m128i);
                acc_hi = _mm_add_epi32(acc_hi, _mm_madd_epi16(px, hi));
                acc_lo = _mm_add_epi32(acc_lo, _mm_madd_epi16(px, lo));
            }
            let sum = _mm_add_epi32(_mm_add_epi32(_mm_slli_epi32(acc_hi, SPLIT), acc_lo), half);
            let sum = _mm_srai_epi32(sum, PRECISION_BITS as i32);
            // Saturating packs clip to 0..=255 as Pillow's clip8 does.
            let bytes = _mm_packus_epi16(_mm_packs_epi32(sum, sum), sum);
            let [r, g, b, _] = _mm_cvtsi128_si32(bytes).to_le_bytes();
            out[xx * 3..xx * 3 + 3].copy_from_slice(&[r, g, b]);
        }
    }

    /// Two rows at once: row `a` in the low 128-bit lane, row `b` in the high one, sharing weights.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn horizontal_two_rows(
        a: &[u8],
        b: &[u8],
        out_a: &mut [u8],
        out_b: &mut [u8],
        starts: &[usize],
        w: &PairWeights,
    ) {
        w.check(a, starts, out_a);
        w.check(b, starts, out_b);
        let gather =
            _mm256_broadcastsi128_si256(_mm_loadu_si128(GATHER.as_ptr() as *const __m128i));
        let half = _mm256_set1_epi32(HALF);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        for (xx, &start) in starts.iter().enumerate() {
            let mut acc_hi = _mm256_setzero_si256();
            let mut acc_lo = _mm256_setzero_si256();
            for j in 0..w.pairs {
                let k = xx * w.pairs + j;
                let off = (start + 2 * j) * 3;
                // SAFETY: in bounds by `check` on both rows and the weight tables.
                let lo_row = _mm_loadl_epi64(pa.add(off) as *const __m128i);
                let hi_row = _mm_loadl_epi64(pb.add(off) as *const __m128i);
                let px = _mm256_inserti128_si256(_mm256_castsi128_si256(lo_row), hi_row, 1);
                let px = _mm256_shuffle_epi8(px, gather);
                let hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                    w.hi.as_ptr().add(k) as *const __m128i
                ));
                let lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                    w.lo.as_ptr().add(k) as *const __m128i
                ));
                acc_hi = _mm256_add_epi32(acc_hi, _mm256_madd_epi16(px, hi));
                acc_lo = _mm256_add_epi32(acc_lo, _mm256_madd_epi16(px, lo));
            }
            let sum = _mm256_add_epi32(
                _mm256_add_epi32(_mm256_slli_epi32(acc_hi, SPLIT), acc_lo),
                half,
            );
            let sum = _mm256_srai_epi32(sum, PRECISION_BITS as i32);
            let bytes = _mm256_packus_epi16(_mm256_packs_epi32(sum, sum), sum);
            let [r, g, b_, _] = _mm_cvtsi128_si32(_mm256_castsi256_si128(bytes)).to_le_bytes();
            out_a[xx * 3..xx * 3 + 3].copy_from_slice(&[r, g, b_]);
            let [r, g, b_, _] = _mm_cvtsi128_si32(_mm256_extracti128_si256(bytes, 1)).to_le_bytes();
            out_b[xx * 3..xx * 3 + 3].copy_from_slice(&[r, g, b_]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_horizontal_pass_equals_the_portable_one() {
        let mut state = 12345u32;
        let input: Vec<u8> = (0..97 * 3)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (state >> 16) as u8
            })
            .collect();
        for filter in [
            Filter::Bilinear,
            Filter::Bicubic,
            Filter::Lanczos,
            Filter::Box,
            Filter::Hamming,
        ] {
            for out_w in [1, 13, 48, 96, 97, 150, 400] {
                let c = Coeffs::new(97, out_w, filter);
                let mut portable = vec![0u8; out_w * 3];
                horizontal_row(&input, &mut portable, &c);
                let mut pass = HorizontalPass::new(&c);
                let mut one = vec![0u8; out_w * 3];
                pass.run(&input, &mut one);
                assert_eq!(portable, one, "{filter:?} 97 -> {out_w}");
                // Two rows at once: the same row reversed as the partner must not leak across.
                let reversed: Vec<u8> = input.iter().rev().copied().collect();
                let mut portable_rev = vec![0u8; out_w * 3];
                horizontal_row(&reversed, &mut portable_rev, &c);
                let (mut a, mut b) = (vec![0u8; out_w * 3], vec![0u8; out_w * 3]);
                pass.run_two(&input, &reversed, &mut a, &mut b);
                assert_eq!(
                    (portable.clone(), portable_rev),
                    (a, b),
                    "{filter:?} 97 -> {out_w}, two rows"
                );
            }
        }
    }
}
