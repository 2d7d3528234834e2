//! Image -> tensor conversion (ToTensor, ImgToTensor, ImgPilToRawTensor) and Normalize. Every
//! 8-bit value maps to one float per channel, so conversion (fused with a following Normalize)
//! is a table lookup computed with torchvision's own float32 operations: same bits, one pass.

use rand_pcg::Pcg64Mcg;
use serde_yaml::Mapping;

use super::params::Params;
use super::{expect_image, expect_tensor, transform_error, MapItem, Op};
use crate::data::{ChwTensor, Item, Result};

/// Whether `name` converts images to tensors (and may absorb a following Normalize).
pub(crate) fn is_to_tensor(name: &str) -> bool {
    matches!(name, "ToTensor" | "ImgToTensor" | "ImgPilToRawTensor")
}

/// Per-channel mean and std of a Normalize.
#[derive(Clone, Debug)]
struct MeanStd {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl MeanStd {
    fn from_params(p: &Params) -> Result<MeanStd> {
        let mean = p.opt_f64_list("mean")?.ok_or_else(|| p.missing("mean"))?;
        let std = p.opt_f64_list("std")?.ok_or_else(|| p.missing("std"))?;
        p.bool_or("inplace", false)?;
        if mean.is_empty() || std.is_empty() {
            return Err(p.error("mean and std must not be empty"));
        }
        if std.contains(&0.0) {
            return Err(p.bad("std", "contains a zero; division by zero"));
        }
        let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
        Ok(MeanStd {
            mean: f32s(mean),
            std: f32s(std),
        })
    }

    /// The (mean, std) of channel `c` of a `channels`-channel tensor; a single value broadcasts.
    fn channel(&self, c: usize, channels: usize, transform: &str) -> Result<(f32, f32)> {
        let pick = |v: &[f32], what: &str| match v.len() {
            1 => Ok(v[0]),
            n if n == channels => Ok(v[c]),
            n => Err(transform_error(
                transform,
                format!("{what} has {n} values but the tensor has {channels} channels"),
            )),
        };
        Ok((pick(&self.mean, "mean")?, pick(&self.std, "std")?))
    }
}

/// Image -> CHW float tensor through one lookup table per channel.
struct ToTensor {
    name: String,
    tables: [[f32; 256]; 3],
}

impl ToTensor {
    fn new(name: &str, raw: bool, normalize: Option<&MeanStd>) -> Result<ToTensor> {
        let mut tables = [[0f32; 256]; 3];
        for (c, table) in tables.iter_mut().enumerate() {
            let (mean, std) = match normalize {
                Some(ms) => ms.channel(c, 3, name)?,
                None => (0.0, 1.0),
            };
            for (v, slot) in table.iter_mut().enumerate() {
                let x = if raw { v as f32 } else { v as f32 / 255.0 };
                *slot = if normalize.is_some() {
                    (x - mean) / std
                } else {
                    x
                };
            }
        }
        Ok(ToTensor {
            name: name.to_string(),
            tables,
        })
    }
}

impl MapItem for ToTensor {
    fn map(&self, item: Item, _rng: &mut Pcg64Mcg) -> Result<Item> {
        let img = expect_image(item, &self.name)?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let n = w * h;
        let mut data = vec![0f32; 3 * n];
        let (r, gb) = data.split_at_mut(n);
        let (g, b) = gb.split_at_mut(n);
        let [tr, tg, tb] = &self.tables;
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            r[i] = tr[px[0] as usize];
            g[i] = tg[px[1] as usize];
            b[i] = tb[px[2] as usize];
        }
        Ok(Item::Tensor(ChwTensor { c: 3, h, w, data }))
    }
}

pub(crate) fn to_tensor(p: &Params) -> Result<Op> {
    Ok(Op::Map(Box::new(ToTensor::new(
        p.transform(),
        false,
        None,
    )?)))
}

pub(crate) fn img_pil_to_raw_tensor(p: &Params) -> Result<Op> {
    Ok(Op::Map(Box::new(ToTensor::new(p.transform(), true, None)?)))
}

/// `ToTensor` (or a sibling) immediately followed by `Normalize`, as one stage.
pub(crate) fn fused_to_tensor_normalize(
    name: &str,
    to_tensor: &Mapping,
    normalize: &Mapping,
) -> Result<Op> {
    let tp = Params::new(name, to_tensor);
    tp.finish()?;
    let np = Params::new("Normalize", normalize);
    let ms = MeanStd::from_params(&np)?;
    np.finish()?;
    let raw = name == "ImgPilToRawTensor";
    Ok(Op::Map(Box::new(ToTensor::new(
        &format!("{name}+Normalize"),
        raw,
        Some(&ms),
    )?)))
}

/// torchvision's Normalize on a tensor: `(x - mean) / std` per channel in float32.
struct Normalize {
    ms: MeanStd,
}

impl MapItem for Normalize {
    fn map(&self, item: Item, _rng: &mut Pcg64Mcg) -> Result<Item> {
        let mut t = expect_tensor(item, "Normalize")?;
        let plane = t.h * t.w;
        if plane > 0 {
            for (c, chunk) in t.data.chunks_exact_mut(plane).enumerate() {
                let (mean, std) = self.ms.channel(c, t.c, "Normalize")?;
                chunk.iter_mut().for_each(|x| *x = (*x - mean) / std);
            }
        }
        Ok(Item::Tensor(t))
    }
}

pub(crate) fn normalize(p: &Params) -> Result<Op> {
    Ok(Op::Map(Box::new(Normalize {
        ms: MeanStd::from_params(p)?,
    })))
}
