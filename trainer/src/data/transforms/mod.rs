//! VISSL's transforms (`DATA.<split>.TRANSFORMS`), applied with VISSL's SSLTransformsWrapper
//! semantics: each entry runs on the sample's `indices` (default: all entries of `sample.data`);
//! copy transforms flatten their outputs into the sample and replicate `label`, `data_valid` and
//! `data_idx` alongside; label transforms write the label of the entry they changed (VISSL
//! overwrites the sample's last label, which is the same entry whenever a sample has one entry,
//! the only case its label transforms are used in). Jigsaw patches are entries of their own here,
//! not a nested list (see `multi`).
//!
//! Images are transformed as 8-bit RGB buffers with Pillow's exact arithmetic (resampling, blur,
//! enhancements, HSV), so a pipeline reproduces what torchvision + PIL compute, only faster:
//! crops are fused into the resize, ToTensor + Normalize become one lookup pass, and the heavy
//! loops are vectorized (see `simd`).
//!
//! One file per transform family; [`REGISTRY`] maps each VISSL name to its constructor.

mod blur;
mod color;
mod geometry;
mod lab;
mod multi;
mod params;
mod photometric;
mod resample;
mod simd;
mod tensor;
#[cfg(test)]
mod tests;

use rand::Rng;
use rand_pcg::Pcg64Mcg;
use serde_yaml::Value;

use super::{ChwTensor, DataError, Item, Result, Sample};
use params::{show, Params};

/// A transform that maps one entry to one entry.
pub(crate) trait MapItem: Send + Sync {
    fn map(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Item>;
}

/// A transform that maps one entry to one entry and a new label for it (ImgRotatePil).
pub(crate) trait LabelItem: Send + Sync {
    fn map_labelled(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<(Item, i64)>;
}

/// A transform that turns one entry into several (replicas, crops, patches).
pub(crate) trait CopyItem: Send + Sync {
    fn copies(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Vec<Item>>;
}

/// A transform that needs all selected entries at once (ShuffleImgPatches, ImgPilMultiCropRandomApply).
pub(crate) trait GroupItems: Send + Sync {
    fn apply_group(
        &self,
        sample: &mut Sample,
        selected: &[usize],
        rng: &mut Pcg64Mcg,
    ) -> Result<()>;
}

/// How a transform relates the entries it reads to the entries it writes.
pub(crate) enum Op {
    Map(Box<dyn MapItem>),
    Labelled(Box<dyn LabelItem>),
    Copies(Box<dyn CopyItem>),
    Group(Box<dyn GroupItems>),
}

/// Builds one transform from its parameters.
type Builder = fn(&Params) -> Result<Op>;

/// Every supported transform, by VISSL (or torchvision) name.
const REGISTRY: &[(&str, Builder)] = &[
    ("RandomResizedCrop", geometry::random_resized_crop),
    ("Resize", geometry::resize),
    ("CenterCrop", geometry::center_crop),
    ("RandomCrop", geometry::random_crop),
    ("RandomHorizontalFlip", geometry::random_horizontal_flip),
    ("ImgRotatePil", geometry::img_rotate_pil),
    ("ColorJitter", color::color_jitter),
    ("RandomGrayscale", color::random_grayscale),
    ("ImgPilColorDistortion", color::img_pil_color_distortion),
    (
        "ImgPilRandomColorJitter",
        color::img_pil_random_color_jitter,
    ),
    ("ImgPilGaussianBlur", blur::img_pil_gaussian_blur),
    ("ImgPilRandomSolarize", photometric::img_pil_random_solarize),
    (
        "ImgPilRandomPhotometric",
        photometric::img_pil_random_photometric,
    ),
    ("ToTensor", tensor::to_tensor),
    ("ImgToTensor", tensor::to_tensor),
    ("ImgPilToRawTensor", tensor::img_pil_to_raw_tensor),
    ("Normalize", tensor::normalize),
    ("ImgPil2LabTensor", lab::img_pil_2_lab_tensor),
    ("ImgReplicatePil", multi::img_replicate_pil),
    ("ImgPilToMultiCrop", multi::img_pil_to_multi_crop),
    ("ImgPatchesFromTensor", multi::img_patches_from_tensor),
    ("ShuffleImgPatches", multi::shuffle_img_patches),
    (
        "ImgPilToPatchesAndImage",
        multi::img_pil_to_patches_and_image,
    ),
    (
        "ImgPilMultiCropRandomApply",
        multi::img_pil_multi_crop_random_apply,
    ),
];

/// The registry's names, for `vissl list transforms`.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|(name, _)| *name).collect()
}

/// One configured transform and the entries it applies to.
struct Stage {
    name: String,
    /// Empty: every entry (VISSL's default).
    indices: Vec<usize>,
    op: Op,
}

/// The ordered transforms of one split, built from `DATA.<split>.TRANSFORMS`.
pub struct Pipeline {
    stages: Vec<Stage>,
}

impl Pipeline {
    /// Build from the config entries (`{name: ..., <params>..., indices: [...]}`).
    pub fn from_config(specs: &[serde_yaml::Value]) -> Result<Pipeline> {
        let mut stages = Vec::with_capacity(specs.len());
        let mut i = 0;
        while i < specs.len() {
            let (name, map) = spec_parts(&specs[i], i)?;
            let indices = parse_indices(name, map)?;
            // ToTensor followed by Normalize on the same entries runs as one lookup pass.
            if tensor::is_to_tensor(name) {
                if let Some(next) = specs.get(i + 1) {
                    let (next_name, next_map) = spec_parts(next, i + 1)?;
                    if next_name == "Normalize" && parse_indices(next_name, next_map)? == indices {
                        let op = tensor::fused_to_tensor_normalize(name, map, next_map)?;
                        stages.push(Stage {
                            name: format!("{name}+Normalize"),
                            indices,
                            op,
                        });
                        i += 2;
                        continue;
                    }
                }
            }
            stages.push(Stage {
                name: name.to_string(),
                indices,
                op: build(name, map)?,
            });
            i += 1;
        }
        Ok(Pipeline { stages })
    }

    /// Apply every transform in order to one sample.
    pub fn apply(&self, sample: &mut Sample, rng: &mut Pcg64Mcg) -> Result<()> {
        check_parallel(sample)?;
        let mut selected = Vec::new();
        for stage in &self.stages {
            select(stage, sample.data.len(), &mut selected)?;
            match &stage.op {
                Op::Map(t) => {
                    for &i in &selected {
                        let item = take(&mut sample.data[i]);
                        sample.data[i] = t.map(item, rng)?;
                    }
                }
                Op::Labelled(t) => {
                    for &i in &selected {
                        let item = take(&mut sample.data[i]);
                        let (item, label) = t.map_labelled(item, rng)?;
                        sample.data[i] = item;
                        sample.label[i] = label;
                    }
                }
                Op::Copies(t) => flatten_copies(t.as_ref(), sample, &selected, rng)?,
                Op::Group(t) => t.apply_group(sample, &selected, rng)?,
            }
        }
        Ok(())
    }

    /// The stage names in order (fused stages read `ToTensor+Normalize`), for logs.
    pub fn stage_names(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.name.as_str()).collect()
    }
}

/// Build one (non-fused) transform from its name and mapping.
fn build(name: &str, map: &serde_yaml::Mapping) -> Result<Op> {
    let (canonical, builder) = REGISTRY.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        DataError::Config(format!(
            "unknown transform '{name}'; known transforms: {}",
            names().join(", ")
        ))
    })?;
    let params = Params::new(canonical, map);
    let op = builder(&params)?;
    params.finish()?;
    Ok(op)
}

/// Build a transform that must map one entry to one entry (inside a composite transform).
pub(crate) fn build_map(spec: &Value, parent: &str) -> Result<Box<dyn MapItem>> {
    let (name, map) =
        spec_parts(spec, 0).map_err(|e| DataError::Config(format!("transform {parent}: {e}")))?;
    match build(name, map)? {
        Op::Map(t) => Ok(t),
        _ => Err(DataError::Config(format!(
            "transform {parent}: inner transform {name} changes the number of entries or their labels; only one-to-one transforms can be nested"
        ))),
    }
}

fn spec_parts(spec: &Value, position: usize) -> Result<(&str, &serde_yaml::Mapping)> {
    let map = spec.as_mapping().ok_or_else(|| {
        DataError::Config(format!(
            "transform #{position}: expected a mapping with a 'name', found {}",
            show(spec)
        ))
    })?;
    let name = map.get("name").and_then(Value::as_str).ok_or_else(|| {
        DataError::Config(format!(
            "transform #{position}: missing 'name' (got {})",
            show(spec)
        ))
    })?;
    Ok((name, map))
}

/// VISSL's `indices`: a list of entry positions (or one int); empty or absent means all entries.
fn parse_indices(name: &str, map: &serde_yaml::Mapping) -> Result<Vec<usize>> {
    let bad = |v: &Value| {
        DataError::Config(format!(
            "transform {name}: parameter 'indices': expected a list of non-negative integers, found {}",
            show(v)
        ))
    };
    let one = |v: &Value| v.as_u64().map(|x| x as usize).ok_or_else(|| bad(v));
    let mut out = match map.get("indices") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(items)) => items.iter().map(one).collect::<Result<Vec<_>>>()?,
        Some(v) => vec![one(v)?],
    };
    // VISSL stores them as a set: order and repeats do not matter.
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn select(stage: &Stage, len: usize, selected: &mut Vec<usize>) -> Result<()> {
    selected.clear();
    if stage.indices.is_empty() {
        selected.extend(0..len);
        return Ok(());
    }
    if let Some(&bad) = stage.indices.iter().find(|&&i| i >= len) {
        return Err(DataError::Transform {
            transform: stage.name.clone(),
            reason: format!(
                "index {bad} in 'indices' is out of range: the sample has {len} entries"
            ),
        });
    }
    selected.extend_from_slice(&stage.indices);
    Ok(())
}

fn check_parallel(sample: &Sample) -> Result<()> {
    let n = sample.data.len();
    if sample.label.len() != n || sample.data_valid.len() != n || sample.data_idx.len() != n {
        return Err(DataError::Transform {
            transform: "Pipeline".into(),
            reason: format!(
                "sample lists are not parallel: {} data, {} label, {} data_valid, {} data_idx",
                n,
                sample.label.len(),
                sample.data_valid.len(),
                sample.data_idx.len()
            ),
        });
    }
    Ok(())
}

/// Move an entry out, leaving an empty tensor (no allocation) in its place.
fn take(item: &mut Item) -> Item {
    std::mem::replace(
        item,
        Item::Tensor(ChwTensor {
            c: 0,
            h: 0,
            w: 0,
            data: Vec::new(),
        }),
    )
}

/// Replace each selected entry by its copies, replicating its label, validity and index.
fn flatten_copies(
    t: &dyn CopyItem,
    sample: &mut Sample,
    selected: &[usize],
    rng: &mut Pcg64Mcg,
) -> Result<()> {
    let old_data = std::mem::take(&mut sample.data);
    let old_label = std::mem::take(&mut sample.label);
    let old_valid = std::mem::take(&mut sample.data_valid);
    let old_idx = std::mem::take(&mut sample.data_idx);
    let mut next_selected = selected.iter().peekable();
    for (i, item) in old_data.into_iter().enumerate() {
        let outputs = if next_selected.next_if(|&&s| s == i).is_some() {
            t.copies(item, rng)?
        } else {
            vec![item]
        };
        let k = outputs.len();
        sample.data.extend(outputs);
        sample.label.extend(std::iter::repeat_n(old_label[i], k));
        sample
            .data_valid
            .extend(std::iter::repeat_n(old_valid[i], k));
        sample.data_idx.extend(std::iter::repeat_n(old_idx[i], k));
    }
    Ok(())
}

/// A transform error naming the transform.
pub(crate) fn transform_error(transform: &str, reason: impl Into<String>) -> DataError {
    DataError::Transform {
        transform: transform.to_string(),
        reason: reason.into(),
    }
}

/// The image inside an entry, or an error saying this transform needs an image.
pub(crate) fn expect_image(item: Item, transform: &str) -> Result<image::RgbImage> {
    match item {
        Item::Image(img) => Ok(img),
        Item::Tensor(t) => Err(transform_error(
            transform,
            format!(
                "expects an image but got a {}x{}x{} tensor; place it before ToTensor",
                t.c, t.h, t.w
            ),
        )),
    }
}

/// The tensor inside an entry, or an error saying this transform needs a tensor.
pub(crate) fn expect_tensor(item: Item, transform: &str) -> Result<ChwTensor> {
    match item {
        Item::Tensor(t) => Ok(t),
        Item::Image(img) => Err(transform_error(
            transform,
            format!(
                "expects a tensor but got a {}x{} image; place it after ToTensor",
                img.width(),
                img.height()
            ),
        )),
    }
}

/// Random draws, in one place so every transform uses the same conventions.
pub(crate) mod draw {
    use super::*;

    /// True with probability `p` (torchvision's `torch.rand(1) < p`).
    pub(crate) fn chance(rng: &mut Pcg64Mcg, p: f64) -> bool {
        rng.gen::<f64>() < p
    }

    /// Uniform in `[lo, hi)`.
    pub(crate) fn uniform(rng: &mut Pcg64Mcg, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * rng.gen::<f64>()
    }

    /// Uniform integer in `[lo, hi)`; `lo` when the range is empty.
    pub(crate) fn int(rng: &mut Pcg64Mcg, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            lo
        } else {
            rng.gen_range(lo..hi)
        }
    }
}
