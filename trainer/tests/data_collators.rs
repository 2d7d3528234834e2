//! Collator layouts against VISSL's, on hand-built samples whose every value says where it came
//! from: entry k of sample i is filled with `10 * i + k`.

mod data_common;

use data_common::{filled, floats, ints};
use tch::Kind;
use vissl_trainer::data::collators::{self, Batch};
use vissl_trainer::data::{Item, Sample};

/// `n` samples of `k` entries; entry sizes from `side(k)`; labels `100 * i + k`; data_idx `i`.
fn samples(n: usize, k: usize, side: impl Fn(usize) -> usize) -> Vec<Sample> {
    (0..n)
        .map(|i| Sample {
            data: (0..k)
                .map(|e| Item::Tensor(filled(3, side(e), side(e), (10 * i + e) as f32)))
                .collect(),
            label: (0..k).map(|e| (100 * i + e) as i64).collect(),
            data_valid: vec![true; k],
            data_idx: vec![i as i64; k],
        })
        .collect()
}

fn collate(name: &str, params: &str, input: &[Sample]) -> Batch {
    let params: serde_yaml::Mapping = serde_yaml::from_str(params).unwrap();
    collators::build(name, &params)
        .unwrap()
        .collate(input)
        .unwrap()
}

/// The fill value of each image along dim 0 of a `B x C x H x W` tensor.
fn markers(t: &tch::Tensor) -> Vec<f32> {
    let per = (t.numel() / t.size()[0] as usize).max(1);
    floats(t).chunks(per).map(|c| c[0]).collect()
}

#[test]
fn simclr_stacks_all_first_crops_then_all_second_crops() {
    let mut input = samples(3, 2, |_| 2);
    input[1].data_valid[1] = false;
    let b = collate("simclr_collator", "{}", &input);
    assert_eq!(b.data.len(), 1);
    assert_eq!(b.data[0].size(), vec![6, 3, 2, 2]);
    assert_eq!(b.data[0].kind(), Kind::Float);
    assert_eq!(markers(&b.data[0]), vec![0.0, 10.0, 20.0, 1.0, 11.0, 21.0]);
    assert_eq!(ints(&b.label[0]), vec![0, 100, 200, 1, 101, 201]);
    assert_eq!(b.label[0].kind(), Kind::Int64);
    assert_eq!(ints(&b.data_valid[0]), vec![1, 1, 1, 1, -1, 1]);
    assert_eq!(ints(&b.data_idx[0]), vec![0, 1, 2, 0, 1, 2]);
}

#[test]
fn multicrop_keeps_one_tensor_per_crop_and_crop_major_labels() {
    let input = samples(2, 3, |e| if e < 2 { 4 } else { 2 });
    let b = collate("multicrop_collator", "{}", &input);
    let shapes: Vec<Vec<i64>> = b.data.iter().map(tch::Tensor::size).collect();
    assert_eq!(
        shapes,
        vec![vec![2, 3, 4, 4], vec![2, 3, 4, 4], vec![2, 3, 2, 2]]
    );
    assert_eq!(markers(&b.data[2]), vec![2.0, 12.0]);
    assert_eq!(ints(&b.label[0]), vec![0, 100, 1, 101, 2, 102]);
    assert_eq!(ints(&b.data_idx[0]), vec![0, 1, 0, 1, 0, 1]);

    // VISSL's MultiDimensionalTensor: zero padding to 4x4, mask true on the padding.
    let b = collate(
        "multicrop_collator",
        "{create_multidimensional_tensor: true}",
        &input,
    );
    assert_eq!(b.data[0].size(), vec![6, 3, 4, 4]);
    assert_eq!(b.data[1].size(), vec![6, 4, 4]);
    let padded = floats(&b.data[0]);
    let mask = ints(&b.data[1]);
    let image4 = &padded[4 * 48..5 * 48]; // crop 2 of sample 0
    assert_eq!(image4[0], 2.0);
    assert_eq!(image4[3], 0.0, "column 3 is padding");
    assert_eq!(&mask[4 * 16..4 * 16 + 4], &[0, 0, 1, 1]);
    assert!(
        mask[..4 * 16].iter().all(|&m| m == 0),
        "full-size crops have no padding"
    );
}

#[test]
fn default_collate_transposes_the_sample_lists() {
    let input = samples(2, 2, |_| 1);
    let b = collate("default_collate", "{}", &input);
    assert_eq!(b.data.len(), 2);
    assert_eq!(b.data[0].size(), vec![2, 3, 1, 1]);
    assert_eq!(markers(&b.data[0]), vec![0.0, 10.0]);
    assert_eq!(markers(&b.data[1]), vec![1.0, 11.0]);
    assert_eq!(
        b.label.iter().map(ints).collect::<Vec<_>>(),
        vec![vec![0, 100], vec![1, 101]]
    );
    assert_eq!(
        b.data_valid.iter().map(ints).collect::<Vec<_>>(),
        vec![vec![1, 1], vec![1, 1]]
    );
    assert_eq!(
        b.data_idx.iter().map(ints).collect::<Vec<_>>(),
        vec![vec![0, 1], vec![0, 1]]
    );
}

#[test]
fn siamese_puts_each_samples_towers_together() {
    let mut input = samples(2, 3, |_| 2);
    input[1].data_valid = vec![false; 3];
    let b = collate("siamese_collator", "{}", &input);
    assert_eq!(b.data[0].size(), vec![6, 3, 2, 2]);
    assert_eq!(markers(&b.data[0]), vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0]);
    assert_eq!(ints(&b.label[0]), vec![0, 100]);
    assert_eq!(b.data_valid[0].kind(), Kind::Bool);
    assert_eq!(ints(&b.data_valid[0]), vec![1, 0]);
    assert!(b.data_idx.is_empty());
}

#[test]
fn moco_splits_query_and_key_crops() {
    let input = samples(3, 2, |_| 2);
    let c = collators::build("moco_collator", &serde_yaml::Mapping::new()).unwrap();
    assert_eq!(c.data_keys(), &["data", "data_momentum"]);
    let b = c.collate(&input).unwrap();
    assert_eq!(markers(&b.data[0]), vec![0.0, 10.0, 20.0]);
    assert_eq!(markers(&b.data[1]), vec![1.0, 11.0, 21.0]);
    assert_eq!(b.label[0].size(), vec![3, 2]);
    assert_eq!(ints(&b.label[0]), vec![0, 1, 100, 101, 200, 201]);
    assert_eq!(ints(&b.data_idx[0]), vec![0, 0, 1, 1, 2, 2]);
    let err = collators::build("moco_collator", &serde_yaml::Mapping::new())
        .unwrap()
        .collate(&samples(2, 1, |_| 2))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("moco_collator") && err.contains("two entries"),
        "{err}"
    );
}

#[test]
fn patch_and_image_separates_the_image_from_its_patches() {
    let input = samples(2, 4, |e| if e == 0 { 4 } else { 2 });
    let b = collate("patch_and_image_collator", "{}", &input);
    assert_eq!(b.data[0].size(), vec![2, 3, 4, 4]);
    assert_eq!(markers(&b.data[0]), vec![0.0, 10.0]);
    assert_eq!(b.data[1].size(), vec![6, 3, 2, 2]);
    assert_eq!(markers(&b.data[1]), vec![1.0, 2.0, 3.0, 11.0, 12.0, 13.0]);
    assert_eq!(ints(&b.label[0]), vec![0, 100]);
    assert_eq!(b.data_valid[0].kind(), Kind::Bool);
}

#[test]
fn targets_one_hot_marks_positives_negatives_and_unknowns() {
    let mut input = samples(2, 1, |_| 1);
    input[0].label = vec![1, 3, -(4 + 1)]; // positives 1, 3; negative 4
    input[1].label = vec![0, -1]; // positive 0, then negative 0 (negatives win, as in VISSL)
    let b = collate(
        "targets_one_hot_default_collator",
        "{num_classes: 5}",
        &input,
    );
    assert_eq!(b.label[0].size(), vec![2, 5]);
    assert_eq!(ints(&b.label[0]), vec![-1, 1, -1, 1, 0, 0, -1, -1, -1, -1]);
    assert_eq!(b.data[0].size(), vec![2, 3, 1, 1]);

    let mut bad = samples(1, 1, |_| 1);
    bad[0].label = vec![5];
    let err = collators::build(
        "targets_one_hot_default_collator",
        &serde_yaml::from_str("{num_classes: 5}").unwrap(),
    )
    .unwrap()
    .collate(&bad)
    .unwrap_err()
    .to_string();
    assert!(err.contains("num_classes 5"), "{err}");
    let err = collators::build(
        "targets_one_hot_default_collator",
        &serde_yaml::Mapping::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("num_classes"), "{err}");
}

#[test]
fn errors_name_the_collator_and_the_problem() {
    let err = collators::build("swav_magic", &serde_yaml::Mapping::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("swav_magic") && err.contains("simclr_collator"),
        "{err}"
    );
    let err = collators::build(
        "simclr_collator",
        &serde_yaml::from_str("{num_crops: 2}").unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("simclr_collator") && err.contains("num_crops"),
        "{err}"
    );

    let mut mixed = samples(3, 2, |_| 2);
    mixed[2].data[1] = Item::Tensor(filled(3, 3, 3, 0.0));
    let err = collators::build("simclr_collator", &serde_yaml::Mapping::new())
        .unwrap()
        .collate(&mixed)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("simclr_collator")
            && err.contains("sample 2 entry 1")
            && err.contains("[3, 3, 3]"),
        "{err}"
    );

    let mut image = samples(1, 1, |_| 2);
    image[0].data[0] = Item::Image(image::RgbImage::new(2, 2));
    let err = collators::build("default_collate", &serde_yaml::Mapping::new())
        .unwrap()
        .collate(&image)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ToTensor"), "{err}");
    assert_eq!(collators::names().len(), 7);
}
