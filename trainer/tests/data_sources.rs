//! Data sources, the dataset catalog and the dataset: real files on disk, references from numpy.

mod data_common;

use std::path::Path;

use data_common::{marked_image, run_python, split_config, write_jpeg, write_png};
use image::{GrayImage, Rgb, RgbImage, Rgba, RgbaImage};
use vissl_trainer::data::dataset::Dataset;
use vissl_trainer::data::sources::catalog::{get_data_files, DatasetCatalog};
use vissl_trainer::data::sources::npy::read_npy;
use vissl_trainer::data::sources::{self, mean_image};
use vissl_trainer::data::{DataError, Item, Sample};

fn image_of(sample: &Sample, entry: usize) -> &RgbImage {
    match &sample.data[entry] {
        Item::Image(img) => img,
        Item::Tensor(_) => panic!("expected an image"),
    }
}

fn load_all(ds: &Dataset) -> Vec<Sample> {
    let mut recent = ds.recent_images();
    (0..ds.len())
        .map(|i| ds.load(i, &mut recent).unwrap())
        .collect()
}

// ---- catalog -------------------------------------------------------------------------------

fn write_catalog(dir: &Path, json: &str) -> DatasetCatalog {
    let path = dir.join("dataset_catalog.json");
    std::fs::write(&path, json).unwrap();
    DatasetCatalog::load(&path).unwrap()
}

#[test]
fn catalog_maps_train_to_train_and_test_to_val_with_test_fallback() {
    let tmp = tempfile::tempdir().unwrap();
    for d in ["tr", "va", "te"] {
        std::fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    std::fs::write(tmp.path().join("tr_labels.npy"), b"x").unwrap();
    let p = |d: &str| tmp.path().join(d).display().to_string();
    let catalog = write_catalog(
        tmp.path(),
        &format!(
            r#"{{"toy": {{"train": ["{}", "{}"], "val": ["{}", "{}"]}},
                "toy_test_only": {{"train": ["{}", ""], "test": ["{}", ""]}}}}"#,
            p("tr"),
            p("tr_labels.npy"),
            p("va"),
            p("missing_labels.npy"),
            p("tr"),
            p("te")
        ),
    );
    assert_eq!(catalog.names(), vec!["toy", "toy_test_only"]);

    let cfg = split_config("{DATASET_NAMES: [toy], DATA_SOURCES: [disk_folder]}");
    let train = get_data_files("TRAIN", &cfg, Some(&catalog)).unwrap();
    assert_eq!(train.data_paths, vec![p("tr")]);
    assert_eq!(train.label_paths, vec![Some(p("tr_labels.npy"))]);
    // A label file that does not exist is optional, as in VISSL.
    let test = get_data_files("TEST", &cfg, Some(&catalog)).unwrap();
    assert_eq!(test.data_paths, vec![p("va")]);
    assert_eq!(test.label_paths, vec![None]);

    let cfg = split_config("{DATASET_NAMES: [toy_test_only], DATA_SOURCES: [disk_folder]}");
    assert_eq!(
        get_data_files("TEST", &cfg, Some(&catalog))
            .unwrap()
            .data_paths,
        vec![p("te")]
    );

    // Explicit DATA_PATHS win over the catalog; synthetic needs no path at all.
    let cfg = split_config(&format!(
        "{{DATASET_NAMES: [toy, x], DATA_SOURCES: [disk_folder, synthetic], DATA_PATHS: ['{}', '']}}",
        p("te")
    ));
    let files = get_data_files("TRAIN", &cfg, Some(&catalog)).unwrap();
    assert_eq!(files.data_paths, vec![p("te"), String::new()]);
}

#[test]
fn catalog_errors_name_the_dataset_split_source_and_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere").display().to_string();
    let catalog = write_catalog(
        tmp.path(),
        &format!(
            r#"{{"gone": {{"train": ["{missing}", ""]}}, "other": {{"train": ["{missing}", ""]}}}}"#
        ),
    );
    let cfg = split_config("{DATASET_NAMES: [nope], DATA_SOURCES: [disk_folder]}");
    let err = get_data_files("TRAIN", &cfg, Some(&catalog))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'nope'") && err.contains("gone") && err.contains("other"),
        "{err}"
    );

    let cfg = split_config("{DATASET_NAMES: [gone], DATA_SOURCES: [disk_folder]}");
    let err = get_data_files("TRAIN", &cfg, Some(&catalog))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("DATA.TRAIN") && err.contains("disk_folder") && err.contains(&missing),
        "{err}"
    );
    // No "val"/"test" entry for TEST.
    let err = get_data_files("TEST", &cfg, Some(&catalog))
        .unwrap_err()
        .to_string();
    assert!(err.contains("'val' or 'test'"), "{err}");

    let err = split_config("{DATA_SOURCES: [hdf5], DATA_PATHS: ['/']}");
    let err = Dataset::from_config("TRAIN", &err, None)
        .err()
        .expect("unknown source")
        .to_string();
    assert!(
        err.contains("hdf5") && err.contains("disk_folder") && err.contains("mnist_idx"),
        "{err}"
    );
}

// ---- disk_folder ---------------------------------------------------------------------------

/// An ImageFolder tree with PNG and JPEG files, nested folders, grey and RGBA images.
fn build_image_folder(root: &Path) {
    write_png(
        &root.join("dog/b.png"),
        &marked_image(6, 4, [200, 10, 10], 1),
    );
    write_png(
        &root.join("dog/a.png"),
        &marked_image(6, 4, [10, 200, 10], 2),
    );
    write_jpeg(
        &root.join("cat/x.jpg"),
        &RgbImage::from_pixel(16, 16, Rgb([30, 90, 150])),
    );
    write_png(
        &root.join("cat/sub/y.PNG"),
        &marked_image(5, 5, [1, 2, 3], 4),
    );
    let grey = GrayImage::from_pixel(3, 2, image::Luma([77]));
    grey.save(root.join("cat/sub/grey.png")).unwrap();
    let rgba = RgbaImage::from_pixel(2, 2, Rgba([9, 8, 7, 0]));
    std::fs::create_dir_all(root.join("ant")).unwrap();
    rgba.save(root.join("ant/rgba.png")).unwrap();
    std::fs::write(root.join("ant/notes.txt"), "not an image").unwrap();
    // A symlinked folder is followed, as os.walk(followlinks=True) does.
    std::os::unix::fs::symlink(root.join("cat/sub"), root.join("dog/linked")).unwrap();
}

#[test]
fn disk_folder_lists_images_in_imagefolder_order_with_class_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("train");
    build_image_folder(&root);
    // torchvision's make_dataset order, written out independently in Python.
    let reference = run_python(
        r#"
import os, sys
root = sys.argv[1]
exts = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
for ci, c in enumerate(classes):
    for r, _, fnames in sorted(os.walk(os.path.join(root, c), followlinks=True)):
        for f in sorted(fnames):
            if f.lower().endswith(exts):
                print(os.path.join(r, f), ci)
"#,
        &[root.to_str().unwrap()],
    );
    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [disk_folder], DATA_PATHS: ['{}'], LABEL_SOURCES: [disk_folder]}}",
        root.display()
    ));
    let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
    let paths = ds.image_paths()[0].clone().unwrap();
    let labels = ds.sample_labels()[0].clone();
    let ours: Vec<String> = paths
        .iter()
        .zip(&labels)
        .map(|(p, l)| format!("{p} {l}"))
        .collect();
    let theirs: Vec<&str> = reference.lines().collect();
    assert_eq!(ours, theirs);
    assert_eq!(
        ds.label_columns()[0].class_names.as_deref(),
        Some(&["ant".to_string(), "cat".into(), "dog".into()][..])
    );

    let samples = load_all(&ds);
    assert!(samples.iter().all(|s| s.data_valid == vec![true]));
    assert_eq!(ds.replaced_count(), 0);
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s.data_idx, vec![i as i64]);
        assert_eq!(s.label, vec![labels[i]]);
    }
    let by_name = |name: &str| {
        let i = paths.iter().position(|p| p.ends_with(name)).unwrap();
        image_of(&samples[i], 0).clone()
    };
    // PNG is lossless; grey is replicated; alpha is dropped (PIL's convert("RGB")).
    assert_eq!(by_name("dog/b.png"), marked_image(6, 4, [200, 10, 10], 1));
    assert_eq!(
        by_name("grey.png"),
        RgbImage::from_pixel(3, 2, Rgb([77, 77, 77]))
    );
    assert_eq!(
        by_name("rgba.png"),
        RgbImage::from_pixel(2, 2, Rgb([9, 8, 7]))
    );
    let jpeg = by_name("x.jpg");
    assert_eq!(jpeg.dimensions(), (16, 16));
    for p in jpeg.pixels() {
        for (got, want) in p.0.iter().zip([30u8, 90, 150]) {
            assert!(
                (i32::from(*got) - i32::from(want)).abs() <= 3,
                "jpeg pixel {p:?}"
            );
        }
    }
}

#[test]
fn cmyk_jpeg_decodes_to_rgb_like_pillow() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cmyk.jpg");
    let reference = run_python(
        r#"
import sys
from PIL import Image
img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
img.save(sys.argv[1], quality=95)
print(*Image.open(sys.argv[1]).convert("RGB").getpixel((4, 4)))
"#,
        &[path.to_str().unwrap()],
    );
    let want: Vec<i32> = reference
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let img = sources::load_image_file(&path).unwrap();
    let got = img.get_pixel(4, 4).0;
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (i32::from(*g) - w).abs() <= 8,
            "CMYK pixel {got:?} vs Pillow {want:?}"
        );
    }
}

#[test]
fn bad_files_are_replaced_counted_and_the_run_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    write_png(
        &root.join("c/0_good.png"),
        &marked_image(4, 4, [50, 60, 70], 11),
    );
    std::fs::write(
        root.join("c/1_garbage.jpg"),
        b"\xff\xd8\xff this is not a jpeg",
    )
    .unwrap();
    let mut png = Vec::new();
    marked_image(32, 32, [1, 1, 1], 2)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(root.join("c/2_truncated.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(root.join("c/3_empty.jpeg"), b"").unwrap();
    std::fs::write(root.join("c/4_text.png"), "hello").unwrap();
    write_png(
        &root.join("c/5_good.png"),
        &marked_image(4, 4, [80, 90, 100], 12),
    );

    for queue in [false, true] {
        let cfg = split_config(&format!(
            "{{DATA_SOURCES: [disk_folder], DATA_PATHS: ['{}'], DEFAULT_GRAY_IMG_SIZE: 8, \
              ENABLE_QUEUE_DATASET: {queue}, BATCHSIZE_PER_REPLICA: 4}}",
            root.display()
        ));
        let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
        assert_eq!(ds.len(), 6);
        let samples = load_all(&ds);
        let valid: Vec<bool> = samples.iter().map(|s| s.data_valid[0]).collect();
        assert_eq!(valid, vec![true, false, false, false, false, true]);
        assert_eq!(ds.replaced_count(), 4);
        let first_good = marked_image(4, 4, [50, 60, 70], 11);
        if queue {
            // The one valid image seen so far replaces the first failure; then the pool is empty.
            assert_eq!(image_of(&samples[1], 0), &first_good);
            assert_eq!(image_of(&samples[2], 0), &mean_image(8));
        } else {
            for s in &samples[1..5] {
                assert_eq!(image_of(s, 0), &mean_image(8));
            }
        }
        // Loading again counts again (each failure is a replacement) but does not panic.
        let _ = load_all(&ds);
        assert_eq!(ds.replaced_count(), 8);
    }
}

// ---- disk_filelist and .npy ------------------------------------------------------------------

#[test]
fn disk_filelist_reads_numpy_unicode_and_byte_arrays_and_label_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs é");
    let names = ["a.png", "b.png", "c.png"];
    for (i, n) in names.iter().enumerate() {
        write_png(
            &dir.join(n),
            &marked_image(3, 3, [i as u8 * 40, 0, 0], i as u8),
        );
    }
    let out = tmp.path().display().to_string();
    run_python(
        r#"
import sys, os
import numpy as np
out, d = sys.argv[1], sys.argv[2]
paths = [os.path.join("/old/prefix", n) for n in ("a.png", "b.png", "c.png")]
np.save(os.path.join(out, "uni.npy"), np.array(paths))
np.save(os.path.join(out, "bytes.npy"), np.array([p.encode() for p in paths], dtype="S"))
np.save(os.path.join(out, "labels.npy"), np.array([7, -2, 40000], dtype=np.int32))
np.save(os.path.join(out, "names.npy"), np.array(["zebra", "ant", "zebra"]))
np.save(os.path.join(out, "obj.npy"), np.array(paths, dtype=object), allow_pickle=True)
np.save(os.path.join(out, "u8.npy"), np.array([1, 255], dtype=np.uint8))
np.save(os.path.join(out, "i64be.npy"), np.array([-5, 2**40], dtype=">i8"))
np.save(os.path.join(out, "perm.npy"), np.asfortranarray(np.arange(6).reshape(2, 3)))
"#,
        &[&out, dir.to_str().unwrap()],
    );
    let p = |n: &str| tmp.path().join(n);
    let int_values = |n: &str| match read_npy(&p(n)).unwrap().data {
        sources::npy::NpyData::Ints(v) => v,
        other => panic!("{other:?}"),
    };
    assert_eq!(int_values("u8.npy"), vec![1, 255]);
    assert_eq!(int_values("i64be.npy"), vec![-5, 1 << 40]);
    let perm = read_npy(&p("perm.npy")).unwrap();
    assert_eq!(perm.shape, vec![2, 3]);
    assert_eq!(
        perm.data,
        sources::npy::NpyData::Ints(vec![0, 1, 2, 3, 4, 5])
    );
    assert!(read_npy(&p("obj.npy")).is_err());
    let err = Dataset::from_config(
        "TRAIN",
        &split_config(&format!(
            "{{DATA_SOURCES: [disk_filelist], DATA_PATHS: ['{}']}}",
            p("obj.npy").display()
        )),
        None,
    )
    .err()
    .expect("object arrays are refused")
    .to_string();
    assert!(err.contains("obj.npy") && err.contains("unicode"), "{err}");

    for (list, labels, want_labels) in [
        ("uni.npy", "labels.npy", vec![7, -2, 40000]),
        ("bytes.npy", "names.npy", vec![1, 0, 1]),
    ] {
        let cfg = split_config(&format!(
            "{{DATA_SOURCES: [disk_filelist], DATA_PATHS: ['{}'], LABEL_SOURCES: [disk_filelist], \
              LABEL_PATHS: ['{}'], REMOVE_IMG_PATH_PREFIX: /old/prefix, NEW_IMG_PATH_PREFIX: '{}'}}",
            p(list).display(),
            p(labels).display(),
            dir.display()
        ));
        let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
        let samples = load_all(&ds);
        assert_eq!(ds.replaced_count(), 0, "{list}");
        for (i, s) in samples.iter().enumerate() {
            assert_eq!(
                image_of(s, 0),
                &marked_image(3, 3, [i as u8 * 40, 0, 0], i as u8),
                "{list}"
            );
            assert_eq!(s.label, vec![want_labels[i]], "{list}");
        }
        if labels == "names.npy" {
            let names = ds.label_columns()[0].class_names.clone().unwrap();
            assert_eq!(names, vec!["ant".to_string(), "zebra".into()]);
        }
    }

    // Without the prefix rewrite the files are missing: replaced, counted, never a crash.
    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [disk_filelist], DATA_PATHS: ['{}'], DEFAULT_GRAY_IMG_SIZE: 4}}",
        p("uni.npy").display()
    ));
    let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
    let samples = load_all(&ds);
    assert!(samples.iter().all(|s| s.data_valid == vec![false]));
    assert_eq!(ds.replaced_count(), 3);
}

#[test]
fn label_source_mismatch_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    write_png(
        &tmp.path().join("c/a.png"),
        &marked_image(2, 2, [0, 0, 0], 0),
    );
    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [disk_folder], DATA_PATHS: ['{}'], LABEL_SOURCES: [disk_filelist]}}",
        tmp.path().display()
    ));
    let err = Dataset::from_config("TRAIN", &cfg, None)
        .err()
        .expect("no label file")
        .to_string();
    assert!(
        err.contains("LABEL_SOURCES[0]") && err.contains("LABEL_PATHS"),
        "{err}"
    );
    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [disk_folder], DATA_PATHS: ['{}'], LABEL_SOURCES: [synthetic]}}",
        tmp.path().display()
    ));
    assert!(matches!(
        Dataset::from_config("TRAIN", &cfg, None),
        Err(DataError::Config(_))
    ));
}

// ---- synthetic -----------------------------------------------------------------------------

#[test]
fn synthetic_gives_grey_or_seeded_random_images_and_cyclic_labels() {
    let cfg = split_config(
        "{DATA_SOURCES: [synthetic], LABEL_SOURCES: [synthetic], DEFAULT_GRAY_IMG_SIZE: 32, RANDOM_SYNTHETIC_LABELS: 3}",
    );
    let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
    assert_eq!(ds.len(), 50_000);
    let mut recent = ds.recent_images();
    let s = ds.load(4, &mut recent).unwrap();
    assert_eq!(
        image_of(&s, 0),
        &RgbImage::from_pixel(32, 32, Rgb([128, 128, 128]))
    );
    assert_eq!(s.label, vec![1]);

    let cfg = split_config(
        "{DATA_SOURCES: [synthetic], DEFAULT_GRAY_IMG_SIZE: 64, RANDOM_SYNTHETIC_IMAGES: true}",
    );
    let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
    let a = image_of(&ds.load(1, &mut recent).unwrap(), 0).clone();
    let a2 = image_of(&ds.load(1, &mut recent).unwrap(), 0).clone();
    let b = image_of(&ds.load(2, &mut recent).unwrap(), 0).clone();
    assert_eq!(a.dimensions(), (64, 64));
    assert_eq!(a, a2);
    assert_ne!(a, b);
    let distinct: std::collections::HashSet<[u8; 3]> = a.pixels().map(|p| p.0).collect();
    assert!(distinct.len() > 10, "random image should not be flat");
}

// ---- mnist_idx on the real Fashion-MNIST files ------------------------------------------------

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

#[test]
fn mnist_idx_reads_fashion_mnist_test_set() {
    assert!(
        Path::new(FASHION_MNIST)
            .join("t10k-images-idx3-ubyte.gz")
            .is_file(),
        "Fashion-MNIST missing: install Debian's dataset-fashion-mnist"
    );
    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [mnist_idx], DATA_PATHS: ['{FASHION_MNIST}'], LABEL_SOURCES: [mnist_idx]}}"
    ));
    let ds = Dataset::from_config("TEST", &cfg, None).unwrap();
    assert_eq!(ds.len(), 10_000);
    let mut histogram = [0usize; 10];
    for &l in &ds.sample_labels()[0] {
        histogram[usize::try_from(l).unwrap()] += 1;
    }
    assert_eq!(histogram, [1000; 10]);

    // Pixels and labels of a few images, read independently with gzip + numpy.
    let reference = run_python(
        r#"
import gzip, sys
import numpy as np
d = sys.argv[1]
imgs = np.frombuffer(gzip.open(d + "/t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
lbls = np.frombuffer(gzip.open(d + "/t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
for i in (0, 1234, 9999):
    print(i, lbls[i], imgs[i].tobytes().hex())
"#,
        &[FASHION_MNIST],
    );
    let mut recent = ds.recent_images();
    for line in reference.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let index: usize = parts[0].parse().unwrap();
        let label: i64 = parts[1].parse().unwrap();
        let s = ds.load(index, &mut recent).unwrap();
        assert_eq!(s.label, vec![label]);
        let img = image_of(&s, 0);
        assert_eq!(img.dimensions(), (28, 28));
        let grey: String = img
            .pixels()
            .map(|p| {
                assert!(p[0] == p[1] && p[1] == p[2], "grey replicated to RGB");
                format!("{:02x}", p[0])
            })
            .collect();
        assert_eq!(grey, parts[2], "image {index}");
    }

    // The folder form picks the split's files; an explicit images file works as well.
    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [mnist_idx], DATA_PATHS: ['{FASHION_MNIST}/train-images-idx3-ubyte.gz'], LABEL_SOURCES: [mnist_idx]}}"
    ));
    let train = Dataset::from_config("TRAIN", &cfg, None).unwrap();
    assert_eq!(train.len(), 60_000);
    assert_eq!(train.sample_labels()[0].len(), 60_000);
}

#[test]
fn mnist_idx_rejects_a_non_idx_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t10k-images-idx3-ubyte");
    std::fs::write(&path, b"\x00\x00\x08\x03\x00\x00\x00\x05").unwrap();
    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [mnist_idx], DATA_PATHS: ['{}']}}",
        path.display()
    ));
    let err = Dataset::from_config("TEST", &cfg, None)
        .err()
        .expect("truncated")
        .to_string();
    assert!(
        err.contains("t10k-images-idx3-ubyte") && err.contains("truncated"),
        "{err}"
    );
}
