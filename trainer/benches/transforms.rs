//! Per-image time of VISSL's SimCLR and SwAV augmentation chains (and of their main stages) on a
//! synthetic 450x350 RGB image, single thread. Run with `cargo bench -p vissl-trainer --bench transforms`.
//!
//! The design target is >= 3x torchvision + PIL per core; DESIGN.md records torchvision at about
//! 110 img/s (SimCLR 2x224) and 64 img/s (SwAV 2x224 + 6x96) per worker, JPEG decoding included.

use std::hint::black_box;
use std::time::Duration;

use image::RgbImage;
use vissl_trainer::data::transforms::Pipeline;
use vissl_trainer::data::{sample_rng, Item, Sample};

const SIMCLR: &str = "
- {name: ImgReplicatePil, num_times: 2}
- {name: RandomResizedCrop, size: 224}
- {name: RandomHorizontalFlip, p: 0.5}
- {name: ImgPilColorDistortion, strength: 1.0}
- {name: ImgPilGaussianBlur, p: 0.5, radius_min: 0.1, radius_max: 2.0}
- {name: ToTensor}
- {name: Normalize, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
";

const SWAV: &str = "
- name: ImgPilToMultiCrop
  total_num_crops: 8
  size_crops: [224, 96]
  num_crops: [2, 6]
  crop_scales: [[0.14, 1], [0.05, 0.14]]
- {name: RandomHorizontalFlip, p: 0.5}
- {name: ImgPilColorDistortion, strength: 1.0}
- {name: ImgPilGaussianBlur, p: 0.5, radius_min: 0.1, radius_max: 2.0}
- {name: ToTensor}
- {name: Normalize, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
";

/// Single stages, to see where the time goes: crops on the 450x350 image, the rest on a 224x224 crop.
const STAGES: &[(&str, &str)] = &[
    ("RandomResizedCrop 224", "[{name: RandomResizedCrop, size: 224}]"),
    ("Resize 224x224 (full image)", "[{name: Resize, size: [224, 224]}]"),
    ("  Resize 350x224 (horizontal pass only)", "[{name: Resize, size: [350, 224]}]"),
    ("  Resize 224x450 (vertical pass only)", "[{name: Resize, size: [224, 450]}]"),
    ("ColorJitter 0.8/0.8/0.8/0.2 (all four ops)", "[{name: ColorJitter, brightness: 0.8, contrast: 0.8, saturation: 0.8, hue: 0.2}]"),
    ("  brightness only", "[{name: ColorJitter, brightness: 0.8}]"),
    ("  contrast only", "[{name: ColorJitter, contrast: 0.8}]"),
    ("  saturation only", "[{name: ColorJitter, saturation: 0.8}]"),
    ("  hue only", "[{name: ColorJitter, hue: 0.2}]"),
    ("GaussianBlur p=1 radius 0.1..2", "[{name: ImgPilGaussianBlur, p: 1.0, radius_min: 0.1, radius_max: 2.0}]"),
    ("RandomGrayscale p=1", "[{name: RandomGrayscale, p: 1.0}]"),
    ("ToTensor+Normalize", "[{name: ToTensor}, {name: Normalize, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}]"),
];

fn synthetic_image(w: u32, h: u32) -> RgbImage {
    let mut state = 0x2545_F491u32;
    RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state & 31) as i32 - 16;
        let r = (x * 255 / w) as i32 + n;
        let g = (y * 255 / h) as i32 - n;
        let b = ((x + y) * 255 / (w + h)) as i32 + n / 2;
        image::Rgb([r, g, b].map(|v| v.clamp(0, 255) as u8))
    })
}

fn pipeline(yaml: &str) -> Pipeline {
    let specs: Vec<serde_yaml::Value> = serde_yaml::from_str(yaml).expect("bench YAML");
    Pipeline::from_config(&specs).expect("bench pipeline")
}

/// CPU time of this thread, so other processes sharing the cores do not inflate the numbers.
#[cfg(target_os = "linux")]
fn thread_cpu_time() -> Duration {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec and the clock id is Linux's constant.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime failed");
    Duration::new(ts.sec as u64, ts.nsec as u32)
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_time() -> Duration {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

/// Thread CPU time per source image: the fastest of ten batches.
fn time_per_image(p: &Pipeline, img: &RgbImage, budget: Duration) -> Duration {
    let mut index = 0u64;
    let mut run = || {
        let mut s = Sample {
            data: vec![Item::Image(img.clone())],
            label: vec![0],
            data_valid: vec![true],
            data_idx: vec![0],
        };
        p.apply(&mut s, &mut sample_rng(0, 0, index))
            .expect("bench apply");
        index += 1;
        black_box(s);
    };
    (0..20).for_each(|_| run());
    let mut best = Duration::MAX;
    for _ in 0..10 {
        let start = thread_cpu_time();
        let mut n = 0u32;
        while thread_cpu_time() - start < budget / 10 {
            run();
            n += 1;
        }
        best = best.min((thread_cpu_time() - start) / n);
    }
    best
}

fn main() {
    let img = synthetic_image(450, 350);
    let budget = Duration::from_millis(
        std::env::var("BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
    );
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&img)
        .expect("encode bench JPEG");
    let decode = {
        let start = thread_cpu_time();
        let mut n = 0u32;
        while thread_cpu_time() - start < budget / 4 {
            black_box(
                image::load_from_memory(&jpeg)
                    .expect("decode bench JPEG")
                    .to_rgb8(),
            );
            n += 1;
        }
        (thread_cpu_time() - start) / n
    };
    println!("thread CPU time per source image, synthetic 450x350 image");
    println!(
        "{:<45} {:>8.1} us",
        "JPEG decode 450x350 q90 (image crate)",
        decode.as_secs_f64() * 1e6
    );
    for (name, yaml, torchvision_per_s) in [
        ("SimCLR 2x224", SIMCLR, 110.0),
        ("SwAV 2x224+6x96", SWAV, 64.0),
    ] {
        let t = time_per_image(&pipeline(yaml), &img, budget);
        let with_decode = 1.0 / (t + decode).as_secs_f64();
        println!(
            "{name:<45} {:>8.1} us/img transforms; with decode {with_decode:>4.0} img/s = {:.1}x torchvision's {torchvision_per_s} img/s (DESIGN.md, decode included)",
            t.as_secs_f64() * 1e6,
            with_decode / torchvision_per_s
        );
    }
    let crop = synthetic_image(224, 224);
    for (name, yaml) in STAGES {
        let input = if name.contains("Crop") || name.contains("Resize") {
            &img
        } else {
            &crop
        };
        let t = time_per_image(&pipeline(yaml), input, budget / 4);
        println!("{name:<45} {:>8.1} us", t.as_secs_f64() * 1e6);
    }
}
