//! Shared helpers of the `data_*` integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use image::{Rgb, RgbImage};
use rand::Rng;
use rand_pcg::Pcg64Mcg;
use vissl_crds::config::DataSplitConfig;
use vissl_trainer::data::dataset::SampleTransform;
use vissl_trainer::data::{ChwTensor, Item, Result, Sample};

/// VISSL's `DATA.TRAIN` defaults (vissl/config/defaults.yaml).
const SPLIT_DEFAULTS: &str = r#"
USE_DEBUGGING_SAMPLER: false
STRATIFIED_SAMPLER: {ENABLED: false, CLASSES_PER_BATCH: 2, STEP_PER_EPOCH: 1250, UNIQUE_CLASSES: false}
POWER_LAW_SAMPLER: {ENABLED: false, POWER: 1.0}
USE_STATEFUL_DISTRIBUTED_SAMPLER: false
DROP_LAST: false
REMOVE_IMG_PATH_PREFIX: ""
NEW_IMG_PATH_PREFIX: ""
BASE_DATASET: generic_ssl
DATASET_NAMES: []
DATA_SOURCES: []
DATA_PATHS: []
LABEL_SOURCES: []
LABEL_PATHS: []
LABEL_TYPE: standard
MMAP_MODE: true
DEFAULT_GRAY_IMG_SIZE: 224
RANDOM_SYNTHETIC_IMAGES: false
RANDOM_SYNTHETIC_LABELS: 0
BATCHSIZE_PER_REPLICA: 256
TRANSFORMS: []
COLLATE_FUNCTION: default_collate
COLLATE_FUNCTION_PARAMS: {}
DATA_LIMIT: -1
DATA_LIMIT_SAMPLING: {SEED: 0, IS_BALANCED: false, SKIP_NUM_SAMPLES: 0}
COPY_TO_LOCAL_DISK: false
COPY_DESTINATION_DIR: ""
INPUT_KEY_NAMES: [data]
TARGET_KEY_NAMES: [label]
ENABLE_QUEUE_DATASET: false
"#;

/// A split config: VISSL's defaults with the top-level keys of `overrides` (YAML) replaced.
pub fn split_config(overrides: &str) -> DataSplitConfig {
    let mut base: serde_yaml::Mapping =
        serde_yaml::from_str(SPLIT_DEFAULTS).expect("defaults parse");
    let extra: serde_yaml::Mapping = serde_yaml::from_str(overrides).expect("overrides parse");
    for (k, v) in extra {
        assert!(base.contains_key(&k), "unknown key {k:?} in test overrides");
        base.insert(k, v);
    }
    serde_yaml::from_value(serde_yaml::Value::Mapping(base)).expect("split config deserializes")
}

/// The Python with numpy/Pillow used for independent references.
pub fn python() -> PathBuf {
    let path = std::env::var_os("VISSL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python"))
        });
    assert!(
        path.exists(),
        "reference python not found at {}; set VISSL_PYTHON to a python with numpy and Pillow",
        path.display()
    );
    path
}

/// Run a python script with arguments; returns stdout, panics with stderr on failure.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8 output")
}

/// A solid-colour image with a per-image marker pixel, so images can be told apart.
pub fn marked_image(w: u32, h: u32, color: [u8; 3], marker: u8) -> RgbImage {
    let mut img = RgbImage::from_pixel(w, h, Rgb(color));
    img.put_pixel(0, 0, Rgb([marker, marker, marker]));
    img
}

pub fn write_png(path: &Path, img: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save_with_format(path, image::ImageFormat::Png).unwrap();
}

pub fn write_jpeg(path: &Path, img: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save_with_format(path, image::ImageFormat::Jpeg)
        .unwrap();
}

/// Test stand-in for the transform pipeline: image -> CHW float tensor in [0, 1], then every
/// value shifted by one draw from the sample's random stream (so determinism per
/// (seed, epoch, index) is visible in the output).
pub struct ToTensorJitter;

impl SampleTransform for ToTensorJitter {
    fn apply(&self, sample: &mut Sample, rng: &mut Pcg64Mcg) -> Result<()> {
        for item in &mut sample.data {
            if let Item::Image(img) = item {
                let shift: f32 = rng.gen_range(0.0..1.0);
                *item = Item::Tensor(to_chw(img, shift));
            }
        }
        Ok(())
    }
}

/// Image -> CHW tensor of `value / 255 + shift`.
pub fn to_chw(img: &RgbImage, shift: f32) -> ChwTensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut t = ChwTensor::zeros(3, h, w);
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            t.data[c * h * w + y as usize * w + x as usize] = f32::from(p[c]) / 255.0 + shift;
        }
    }
    t
}

/// A CHW tensor filled with one value.
pub fn filled(c: usize, h: usize, w: usize, value: f32) -> ChwTensor {
    ChwTensor {
        c,
        h,
        w,
        data: vec![value; c * h * w],
    }
}

/// A tensor's values as f32.
pub fn floats(t: &tch::Tensor) -> Vec<f32> {
    let flat = t.flatten(0, -1).to_kind(tch::Kind::Float);
    Vec::<f32>::try_from(&flat).unwrap()
}

/// A tensor's values as i64.
pub fn ints(t: &tch::Tensor) -> Vec<i64> {
    let flat = t.flatten(0, -1).to_kind(tch::Kind::Int64);
    Vec::<i64>::try_from(&flat).unwrap()
}
