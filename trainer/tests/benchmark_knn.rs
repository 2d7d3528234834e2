//! `vissl benchmark knn` as a `Benchmark` pod runs it: weights from an S3 training's CHECKPOINT.DIR, results
//! to S3 (moto), the Kubernetes termination message and its 4096-byte cut, exit codes of a missing
//! checkpoint and a bad config, and 2 Gloo ranks giving the 1-rank result.

mod storage_common;

use std::path::Path;
use std::sync::Mutex;
use storage_common::*;

const BUCKET: &str = "vissl-bench";

/// The tests start several processes each; on a 2-core machine they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Train the quickstart model for 2 steps (64 images, batch 32) into `checkpoint_dir`.
fn train_tiny(checkpoint_dir: &str, env: &[(&str, String)]) {
    let mut args = strings(&[
        "train",
        "config=pretrain/simclr/quick_cpu_fmnist",
        "config.DATA.TRAIN.DATA_LIMIT=64",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32",
        "config.OPTIMIZER.num_epochs=1",
    ]);
    args.push(format!("config.CHECKPOINT.DIR={checkpoint_dir}"));
    let (out, text) = run(vissl(&args, env));
    assert!(out.status.success(), "training failed:\n{text}");
}

/// `vissl benchmark knn` on 200 train and 100 test images with `weights`, plus `extra`; the default
/// output goes under `scratch`.
fn knn_args(weights: &str, scratch: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = strings(&[
        "benchmark",
        "knn",
        "config=benchmark/nearest_neighbor/quick_cpu_fmnist_knn",
        "config.DATA.TRAIN.DATA_LIMIT=200",
        "config.DATA.TEST.DATA_LIMIT=100",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=50",
        "config.DATA.TEST.BATCHSIZE_PER_REPLICA=50",
        "config.NEAREST_NEIGHBOR.TOPK=20",
    ]);
    args.push(format!("config.MODEL.WEIGHTS_INIT.PARAMS_FILE={weights}"));
    args.push(format!("config.CHECKPOINT.DIR={}", scratch.display()));
    args.extend(strings(extra));
    args
}

fn knn_ok(args: &[String], env: &[(&str, String)]) -> String {
    let (out, text) = run(vissl(args, env));
    assert!(out.status.success(), "benchmark failed:\n{text}");
    text
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

fn read_json(path: &Path) -> serde_json::Value {
    json(&std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())))
}

/// (top1, top5) of every result row.
fn accuracies(report: &serde_json::Value) -> Vec<(f64, f64)> {
    report["results"]
        .as_array()
        .expect("a `results` array")
        .iter()
        .map(|r| (r["top1"].as_f64().unwrap(), r["top5"].as_f64().unwrap()))
        .collect()
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[test]
fn weights_and_results_round_trip_through_s3_and_match_a_local_copy() {
    let _serial = serial();
    let moto = start_moto();
    let env = s3_env(moto.address);
    create_bucket(moto.address, BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let run_url = format!("s3://{BUCKET}/runs/tiny");
    train_tiny(&run_url, &env);
    // 64 images in batches of 32: the newest checkpoint is the one after step 2.
    let newest = "runs/tiny/checkpoint_iter000000002";
    let keys = list_keys(moto.address, BUCKET, "runs/tiny/");
    assert!(
        keys.contains(&format!("{newest}/manifest.json")),
        "{keys:?}"
    );

    // From the CHECKPOINT.DIR URL, results to S3, the termination message to a file.
    let message_path = tmp.path().join("termination-log");
    let output_url = format!("s3://{BUCKET}/results/knn.json");
    let args = knn_args(
        &run_url,
        tmp.path(),
        &[
            "--output",
            &output_url,
            "--termination-message",
            message_path.to_str().unwrap(),
        ],
    );
    let text = knn_ok(&args, &env);
    assert!(text.contains(&format!("results: {output_url}")), "{text}");
    let report = json(&s3_get(moto.address, BUCKET, "results/knn.json"));
    assert_eq!(report["benchmark"], "knn");
    assert_eq!(report["weights"], format!("s3://{BUCKET}/{newest}"));
    assert_eq!(report["train_samples"], 200);
    assert_eq!(report["test_samples"], 100);
    assert!(report["seconds"].as_f64().unwrap() > 0.0, "{report}");
    let rows = report["results"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{report}");
    assert_eq!(rows[0]["features"], "trained");
    assert_eq!(rows[0]["layer"], "res5avg");
    assert_eq!(rows[0]["k"], 20);
    let from_s3 = accuracies(&report);
    let (top1, top5) = from_s3[0];
    // Ten classes: a trained trunk beats chance; 100% on 100 queries would mean a leak.
    assert!(top1 > 20.0 && top1 < 100.0 && top5 >= top1, "{report}");

    // The termination message: one compact line, the output URL, the rows rounded to two decimals.
    let raw = std::fs::read_to_string(&message_path).unwrap();
    assert!(
        !raw.contains('\n') && !raw.contains(": "),
        "not compact: {raw}"
    );
    let message = json(raw.as_bytes());
    assert_eq!(
        message,
        serde_json::json!({
            "benchmark": "knn",
            "output": output_url,
            "results": [{"features": "trained", "layer": "res5avg", "k": 20,
                         "top1": round2(top1), "top5": round2(top5)}],
        })
    );

    // The same checkpoint copied to disk gives the same accuracies, and so does its model file by URL.
    let local_run = tmp.path().join("local-run");
    for key in keys.iter().filter(|k| k.starts_with(newest)) {
        let dest = local_run.join(key.strip_prefix("runs/tiny/").unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(&dest, s3_get(moto.address, BUCKET, key)).unwrap();
    }
    let local_out = tmp.path().join("local.json");
    knn_ok(
        &knn_args(
            local_run.to_str().unwrap(),
            tmp.path(),
            &["--output", local_out.to_str().unwrap()],
        ),
        &[],
    );
    let local = read_json(&local_out);
    assert_eq!(accuracies(&local), from_s3);
    assert_eq!(
        local["weights"],
        local_run
            .join("checkpoint_iter000000002")
            .display()
            .to_string()
    );

    let file_url = format!("s3://{BUCKET}/{newest}/model.safetensors");
    let file_out = tmp.path().join("file.json");
    knn_ok(
        &knn_args(
            &file_url,
            tmp.path(),
            &["--output", file_out.to_str().unwrap()],
        ),
        &env,
    );
    let by_file = read_json(&file_out);
    assert_eq!(accuracies(&by_file), from_s3);
    assert_eq!(by_file["weights"], file_url);
}

#[test]
fn a_missing_checkpoint_or_a_bad_config_exits_permanently_and_leaves_no_message() {
    let _serial = serial();
    let moto = start_moto();
    let env = s3_env(moto.address);
    create_bucket(moto.address, BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let message_path = tmp.path().join("termination-log");
    let message_arg = ["--termination-message", message_path.to_str().unwrap()];

    let missing = format!("s3://{BUCKET}/runs/never-trained");
    let (out, text) = run(vissl(&knn_args(&missing, tmp.path(), &message_arg), &env));
    assert_eq!(out.status.code(), Some(65), "{text}");
    assert!(
        text.contains(&missing) && text.contains("no verified checkpoint"),
        "{text}"
    );

    let (out, text) = run(vissl(
        &knn_args("ftp://host/ckpt", tmp.path(), &message_arg),
        &env,
    ));
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(text.contains("ftp://host/ckpt"), "{text}");

    let mut args = knn_args(&missing, tmp.path(), &message_arg);
    args.push("config.NEAREST_NEIGHBOR.SIGMAA=0.1".into());
    let (out, text) = run(vissl(&args, &env));
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(text.contains("SIGMAA"), "{text}");

    assert!(
        !message_path.exists(),
        "a failed benchmark wrote a termination message"
    );
}

#[test]
fn a_long_termination_message_keeps_the_first_rows_within_4096_bytes() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let message_path = tmp.path().join("termination-log");
    let output = tmp.path().join("knn.json");
    let ks: Vec<String> = (1..=40).map(|k| k.to_string()).collect();
    let topk = format!("config.NEAREST_NEIGHBOR.TOPK=[{}]", ks.join(","));
    let args = knn_args(
        "unused",
        tmp.path(),
        &[
            "--random-init",
            "--baselines",
            &topk,
            "--output",
            output.to_str().unwrap(),
            "--termination-message",
            message_path.to_str().unwrap(),
        ],
    );
    knn_ok(&args, &[]);
    let report = read_json(&output);
    let all = report["results"].as_array().unwrap();
    // random_init and raw_pixels, 40 values of k each.
    assert_eq!(all.len(), 80);
    assert_eq!(report["weights"], serde_json::Value::Null);
    let raw = std::fs::read_to_string(&message_path).unwrap();
    assert!(raw.len() <= 4096, "{} bytes", raw.len());
    let message = json(raw.as_bytes());
    assert_eq!(message["truncated"], true);
    assert_eq!(message["output"], output.display().to_string());
    let kept = message["results"].as_array().unwrap();
    assert!(kept.len() > 20 && kept.len() < 80, "{} rows", kept.len());
    for (short, full) in kept.iter().zip(all) {
        assert_eq!(short["features"], full["features"]);
        assert_eq!(short["k"], full["k"]);
        assert_eq!(short["top1"].as_f64(), full["top1"].as_f64().map(round2));
        assert_eq!(short["top5"].as_f64(), full["top5"].as_f64().map(round2));
    }
    // Not cut more than needed: the next row would not have fitted.
    let next = serde_json::to_string(&all[kept.len()]).unwrap();
    assert!(raw.len() + next.len() + 1 > 4096, "{} bytes", raw.len());
}

/// Features, labels and indices of a split written with `--save-features`.
fn saved_features(dir: &Path, split: &str) -> [tch::Tensor; 3] {
    let path = dir.join(format!("{split}_trained_res5avg.safetensors"));
    let tensors = tch::Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    ["features", "targets", "inds"].map(|name| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{} has no `{name}`", path.display()))
            .1
            .shallow_clone()
    })
}

#[test]
fn two_gloo_ranks_give_the_one_rank_features_and_accuracies() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    train_tiny(run_dir.to_str().unwrap(), &[]);
    // Odd sizes and batches that do not divide them: shards differ in length and the sampler pads.
    let sizes = [
        "config.DATA.TRAIN.DATA_LIMIT=101",
        "config.DATA.TEST.DATA_LIMIT=51",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
        "config.DATA.TEST.BATCHSIZE_PER_REPLICA=16",
        "config.NEAREST_NEIGHBOR.TOPK=[5,20]",
    ];
    let benchmark = |nproc: usize| {
        let out = tmp.path().join(format!("nproc{nproc}"));
        let message = out.join("termination-log");
        let mut args = knn_args(
            run_dir.to_str().unwrap(),
            tmp.path(),
            &[
                "--output",
                out.join("knn.json").to_str().unwrap(),
                "--save-features",
                out.join("features").to_str().unwrap(),
                "--termination-message",
                message.to_str().unwrap(),
            ],
        );
        args.extend(strings(&sizes));
        args.push(format!("config.DISTRIBUTED.NUM_PROC_PER_NODE={nproc}"));
        std::fs::create_dir_all(&out).unwrap();
        let text = knn_ok(&args, &[("OMP_NUM_THREADS", "1".into())]);
        (
            read_json(&out.join("knn.json")),
            read_json(&message),
            out,
            text,
        )
    };
    let (one, one_message, one_dir, _) = benchmark(1);
    let (two, two_message, two_dir, text) = benchmark(2);
    assert!(
        text.contains("starting workers"),
        "not distributed:\n{text}"
    );
    assert_eq!(two["train_samples"], 101);
    assert_eq!(two["test_samples"], 51);
    assert_eq!(accuracies(&two).len(), 2);
    assert_eq!(accuracies(&two), accuracies(&one));
    assert_eq!(two_message["results"], one_message["results"]);
    for (split, n) in [("train", 101), ("test", 51)] {
        let [f1, t1, i1] = saved_features(&one_dir.join("features"), split);
        let [f2, t2, i2] = saved_features(&two_dir.join("features"), split);
        assert_eq!(
            Vec::<i64>::try_from(&i2).unwrap(),
            (0..n).collect::<Vec<i64>>(),
            "{split}: every sample once, in index order"
        );
        assert_eq!(i1, i2);
        assert_eq!(t1, t2, "{split} labels");
        assert_eq!(f1.size(), f2.size());
        let diff = (&f1 - &f2).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{split} features differ by {diff}");
    }
}
