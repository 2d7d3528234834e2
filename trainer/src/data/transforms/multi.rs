//! Transforms that change the number of entries or act on several at once: ImgReplicatePil,
//! ImgPilToMultiCrop (SwAV), ImgPatchesFromTensor + ShuffleImgPatches (Jigsaw),
//! ImgPilToPatchesAndImage (PIRL) and ImgPilMultiCropRandomApply (BYOL/DINO).
//!
//! VISSL keeps Jigsaw patches nested inside one entry and stacks them in ShuffleImgPatches; here
//! every patch is its own entry (a sample holds images or 3-D tensors only), so
//! ShuffleImgPatches permutes consecutive groups of entries and gives each entry of a group the
//! permutation index as its label.

use std::path::Path;

use image::RgbImage;
use rand_pcg::Pcg64Mcg;
use serde_yaml::Value;

use super::geometry::{check_scale, scale_range, RandomResizedCrop, Size};
use super::params::{show, Params};
use super::resample::{crop, Filter, Window};
use super::{
    build_map, draw, expect_image, take, transform_error, CopyItem, GroupItems, MapItem, Op,
};
use crate::data::sources::npy;
use crate::data::{ChwTensor, Item, Result, Sample};

/// ImgReplicatePil: `num_times` copies of the entry.
struct ImgReplicatePil {
    num_times: usize,
}

impl CopyItem for ImgReplicatePil {
    fn copies(&self, item: Item, _rng: &mut Pcg64Mcg) -> Result<Vec<Item>> {
        let mut out = Vec::with_capacity(self.num_times);
        out.extend(std::iter::repeat_n(&item, self.num_times - 1).cloned());
        out.push(item);
        Ok(out)
    }
}

pub(crate) fn img_replicate_pil(p: &Params) -> Result<Op> {
    let num_times = p.usize_or("num_times", 2)?;
    if num_times == 0 {
        return Err(p.bad("num_times", "must be greater than zero"));
    }
    Ok(Op::Copies(Box::new(ImgReplicatePil { num_times })))
}

/// ImgPilToMultiCrop: `num_crops[i]` RandomResizedCrops of `size_crops[i]` with `crop_scales[i]`.
struct ImgPilToMultiCrop {
    crops: Vec<RandomResizedCrop>,
}

impl CopyItem for ImgPilToMultiCrop {
    fn copies(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Vec<Item>> {
        let img = expect_image(item, "ImgPilToMultiCrop")?;
        if img.width() == 0 || img.height() == 0 {
            return Err(transform_error("ImgPilToMultiCrop", "empty image"));
        }
        Ok(self
            .crops
            .iter()
            .map(|c| Item::Image(c.apply(&img, rng)))
            .collect())
    }
}

pub(crate) fn img_pil_to_multi_crop(p: &Params) -> Result<Op> {
    let total = p
        .opt_usize("total_num_crops")?
        .ok_or_else(|| p.missing("total_num_crops"))?;
    let num_crops = p
        .opt_usize_list("num_crops")?
        .ok_or_else(|| p.missing("num_crops"))?;
    let sizes = p
        .opt_usize_list("size_crops")?
        .ok_or_else(|| p.missing("size_crops"))?;
    let scales_value = p
        .raw("crop_scales")
        .ok_or_else(|| p.missing("crop_scales"))?;
    let scales = match scales_value {
        Value::Sequence(items) => items
            .iter()
            .map(|v| p.as_range("crop_scales", v))
            .collect::<Result<Vec<_>>>()?,
        v => {
            return Err(p.bad(
                "crop_scales",
                format_args!("expected a list of [low, high] pairs, found {}", show(v)),
            ))
        }
    };
    if num_crops.iter().sum::<usize>() != total {
        return Err(p.error(format_args!(
            "num_crops {num_crops:?} must sum to total_num_crops ({total})"
        )));
    }
    if sizes.len() != num_crops.len() || scales.len() != num_crops.len() {
        return Err(p.error(format_args!(
            "num_crops, size_crops and crop_scales need the same length, got {}, {} and {}",
            num_crops.len(),
            sizes.len(),
            scales.len()
        )));
    }
    if let Some(&s) = sizes.iter().find(|&&s| s == 0) {
        return Err(p.bad(
            "size_crops",
            format_args!("sizes must be positive, got {s}"),
        ));
    }
    let mut crops = Vec::with_capacity(total);
    for ((&n, &size), &scale) in num_crops.iter().zip(&sizes).zip(&scales) {
        let scale = check_scale(p, "crop_scales", scale)?;
        for _ in 0..n {
            crops.push(RandomResizedCrop::new(
                (size, size),
                scale,
                RandomResizedCrop::DEFAULT_RATIO,
                Filter::Bilinear,
            ));
        }
    }
    Ok(Op::Copies(Box::new(ImgPilToMultiCrop { crops })))
}

/// The Jigsaw grid: `side` x `side` cells of `cell` pixels, each giving a `patch`-pixel square at
/// a random offset below `jitter`.
#[derive(Clone, Copy)]
struct PatchGrid {
    side: usize,
    jitter: usize,
}

impl PatchGrid {
    fn from_params(p: &Params) -> Result<PatchGrid> {
        let num_patches = p.usize_or("num_patches", 9)?;
        let jitter = p.usize_or("patch_jitter", 21)?;
        if jitter == 0 {
            return Err(p.bad("patch_jitter", "must be positive"));
        }
        Self::new(p, num_patches, jitter)
    }

    fn new(p: &Params, num_patches: usize, jitter: usize) -> Result<PatchGrid> {
        let side = (num_patches as f64).sqrt() as usize;
        if side == 0 || side * side != num_patches {
            return Err(p.bad(
                "num_patches",
                format_args!("must be a perfect square, got {num_patches}"),
            ));
        }
        Ok(PatchGrid { side, jitter })
    }

    /// The patch windows of a `height` x `width` image, in VISSL's order (column-major over the grid).
    fn windows(
        &self,
        width: usize,
        height: usize,
        rng: &mut Pcg64Mcg,
        transform: &str,
    ) -> Result<Vec<Window>> {
        let cell = height / self.side;
        let patch = cell.saturating_sub(self.jitter);
        if patch == 0 || cell * self.side > width {
            return Err(transform_error(
                transform,
                format!(
                    "a {width}x{height} image is too small for a {0}x{0} grid with patch_jitter {1}",
                    self.side, self.jitter
                ),
            ));
        }
        let n = self.side * self.side;
        // numpy's randint(0, jitter, (2, side, side)): all x offsets, then all y offsets.
        let offsets: Vec<usize> = (0..2 * n).map(|_| draw::int(rng, 0, self.jitter)).collect();
        let mut out = Vec::with_capacity(n);
        for i in 0..self.side {
            for j in 0..self.side {
                let k = i * self.side + j;
                out.push(Window {
                    left: i * cell + offsets[k],
                    top: j * cell + offsets[n + k],
                    width: patch,
                    height: patch,
                });
            }
        }
        Ok(out)
    }
}

/// Copy a window out of a CHW tensor.
fn crop_tensor(t: &ChwTensor, win: Window) -> ChwTensor {
    let mut data = Vec::with_capacity(t.c * win.width * win.height);
    for c in 0..t.c {
        for y in win.top..win.top + win.height {
            let start = (c * t.h + y) * t.w + win.left;
            data.extend_from_slice(&t.data[start..start + win.width]);
        }
    }
    ChwTensor {
        c: t.c,
        h: win.height,
        w: win.width,
        data,
    }
}

/// ImgPatchesFromTensor: the `num_patches` jittered grid patches of a tensor (or image).
struct ImgPatchesFromTensor {
    grid: PatchGrid,
}

impl CopyItem for ImgPatchesFromTensor {
    fn copies(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Vec<Item>> {
        const NAME: &str = "ImgPatchesFromTensor";
        Ok(match item {
            Item::Tensor(t) => {
                let wins = self.grid.windows(t.w, t.h, rng, NAME)?;
                wins.into_iter()
                    .map(|w| Item::Tensor(crop_tensor(&t, w)))
                    .collect()
            }
            Item::Image(img) => {
                let wins =
                    self.grid
                        .windows(img.width() as usize, img.height() as usize, rng, NAME)?;
                wins.into_iter()
                    .map(|w| Item::Image(crop(&img, w)))
                    .collect()
            }
        })
    }
}

pub(crate) fn img_patches_from_tensor(p: &Params) -> Result<Op> {
    Ok(Op::Copies(Box::new(ImgPatchesFromTensor {
        grid: PatchGrid::from_params(p)?,
    })))
}

/// ShuffleImgPatches: reorder each group of patches by a permutation drawn from `perm_file`;
/// every entry of the group is labelled with the permutation's index.
struct ShuffleImgPatches {
    perms: Vec<Vec<usize>>,
}

impl ShuffleImgPatches {
    fn load(path: &str) -> Result<Vec<Vec<usize>>> {
        let err = |reason: String| {
            transform_error("ShuffleImgPatches", format!("perm_file {path}: {reason}"))
        };
        let arr = npy::read_npy(Path::new(path)).map_err(|e| err(e.to_string()))?;
        let values = match arr.data {
            npy::NpyData::Ints(v) => v,
            npy::NpyData::Strings(_) => {
                return Err(err("expected an integer array, found strings".into()))
            }
        };
        let [rows, k] = arr.shape[..] else {
            return Err(err(format!(
                "expected a 2-D array (permutations x patches), found shape {:?}",
                arr.shape
            )));
        };
        if rows == 0 || k == 0 {
            return Err(err("the permutation table is empty".into()));
        }
        if values.iter().any(|v| *v < 0) {
            return Err(err("permutations must hold non-negative integers".into()));
        }
        // VISSL accepts 1-based tables and shifts them.
        let shift = i64::from(values.iter().copied().min() == Some(1));
        let perms: Vec<Vec<usize>> = values
            .chunks_exact(k)
            .map(|row| row.iter().map(|&v| (v - shift) as usize).collect())
            .collect();
        for (i, perm) in perms.iter().enumerate() {
            let mut seen = vec![false; k];
            for &v in perm {
                if v >= k || std::mem::replace(&mut seen[v], true) {
                    return Err(err(format!(
                        "row {i} is not a permutation of 0..{k}: {perm:?}"
                    )));
                }
            }
        }
        Ok(perms)
    }
}

impl GroupItems for ShuffleImgPatches {
    fn apply_group(
        &self,
        sample: &mut Sample,
        selected: &[usize],
        rng: &mut Pcg64Mcg,
    ) -> Result<()> {
        let k = self.perms[0].len();
        if !selected.len().is_multiple_of(k) {
            return Err(transform_error(
                "ShuffleImgPatches",
                format!(
                    "the permutations have {k} patches but {} entries were selected; place it after ImgPatchesFromTensor",
                    selected.len()
                ),
            ));
        }
        for group in selected.chunks_exact(k) {
            let index = draw::int(rng, 0, self.perms.len());
            let mut items: Vec<Item> = group.iter().map(|&i| take(&mut sample.data[i])).collect();
            let valid: Vec<bool> = group.iter().map(|&i| sample.data_valid[i]).collect();
            let idx: Vec<i64> = group.iter().map(|&i| sample.data_idx[i]).collect();
            for (slot, &src) in group.iter().zip(&self.perms[index]) {
                sample.data[*slot] = take(&mut items[src]);
                sample.data_valid[*slot] = valid[src];
                sample.data_idx[*slot] = idx[src];
                sample.label[*slot] = index as i64;
            }
        }
        Ok(())
    }
}

pub(crate) fn shuffle_img_patches(p: &Params) -> Result<Op> {
    let path = p
        .opt_str("perm_file")?
        .ok_or_else(|| p.missing("perm_file"))?;
    if path.contains("://") {
        return Err(p.bad(
            "perm_file",
            format_args!("only local files are supported; download {path} first"),
        ));
    }
    let perms = ShuffleImgPatches::load(path).map_err(|e| p.bad("perm_file", e))?;
    Ok(Op::Group(Box::new(ShuffleImgPatches { perms })))
}

/// ImgPilToPatchesAndImage (PIRL): a RandomResizedCrop of the image followed by the Jigsaw
/// patches of a second RandomResizedCrop, optionally shuffled.
struct ImgPilToPatchesAndImage {
    image_crop: RandomResizedCrop,
    patch_crop: RandomResizedCrop,
    grid: PatchGrid,
    permute: bool,
}

impl CopyItem for ImgPilToPatchesAndImage {
    fn copies(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Vec<Item>> {
        const NAME: &str = "ImgPilToPatchesAndImage";
        let img = expect_image(item, NAME)?;
        if img.width() == 0 || img.height() == 0 {
            return Err(transform_error(NAME, "empty image"));
        }
        let image = self.image_crop.apply(&img, rng);
        let source: RgbImage = self.patch_crop.apply(&img, rng);
        let wins =
            self.grid
                .windows(source.width() as usize, source.height() as usize, rng, NAME)?;
        let mut patches: Vec<Item> = wins
            .into_iter()
            .map(|w| Item::Image(crop(&source, w)))
            .collect();
        if self.permute {
            for i in (1..patches.len()).rev() {
                patches.swap(i, draw::int(rng, 0, i + 1));
            }
        }
        let mut out = Vec::with_capacity(patches.len() + 1);
        out.push(Item::Image(image));
        out.extend(patches);
        Ok(out)
    }
}

/// VISSL's PIRL transform. `permute_patches: false` keeps grid order (VISSL ignores the flag and
/// always shuffles; its default, true, behaves the same here).
pub(crate) fn img_pil_to_patches_and_image(p: &Params) -> Result<Op> {
    let crop_of = |scale_key: &'static str,
                   size_key: &'static str,
                   scale: (f64, f64),
                   size: usize|
     -> Result<_> {
        let scale = scale_range(p, scale_key, scale)?;
        let size = match p.raw(size_key) {
            None => (size, size),
            Some(v) => Size::from_value(p, size_key, v)?.height_width(),
        };
        Ok(RandomResizedCrop::new(
            size,
            scale,
            RandomResizedCrop::DEFAULT_RATIO,
            Filter::Bilinear,
        ))
    };
    let image_crop = crop_of("crop_scale_image", "crop_size_image", (0.08, 1.0), 224)?;
    let patch_crop = crop_of("crop_scale_patches", "crop_size_patches", (0.6, 1.0), 255)?;
    let permute = p.bool_or("permute_patches", true)?;
    let grid = PatchGrid::new(p, p.usize_or("num_patches", 9)?, 21)?;
    Ok(Op::Copies(Box::new(ImgPilToPatchesAndImage {
        image_crop,
        patch_crop,
        grid,
        permute,
    })))
}

/// ImgPilMultiCropRandomApply: entry `i` gets the composed `transforms` with probability `prob[i]`.
struct ImgPilMultiCropRandomApply {
    transforms: Vec<Box<dyn MapItem>>,
    prob: Vec<f64>,
}

impl GroupItems for ImgPilMultiCropRandomApply {
    fn apply_group(
        &self,
        sample: &mut Sample,
        selected: &[usize],
        rng: &mut Pcg64Mcg,
    ) -> Result<()> {
        if selected.len() != self.prob.len() {
            return Err(transform_error(
                "ImgPilMultiCropRandomApply",
                format!(
                    "prob has {} values but the sample has {} crops",
                    self.prob.len(),
                    selected.len()
                ),
            ));
        }
        for (&i, &p) in selected.iter().zip(&self.prob) {
            if draw::chance(rng, p) {
                let mut item = take(&mut sample.data[i]);
                for t in &self.transforms {
                    item = t.map(item, rng)?;
                }
                sample.data[i] = item;
            }
        }
        Ok(())
    }
}

pub(crate) fn img_pil_multi_crop_random_apply(p: &Params) -> Result<Op> {
    let specs = match p.raw("transforms") {
        None => Vec::new(),
        Some(Value::Sequence(items)) => items.clone(),
        Some(v) => {
            return Err(p.bad(
                "transforms",
                format_args!("expected a list of transforms, found {}", show(v)),
            ))
        }
    };
    let transforms = specs
        .iter()
        .map(|s| build_map(s, p.transform()))
        .collect::<Result<Vec<_>>>()?;
    let prob = p.opt_f64_list("prob")?.unwrap_or_default();
    if let Some(bad) = prob.iter().find(|x| !(0.0..=1.0).contains(*x)) {
        return Err(p.bad(
            "prob",
            format_args!("probabilities must lie in [0, 1], got {bad}"),
        ));
    }
    Ok(Op::Group(Box::new(ImgPilMultiCropRandomApply {
        transforms,
        prob,
    })))
}
