//! The dataset: DATA_LIMIT subsets against numpy, label types, several sources, transforms.

mod data_common;

use data_common::{marked_image, run_python, split_config, write_png, ToTensorJitter};
use vissl_trainer::data::dataset::{balanced_sub_sampling, unbalanced_sub_sampling, Dataset};
use vissl_trainer::data::{Item, Sample};

fn parse_rows(text: &str) -> Vec<Vec<usize>> {
    text.lines()
        .map(|l| l.split_whitespace().map(|v| v.parse().unwrap()).collect())
        .collect()
}

#[test]
fn unbalanced_subset_matches_numpy_random_choice() {
    let cases: [(usize, usize, usize, u64); 5] = [
        (10, 10, 0, 0),
        (1000, 37, 5, 1),
        (100_000, 50, 0, 12345),
        (7, 3, 2, 4_294_967_295),
        (1, 1, 0, 9),
    ];
    let args: Vec<String> = cases
        .iter()
        .map(|(n, k, s, seed)| format!("{n},{k},{s},{seed}"))
        .collect();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    // VISSL's unbalanced_sub_sampling, verbatim semantics.
    let reference = run_python(
        r#"
import sys
import numpy as np
for case in sys.argv[1:]:
    n, k, s, seed = map(int, case.split(","))
    np.random.seed(seed)
    print(*np.random.choice(n, size=s + k, replace=False)[s:])
"#,
        &arg_refs,
    );
    for ((n, k, s, seed), want) in cases.iter().zip(parse_rows(&reference)) {
        assert_eq!(
            unbalanced_sub_sampling(*n, *k, *s, *seed).unwrap(),
            want,
            "case {n},{k},{s},{seed}"
        );
    }
    assert!(unbalanced_sub_sampling(5, 6, 0, 0).is_err());
}

#[test]
fn balanced_subset_matches_vissl_balanced_sub_sampling() {
    let labels: Vec<i64> = (0..300)
        .map(|i| [3, 1, 4, 1, 5, 9, 2, 6][i % 8] * (1 + (i % 3) as i64))
        .collect();
    let text: Vec<String> = labels.iter().map(i64::to_string).collect();
    let reference = run_python(
        r#"
import sys
import numpy as np
labels = np.array([int(v) for v in sys.argv[1].split(",")])
def balanced(labels, num_samples, skip_samples, seed):
    groups = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    unique_labels = sorted(groups.keys())
    skip_quotient, skip_rest = divmod(skip_samples, len(unique_labels))
    sample_quotient, sample_rest = divmod(num_samples, len(unique_labels))
    np.random.seed(seed)
    for i, label in enumerate(unique_labels):
        label_indices = groups[label]
        n = sample_quotient + (1 if i < sample_rest else 0)
        s = skip_quotient + (1 if i < skip_rest else 0)
        groups[label] = np.random.choice(label_indices, size=s + n, replace=False)[s:]
    return np.concatenate([groups[label] for label in unique_labels])
print(*balanced(labels, 29, 0, 0))
print(*balanced(labels, 40, 13, 77))
"#,
        &[&text.join(",")],
    );
    let rows = parse_rows(&reference);
    assert_eq!(balanced_sub_sampling(&labels, 29, 0, 0).unwrap(), rows[0]);
    assert_eq!(balanced_sub_sampling(&labels, 40, 13, 77).unwrap(), rows[1]);
    assert!(
        balanced_sub_sampling(&labels, 3, 0, 0).is_err(),
        "fewer samples than classes"
    );
}

/// Two class folders of `n` images each, image `i` marked with `i` in its first pixel.
fn folder(root: &std::path::Path, n: usize, color: [u8; 3]) {
    for i in 0..n {
        let class = if i % 2 == 0 { "even" } else { "odd" };
        write_png(
            &root.join(format!("{class}/{i:03}.png")),
            &marked_image(2, 2, color, i as u8),
        );
    }
}

fn marker(s: &Sample, entry: usize) -> u8 {
    match &s.data[entry] {
        Item::Image(img) => img.get_pixel(0, 0)[0],
        Item::Tensor(_) => panic!("image expected"),
    }
}

#[test]
fn data_limit_picks_vissl_subset_and_labels_follow_it() {
    let tmp = tempfile::tempdir().unwrap();
    folder(tmp.path(), 20, [1, 2, 3]);
    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [disk_folder], DATA_PATHS: ['{}'], LABEL_SOURCES: [disk_folder], DATA_LIMIT: 6, \
          DATA_LIMIT_SAMPLING: {{SEED: 5, IS_BALANCED: false, SKIP_NUM_SAMPLES: 2}}}}",
        tmp.path().display()
    ));
    let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
    assert_eq!(ds.len(), 6);
    let subset = parse_rows(&run_python(
        "import numpy as np\nnp.random.seed(5)\nprint(*np.random.choice(20, size=8, replace=False)[2:])",
        &[],
    ))
    .remove(0);
    // ImageFolder order: class "even" (label 0) holds 000, 002, ...; "odd" (label 1) 001, 003, ...
    let source_marker = |k: usize| if k < 10 { 2 * k } else { 2 * (k - 10) + 1 };
    let mut recent = ds.recent_images();
    for (i, &k) in subset.iter().enumerate() {
        let s = ds.load(i, &mut recent).unwrap();
        assert_eq!(usize::from(marker(&s, 0)), source_marker(k));
        assert_eq!(s.label, vec![i64::from(k >= 10)]);
        assert_eq!(s.data_idx, vec![i as i64]);
    }
    assert!(ds.load(6, &mut recent).is_err(), "index past DATA_LIMIT");

    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [disk_folder], DATA_PATHS: ['{}'], LABEL_SOURCES: [disk_folder], DATA_LIMIT: 4, \
          DATA_LIMIT_SAMPLING: {{SEED: 0, IS_BALANCED: true, SKIP_NUM_SAMPLES: 0}}}}",
        tmp.path().display()
    ));
    let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
    assert_eq!(ds.sample_labels()[0], vec![0, 0, 1, 1]);
}

#[test]
fn several_sources_are_read_side_by_side_with_their_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    folder(&a, 4, [10, 0, 0]);
    folder(&b, 4, [20, 0, 0]);
    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [disk_folder, disk_folder], DATA_PATHS: ['{}', '{}'], LABEL_SOURCES: [disk_folder, disk_folder]}}",
        a.display(),
        b.display()
    ));
    let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
    let mut recent = ds.recent_images();
    let s = ds.load(3, &mut recent).unwrap();
    assert_eq!(s.data.len(), 2);
    assert_eq!((marker(&s, 0), marker(&s, 1)), (3, 3));
    assert_eq!(s.label, vec![1, 1]);
    assert_eq!(s.data_idx, vec![3, 3]);
    assert_eq!(s.data_valid, vec![true, true]);

    // Sources of different lengths cannot be read side by side.
    let c = tmp.path().join("c");
    folder(&c, 6, [0, 0, 0]);
    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [disk_folder, disk_folder], DATA_PATHS: ['{}', '{}']}}",
        a.display(),
        c.display()
    ));
    let err = Dataset::from_config("TRAIN", &cfg, None)
        .err()
        .expect("length mismatch")
        .to_string();
    assert!(
        err.contains("source 1") && err.contains('6') && err.contains('4'),
        "{err}"
    );
}

#[test]
fn label_types_sample_index_and_zero() {
    let cfg = split_config(
        "{DATA_SOURCES: [synthetic], LABEL_TYPE: sample_index, DEFAULT_GRAY_IMG_SIZE: 4}",
    );
    let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
    let mut recent = ds.recent_images();
    assert_eq!(ds.load(41, &mut recent).unwrap().label, vec![41]);
    let cfg =
        split_config("{DATA_SOURCES: [synthetic], LABEL_TYPE: zero, DEFAULT_GRAY_IMG_SIZE: 4}");
    let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
    assert_eq!(ds.load(41, &mut recent).unwrap().label, vec![0]);
    let cfg = split_config("{DATA_SOURCES: [synthetic], LABEL_TYPE: fancy}");
    let err = Dataset::from_config("TRAIN", &cfg, None)
        .err()
        .expect("bad label type")
        .to_string();
    assert!(err.contains("LABEL_TYPE") && err.contains("fancy"), "{err}");
}

#[test]
fn get_applies_the_transform_with_the_samples_own_random_stream() {
    let cfg = split_config("{DATA_SOURCES: [synthetic], DEFAULT_GRAY_IMG_SIZE: 4}");
    let ds = Dataset::from_config("TRAIN", &cfg, None).unwrap();
    let mut recent = ds.recent_images();
    let mut first_value = |index, epoch, seed| match &ds
        .get(index, epoch, seed, &ToTensorJitter, &mut recent)
        .unwrap()
        .data[0]
    {
        Item::Tensor(t) => t.data[0],
        Item::Image(_) => panic!("tensor expected"),
    };
    let base = first_value(7, 2, 11);
    assert_eq!(base, first_value(7, 2, 11));
    assert_ne!(base, first_value(8, 2, 11));
    assert_ne!(base, first_value(7, 3, 11));
    assert_ne!(base, first_value(7, 2, 12));
}
