//! The transforms pipeline through its public API: VISSL's wrapper semantics (indices, copies,
//! labels), shapes and value ranges of VISSL's standard chains, determinism per
//! (seed, epoch, index), parameters measured over many draws, and config errors.

use image::{Rgb, RgbImage};
use vissl_trainer::data::transforms::{names, Pipeline};
use vissl_trainer::data::{sample_rng, ChwTensor, DataError, Item, Sample};

fn pipeline(yaml: &str) -> Pipeline {
    let specs: Vec<serde_yaml::Value> = serde_yaml::from_str(yaml).expect("test YAML");
    Pipeline::from_config(&specs).unwrap_or_else(|e| panic!("pipeline {yaml}: {e}"))
}

fn config_error(yaml: &str) -> String {
    let specs: Vec<serde_yaml::Value> = serde_yaml::from_str(yaml).expect("test YAML");
    match Pipeline::from_config(&specs) {
        Err(DataError::Config(msg)) => msg,
        Err(other) => panic!("expected a config error for {yaml}, got {other}"),
        Ok(_) => panic!("expected a config error for {yaml}"),
    }
}

/// A sample with one entry per image, labelled 10, 11, ... and indexed 100, 101, ...
fn sample(images: Vec<RgbImage>) -> Sample {
    let n = images.len();
    Sample {
        data: images.into_iter().map(Item::Image).collect(),
        label: (0..n as i64).map(|i| 10 + i).collect(),
        data_valid: vec![true; n],
        data_idx: (0..n as i64).map(|i| 100 + i).collect(),
    }
}

/// An image whose pixels are all different and left-right asymmetric.
fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w) as u8,
            (y * 255 / h) as u8,
            ((x * 7 + y * 3) % 256) as u8,
        ])
    })
}

fn run(p: &Pipeline, s: &mut Sample, index: u64) {
    p.apply(s, &mut sample_rng(7, 0, index)).expect("apply");
}

fn image(item: &Item) -> &RgbImage {
    match item {
        Item::Image(img) => img,
        Item::Tensor(t) => panic!("expected an image, got a {}x{}x{} tensor", t.c, t.h, t.w),
    }
}

fn tensor(item: &Item) -> &ChwTensor {
    match item {
        Item::Tensor(t) => t,
        Item::Image(img) => panic!(
            "expected a tensor, got a {}x{} image",
            img.width(),
            img.height()
        ),
    }
}

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

#[test]
fn pipeline_can_be_shared_across_loader_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pipeline>();
}

#[test]
fn registry_lists_every_vissl_transform_of_the_brief() {
    let known = names();
    for name in [
        "RandomResizedCrop",
        "Resize",
        "CenterCrop",
        "RandomHorizontalFlip",
        "ColorJitter",
        "RandomGrayscale",
        "ToTensor",
        "ImgToTensor",
        "ImgPilToRawTensor",
        "Normalize",
        "ImgReplicatePil",
        "ImgPilToMultiCrop",
        "ImgPilColorDistortion",
        "ImgPilGaussianBlur",
        "ImgPilRandomSolarize",
        "ImgPilRandomColorJitter",
        "ImgPilRandomPhotometric",
        "ImgRotatePil",
        "ImgPatchesFromTensor",
        "ShuffleImgPatches",
        "ImgPilToPatchesAndImage",
        "ImgPil2LabTensor",
    ] {
        assert!(known.contains(&name), "{name} missing from names()");
    }
}

#[test]
fn simclr_chain_gives_two_normalized_224_views_with_replicated_metadata() {
    let p = pipeline(SIMCLR);
    let mut s = sample(vec![gradient(450, 350)]);
    run(&p, &mut s, 3);
    assert_eq!(s.data.len(), 2);
    assert_eq!(s.label, vec![10, 10]);
    assert_eq!(s.data_valid, vec![true, true]);
    assert_eq!(s.data_idx, vec![100, 100]);
    for item in &s.data {
        let t = tensor(item);
        assert_eq!((t.c, t.h, t.w, t.data.len()), (3, 224, 224, 3 * 224 * 224));
        // Normalized [0, 1] values lie within [(0 - mean) / std, (1 - mean) / std].
        assert!(t
            .data
            .iter()
            .all(|v| v.is_finite() && (-2.2..=2.7).contains(v)));
    }
}

#[test]
fn swav_multicrop_gives_two_224_and_six_96_crops() {
    let p = pipeline(SWAV);
    let mut s = sample(vec![gradient(450, 350)]);
    run(&p, &mut s, 0);
    let sizes: Vec<(usize, usize)> = s.data.iter().map(|i| (tensor(i).h, tensor(i).w)).collect();
    assert_eq!(sizes, [vec![(224, 224); 2], vec![(96, 96); 6]].concat());
    assert_eq!(s.label, vec![10; 8]);
    assert_eq!(s.data_idx, vec![100; 8]);
}

#[test]
fn copies_flatten_per_source_entry() {
    let p = pipeline("[{name: ImgReplicatePil, num_times: 3}]");
    let mut s = sample(vec![gradient(20, 10), gradient(8, 8)]);
    s.data_valid[1] = false;
    run(&p, &mut s, 0);
    assert_eq!(s.data.len(), 6);
    assert_eq!(s.label, vec![10, 10, 10, 11, 11, 11]);
    assert_eq!(s.data_valid, vec![true, true, true, false, false, false]);
    assert_eq!(s.data_idx, vec![100, 100, 100, 101, 101, 101]);
    assert_eq!(image(&s.data[2]).dimensions(), (20, 10));
    assert_eq!(image(&s.data[3]).dimensions(), (8, 8));
}

#[test]
fn same_seed_epoch_index_gives_identical_output_and_others_differ() {
    let p = pipeline(SIMCLR);
    let out = |seed: u64, epoch: u64, index: u64| {
        let mut s = sample(vec![gradient(300, 200)]);
        p.apply(&mut s, &mut sample_rng(seed, epoch, index))
            .expect("apply");
        s.data
            .iter()
            .map(|i| tensor(i).data.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(out(1, 2, 3), out(1, 2, 3));
    assert_ne!(out(1, 2, 3), out(1, 2, 4));
    assert_ne!(out(1, 2, 3), out(1, 3, 3));
    assert_ne!(out(1, 2, 3), out(2, 2, 3));
}

#[test]
fn indices_restrict_a_transform_to_the_selected_entries() {
    let p = pipeline(
        "[{name: RandomGrayscale, p: 1.0, indices: [1]}, {name: Resize, size: [5, 6], indices: 2}]",
    );
    let imgs = vec![gradient(30, 20), gradient(30, 20), gradient(30, 20)];
    let mut s = sample(imgs.clone());
    run(&p, &mut s, 0);
    assert_eq!(image(&s.data[0]), &imgs[0], "entry 0 must be untouched");
    assert!(
        image(&s.data[1])
            .pixels()
            .all(|p| p[0] == p[1] && p[1] == p[2]),
        "entry 1 must be grey"
    );
    assert_eq!(image(&s.data[1]).dimensions(), (30, 20));
    assert_eq!(
        image(&s.data[2]).dimensions(),
        (6, 5),
        "entry 2 resized to [h=5, w=6]"
    );
    assert!(
        image(&s.data[2]).pixels().any(|p| p[0] != p[1]),
        "entry 2 keeps its colours"
    );

    let out_of_range = pipeline("[{name: RandomGrayscale, p: 1.0, indices: [3]}]");
    let err = out_of_range
        .apply(&mut sample(imgs), &mut sample_rng(0, 0, 0))
        .expect_err("index 3 of 3");
    assert!(
        err.to_string().contains("RandomGrayscale") && err.to_string().contains("index 3"),
        "{err}"
    );
}

#[test]
fn flip_probability_is_respected() {
    let img = gradient(16, 4);
    let mut flipped_img = img.clone();
    for y in 0..4 {
        for x in 0..16 {
            flipped_img.put_pixel(15 - x, y, *img.get_pixel(x, y));
        }
    }
    for (p, lo, hi) in [(0.0, 0, 0), (1.0, 2000, 2000), (0.3, 520, 680)] {
        let pipe = pipeline(&format!("[{{name: RandomHorizontalFlip, p: {p}}}]"));
        let mut flipped = 0;
        for i in 0..2000 {
            let mut s = sample(vec![img.clone()]);
            run(&pipe, &mut s, i);
            let out = image(&s.data[0]);
            if *out == flipped_img {
                flipped += 1;
            } else {
                assert_eq!(out, &img);
            }
        }
        assert!(
            (lo..=hi).contains(&flipped),
            "p = {p}: {flipped} of 2000 flipped"
        );
    }
}

#[test]
fn grayscale_gives_equal_channels_with_probability_p() {
    let pipe = pipeline("[{name: RandomGrayscale, p: 0.25}]");
    let mut grey = 0;
    for i in 0..1000 {
        let mut s = sample(vec![gradient(12, 9)]);
        run(&pipe, &mut s, i);
        if image(&s.data[0])
            .pixels()
            .all(|p| p[0] == p[1] && p[1] == p[2])
        {
            grey += 1;
        }
    }
    assert!(
        (200..=300).contains(&grey),
        "{grey} of 1000 grey at p = 0.25"
    );
}

#[test]
fn random_solarize_inverts_exactly_the_values_above_a_threshold() {
    // Every value 0..=255 appears, so the threshold of each draw can be read off the output.
    let img = RgbImage::from_fn(256, 1, |x, _| Rgb([x as u8, x as u8, 255 - x as u8]));
    let pipe = pipeline("[{name: ImgPilRandomSolarize, p: 1.0}]");
    let mut thresholds = Vec::new();
    for i in 0..400 {
        let mut s = sample(vec![img.clone()]);
        run(&pipe, &mut s, i);
        let out = image(&s.data[0]);
        // 255 - v never equals v, so the first changed value is the threshold.
        let t = (0..256u32)
            .position(|x| out.get_pixel(x, 0)[0] != x as u8)
            .unwrap_or(256);
        for x in 0..256u32 {
            let v = x as u8;
            let expect = |v: u8| if (v as usize) < t { v } else { 255 - v };
            assert_eq!(
                out.get_pixel(x, 0)[0],
                expect(v),
                "value {v} with threshold {t}"
            );
            assert_eq!(
                out.get_pixel(x, 0)[2],
                expect(255 - v),
                "value {} with threshold {t}",
                255 - v
            );
        }
        thresholds.push(t);
    }
    // VISSL draws the threshold uniformly from 0..=256.
    assert!(thresholds.iter().any(|&t| t < 30) && thresholds.iter().any(|&t| t > 226));
}

#[test]
fn to_tensor_ranges_and_fused_normalize_equal_the_separate_steps() {
    let img = gradient(31, 17);
    let t = |yaml: &str| {
        let mut s = sample(vec![img.clone()]);
        run(&pipeline(yaml), &mut s, 0);
        tensor(&s.data[0]).clone()
    };
    let unit = t("[{name: ToTensor}]");
    assert_eq!((unit.c, unit.h, unit.w), (3, 17, 31));
    assert!(unit.data.iter().all(|v| (0.0..=1.0).contains(v)));
    // Channel-major: the first plane is the red channel.
    assert_eq!(unit.data[5], img.get_pixel(5, 0)[0] as f32 / 255.0);
    assert_eq!(
        unit.data[17 * 31 + 5],
        img.get_pixel(5, 0)[1] as f32 / 255.0
    );
    let raw = t("[{name: ImgPilToRawTensor}]");
    assert_eq!(
        raw.data[17 * 31 * 2 + 31 + 3],
        img.get_pixel(3, 1)[2] as f32
    );

    let fused =
        t("[{name: ToTensor}, {name: Normalize, mean: [0.5, 0.4, 0.3], std: [0.2, 0.25, 0.3]}]");
    // A no-op in between keeps ToTensor and Normalize as separate stages.
    let separate = t("[{name: ToTensor}, {name: RandomHorizontalFlip, p: 0.0}, {name: Normalize, mean: [0.5, 0.4, 0.3], std: [0.2, 0.25, 0.3]}]");
    assert_eq!(fused, separate);
    // torchvision's float32 arithmetic: (v / 255 - mean) / std.
    let v = img.get_pixel(0, 0)[1] as f32;
    assert_eq!(fused.data[17 * 31], (v / 255.0 - 0.4f32) / 0.25f32);
}

#[test]
fn rotation_labels_cover_all_angles_and_match_the_image() {
    let img = gradient(10, 10);
    let pipe = pipeline("[{name: ImgRotatePil, num_angles: 4}]");
    let mut seen = [0; 4];
    for i in 0..200 {
        let mut s = sample(vec![img.clone()]);
        run(&pipe, &mut s, i);
        let label = s.label[0];
        let out = image(&s.data[0]);
        // Counter-clockwise by label * 90 degrees: out(x, y) = in(rotated back).
        for y in 0..10 {
            for x in 0..10 {
                let (sx, sy) = match label {
                    0 => (x, y),
                    1 => (9 - y, x),
                    2 => (9 - x, 9 - y),
                    3 => (y, 9 - x),
                    _ => panic!("label {label} outside 0..4"),
                };
                assert_eq!(
                    out.get_pixel(x, y),
                    img.get_pixel(sx, sy),
                    "label {label} at ({x}, {y})"
                );
            }
        }
        seen[label as usize] += 1;
    }
    assert!(seen.iter().all(|&n| n > 20), "labels {seen:?}");
}

#[test]
fn jigsaw_patches_and_pirl_patches_have_vissl_shapes() {
    let p = pipeline("[{name: RandomResizedCrop, size: 255}, {name: ToTensor}, {name: ImgPatchesFromTensor, num_patches: 9, patch_jitter: 21}]");
    let mut s = sample(vec![gradient(300, 280)]);
    run(&p, &mut s, 0);
    assert_eq!(s.data.len(), 9);
    assert!(s
        .data
        .iter()
        .all(|i| (tensor(i).c, tensor(i).h, tensor(i).w) == (3, 64, 64)));
    assert_eq!(s.label, vec![10; 9]);

    let pirl = pipeline("[{name: ImgPilToPatchesAndImage, crop_scale_image: [0.08, 1.0], crop_size_image: 224, crop_scale_patches: [0.6, 1.0], crop_size_patches: 255, permute_patches: true, num_patches: 9}]");
    let mut s = sample(vec![gradient(300, 280)]);
    run(&pirl, &mut s, 0);
    assert_eq!(s.data.len(), 10);
    assert_eq!(image(&s.data[0]).dimensions(), (224, 224));
    assert!(s.data[1..]
        .iter()
        .all(|i| image(i).dimensions() == (64, 64)));
    assert_eq!(s.data_idx, vec![100; 10]);
}

#[test]
fn lab_tensor_has_vissl_ranges() {
    let p = pipeline("[{name: ImgPil2LabTensor}]");
    let img = RgbImage::from_fn(16, 16, |x, y| {
        Rgb([(x * 16) as u8, (y * 16) as u8, 255 - (x * 8 + y * 8) as u8])
    });
    let mut s = sample(vec![img]);
    run(&p, &mut s, 0);
    let t = tensor(&s.data[0]);
    assert_eq!((t.c, t.h, t.w), (3, 16, 16));
    let plane = 16 * 16;
    assert!(t.data[..plane].iter().all(|v| (-50.0..=50.0).contains(v)));
    assert!(t.data[plane..].iter().all(|v| (-128.0..=127.0).contains(v)));
    // White is L = 100 (-> 50 after VISSL's shift) with a = b = 0.
    let mut white = sample(vec![RgbImage::from_pixel(2, 2, Rgb([255, 255, 255]))]);
    run(&p, &mut white, 0);
    let w = tensor(&white.data[0]);
    assert_eq!((w.data[0], w.data[4], w.data[8]), (50.0, 0.0, 0.0));
}

#[test]
fn multicrop_random_apply_uses_one_probability_per_crop() {
    let p = pipeline("[{name: ImgReplicatePil, num_times: 2}, {name: ImgPilMultiCropRandomApply, transforms: [{name: RandomGrayscale, p: 1.0}], prob: [0.0, 1.0]}]");
    let mut s = sample(vec![gradient(10, 10)]);
    run(&p, &mut s, 0);
    assert_eq!(image(&s.data[0]), &gradient(10, 10));
    assert!(image(&s.data[1])
        .pixels()
        .all(|p| p[0] == p[1] && p[1] == p[2]));
}

#[test]
fn wrong_item_kind_is_a_transform_error_naming_the_transform() {
    let p = pipeline("[{name: Normalize, mean: [0.5], std: [0.5]}]");
    match p.apply(&mut sample(vec![gradient(4, 4)]), &mut sample_rng(0, 0, 0)) {
        Err(DataError::Transform { transform, reason }) => {
            assert_eq!(transform, "Normalize");
            assert!(reason.contains("ToTensor"), "{reason}");
        }
        other => panic!("expected a transform error, got {other:?}"),
    }
    let p = pipeline("[{name: ToTensor}, {name: RandomResizedCrop, size: 8}]");
    let err = p
        .apply(&mut sample(vec![gradient(4, 4)]), &mut sample_rng(0, 0, 0))
        .expect_err("crop of a tensor");
    assert!(err.to_string().contains("RandomResizedCrop"), "{err}");
}

#[test]
fn config_errors_name_the_transform_and_the_parameter() {
    let msg = config_error("[{name: RandomResizedCrap, size: 224}]");
    assert!(
        msg.contains("RandomResizedCrap") && msg.contains("RandomResizedCrop"),
        "{msg}"
    );
    let msg = config_error("[{name: RandomResizedCrop, sise: 224}]");
    assert!(
        msg.contains("RandomResizedCrop") && msg.contains("size"),
        "{msg}"
    );
    let msg = config_error("[{name: RandomResizedCrop, size: 224, scale: [0.08, 1.0], sclae: 1}]");
    assert!(
        msg.contains("RandomResizedCrop") && msg.contains("'sclae'"),
        "{msg}"
    );
    let msg = config_error("[{name: RandomHorizontalFlip, p: often}]");
    assert!(
        msg.contains("RandomHorizontalFlip") && msg.contains("'p'"),
        "{msg}"
    );
    let msg = config_error("[{name: RandomGrayscale, p: 1.5}]");
    assert!(
        msg.contains("RandomGrayscale") && msg.contains("'p'"),
        "{msg}"
    );
    let msg = config_error("[{name: ImgPilToMultiCrop, total_num_crops: 3, num_crops: [2, 2], size_crops: [224, 96], crop_scales: [[0.14, 1], [0.05, 0.14]]}]");
    assert!(
        msg.contains("ImgPilToMultiCrop") && msg.contains("total_num_crops"),
        "{msg}"
    );
    let msg = config_error("[{name: ColorJitter, hue: 0.7}]");
    assert!(
        msg.contains("ColorJitter") && msg.contains("'hue'"),
        "{msg}"
    );
    let msg = config_error("[{name: ShuffleImgPatches, perm_file: /nonexistent/perms.npy}]");
    assert!(
        msg.contains("ShuffleImgPatches") && msg.contains("perm_file"),
        "{msg}"
    );
    let msg = config_error("[{name: Normalize, mean: [0.5, 0.5, 0.5]}]");
    assert!(msg.contains("Normalize") && msg.contains("'std'"), "{msg}");
    let msg = config_error(
        "[{name: ImgPilMultiCropRandomApply, transforms: [{name: ImgReplicatePil}], prob: [1.0]}]",
    );
    assert!(
        msg.contains("ImgPilMultiCropRandomApply") && msg.contains("ImgReplicatePil"),
        "{msg}"
    );
    let msg = config_error("[{size: 3}]");
    assert!(msg.contains("name"), "{msg}");
}

#[test]
fn random_crop_pads_like_torchvision() {
    // Padding 2 on every side and a crop of the padded size: the whole padded image, black border.
    let img = gradient(4, 3);
    let p = pipeline("[{name: RandomCrop, size: [7, 8], padding: 2}]");
    let mut s = sample(vec![img.clone()]);
    run(&p, &mut s, 0);
    let out = image(&s.data[0]);
    assert_eq!(out.dimensions(), (8, 7));
    for y in 0..7 {
        for x in 0..8 {
            let inside = (2..6).contains(&x) && (2..5).contains(&y);
            let expect = if inside {
                *img.get_pixel(x - 2, y - 2)
            } else {
                Rgb([0, 0, 0])
            };
            assert_eq!(*out.get_pixel(x, y), expect, "({x}, {y})");
        }
    }
    // pad_if_needed pads both sides by the 2-pixel shortfall: the image lands at offsets 0..=2.
    let p = pipeline("[{name: RandomCrop, size: 6, pad_if_needed: true, fill: 9}]");
    let mut offsets = std::collections::HashSet::new();
    for i in 0..200 {
        let mut s = sample(vec![gradient(4, 6)]);
        run(&p, &mut s, i);
        let out = image(&s.data[0]);
        let left = (0..6)
            .find(|&x| out.get_pixel(x, 0) != &Rgb([9, 9, 9]))
            .expect("image columns");
        assert_eq!(out.get_pixel(left, 5), gradient(4, 6).get_pixel(0, 5));
        offsets.insert(left);
    }
    assert_eq!(
        offsets,
        (0..=2).collect(),
        "left offsets of a 4-wide image in a 6-wide crop"
    );
    let err = config_error("[{name: RandomCrop, size: 6, padding_mode: reflect}]");
    assert!(err.contains("padding_mode"), "{err}");
}
