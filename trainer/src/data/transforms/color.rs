//! Colour transforms with PIL's exact 8-bit arithmetic: ColorJitter (ImageEnhance's brightness,
//! contrast and colour blends, HSV hue rotation), RandomGrayscale (ITU-R 601 luma), and VISSL's
//! ImgPilColorDistortion / ImgPilRandomColorJitter built from them.

use image::RgbImage;
use rand_pcg::Pcg64Mcg;
use serde_yaml::Value;

use super::params::Params;
use super::simd::{clamp_trunc_f32, clamp_trunc_f64, multiversion};
use super::{draw, expect_image, MapItem, Op};
use crate::data::{Item, Result};

/// PIL's `L` conversion: ITU-R 601-2 luma in 16-bit fixed point.
#[inline(always)]
pub(crate) fn luma(r: i32, g: i32, b: i32) -> i32 {
    (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
}

/// PIL's `Image.blend(a, b, alpha)` for one 8-bit value: float interpolation, clipped, truncated.
#[inline(always)]
pub(crate) fn blend_value(a: i32, b: i32, alpha: f32) -> i32 {
    clamp_trunc_f32(a as f32 + alpha * (b - a) as f32, 0.0, 255.0)
}

/// A per-value table: `table[v]` replaces every channel value `v`.
pub(crate) type Lut = [u8; 256];

/// Build a table from a per-value function.
pub(crate) fn lut(f: impl Fn(i32) -> i32) -> Lut {
    std::array::from_fn(|v| f(v as i32) as u8)
}

/// Replace every channel value through a table.
pub(crate) fn apply_lut(buf: &mut [u8], table: &Lut) {
    for v in buf.iter_mut() {
        *v = table[*v as usize];
    }
}

/// Pixels per block of the per-pixel kernels.
const BLOCK: usize = 64;

/// One block of pixels split into channel planes, so per-pixel arithmetic vectorizes.
type Planes = [[i32; BLOCK]; 3];

/// Run `$body` over `$buf` in blocks of [`BLOCK`] pixels split into planes (`$planes`), writing
/// the planes back. Lanes past the end of a short last block hold stale values that are computed
/// on but never written back. A macro rather than a closure so the body is always inlined into
/// the (AVX2-compiled) caller.
macro_rules! for_pixel_blocks {
    ($buf:expr, |$planes:ident| $body:block) => {{
        let mut planes: Planes = [[0i32; BLOCK]; 3];
        for block in $buf.chunks_mut(BLOCK * 3) {
            for (i, p) in block.chunks_exact(3).enumerate() {
                planes[0][i] = p[0] as i32;
                planes[1][i] = p[1] as i32;
                planes[2][i] = p[2] as i32;
            }
            {
                let $planes = &mut planes;
                $body
            }
            for (i, p) in block.chunks_exact_mut(3).enumerate() {
                p[0] = planes[0][i] as u8;
                p[1] = planes[1][i] as u8;
                p[2] = planes[2][i] as u8;
            }
        }
    }};
}

multiversion! {
    /// Set every pixel to its grey level (three equal channels), as torchvision's
    /// `to_grayscale(img, 3)` does.
    pub(crate) fn grayscale(buf: &mut [u8]) {
        for_pixel_blocks!(buf, |planes| {
            let [r, g, b] = planes;
            for i in 0..BLOCK {
                let l = luma(r[i], g[i], b[i]);
                (r[i], g[i], b[i]) = (l, l, l);
            }
        });
    }
}

multiversion! {
    /// The mean grey level, rounded as `ImageEnhance.Contrast` does.
    fn mean_luma(buf: &[u8]) -> i32 {
        let n = buf.len() / 3;
        if n == 0 {
            return 0;
        }
        let mut sum = 0u64;
        for block in buf.chunks(BLOCK * 3) {
            let mut part = 0u32;
            for p in block.chunks_exact(3) {
                part += luma(p[0] as i32, p[1] as i32, p[2] as i32) as u32;
            }
            sum += part as u64;
        }
        (sum as f64 / n as f64 + 0.5) as i32
    }
}

multiversion! {
    /// Blend every value with the constant `base` (PIL's blend with a flat degenerate image);
    /// arithmetic rather than a table, because it vectorizes.
    fn blend_with_constant(buf: &mut [u8], base: i32, alpha: f32) {
        for v in buf.iter_mut() {
            *v = blend_value(base, *v as i32, alpha) as u8;
        }
    }
}

/// `ImageEnhance.Brightness(img).enhance(factor)`: blend with black.
pub(crate) fn adjust_brightness(buf: &mut [u8], factor: f64) {
    blend_with_constant(buf, 0, factor as f32);
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blend with the mean grey level.
pub(crate) fn adjust_contrast(buf: &mut [u8], factor: f64) {
    blend_with_constant(buf, mean_luma(buf), factor as f32);
}

multiversion! {
    /// `ImageEnhance.Color(img).enhance(factor)`: blend each pixel with its grey level.
    pub(crate) fn adjust_saturation(buf: &mut [u8], factor: f64) {
        let f = factor as f32;
        for_pixel_blocks!(buf, |planes| {
            let [r, g, b] = planes;
            for i in 0..BLOCK {
                let l = luma(r[i], g[i], b[i]);
                r[i] = blend_value(l, r[i], f);
                g[i] = blend_value(l, g[i], f);
                b[i] = blend_value(l, b[i], f);
            }
        });
    }
}

/// PIL's `h / 6.0` on the double hue, as a multiplication: `hue_sixth_is_exact` checks it gives
/// the same 8-bit hue as the division for every hue `rgb2hsv` can produce.
const SIXTH: f64 = 1.0 / 6.0;

/// The per-hue and per-saturation constants of PIL's `hsv2rgb`, so the pass needs no divisions.
struct HsvTables {
    /// `floor(h * 6 / 255) % 6`.
    sector: [i32; 256],
    /// The remainder `h * 6 / 255 - floor(..)`, rounded to a C float as PIL stores it.
    frac: [f32; 256],
    /// `s / 255` as a C float.
    fs: [f32; 256],
}

static HSV_TABLES: std::sync::LazyLock<HsvTables> = std::sync::LazyLock::new(|| {
    let mut t = HsvTables {
        sector: [0; 256],
        frac: [0.0; 256],
        fs: [0.0; 256],
    };
    for v in 0..256 {
        let h6 = v as f32 as f64 * 6.0 / 255.0;
        let i = h6.floor();
        t.sector[v] = i as i32 % 6;
        t.frac[v] = (h6 - i) as f32;
        t.fs[v] = (v as f32 as f64 / 255.0) as f32;
    }
    t
});

/// PIL's `rgb2hsv` hue of one pixel as an unquantized float (before `fmod` and scaling), given
/// the pixel's channel distances to its maximum and `cr = max - min > 0`.
#[inline(always)]
fn raw_hue(r_is_max: bool, g_is_max: bool, rc: f32, gc: f32, bc: f32) -> f32 {
    if r_is_max {
        bc - gc
    } else if g_is_max {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    }
}

/// `fmod(h / 6 + 1, 1)` scaled to 8 bits as PIL does; `x` in [0, 2) makes fmod a subtraction.
#[inline(always)]
fn hue_to_u8(h: f32, sixth: impl Fn(f64) -> f64) -> i32 {
    let x = sixth(h as f64) + 1.0;
    let h = (if x >= 1.0 { x - 1.0 } else { x }) as f32;
    clamp_trunc_f64(h as f64 * 255.0, 0.0, 255.0)
}

/// torchvision's `adjust_hue` on PIL images: rotate the 8-bit HSV hue by `factor * 255`.
pub(crate) fn adjust_hue(buf: &mut [u8], factor: f64) {
    // numpy's float -> uint8 cast truncates toward zero and wraps.
    let shift = ((factor * 255.0) as i64).rem_euclid(256) as i32;
    // Even a zero shift goes through 8-bit HSV in PIL, which is not always the identity.
    hue_pass(buf, shift);
}

multiversion! {
    fn hue_pass(buf: &mut [u8], shift: i32) {
        let tables = &*HSV_TABLES;
        for_pixel_blocks!(buf, |planes| {
            hue_block(planes, shift, tables);
        });
    }
}

/// PIL's `rgb2hsv`, hue shift and `hsv2rgb` (`Convert.c`) on one block, in PIL's float/double
/// precision, written branch-free so it vectorizes. Grey pixels need no special case: their
/// channel distances are 0, giving hue 0 and saturation 0 as PIL's early exit does, and zero
/// saturation makes p = q = t = v.
#[inline(always)]
fn hue_block(rgb: &mut Planes, shift: i32, tables: &HsvTables) {
    let mut h8 = [0i32; BLOCK];
    let mut s8 = [0i32; BLOCK];
    {
        let [r, g, b] = &*rgb;
        for i in 0..BLOCK {
            let (r, g, b) = (r[i], g[i], b[i]);
            let maxc = r.max(g).max(b);
            let cr = maxc - r.min(g).min(b);
            let crf = if cr == 0 { 1.0 } else { cr as f32 };
            let maxf = if maxc == 0 { 1.0 } else { maxc as f32 };
            let s = cr as f32 / maxf;
            let rc = (maxc - r) as f32 / crf;
            let gc = (maxc - g) as f32 / crf;
            let bc = (maxc - b) as f32 / crf;
            let h = raw_hue(r == maxc, g == maxc, rc, gc, bc);
            h8[i] = (hue_to_u8(h, |x| x * SIXTH) + shift) & 255;
            s8[i] = clamp_trunc_f64(s as f64 * 255.0, 0.0, 255.0);
        }
    }
    // Table lookups in their own loop keep the arithmetic loops gather-free.
    let mut sector = [0i32; BLOCK];
    let mut frac = [0f32; BLOCK];
    let mut fsat = [0f32; BLOCK];
    for i in 0..BLOCK {
        sector[i] = tables.sector[h8[i] as usize & 255];
        frac[i] = tables.frac[h8[i] as usize & 255];
        fsat[i] = tables.fs[s8[i] as usize & 255];
    }
    let [r, g, b] = rgb;
    for i in 0..BLOCK {
        let v = r[i].max(g[i]).max(b[i]);
        let (f, fs, vf) = (frac[i], fsat[i], v as f64);
        // C's round() (half away from zero) on non-negative values, built from trunc so it vectorizes.
        let round = |x: f64| {
            let t = x.trunc();
            clamp_trunc_f64(t + if x - t >= 0.5 { 1.0 } else { 0.0 }, 0.0, 255.0)
        };
        let p = round(vf * (1.0 - fs as f64));
        let q = round(vf * (1.0 - (fs * f) as f64));
        let t = round(vf * (1.0 - fs as f64 * (1.0 - f as f64)));
        let sec = sector[i];
        r[i] = match sec {
            0 | 5 => v,
            1 => q,
            2 | 3 => p,
            _ => t,
        };
        g[i] = match sec {
            0 => t,
            1 | 2 => v,
            3 => q,
            _ => p,
        };
        b[i] = match sec {
            0 | 1 => p,
            2 => t,
            3 | 4 => v,
            _ => q,
        };
    }
}

/// A `[low, high]` factor range of ColorJitter, or None when it is the identity.
type FactorRange = Option<(f64, f64)>;

/// torchvision's ColorJitter: the four adjustments in a random order with random factors.
pub(crate) struct ColorJitter {
    brightness: FactorRange,
    contrast: FactorRange,
    saturation: FactorRange,
    hue: FactorRange,
}

impl ColorJitter {
    /// Jitter strengths as plain numbers (torchvision's `ColorJitter(b, c, s, h)`).
    pub(crate) fn from_strengths(
        p: &Params,
        b: f64,
        c: f64,
        s: f64,
        h: f64,
    ) -> Result<ColorJitter> {
        Ok(ColorJitter {
            brightness: factor_range(p, "brightness", b, 1.0)?,
            contrast: factor_range(p, "contrast", c, 1.0)?,
            saturation: factor_range(p, "saturation", s, 1.0)?,
            hue: hue_range(p, "hue", h, h)?,
        })
    }

    /// Apply to an image in place.
    pub(crate) fn apply(&self, img: &mut RgbImage, rng: &mut Pcg64Mcg) {
        let mut order = [0usize, 1, 2, 3];
        for i in (1..4).rev() {
            order.swap(i, draw::int(rng, 0, i + 1));
        }
        let mut factor = |r: FactorRange| r.map(|(lo, hi)| draw::uniform(rng, lo, hi));
        let factors = [
            factor(self.brightness),
            factor(self.contrast),
            factor(self.saturation),
            factor(self.hue),
        ];
        let buf: &mut [u8] = img;
        for op in order {
            let Some(f) = factors[op] else { continue };
            match op {
                0 => adjust_brightness(buf, f),
                1 => adjust_contrast(buf, f),
                2 => adjust_saturation(buf, f),
                _ => adjust_hue(buf, f),
            }
        }
    }
}

/// torchvision's `_check_input` for brightness/contrast/saturation given as one strength.
fn factor_range(p: &Params, key: &str, strength: f64, center: f64) -> Result<FactorRange> {
    if strength < 0.0 {
        return Err(p.bad(key, format_args!("must be non-negative, got {strength}")));
    }
    Ok(Some(((center - strength).max(0.0), center + strength))
        .filter(|&(lo, hi)| !(lo == center && hi == center)))
}

/// Hue jitter `[lo, hi]` must stay inside [-0.5, 0.5].
fn hue_range(p: &Params, key: &str, neg: f64, pos: f64) -> Result<FactorRange> {
    let (lo, hi) = (-neg, pos);
    if !(-0.5 <= lo && lo <= hi && hi <= 0.5) {
        return Err(p.bad(
            key,
            format_args!("hue range [{lo}, {hi}] must lie within [-0.5, 0.5]"),
        ));
    }
    Ok(Some((lo, hi)).filter(|&r| r != (0.0, 0.0)))
}

/// A ColorJitter parameter: a strength or an explicit `[low, high]` range.
fn jitter_param(p: &Params, key: &'static str, center: f64) -> Result<FactorRange> {
    match p.raw(key) {
        None => Ok(None),
        Some(v @ Value::Sequence(_)) => {
            let (lo, hi) = p.as_range(key, v)?;
            if center == 0.0 {
                hue_range(p, key, -lo, hi)
            } else if lo < 0.0 {
                Err(p.bad(
                    key,
                    format_args!("factors must be non-negative, got [{lo}, {hi}]"),
                ))
            } else {
                Ok(Some((lo, hi)).filter(|&r| r != (center, center)))
            }
        }
        Some(v) => {
            let s = p.as_f64(key, v)?;
            if center == 0.0 {
                if s < 0.0 {
                    return Err(p.bad(key, format_args!("must be non-negative, got {s}")));
                }
                hue_range(p, key, s, s)
            } else {
                factor_range(p, key, s, center)
            }
        }
    }
}

impl MapItem for ColorJitter {
    fn map(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Item> {
        let mut img = expect_image(item, "ColorJitter")?;
        self.apply(&mut img, rng);
        Ok(Item::Image(img))
    }
}

pub(crate) fn color_jitter(p: &Params) -> Result<Op> {
    Ok(Op::Map(Box::new(ColorJitter {
        brightness: jitter_param(p, "brightness", 1.0)?,
        contrast: jitter_param(p, "contrast", 1.0)?,
        saturation: jitter_param(p, "saturation", 1.0)?,
        hue: jitter_param(p, "hue", 0.0)?,
    })))
}

/// torchvision's RandomGrayscale (three equal channels).
struct RandomGrayscale {
    p: f64,
}

impl MapItem for RandomGrayscale {
    fn map(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Item> {
        let mut img = expect_image(item, "RandomGrayscale")?;
        if draw::chance(rng, self.p) {
            grayscale(&mut img);
        }
        Ok(Item::Image(img))
    }
}

pub(crate) fn random_grayscale(p: &Params) -> Result<Op> {
    Ok(Op::Map(Box::new(RandomGrayscale {
        p: p.prob_or("p", 0.1)?,
    })))
}

/// VISSL's colour distortions: ColorJitter applied with probability `jitter_p`, then
/// (for ImgPilColorDistortion) grayscale with probability `gray_p`.
struct ColorDistortion {
    name: &'static str,
    jitter: ColorJitter,
    jitter_p: f64,
    gray_p: f64,
}

impl MapItem for ColorDistortion {
    fn map(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Item> {
        let mut img = expect_image(item, self.name)?;
        if draw::chance(rng, self.jitter_p) {
            self.jitter.apply(&mut img, rng);
        }
        if self.gray_p > 0.0 && draw::chance(rng, self.gray_p) {
            grayscale(&mut img);
        }
        Ok(Item::Image(img))
    }
}

/// ImgPilColorDistortion (SimCLR): jitter strengths `base * strength` with p 0.8, then grayscale p 0.2.
///
/// VISSL's `from_config` reads only `strength` and silently drops `brightness`, `contrast`,
/// `saturation` and `hue` even though its constructor takes them and some configs (iBOT) set
/// them; here they are honoured, as those configs intend.
pub(crate) fn img_pil_color_distortion(p: &Params) -> Result<Op> {
    let strength = p.f64_or("strength", 1.0)?;
    let b = p.f64_or("brightness", 0.8)? * strength;
    let c = p.f64_or("contrast", 0.8)? * strength;
    let s = p.f64_or("saturation", 0.8)? * strength;
    let h = p.f64_or("hue", 0.2)? * strength;
    let jitter = ColorJitter::from_strengths(p, b, c, s, h)?;
    Ok(Op::Map(Box::new(ColorDistortion {
        name: "ImgPilColorDistortion",
        jitter,
        jitter_p: 0.8,
        gray_p: 0.2,
    })))
}

/// ImgPilRandomColorJitter: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with probability `p`.
pub(crate) fn img_pil_random_color_jitter(p: &Params) -> Result<Op> {
    let s = p.f64_or("strength", 1.0)?;
    let jitter_p = p.prob_or("p", 0.8)?;
    let jitter = ColorJitter::from_strengths(p, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)?;
    Ok(Op::Map(Box::new(ColorDistortion {
        name: "ImgPilRandomColorJitter",
        jitter,
        jitter_p,
        gray_p: 0.0,
    })))
}

#[cfg(test)]
mod hue_tests {
    use super::*;

    #[test]
    fn hue_sixth_is_exact() {
        // Every hue rgb2hsv can produce: the channel distances to the maximum lie in 0..=cr.
        for cr in 1..=255i32 {
            let crf = cr as f32;
            for d1 in 0..=cr {
                for d2 in 0..=cr {
                    let (a, b) = (d1 as f32 / crf, d2 as f32 / crf);
                    for (r_max, g_max, rc, gc, bc) in [
                        (true, false, 0.0, a, b),
                        (false, true, a, 0.0, b),
                        (false, false, a, b, 0.0),
                    ] {
                        let h = raw_hue(r_max, g_max, rc, gc, bc);
                        assert_eq!(
                            hue_to_u8(h, |x| x * SIXTH),
                            hue_to_u8(h, |x| x / 6.0),
                            "h = {h}"
                        );
                    }
                }
            }
        }
    }
}
