//! Parity of the pixel kernels with Pillow itself: each case runs the same operation in the
//! project's Python (VISSL_PYTHON, default the workspace's `.venv`) on the same image and
//! compares the bytes.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use image::RgbImage;

use super::resample::{resized_crop, Filter, Window};
use super::{blur, color, geometry, lab, photometric};

/// The Python with Pillow and numpy; failing loudly (never skipping) when it is missing.
pub(crate) fn python() -> PathBuf {
    let path = std::env::var_os("VISSL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python"))
        });
    assert!(
        path.exists(),
        "Pillow parity tests need a Python with Pillow and numpy: {} does not exist; set VISSL_PYTHON",
        path.display()
    );
    path
}

/// A deterministic test image: smooth gradients, saturated blocks, and noise.
pub(crate) fn test_image(w: u32, h: u32, seed: u32) -> RgbImage {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state % 256) as i32
    };
    RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (
            x as i32 * 255 / w.max(2) as i32,
            y as i32 * 255 / h.max(2) as i32,
        );
        let n = noise();
        let block = ((x / 7 + y / 5) % 6) as i32;
        let px = match block {
            0 => [fx, fy, 255 - fx],
            1 => [255, (fx + n) / 2, 0],
            2 => [n, n, n],
            3 => [(fx + fy) / 2, 40, 200],
            4 => [n, 255 - fy, (n * 3) % 256],
            _ => [200, 200, 200 - fx / 4],
        };
        image::Rgb(px.map(|v| v.clamp(0, 255) as u8))
    })
}

/// Run `body` (Python using `img`, binding the result to `out`) and return `out` as RGB.
pub(crate) fn pil(body: &str, img: &RgbImage) -> RgbImage {
    let mut input = tempfile::NamedTempFile::new().expect("temp file");
    input.write_all(img.as_raw()).expect("write temp image");
    let script = format!(
        "import sys, math, numpy as np\n\
         from PIL import Image, ImageFilter, ImageOps, ImageEnhance\n\
         img = Image.frombytes('RGB', ({w}, {h}), open(sys.argv[1], 'rb').read())\n\
         {body}\n\
         out = out.convert('RGB')\n\
         sys.stdout.buffer.write(f'{{out.width}} {{out.height}}\\n'.encode() + out.tobytes())\n",
        w = img.width(),
        h = img.height(),
    );
    let output = Command::new(python())
        .arg("-c")
        .arg(&script)
        .arg(input.path())
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "python failed:\n{}\n{}",
        script,
        String::from_utf8_lossy(&output.stderr)
    );
    let split = output
        .stdout
        .iter()
        .position(|&b| b == b'\n')
        .expect("size line");
    let header = std::str::from_utf8(&output.stdout[..split]).expect("utf8 header");
    let mut dims = header.split(' ').map(|s| s.parse::<u32>().expect("int"));
    let (w, h) = (dims.next().expect("w"), dims.next().expect("h"));
    RgbImage::from_raw(w, h, output.stdout[split + 1..].to_vec())
        .expect("python returned w*h*3 bytes")
}

/// Largest per-value difference; panics on a size mismatch.
fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn assert_same(ours: &RgbImage, theirs: &RgbImage, what: &str) {
    let d = max_diff(ours, theirs);
    assert_eq!(d, 0, "{what}: max abs difference to Pillow is {d}");
}

#[test]
fn resize_matches_pillow_for_every_filter_down_and_up() {
    let img = test_image(67, 53, 1);
    let cases = [
        (Filter::Bilinear, "BILINEAR"),
        (Filter::Bicubic, "BICUBIC"),
        (Filter::Lanczos, "LANCZOS"),
        (Filter::Box, "BOX"),
        (Filter::Hamming, "HAMMING"),
        (Filter::Nearest, "NEAREST"),
    ];
    for (filter, name) in cases {
        for (ow, oh) in [(31, 24), (100, 90), (67, 20), (15, 53), (224, 224)] {
            let ours = resized_crop(&img, Window::full(&img), ow, oh, filter);
            let theirs = pil(
                &format!("out = img.resize(({ow}, {oh}), Image.Resampling.{name})"),
                &img,
            );
            assert_same(&ours, &theirs, &format!("resize {name} to {ow}x{oh}"));
        }
    }
}

#[test]
fn fused_crop_resize_matches_pillow_crop_then_resize() {
    let img = test_image(90, 70, 2);
    for (l, t, w, h, ow, oh) in [
        (5, 7, 40, 33, 24, 24),
        (0, 0, 90, 70, 96, 96),
        (50, 30, 40, 40, 17, 61),
        (1, 2, 3, 4, 9, 9),
    ] {
        let ours = resized_crop(
            &img,
            Window {
                left: l,
                top: t,
                width: w,
                height: h,
            },
            ow,
            oh,
            Filter::Bilinear,
        );
        let theirs = pil(
            &format!("out = img.crop(({l}, {t}, {}, {})).resize(({ow}, {oh}), Image.Resampling.BILINEAR)", l + w, t + h),
            &img,
        );
        assert_same(
            &ours,
            &theirs,
            &format!("crop {l},{t},{w},{h} -> {ow}x{oh}"),
        );
    }
}

#[test]
fn gaussian_blur_matches_pillow() {
    let img = test_image(41, 37, 3);
    for radius in [0.1f32, 0.5, 1.0, 1.37, 2.0, 6.5, 30.0] {
        let mut ours = img.clone();
        blur::gaussian_blur(&mut ours, radius);
        let theirs = pil(
            &format!("out = img.filter(ImageFilter.GaussianBlur({radius}))"),
            &img,
        );
        assert_same(&ours, &theirs, &format!("GaussianBlur({radius})"));
    }
}

#[test]
fn color_enhancements_match_pillow() {
    let img = test_image(45, 38, 4);
    for f in [0.0, 0.35, 0.9, 1.0, 1.27, 1.8] {
        type Kernel = fn(&mut [u8], f64);
        let kernels: [(Kernel, &str); 3] = [
            (color::adjust_brightness, "Brightness"),
            (color::adjust_contrast, "Contrast"),
            (color::adjust_saturation, "Color"),
        ];
        for (kernel, name) in kernels {
            let mut ours = img.clone();
            kernel(&mut ours, f);
            let theirs = pil(
                &format!("out = ImageEnhance.{name}(img).enhance({f})"),
                &img,
            );
            assert_same(&ours, &theirs, &format!("ImageEnhance.{name}({f})"));
        }
    }
}

#[test]
fn hue_matches_torchvision_pil_path() {
    let img = test_image(64, 48, 5);
    for hue in [-0.5, -0.2, -0.013, 0.0, 0.07, 0.33, 0.5] {
        let mut ours = img.clone();
        color::adjust_hue(&mut ours, hue);
        // torchvision's adjust_hue for PIL images, spelled out.
        let theirs = pil(
            &format!(
                "h, s, v = img.convert('HSV').split()\n\
                 np_h = np.array(h, dtype=np.uint8)\n\
                 np_h += np.array({hue} * 255).astype(np.uint8)\n\
                 out = Image.merge('HSV', (Image.fromarray(np_h, 'L'), s, v)).convert('RGB')"
            ),
            &img,
        );
        assert_same(&ours, &theirs, &format!("adjust_hue({hue})"));
    }
}

#[test]
fn grayscale_is_itu_601_luma_like_pillow() {
    let img = test_image(33, 29, 6);
    let mut ours = img.clone();
    color::grayscale(&mut ours);
    assert!(
        ours.pixels().all(|p| p[0] == p[1] && p[1] == p[2]),
        "channels must be equal"
    );
    let theirs = pil("out = img.convert('L')", &img);
    assert_same(&ours, &theirs, "convert('L')");
}

#[test]
fn photometric_ops_match_pillow() {
    let img = test_image(50, 41, 7);
    for threshold in [0u32, 1, 128, 200, 256] {
        let mut ours = img.clone();
        photometric::solarize(&mut ours, threshold);
        assert_same(
            &ours,
            &pil(&format!("out = ImageOps.solarize(img, {threshold})"), &img),
            "solarize",
        );
    }
    for bits in 1..=8u32 {
        let mut ours = img.clone();
        photometric::posterize(&mut ours, bits);
        assert_same(
            &ours,
            &pil(&format!("out = ImageOps.posterize(img, {bits})"), &img),
            "posterize",
        );
    }
    // A low-contrast image, so autocontrast has something to stretch.
    let mut dull = img.clone();
    dull.iter_mut().for_each(|v| *v = 60 + *v / 3);
    let mut ours = dull.clone();
    photometric::autocontrast(&mut ours);
    assert_same(
        &ours,
        &pil("out = ImageOps.autocontrast(img)", &dull),
        "autocontrast",
    );
    for f in [0.1, 0.73, 1.0, 1.9] {
        let mut ours = img.clone();
        photometric::adjust_sharpness(&mut ours, 50, 41, f);
        assert_same(
            &ours,
            &pil(
                &format!("out = ImageEnhance.Sharpness(img).enhance({f})"),
                &img,
            ),
            "sharpness",
        );
    }
}

#[test]
fn rotation_matches_pillow() {
    for (w, h) in [(40, 40), (45, 31)] {
        let img = test_image(w, h, 8);
        for angle in [0.0, 45.0, 90.0, 120.0, 180.0, 270.0, 51.42857] {
            let ours = geometry::rotate(&img, angle);
            let theirs = pil(&format!("out = img.rotate({angle})"), &img);
            assert_same(&ours, &theirs, &format!("rotate({angle}) of {w}x{h}"));
        }
    }
}

#[test]
fn lab_matches_float64_cie_reference() {
    // An independent numpy float64 implementation of the CIE formulas (as skimage/OpenCV use).
    let img = test_image(32, 24, 9);
    let out = pil(
        "a = np.asarray(img).astype(np.float64) / 255.0\n\
         lin = np.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055) ** 2.4)\n\
         m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])\n\
         xyz = lin @ m.T / np.array([0.950456, 1.0, 1.088754])\n\
         f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)\n\
         y = xyz[..., 1]\n\
         L = np.where(y > 0.008856, 116.0 * np.cbrt(y) - 16.0, 903.3 * y)\n\
         lab = np.stack([L * 255.0 / 100.0, 500.0 * (f[..., 0] - f[..., 1]) + 128.0, 200.0 * (f[..., 1] - f[..., 2]) + 128.0], -1)\n\
         out = Image.fromarray(np.clip(np.round(lab), 0, 255).astype(np.uint8), 'RGB')",
        &img,
    );
    for (px, reference) in img.pixels().zip(out.pixels()) {
        let ours = lab::lab8(px[0], px[1], px[2]);
        for c in 0..3 {
            assert!(
                ours[c].abs_diff(reference[c]) <= 1,
                "Lab of {px:?}: ours {ours:?}, reference {reference:?}"
            );
        }
    }
}

/// Run a pipeline built from YAML on one image.
fn run_pipeline(yaml: &str, img: &RgbImage, index: u64) -> crate::data::Sample {
    let specs: Vec<serde_yaml::Value> = serde_yaml::from_str(yaml).expect("test YAML");
    let p = super::Pipeline::from_config(&specs).expect("pipeline");
    let mut s = crate::data::Sample {
        data: vec![crate::data::Item::Image(img.clone())],
        label: vec![0],
        data_valid: vec![true],
        data_idx: vec![0],
    };
    p.apply(&mut s, &mut crate::data::sample_rng(1, 2, index))
        .expect("apply");
    s
}

fn only_image(s: &crate::data::Sample) -> &RgbImage {
    match &s.data[..] {
        [crate::data::Item::Image(img)] => img,
        _ => panic!("expected one image"),
    }
}

#[test]
fn resize_shorter_side_and_center_crop_match_torchvision_on_pil() {
    // torchvision: Resize(int) scales the shorter side (long side truncated), then CenterCrop
    // rounds the offsets half to even and pads with black when the crop is larger.
    for (w, h) in [(300, 200), (201, 333), (120, 120)] {
        let img = test_image(w, h, 10);
        let ours = run_pipeline(
            "[{name: Resize, size: 256}, {name: CenterCrop, size: 224}]",
            &img,
            0,
        );
        let theirs = pil(
            "w, h = img.size\n\
             ow, oh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)\n\
             r = img.resize((ow, oh), Image.Resampling.BILINEAR)\n\
             top, left = int(round((oh - 224) / 2.0)), int(round((ow - 224) / 2.0))\n\
             out = r.crop((left, top, left + 224, top + 224))",
            &img,
        );
        assert_same(
            only_image(&ours),
            &theirs,
            &format!("Resize 256 + CenterCrop 224 of {w}x{h}"),
        );
    }
    let img = test_image(21, 10, 11);
    let ours = run_pipeline("[{name: CenterCrop, size: [14, 25]}]", &img, 0);
    let theirs = pil(
        "pad = Image.new('RGB', (21 + 2 + 2, 10 + 2 + 2))\n\
         pad.paste(img, (2, 2))\n\
         out = pad.crop((0, 0, 25, 14))",
        &img,
    );
    assert_same(
        only_image(&ours),
        &theirs,
        "CenterCrop larger than the image",
    );
}

#[test]
fn color_jitter_with_fixed_factors_matches_pillow() {
    let img = test_image(40, 30, 12);
    for (yaml, body) in [
        ("[{name: ColorJitter, brightness: [1.3, 1.3]}]", "out = ImageEnhance.Brightness(img).enhance(1.3)"),
        ("[{name: ColorJitter, contrast: [0.6, 0.6]}]", "out = ImageEnhance.Contrast(img).enhance(0.6)"),
        ("[{name: ColorJitter, saturation: [1.7, 1.7]}]", "out = ImageEnhance.Color(img).enhance(1.7)"),
        ("[{name: RandomGrayscale, p: 1.0}]", "out = img.convert('L')"),
        (
            "[{name: ImgPilGaussianBlur, p: 1.0, radius_min: 1.5, radius_max: 1.5}]",
            "out = img.filter(ImageFilter.GaussianBlur(1.5))",
        ),
        (
            "[{name: RandomResizedCrop, size: [24, 32], scale: [1.0, 1.0], ratio: [1.3333333333333333, 1.3333333333333333], interpolation: 3}]",
            "out = img.resize((32, 24), Image.Resampling.BICUBIC)",
        ),
    ] {
        assert_same(only_image(&run_pipeline(yaml, &img, 0)), &pil(body, &img), yaml);
    }
}

#[test]
fn random_resized_crop_windows_respect_scale_and_ratio() {
    let crop =
        geometry::RandomResizedCrop::new((8, 8), (0.2, 0.5), (0.75, 4.0 / 3.0), Filter::Bilinear);
    let (w, h) = (400usize, 300usize);
    let mut rng = crate::data::sample_rng(3, 0, 0);
    let mut fractions = Vec::new();
    for _ in 0..2000 {
        let win = crop.window(w, h, &mut rng);
        assert!(
            win.left + win.width <= w && win.top + win.height <= h,
            "{win:?} outside the image"
        );
        let fraction = (win.width * win.height) as f64 / (w * h) as f64;
        let ratio = win.width as f64 / win.height as f64;
        // Rounding the sides to integers moves area and ratio by less than a pixel's worth.
        assert!(
            (0.2 - 0.01..=0.5 + 0.01).contains(&fraction),
            "area fraction {fraction}"
        );
        assert!(
            (0.75 - 0.02..=4.0 / 3.0 + 0.02).contains(&ratio),
            "ratio {ratio}"
        );
        fractions.push(fraction);
    }
    let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
    assert!(
        (mean - 0.35).abs() < 0.01,
        "mean area fraction {mean}, expected 0.35 for uniform [0.2, 0.5]"
    );
    assert!(fractions.iter().any(|&f| f < 0.22) && fractions.iter().any(|&f| f > 0.48));

    // No window with that area fits a 100x10 strip: torchvision's centred fallback at ratio 4/3.
    let win = crop.window(100, 10, &mut rng);
    assert_eq!((win.width, win.height, win.left, win.top), (13, 10, 43, 0));
}

#[test]
fn shuffle_img_patches_applies_the_drawn_permutation_and_labels_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let perm_file = dir.path().join("perms.npy");
    // 1-based, as some of VISSL's published tables are.
    let script = format!(
        "import numpy as np\n\
         rng = np.random.default_rng(0)\n\
         np.save('{}', np.stack([rng.permutation(9) + 1 for _ in range(5)]).astype(np.int64))\n",
        perm_file.display()
    );
    assert!(Command::new(python())
        .arg("-c")
        .arg(&script)
        .status()
        .expect("python")
        .success());
    let perms = crate::data::sources::npy::read_npy(&perm_file).expect("perms");
    let crate::data::sources::npy::NpyData::Ints(perm_values) = perms.data else {
        panic!("numpy wrote an integer table")
    };
    // Patch k of a 3x3 grid over 90x90 (cell 30, jitter 1) is the constant 10 + k: the values
    // identify the patches after shuffling.
    let img = RgbImage::from_fn(90, 90, |x, y| {
        let k = (x / 30) * 3 + y / 30;
        image::Rgb([10 + k as u8; 3])
    });
    let yaml = format!(
        "[{{name: ImgPatchesFromTensor, num_patches: 9, patch_jitter: 1}}, {{name: ShuffleImgPatches, perm_file: '{}'}}]",
        perm_file.display()
    );
    let mut seen = std::collections::HashSet::new();
    for index in 0..40 {
        let s = run_pipeline(&yaml, &img, index);
        assert_eq!(s.data.len(), 9);
        let label = s.label[0];
        assert!(
            s.label.iter().all(|&l| l == label) && (0..5).contains(&label),
            "labels {:?}",
            s.label
        );
        for (slot, item) in s.data.iter().enumerate() {
            let crate::data::Item::Image(patch) = item else {
                panic!("patches stay images")
            };
            let expected = perm_values[label as usize * 9 + slot] as u8 - 1;
            assert_eq!(
                patch.get_pixel(0, 0)[0],
                10 + expected,
                "slot {slot} of permutation {label}"
            );
        }
        seen.insert(label);
    }
    assert!(seen.len() >= 4, "permutation indices drawn: {seen:?}");
}
