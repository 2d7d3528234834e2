//! Geometric transforms with torchvision's semantics on PIL images: RandomResizedCrop, Resize,
//! CenterCrop, RandomCrop, RandomHorizontalFlip, and VISSL's ImgRotatePil.

use image::RgbImage;
use rand_pcg::Pcg64Mcg;
use serde_yaml::Value;

use super::draw;
use super::params::{show, Params};
use super::resample::{crop, image_from, resized_crop, Filter, Window};
use super::{expect_image, transform_error, LabelItem, MapItem, Op};
use crate::data::{Item, Result};

/// A `size` parameter: one number or `[height, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Size {
    One(usize),
    HeightWidth(usize, usize),
}

impl Size {
    /// Read a required `size`-like parameter.
    pub(crate) fn from_params(p: &Params, key: &'static str) -> Result<Size> {
        let v = p.raw(key).ok_or_else(|| p.missing(key))?;
        Self::from_value(p, key, v)
    }

    /// Interpret a value as a size (`224`, `[224]` or `[224, 192]`).
    pub(crate) fn from_value(p: &Params, key: &str, v: &Value) -> Result<Size> {
        let positive = |v: &Value| {
            p.as_usize(key, v).ok().filter(|&n| n > 0).ok_or_else(|| {
                p.bad(
                    key,
                    format_args!("expected a positive size, found {}", show(v)),
                )
            })
        };
        match v {
            Value::Sequence(items) => match &items[..] {
                [s] => Ok(Size::One(positive(s)?)),
                [h, w] => Ok(Size::HeightWidth(positive(h)?, positive(w)?)),
                _ => Err(p.bad(
                    key,
                    format_args!("expected a size or [height, width], found {}", show(v)),
                )),
            },
            _ => Ok(Size::One(positive(v)?)),
        }
    }

    /// The (height, width) of a square-or-rectangle output.
    pub(crate) fn height_width(self) -> (usize, usize) {
        match self {
            Size::One(s) => (s, s),
            Size::HeightWidth(h, w) => (h, w),
        }
    }
}

/// torchvision's RandomResizedCrop: a random area/aspect window resized to a fixed size.
pub(crate) struct RandomResizedCrop {
    out_h: usize,
    out_w: usize,
    scale: (f64, f64),
    log_ratio: (f64, f64),
    ratio: (f64, f64),
    filter: Filter,
}

const RRC: &str = "RandomResizedCrop";

impl RandomResizedCrop {
    /// A crop with torchvision's default aspect ratios and the given filter.
    pub(crate) fn new(
        size: (usize, usize),
        scale: (f64, f64),
        ratio: (f64, f64),
        filter: Filter,
    ) -> Self {
        Self {
            out_h: size.0,
            out_w: size.1,
            scale,
            log_ratio: (ratio.0.ln(), ratio.1.ln()),
            ratio,
            filter,
        }
    }

    /// The default aspect-ratio range, 3/4 to 4/3.
    pub(crate) const DEFAULT_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

    /// torchvision's `get_params`: ten tries at a random area and log-uniform aspect ratio,
    /// then a centred crop clamped to the ratio range.
    pub(crate) fn window(&self, width: usize, height: usize, rng: &mut Pcg64Mcg) -> Window {
        let area = (width * height) as f64;
        for _ in 0..10 {
            let target_area = area * draw::uniform(rng, self.scale.0, self.scale.1);
            let aspect = draw::uniform(rng, self.log_ratio.0, self.log_ratio.1).exp();
            let w = (target_area * aspect).sqrt().round_ties_even() as usize;
            let h = (target_area / aspect).sqrt().round_ties_even() as usize;
            if 0 < w && w <= width && 0 < h && h <= height {
                let top = draw::int(rng, 0, height - h + 1);
                let left = draw::int(rng, 0, width - w + 1);
                return Window {
                    left,
                    top,
                    width: w,
                    height: h,
                };
            }
        }
        let in_ratio = width as f64 / height as f64;
        let (w, h) = if in_ratio < self.ratio.0 {
            (
                width,
                (width as f64 / self.ratio.0).round_ties_even() as usize,
            )
        } else if in_ratio > self.ratio.1 {
            (
                (height as f64 * self.ratio.1).round_ties_even() as usize,
                height,
            )
        } else {
            (width, height)
        };
        let (w, h) = (w.clamp(1, width.max(1)), h.clamp(1, height.max(1)));
        Window {
            left: (width - w) / 2,
            top: (height - h) / 2,
            width: w,
            height: h,
        }
    }

    /// Draw a window and resize it.
    pub(crate) fn apply(&self, img: &RgbImage, rng: &mut Pcg64Mcg) -> RgbImage {
        let win = self.window(img.width() as usize, img.height() as usize, rng);
        resized_crop(img, win, self.out_w, self.out_h, self.filter)
    }
}

impl MapItem for RandomResizedCrop {
    fn map(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Item> {
        let img = expect_image(item, RRC)?;
        if img.width() == 0 || img.height() == 0 {
            return Err(transform_error(RRC, "empty image"));
        }
        Ok(Item::Image(self.apply(&img, rng)))
    }
}

/// Read a `scale`-like range of area fractions.
pub(crate) fn scale_range(
    p: &Params,
    key: &'static str,
    default: (f64, f64),
) -> Result<(f64, f64)> {
    let range = p.range_or(key, default)?;
    check_scale(p, key, range)
}

/// Area fractions must be positive (torchvision allows an upper bound above 1: such draws fail
/// to fit and fall back to the centre crop).
pub(crate) fn check_scale(p: &Params, key: &str, (lo, hi): (f64, f64)) -> Result<(f64, f64)> {
    if lo <= 0.0 {
        return Err(p.bad(
            key,
            format_args!("area fractions must be positive, got [{lo}, {hi}]"),
        ));
    }
    Ok((lo, hi))
}

pub(crate) fn random_resized_crop(p: &Params) -> Result<Op> {
    let size = Size::from_params(p, "size")?.height_width();
    let scale = scale_range(p, "scale", (0.08, 1.0))?;
    let ratio = p.range_or("ratio", RandomResizedCrop::DEFAULT_RATIO)?;
    if ratio.0 <= 0.0 {
        return Err(p.bad("ratio", "aspect ratios must be positive"));
    }
    let filter = Filter::from_params(p)?;
    // PIL always antialiases; torchvision's flag only matters for tensors.
    p.bool_or("antialias", true)?;
    Ok(Op::Map(Box::new(RandomResizedCrop::new(
        size, scale, ratio, filter,
    ))))
}

/// torchvision's Resize on PIL images.
struct Resize {
    size: Size,
    max_size: Option<usize>,
    filter: Filter,
}

impl Resize {
    /// torchvision's `_compute_resized_output_size` as (width, height).
    fn output_size(&self, w: usize, h: usize) -> (usize, usize) {
        match self.size {
            Size::HeightWidth(oh, ow) => (ow, oh),
            Size::One(s) => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let (mut new_short, mut new_long) =
                    (s, (s as f64 * long as f64 / short as f64) as usize);
                if let Some(max) = self.max_size {
                    if new_long > max {
                        new_short = (max as f64 * new_short as f64 / new_long as f64) as usize;
                        new_long = max;
                    }
                }
                if w <= h {
                    (new_short, new_long)
                } else {
                    (new_long, new_short)
                }
            }
        }
    }
}

impl MapItem for Resize {
    fn map(&self, item: Item, _rng: &mut Pcg64Mcg) -> Result<Item> {
        let img = expect_image(item, "Resize")?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            return Err(transform_error("Resize", "empty image"));
        }
        let (ow, oh) = self.output_size(w, h);
        if (ow, oh) == (w, h) {
            return Ok(Item::Image(img));
        }
        Ok(Item::Image(resized_crop(
            &img,
            Window::full(&img),
            ow.max(1),
            oh.max(1),
            self.filter,
        )))
    }
}

pub(crate) fn resize(p: &Params) -> Result<Op> {
    let size = Size::from_params(p, "size")?;
    let max_size = p.opt_usize("max_size")?;
    if let (Some(max), Size::One(s)) = (max_size, size) {
        if max <= s {
            return Err(p.bad(
                "max_size",
                format_args!("must be larger than size ({s}), got {max}"),
            ));
        }
    } else if max_size.is_some() {
        return Err(p.bad("max_size", "only allowed when size is a single number"));
    }
    let filter = Filter::from_params(p)?;
    p.bool_or("antialias", true)?;
    Ok(Op::Map(Box::new(Resize {
        size,
        max_size,
        filter,
    })))
}

/// Crop a `height` x `width` window at (`top`, `left`) that may reach outside the image;
/// outside pixels take `fill` (torchvision pads before cropping).
fn crop_padded(
    img: &RgbImage,
    top: i64,
    left: i64,
    height: usize,
    width: usize,
    fill: [u8; 3],
) -> RgbImage {
    let (iw, ih) = (img.width() as i64, img.height() as i64);
    if top >= 0 && left >= 0 && top + height as i64 <= ih && left + width as i64 <= iw {
        return crop(
            img,
            Window {
                left: left as usize,
                top: top as usize,
                width,
                height,
            },
        );
    }
    let mut out = Vec::with_capacity(width * height * 3);
    for _ in 0..width * height {
        out.extend_from_slice(&fill);
    }
    let x0 = left.max(0);
    let x1 = (left + width as i64).min(iw);
    let raw = img.as_raw();
    for oy in 0..height as i64 {
        let y = top + oy;
        if y < 0 || y >= ih || x1 <= x0 {
            continue;
        }
        let src = &raw[((y * iw + x0) * 3) as usize..((y * iw + x1) * 3) as usize];
        let dst_start = ((oy * width as i64 + (x0 - left)) * 3) as usize;
        out[dst_start..dst_start + src.len()].copy_from_slice(src);
    }
    image_from(width, height, out)
}

/// torchvision's CenterCrop (pads with black when the crop is larger than the image).
struct CenterCrop {
    height: usize,
    width: usize,
}

impl MapItem for CenterCrop {
    fn map(&self, item: Item, _rng: &mut Pcg64Mcg) -> Result<Item> {
        let img = expect_image(item, "CenterCrop")?;
        let (w, h) = (img.width() as i64, img.height() as i64);
        let (cw, ch) = (self.width as i64, self.height as i64);
        // torchvision pads (left, top) by half the shortfall first, then centres on the padded image.
        let pad_left = if cw > w { (cw - w) / 2 } else { 0 };
        let pad_top = if ch > h { (ch - h) / 2 } else { 0 };
        let padded_w = if cw > w {
            w + (cw - w) / 2 + (cw - w + 1) / 2
        } else {
            w
        };
        let padded_h = if ch > h {
            h + (ch - h) / 2 + (ch - h + 1) / 2
        } else {
            h
        };
        let top = ((padded_h - ch) as f64 / 2.0).round_ties_even() as i64 - pad_top;
        let left = ((padded_w - cw) as f64 / 2.0).round_ties_even() as i64 - pad_left;
        Ok(Item::Image(crop_padded(
            &img,
            top,
            left,
            self.height,
            self.width,
            [0; 3],
        )))
    }
}

pub(crate) fn center_crop(p: &Params) -> Result<Op> {
    let (height, width) = Size::from_params(p, "size")?.height_width();
    Ok(Op::Map(Box::new(CenterCrop { height, width })))
}

/// torchvision's RandomCrop with constant padding.
struct RandomCrop {
    height: usize,
    width: usize,
    /// Padding (left, top, right, bottom).
    padding: [usize; 4],
    pad_if_needed: bool,
    fill: [u8; 3],
}

impl MapItem for RandomCrop {
    fn map(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Item> {
        let img = expect_image(item, "RandomCrop")?;
        let [pl, pt, pr, pb] = self.padding;
        let (mut w, mut h) = (
            img.width() as usize + pl + pr,
            img.height() as usize + pt + pb,
        );
        let (mut off_x, mut off_y) = (pl, pt);
        if self.pad_if_needed && w < self.width {
            off_x += self.width - w;
            w += 2 * (self.width - w);
        }
        if self.pad_if_needed && h < self.height {
            off_y += self.height - h;
            h += 2 * (self.height - h);
        }
        if h < self.height || w < self.width {
            return Err(transform_error(
                "RandomCrop",
                format!(
                    "crop size {}x{} (h x w) is larger than the (padded) image {h}x{w}; set pad_if_needed: true",
                    self.height, self.width
                ),
            ));
        }
        let (top, left) = if w == self.width && h == self.height {
            (0, 0)
        } else {
            (
                draw::int(rng, 0, h - self.height + 1),
                draw::int(rng, 0, w - self.width + 1),
            )
        };
        let (top, left) = (top as i64 - off_y as i64, left as i64 - off_x as i64);
        Ok(Item::Image(crop_padded(
            &img,
            top,
            left,
            self.height,
            self.width,
            self.fill,
        )))
    }
}

pub(crate) fn random_crop(p: &Params) -> Result<Op> {
    let (height, width) = Size::from_params(p, "size")?.height_width();
    let padding = match p.raw("padding") {
        None => [0; 4],
        Some(v) => {
            let list = match v {
                Value::Sequence(items) => items
                    .iter()
                    .map(|x| p.as_usize("padding", x))
                    .collect::<Result<Vec<_>>>()?,
                _ => vec![p.as_usize("padding", v)?],
            };
            match list[..] {
                [a] => [a; 4],
                [lr, tb] => [lr, tb, lr, tb],
                [l, t, r, b] => [l, t, r, b],
                _ => return Err(p.bad("padding", "expected 1, 2 or 4 numbers")),
            }
        }
    };
    let pad_if_needed = p.bool_or("pad_if_needed", false)?;
    let fill = match p.raw("fill") {
        None => [0; 3],
        Some(Value::Sequence(items)) if items.len() == 3 => {
            let mut out = [0u8; 3];
            for (o, v) in out.iter_mut().zip(items) {
                *o = u8::try_from(p.as_usize("fill", v)?)
                    .map_err(|_| p.bad("fill", "values must be 0..255"))?;
            }
            out
        }
        Some(v) => {
            [u8::try_from(p.as_usize("fill", v)?)
                .map_err(|_| p.bad("fill", "values must be 0..255"))?; 3]
        }
    };
    if let Some(mode) = p.opt_str("padding_mode")? {
        if mode != "constant" {
            return Err(p.bad(
                "padding_mode",
                format_args!("only 'constant' is supported, got '{mode}'"),
            ));
        }
    }
    Ok(Op::Map(Box::new(RandomCrop {
        height,
        width,
        padding,
        pad_if_needed,
        fill,
    })))
}

/// Mirror an image left-right in place.
pub(crate) fn hflip_image(img: &mut RgbImage) {
    let w = img.width() as usize;
    for row in img.chunks_exact_mut(w * 3) {
        let (mut a, mut b) = (0, w.saturating_sub(1));
        while a < b {
            for c in 0..3 {
                row.swap(a * 3 + c, b * 3 + c);
            }
            a += 1;
            b -= 1;
        }
    }
}

/// torchvision's RandomHorizontalFlip (images and tensors).
struct RandomHorizontalFlip {
    p: f64,
}

impl MapItem for RandomHorizontalFlip {
    fn map(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<Item> {
        if !draw::chance(rng, self.p) {
            return Ok(item);
        }
        Ok(match item {
            Item::Image(mut img) => {
                hflip_image(&mut img);
                Item::Image(img)
            }
            Item::Tensor(mut t) => {
                if t.w > 0 {
                    t.data.chunks_exact_mut(t.w).for_each(|row| row.reverse());
                }
                Item::Tensor(t)
            }
        })
    }
}

pub(crate) fn random_horizontal_flip(p: &Params) -> Result<Op> {
    Ok(Op::Map(Box::new(RandomHorizontalFlip {
        p: p.prob_or("p", 0.5)?,
    })))
}

/// VISSL's ImgRotatePil: rotate by one of `num_angles` equally spaced angles; the label is its index.
struct ImgRotatePil {
    angles: Vec<f64>,
}

impl LabelItem for ImgRotatePil {
    fn map_labelled(&self, item: Item, rng: &mut Pcg64Mcg) -> Result<(Item, i64)> {
        let img = expect_image(item, "ImgRotatePil")?;
        let label = draw::int(rng, 0, self.angles.len());
        Ok((Item::Image(rotate(&img, self.angles[label])), label as i64))
    }
}

pub(crate) fn img_rotate_pil(p: &Params) -> Result<Op> {
    let num_angles = p.usize_or("num_angles", 4)?;
    if num_angles == 0 {
        return Err(p.bad("num_angles", "must be at least 1"));
    }
    let per_img = p.usize_or("num_rotations_per_img", 1)?;
    if per_img != 1 {
        return Err(p.bad(
            "num_rotations_per_img",
            format_args!("only 1 is supported (as in VISSL), got {per_img}"),
        ));
    }
    // torch.linspace(0, 360, n + 1)[:-1] in float32.
    let step = 360.0f32 / num_angles as f32;
    let angles = (0..num_angles).map(|i| (step * i as f32) as f64).collect();
    Ok(Op::Labelled(Box::new(ImgRotatePil { angles })))
}

/// PIL's `Image.rotate(angle)` (counter-clockwise, nearest neighbour, same size, black fill).
pub(crate) fn rotate(img: &RgbImage, angle: f64) -> RgbImage {
    let angle = angle.rem_euclid(360.0);
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let remap = |f: &dyn Fn(usize, usize) -> (usize, usize)| {
        let mut out = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let (sx, sy) = f(x, y);
                let i = (sy * w + sx) * 3;
                out.extend_from_slice(&raw[i..i + 3]);
            }
        }
        image_from(w, h, out)
    };
    if angle == 0.0 {
        return img.clone();
    }
    if angle == 180.0 {
        return remap(&|x, y| (w - 1 - x, h - 1 - y));
    }
    if w == h && angle == 90.0 {
        return remap(&|x, y| (w - 1 - y, x));
    }
    if w == h && angle == 270.0 {
        return remap(&|x, y| (y, h - 1 - x));
    }
    // The affine path of Image.rotate with 16.16 fixed-point source coordinates.
    let round15 = |v: f64| (v * 1e15).round() / 1e15;
    let rad = -angle.to_radians();
    let (cos, sin) = (round15(rad.cos()), round15(rad.sin()));
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let m = [
        cos,
        sin,
        cos * -cx + sin * -cy + cx,
        -sin,
        cos,
        -sin * -cx + cos * -cy + cy,
    ];
    let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i64;
    let (a0, a1, a3, a4) = (fix(m[0]), fix(m[1]), fix(m[3]), fix(m[4]));
    let mut a2 = fix(m[2] + m[0] * 0.5 + m[1] * 0.5);
    let mut a5 = fix(m[5] + m[3] * 0.5 + m[4] * 0.5);
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        let (mut xx, mut yy) = (a2, a5);
        for x in 0..w {
            let (xin, yin) = (xx >> 16, yy >> 16);
            if (0..w as i64).contains(&xin) && (0..h as i64).contains(&yin) {
                let s = (yin as usize * w + xin as usize) * 3;
                out[(y * w + x) * 3..][..3].copy_from_slice(&raw[s..s + 3]);
            }
            xx += a0;
            yy += a3;
        }
        a2 += a1;
        a5 += a4;
    }
    image_from(w, h, out)
}
