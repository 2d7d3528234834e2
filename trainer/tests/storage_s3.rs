//! Checkpoints and data in a real S3-compatible server (moto, started on 127.0.0.1 by each test): save,
//! resume, retention, an outage in the middle of an upload, a corrupted object, bad credentials and
//! endpoints, multipart uploads, and training images read from a bucket.

mod storage_common;

use std::path::Path;
use std::time::{Duration, Instant};
use storage_common::*;
use vissl_trainer::storage::{self, Location, Storage, StorageError, StorageSettings};

const BUCKET: &str = "vissl-test";

/// A tiny SimCLR run of the quickstart model: 48 Fashion-MNIST images in batches of 8, 6 steps per epoch.
fn train_args(dir: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "config=pretrain/simclr/quick_cpu_fmnist",
        "config.DATA.TRAIN.DATA_LIMIT=48",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.NUM_DATALOADER_WORKERS=2",
        "config.OPTIMIZER.num_epochs=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("config.CHECKPOINT.DIR={dir}"));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Train, expecting success; returns the summary JSON and the output.
fn train_ok(
    dir: &str,
    extra: &[&str],
    env: &[(&str, String)],
    summary: &Path,
) -> (serde_json::Value, String) {
    let mut args = train_args(dir, extra);
    args.push(format!("--summary-json={}", summary.display()));
    let (out, text) = run(vissl(&args, env));
    assert!(out.status.success(), "training failed:\n{text}");
    let json = serde_json::from_slice(&std::fs::read(summary).unwrap()).unwrap();
    (json, text)
}

fn losses(summary: &serde_json::Value) -> Vec<(u64, f64)> {
    serde_json::from_value(summary["losses"].clone()).unwrap()
}

/// Checkpoint folders (by iteration) under `prefix` that have a manifest.
fn complete_checkpoints(moto: std::net::SocketAddr, prefix: &str) -> Vec<u64> {
    let mut found: Vec<u64> = list_keys(moto, BUCKET, prefix)
        .iter()
        .filter_map(|k| k.strip_suffix("/manifest.json"))
        .filter_map(|f| {
            f.rsplit('/')
                .next()?
                .strip_prefix("checkpoint_iter")?
                .parse()
                .ok()
        })
        .collect();
    found.sort_unstable();
    found
}

#[test]
fn checkpoints_save_resume_and_prune_in_s3_exactly_as_on_disk() {
    let moto = start_moto();
    let env = s3_env(moto.address);
    let tmp = tempfile::tempdir().unwrap();
    let summary = tmp.path().join("summary.json");
    let url = format!("s3://{BUCKET}/runs/a");
    let extra = [
        "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=2",
        "config.CHECKPOINT.KEEP_LAST_K=2",
    ];

    // A bucket that does not exist is an error at start, naming CHECKPOINT.DIR.
    let mut args = train_args(&url, &extra);
    args.push("--stop-after-iterations=4".into());
    let (out, text) = run(vissl(&args, &env));
    assert!(!out.status.success());
    assert!(
        text.contains("CHECKPOINT.DIR") && !text.contains("iter 1/"),
        "{text}"
    );

    create_bucket(moto.address, BUCKET);
    let local = tmp.path().join("local");
    let (straight, _) = train_ok(local.to_str().unwrap(), &extra, &[], &summary);

    let (first, _) = train_ok(
        &url,
        &[&extra[..], &["--stop-after-iterations=4"]].concat(),
        &env,
        &summary,
    );
    assert_eq!(complete_checkpoints(moto.address, "runs/a/"), vec![2, 4]);
    let (second, text) = train_ok(&url, &extra, &env, &summary);
    assert!(text.contains("resumed"), "{text}");
    let resumed = [losses(&first), losses(&second)].concat();
    assert_eq!(
        resumed,
        losses(&straight),
        "a run resumed from S3 must match a straight run bitwise"
    );
    assert_eq!(
        second["last_checkpoint"],
        format!("{url}/checkpoint_iter000000012")
    );
    // KEEP_LAST_K=2: only the two newest complete checkpoints remain, each with its files.
    assert_eq!(complete_checkpoints(moto.address, "runs/a/"), vec![10, 12]);
    let keys = list_keys(moto.address, BUCKET, "runs/a/");
    for it in [10, 12] {
        for file in [
            "model.safetensors",
            "optimizer.safetensors",
            "manifest.json",
        ] {
            let key = format!("runs/a/checkpoint_iter{it:09}/{file}");
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
    }
    assert!(
        keys.iter()
            .all(|k| k.contains("iter000000010") || k.contains("iter000000012")),
        "older checkpoints were not deleted: {keys:?}"
    );
}

#[test]
fn an_outage_mid_upload_keeps_training_and_leaves_no_partial_checkpoint() {
    let moto = start_moto();
    create_bucket(moto.address, BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let summary = tmp.path().join("summary.json");
    // The size of one checkpoint, from a local save of the same model.
    let local = tmp.path().join("local");
    let mut args = train_args(local.to_str().unwrap(), &[]);
    args.push("--stop-after-iterations=1".into());
    let (out, text) = run(vissl(&args, &[]));
    assert!(out.status.success(), "{text}");
    let ckpt_bytes: u64 = std::fs::read_dir(local.join("checkpoint_iter000000001"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();

    // Cut the link a quarter into the second checkpoint's upload, for 3 seconds: longer than the
    // request retries and upload attempts configured below take to give up.
    let proxy = Proxy::start(
        moto.address,
        Some(ckpt_bytes + ckpt_bytes / 4),
        Duration::from_secs(3),
    );
    let url = format!("s3://{BUCKET}/runs/outage");
    let (result, text) = train_ok(
        &url,
        &[
            "config.OPTIMIZER.num_epochs=3",
            "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1",
            "config.STORAGE.MAX_RETRIES=1",
            "config.STORAGE.RETRY_TIMEOUT_SEC=1.0",
            "config.STORAGE.INITIAL_BACKOFF_SEC=0.2",
            "config.STORAGE.UPLOAD_ATTEMPTS=2",
            "config.STORAGE.CONNECT_TIMEOUT_SEC=1.0",
            "config.STORAGE.REQUEST_TIMEOUT_SEC=10.0",
        ],
        &s3_env(proxy.address),
        &summary,
    );
    assert_eq!(proxy.cuts.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(result["iterations"], 18, "{text}");
    assert!(text.contains("was not saved"), "{text}");
    assert!(text.contains("retrying"), "{text}");
    let complete = complete_checkpoints(moto.address, "runs/outage/");
    assert!(
        !complete.contains(&2),
        "the interrupted checkpoint became visible: {complete:?}"
    );
    assert_eq!(complete.last(), Some(&18), "{complete:?}\n{text}");
    // Every visible manifest vouches for files that are there and whole: resume from the newest.
    let keys = list_keys(moto.address, BUCKET, "runs/outage/");
    for it in &complete {
        for file in ["model.safetensors", "optimizer.safetensors"] {
            let key = format!("runs/outage/checkpoint_iter{it:09}/{file}");
            assert!(keys.contains(&key), "{key} missing");
        }
    }
    let (resumed, text) = train_ok(
        &url,
        &[
            "config.OPTIMIZER.num_epochs=4",
            "--stop-after-iterations=19",
        ],
        &s3_env(moto.address),
        &summary,
    );
    assert_eq!(losses(&resumed).first().map(|l| l.0), Some(19), "{text}");
}

#[test]
fn a_corrupted_object_is_skipped_on_resume() {
    let moto = start_moto();
    create_bucket(moto.address, BUCKET);
    let env = s3_env(moto.address);
    let tmp = tempfile::tempdir().unwrap();
    let summary = tmp.path().join("summary.json");
    let url = format!("s3://{BUCKET}/runs/corrupt");
    train_ok(&url, &["--stop-after-iterations=6"], &env, &summary);
    train_ok(&url, &["--stop-after-iterations=9"], &env, &summary);
    // Flip one byte in the middle of the newest checkpoint's model file, in the bucket.
    let key = "runs/corrupt/checkpoint_iter000000009/model.safetensors";
    let mut bytes = s3_get(moto.address, BUCKET, key);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    s3_put(moto.address, BUCKET, key, bytes);

    let (resumed, text) = train_ok(&url, &[], &env, &summary);
    assert_eq!(losses(&resumed).first().map(|l| l.0), Some(7), "{text}");
    assert!(
        text.contains(&format!(
            "skipping damaged checkpoint {url}/checkpoint_iter000000009"
        )) && text.contains("checksum mismatch"),
        "{text}"
    );
}

#[test]
fn missing_credentials_or_an_unreachable_store_fail_before_the_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("s3://{BUCKET}/runs/x");
    let started = Instant::now();
    let (out, text) = run(vissl(&train_args(&url, &[]), &[]));
    assert!(!out.status.success());
    assert!(
        text.contains("CHECKPOINT.DIR")
            && text.contains("no credentials")
            && text.contains("AWS_ACCESS_KEY_ID"),
        "{text}"
    );
    assert!(!text.contains("iter 1/"), "{text}");

    // Right credentials, nobody listening at the endpoint: a quick, clear error.
    let nobody = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (out, text) = run(vissl(
        &train_args(&url, &["config.STORAGE.CONNECT_TIMEOUT_SEC=1.0"]),
        &s3_env(nobody),
    ));
    assert!(!out.status.success());
    assert!(
        text.contains("CHECKPOINT.DIR") && text.contains("access check"),
        "{text}"
    );
    assert!(!text.contains("iter 1/"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(60));
    // An unsupported scheme names the supported ones.
    let (out, text) = run(vissl(&train_args("ftp://host/x", &[]), &[]));
    assert!(!out.status.success());
    assert!(text.contains("s3://, gs://, az://, file://"), "{text}");
    drop(tmp);
}

/// Images of two classes as PNG bytes, distinct per index.
fn png(index: usize) -> Vec<u8> {
    let img = image::RgbImage::from_fn(32, 32, |x, y| {
        let v = ((x as usize * 7 + y as usize * 13 + index * 31) % 256) as u8;
        image::Rgb([v, v.wrapping_add((index as u8).wrapping_mul(40)), 255 - v])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn training_reads_its_images_from_a_bucket_as_from_a_folder() {
    let moto = start_moto();
    create_bucket(moto.address, BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("images");
    for i in 0..16 {
        let class = if i % 2 == 0 { "cat" } else { "dog" };
        let name = format!("{class}/img{i:02}.png");
        let bytes = png(i);
        std::fs::create_dir_all(folder.join(class)).unwrap();
        std::fs::write(folder.join(&name), &bytes).unwrap();
        s3_put(moto.address, BUCKET, &format!("data/{name}"), bytes);
    }
    let cache = tmp.path().join("cache");
    let run_on = |data_path: String, dir: &Path, env: &[(&str, String)]| {
        let data = format!("config.DATA.TRAIN.DATA_PATHS=[{data_path}]");
        let cache_dir = format!("config.STORAGE.CACHE_DIR={}", cache.display());
        let extra = [
            "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
            "config.DATA.TRAIN.DATASET_NAMES=[]",
            "config.DATA.TRAIN.DATA_LIMIT=-1",
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
            "config.OPTIMIZER.num_epochs=1",
            data.as_str(),
            cache_dir.as_str(),
        ];
        let summary = dir.join("summary.json");
        train_ok(dir.join("ckpt").to_str().unwrap(), &extra, env, &summary).0
    };
    let local_dir = tmp.path().join("local");
    let remote_dir = tmp.path().join("remote");
    std::fs::create_dir_all(&local_dir).unwrap();
    std::fs::create_dir_all(&remote_dir).unwrap();
    let from_folder = run_on(folder.display().to_string(), &local_dir, &[]);
    let from_bucket = run_on(
        format!("s3://{BUCKET}/data"),
        &remote_dir,
        &s3_env(moto.address),
    );
    assert_eq!(from_bucket["iterations"], 2);
    assert_eq!(
        losses(&from_bucket),
        losses(&from_folder),
        "same images, same order, same losses"
    );
    let cached = walk_files(&cache.join("s3").join(BUCKET).join("data"));
    assert_eq!(
        cached, 16,
        "every image is cached locally after the first read"
    );
}

fn walk_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| {
                    if e.path().is_dir() {
                        walk_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn multipart_uploads_round_trip_and_an_interrupted_one_leaves_nothing() {
    let moto = start_moto();
    create_bucket(moto.address, BUCKET);
    // This test alone changes this process's environment and storage settings; the others run
    // `vissl` with an explicit environment.
    let proxy = Proxy::start(moto.address, None, Duration::from_secs(2));
    for (key, value) in s3_env(proxy.address) {
        std::env::set_var(key, value);
    }
    storage::configure(StorageSettings {
        multipart_part_bytes: 5 << 20,
        max_retries: 1,
        retry_timeout: Duration::from_secs(1),
        upload_attempts: 1,
        connect_timeout: Duration::from_secs(1),
        ..StorageSettings::default()
    });
    let root = Storage::open(&Location::parse(&format!("s3://{BUCKET}/mp")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // 12 MiB: three parts of 5, 5 and 2 MiB.
    let data: Vec<u8> = (0..12u32 << 20)
        .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
        .collect();
    let file = tmp.path().join("big.bin");
    std::fs::write(&file, &data).unwrap();
    assert_eq!(root.upload("big.bin", &file).unwrap(), data.len() as u64);
    assert_eq!(root.get_bytes("big.bin").unwrap(), data);
    assert_eq!(
        root.list_files().unwrap(),
        vec![("big.bin".to_string(), data.len() as u64)]
    );

    // A fresh proxy that cuts the link 7 MiB into the next upload, in its second part.
    drop(proxy);
    let proxy = Proxy::start(moto.address, Some(7 << 20), Duration::from_secs(2));
    for (key, value) in s3_env(proxy.address) {
        std::env::set_var(key, value);
    }
    // New settings drop the cached client that points at the old proxy.
    storage::configure(StorageSettings {
        multipart_part_bytes: 5 << 20,
        max_retries: 0,
        retry_timeout: Duration::from_secs(1),
        upload_attempts: 1,
        connect_timeout: Duration::from_secs(1),
        ..StorageSettings::default()
    });
    let root = Storage::open(&Location::parse(&format!("s3://{BUCKET}/mp")).unwrap()).unwrap();
    let err = root.upload("partial.bin", &file).unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("s3://vissl-test/mp/partial.bin"),
        "{err}"
    );
    wait_for("the outage to end", Duration::from_secs(10), || {
        !proxy.is_down()
    });
    assert!(matches!(
        root.get_bytes("partial.bin"),
        Err(StorageError::NotFound { .. })
    ));
    assert!(!root.exists("partial.bin").unwrap());
    assert_eq!(
        list_keys(moto.address, BUCKET, "mp/"),
        vec!["mp/big.bin".to_string()],
        "no partial object is visible"
    );
}
