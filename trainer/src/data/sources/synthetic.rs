//! `synthetic`: VISSL's test source. Every image is the grey mean image of
//! `DEFAULT_GRAY_IMG_SIZE`, or with `RANDOM_SYNTHETIC_IMAGES` a blurred colour-noise image
//! seeded by its index; labels are 0, or `index % RANDOM_SYNTHETIC_LABELS` when that is set.

use std::path::Path;

use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use super::{index_error, mean_image, DataSource, Labels, SourceSpec};
use crate::data::Result;

/// VISSL's synthetic dataset size when `DATA_LIMIT` asks for fewer images.
pub const DEFAULT_SIZE: usize = 50_000;

/// Generated images.
pub struct Synthetic {
    len: usize,
    size: usize,
    random_images: bool,
    random_labels: i64,
}

pub(super) fn build(spec: &SourceSpec) -> Result<Box<dyn DataSource>> {
    let limit = usize::try_from(spec.cfg.data_limit).unwrap_or(0);
    Ok(Box::new(Synthetic::new(
        DEFAULT_SIZE.max(limit),
        spec.cfg.default_gray_img_size,
        spec.cfg.random_synthetic_images,
        spec.cfg.random_synthetic_labels,
    )))
}

impl Synthetic {
    /// `len` images of `size x size`.
    pub fn new(len: usize, size: usize, random_images: bool, random_labels: i64) -> Self {
        Self {
            len,
            size,
            random_images,
            random_labels,
        }
    }

    /// A smooth random image that only depends on `index`, like VISSL's `generate_image`
    /// (coarse noise, upscaled and Gaussian-blurred; not bit-identical to numpy/PIL).
    fn random_image(&self, index: usize) -> RgbImage {
        let mut rng = Pcg64Mcg::seed_from_u64(index as u64);
        let side = u32::try_from(self.size.max(1)).unwrap_or(u32::MAX);
        let noise_side = (side / 16).max(1);
        let radius = rng.gen_range(noise_side / 2..(noise_side * 2).max(1));
        let noise = RgbImage::from_fn(noise_side, noise_side, |_, _| image::Rgb(rng.gen()));
        let img = imageops::resize(&noise, side, side, FilterType::Triangle);
        if radius > 0 {
            imageops::blur(&img, radius as f32)
        } else {
            img
        }
    }
}

impl DataSource for Synthetic {
    fn len(&self) -> usize {
        self.len
    }

    fn load(&self, index: usize) -> Result<RgbImage> {
        if index >= self.len {
            return Err(index_error("synthetic", index, self.len));
        }
        Ok(if self.random_images {
            self.random_image(index)
        } else {
            mean_image(self.size)
        })
    }

    fn describe(&self, index: usize) -> String {
        format!("fake_path_{index}")
    }

    fn labels(&self, _label_path: Option<&Path>) -> Result<Labels> {
        let values = (0..self.len as i64)
            .map(|i| {
                if self.random_labels > 0 {
                    i % self.random_labels
                } else {
                    0
                }
            })
            .collect();
        Ok(Labels {
            values,
            class_names: None,
        })
    }

    fn image_paths(&self) -> Option<Vec<String>> {
        Some((0..self.len).map(|i| self.describe(i)).collect())
    }
}
