//! PIL's GaussianBlur, bit for bit: three passes of an extended (fractional-radius) box blur per
//! axis, horizontal first, 24-bit fixed-point weights, edges clamped. Each pass is O(1) per pixel
//! (running sums) and runs row-parallel so it vectorizes; the horizontal passes run on a
//! transposed copy so they are row-parallel too.

use image::RgbImage;
use rand_pcg::Pcg64Mcg;

use super::params::Params;
use super::simd::multiversion;
use super::{draw, expect_image, MapItem, Op};
use crate::data::{Item, Result};

/// The extended-box radius whose `passes`-fold repetition matches a Gaussian of `radius`
/// (Pillow's `_gaussian_blur_radius`, with its float/double mix).
fn box_radius(radius: f32, passes: u32) -> f32 {
    let sigma2 = radius * radius / passes as f32;
    let big_l = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    let a = a / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    l + a
}

/// Integer radius and the 24-bit weights of the inner pixels and of the two fractional edge pixels.
#[derive(Clone, Copy)]
struct BoxKernel {
    radius: usize,
    inner: u32,
    edge: u32,
}

impl BoxKernel {
    fn new(float_radius: f32) -> BoxKernel {
        let radius = float_radius as usize;
        let inner = (16_777_216f32 / (float_radius * 2.0 + 1.0)) as u32;
        let edge = ((1u32 << 24) - (radius as u32 * 2 + 1) * inner) / 2;
        BoxKernel {
            radius,
            inner,
            edge,
        }
    }
}

/// Blur in place as `img.filter(ImageFilter.GaussianBlur(radius))` does.
pub(crate) fn gaussian_blur(img: &mut RgbImage, radius: f32) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let r = box_radius(radius, 3);
    if r == 0.0 || w == 0 || h == 0 {
        return;
    }
    let kernel = BoxKernel::new(r);
    let buf: &mut [u8] = img;
    let mut scratch = vec![0u8; buf.len()];
    let mut acc = vec![0u32; w.max(h) * 3];
    // Horizontal passes: transpose, blur along rows of the transpose's columns, transpose back.
    transpose(buf, &mut scratch, w, h);
    three_passes(&mut scratch, buf, h * 3, w, kernel, &mut acc);
    transpose(&scratch, buf, h, w);
    // Vertical passes directly.
    three_passes(buf, &mut scratch, w * 3, h, kernel, &mut acc);
}

/// Three box passes down the columns of `data` (`rows` rows of `row_len` values); the result
/// ends in `data`, `spare` is scratch of the same size.
fn three_passes(
    data: &mut [u8],
    spare: &mut [u8],
    row_len: usize,
    rows: usize,
    k: BoxKernel,
    acc: &mut [u32],
) {
    box_pass(data, spare, row_len, rows, k, &mut acc[..row_len]);
    box_pass(spare, data, row_len, rows, k, &mut acc[..row_len]);
    box_pass(data, spare, row_len, rows, k, &mut acc[..row_len]);
    data.copy_from_slice(spare);
}

multiversion! {
    /// One extended-box pass down the columns: PIL's `ImagingLineBoxBlur` for every column at once.
    fn box_pass(src: &[u8], dst: &mut [u8], row_len: usize, rows: usize, k: BoxKernel, acc: &mut [u32]) {
        let last = rows as isize - 1;
        let r = k.radius as isize;
        let row = |i: isize| -> &[u8] {
            let i = i.clamp(0, last) as usize;
            &src[i * row_len..(i + 1) * row_len]
        };
        // The window sum for the virtual position -1: indices -r-1 ..= r-1, clamped to the edges.
        acc.fill(0);
        for i in -r - 1..r {
            for (a, &v) in acc.iter_mut().zip(row(i)) {
                *a += v as u32;
            }
        }
        for (y, out) in dst.chunks_exact_mut(row_len).enumerate() {
            let y = y as isize;
            let (add, sub) = (row(y + r), row(y - r - 1));
            let far_right = row(y + r + 1);
            for i in 0..row_len {
                acc[i] = acc[i] + add[i] as u32 - sub[i] as u32;
                let bulk = acc[i] * k.inner + (sub[i] as u32 + far_right[i] as u32) * k.edge;
                out[i] = ((bulk + (1 << 23)) >> 24) as u8;
            }
        }
    }
}

/// Transpose an RGB image of `w` x `h` pixels into `h` x `w`.
fn transpose(src: &[u8], dst: &mut [u8], w: usize, h: usize) {
    const TILE: usize = 32;
    for ty in (0..h).step_by(TILE) {
        for tx in (0..w).step_by(TILE) {
            for y in ty..(ty + TILE).min(h) {
                for x in tx..(tx + TILE).min(w) {
                    let s = (y * w + x) * 3;
                    let d = (x * h + y) * 3;
                    dst[d..d + 3].copy_from_slice(&src[s..s + 3]);
                }
            }
        }
    }
}

/// VISSL's ImgPilGaussianBlur: with probability `p`, blur with a radius uniform in [min, max].
struct ImgPilGaussianBlur {
    p: f64,
    radius_min: f64,
    radius_max: f64,
}

impl MapItem for ImgPilGaussianBlur {
    fn map(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Item> {
        let mut img = expect_image(item, "ImgPilGaussianBlur")?;
        if draw::chance(rng, self.p) {
            let radius = draw::uniform(rng, self.radius_min, self.radius_max);
            gaussian_blur(&mut img, radius as f32);
        }
        Ok(Item::Image(img))
    }
}

pub(crate) fn img_pil_gaussian_blur(p: &Params) -> Result<Op> {
    let prob = p.prob_or("p", 0.5)?;
    let radius_min = p.f64_or("radius_min", 0.1)?;
    let radius_max = p.f64_or("radius_max", 2.0)?;
    if radius_min < 0.0 || radius_max < radius_min {
        return Err(p.error(format_args!(
            "need 0 <= radius_min <= radius_max, got radius_min {radius_min}, radius_max {radius_max}"
        )));
    }
    Ok(Op::Map(Box::new(ImgPilGaussianBlur {
        p: prob,
        radius_min,
        radius_max,
    })))
}
