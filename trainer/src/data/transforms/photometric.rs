//! PIL's ImageOps/ImageEnhance photometric operations (solarize, posterize, autocontrast,
//! sharpness) and VISSL's random wrappers of them (ImgPilRandomSolarize, ImgPilRandomPhotometric,
//! as in `pil_photometric_transforms_lib.py`).

use rand_pcg::Pcg64Mcg;

use super::color::{apply_lut, blend_value, lut, Lut};
use super::params::Params;
use super::{draw, expect_image, MapItem, Op};
use crate::data::{Item, Result};

/// `ImageOps.solarize(img, threshold)`: invert every value at or above `threshold`.
pub(crate) fn solarize(buf: &mut [u8], threshold: u32) {
    apply_lut(
        buf,
        &lut(|v| if (v as u32) < threshold { v } else { 255 - v }),
    );
}

/// `ImageOps.posterize(img, bits)`: keep the top `bits` bits of every value.
pub(crate) fn posterize(buf: &mut [u8], bits: u32) {
    let mask = !((1i32 << (8 - bits.min(8))) - 1);
    apply_lut(buf, &lut(|v| v & mask));
}

/// `ImageOps.autocontrast(img)`: stretch each channel's [min, max] to [0, 255].
pub(crate) fn autocontrast(buf: &mut [u8]) {
    let mut hist = [[0u32; 256]; 3];
    for px in buf.chunks_exact(3) {
        for c in 0..3 {
            hist[c][px[c] as usize] += 1;
        }
    }
    let tables: Vec<Lut> = hist
        .iter()
        .map(|h| {
            let lo = h.iter().position(|&n| n > 0).unwrap_or(0);
            let hi = h.iter().rposition(|&n| n > 0).unwrap_or(0);
            if hi <= lo {
                return lut(|v| v);
            }
            let scale = 255.0 / (hi - lo) as f64;
            let offset = -(lo as f64) * scale;
            lut(|v| ((v as f64 * scale + offset) as i64).clamp(0, 255) as i32)
        })
        .collect();
    for px in buf.chunks_exact_mut(3) {
        for c in 0..3 {
            px[c] = tables[c][px[c] as usize];
        }
    }
}

/// `ImageEnhance.Sharpness(img).enhance(factor)`: blend with PIL's SMOOTH-filtered image.
pub(crate) fn adjust_sharpness(buf: &mut [u8], width: usize, height: usize, factor: f64) {
    let smooth = smooth_filter(buf, width, height);
    let f = factor as f32;
    for (v, &d) in buf.iter_mut().zip(&smooth) {
        *v = blend_value(d as i32, *v as i32, f) as u8;
    }
}

/// PIL's 3x3 SMOOTH kernel (1 1 1 / 1 5 1 / 1 1 1, divided by 13); border pixels are copied.
fn smooth_filter(buf: &[u8], width: usize, height: usize) -> Vec<u8> {
    let mut out = buf.to_vec();
    if width < 3 || height < 3 {
        return out;
    }
    let side = 1.0f32 / 13.0;
    let center = 5.0f32 / 13.0;
    let stride = width * 3;
    for y in 1..height - 1 {
        let above = &buf[(y - 1) * stride..y * stride];
        let row = &buf[y * stride..(y + 1) * stride];
        let below = &buf[(y + 1) * stride..(y + 2) * stride];
        let dst = &mut out[y * stride..(y + 1) * stride];
        for i in 3..stride - 3 {
            let line = |l: &[u8], mid: f32| {
                l[i - 3] as f32 * side + l[i] as f32 * mid + l[i + 3] as f32 * side
            };
            // Same summation order as Pillow: row below, the row itself, row above.
            let mut ss = 0.5f32;
            ss += line(below, side);
            ss += line(row, center);
            ss += line(above, side);
            dst[i] = ss.clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// VISSL's ImgPilRandomSolarize: with probability `p`, solarize at a threshold uniform in 0..=256.
struct ImgPilRandomSolarize {
    p: f64,
}

impl MapItem for ImgPilRandomSolarize {
    fn map(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Item> {
        let mut img = expect_image(item, "ImgPilRandomSolarize")?;
        if draw::chance(rng, self.p) {
            solarize(&mut img, draw::int(rng, 0, 257) as u32);
        }
        Ok(Item::Image(img))
    }
}

pub(crate) fn img_pil_random_solarize(p: &Params) -> Result<Op> {
    Ok(Op::Map(Box::new(ImgPilRandomSolarize {
        p: p.prob_or("p", 0.66)?,
    })))
}

/// VISSL's ImgPilRandomPhotometric: with probability `p`, posterize (4..=8 bits), sharpen
/// (0.1..1.9), solarize (0..=256) and autocontrast, in that order.
struct ImgPilRandomPhotometric {
    p: f64,
}

impl MapItem for ImgPilRandomPhotometric {
    fn map(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Item> {
        let mut img = expect_image(item, "ImgPilRandomPhotometric")?;
        if draw::chance(rng, self.p) {
            let (w, h) = (img.width() as usize, img.height() as usize);
            let buf: &mut [u8] = &mut img;
            posterize(buf, draw::int(rng, 4, 9) as u32);
            adjust_sharpness(buf, w, h, draw::uniform(rng, 0.1, 1.9));
            solarize(buf, draw::int(rng, 0, 257) as u32);
            autocontrast(buf);
        }
        Ok(Item::Image(img))
    }
}

pub(crate) fn img_pil_random_photometric(p: &Params) -> Result<Op> {
    Ok(Op::Map(Box::new(ImgPilRandomPhotometric {
        p: p.prob_or("p", 0.66)?,
    })))
}
