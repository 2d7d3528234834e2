//! VISSL's ImgPil2LabTensor (colorization): RGB -> CIE Lab (sRGB, D65), quantized to 8 bits as
//! OpenCV's `COLOR_BGR2LAB` on uint8 images outputs it, then rescaled as VISSL does
//! (L' = L8 * 100/255 - 50, a' = a8 - 128, b' = b8 - 128).

use std::sync::LazyLock;

use rand_pcg::Pcg64Mcg;

use super::params::Params;
use super::{expect_image, MapItem, Op};
use crate::data::{ChwTensor, Item, Result};

/// sRGB 8-bit value -> linear intensity.
static LINEAR: LazyLock<[f64; 256]> = LazyLock::new(|| {
    std::array::from_fn(|v| {
        let x = v as f64 / 255.0;
        if x <= 0.04045 {
            x / 12.92
        } else {
            ((x + 0.055) / 1.055).powf(2.4)
        }
    })
});

/// The CIE Lab cube-root companding.
fn f(t: f64) -> f64 {
    if t > 0.008856 {
        t.cbrt()
    } else {
        7.787 * t + 16.0 / 116.0
    }
}

/// One pixel as 8-bit (L, a, b) the way OpenCV stores Lab in uint8 images.
pub(crate) fn lab8(r: u8, g: u8, b: u8) -> [u8; 3] {
    let (r, g, b) = (LINEAR[r as usize], LINEAR[g as usize], LINEAR[b as usize]);
    let x = (0.412453 * r + 0.357580 * g + 0.180423 * b) / 0.950456;
    let y = 0.212671 * r + 0.715160 * g + 0.072169 * b;
    let z = (0.019334 * r + 0.119193 * g + 0.950227 * b) / 1.088754;
    let l = if y > 0.008856 {
        116.0 * y.cbrt() - 16.0
    } else {
        903.3 * y
    };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    let quant = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    [
        quant(l * 255.0 / 100.0),
        quant(500.0 * (fx - fy) + 128.0),
        quant(200.0 * (fy - fz) + 128.0),
    ]
}

struct ImgPil2LabTensor;

impl MapItem for ImgPil2LabTensor {
    fn map(&self, item: Item, _rng: &mut Pcg64Mcg) -> Result<Item> {
        let img = expect_image(item, "ImgPil2LabTensor")?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let n = w * h;
        let mut data = vec![0f32; 3 * n];
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            let [l, a, b] = lab8(px[0], px[1], px[2]);
            data[i] = l as f32 * (100.0 / 255.0) - 50.0;
            data[n + i] = a as f32 - 128.0;
            data[2 * n + i] = b as f32 - 128.0;
        }
        Ok(Item::Tensor(ChwTensor { c: 3, h, w, data }))
    }
}

pub(crate) fn img_pil_2_lab_tensor(_p: &Params) -> Result<Op> {
    Ok(Op::Map(Box::new(ImgPil2LabTensor)))
}
