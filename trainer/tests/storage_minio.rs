//! Against MinIO, which (unlike moto) checks request signatures: wrong credentials fail the run at start,
//! before any training step, with the store and the reason named; the right ones train and checkpoint.

mod storage_common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use storage_common::*;

const BUCKET: &str = "vissl-minio";

/// The MinIO binary `scripts/setup` builds (or `VISSL_MINIO`).
fn minio_binary() -> PathBuf {
    if let Ok(path) = std::env::var("VISSL_MINIO") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.cache/bin/minio"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup (it builds MinIO), or set VISSL_MINIO",
        path.display()
    );
    path
}

fn start_minio(data: &std::path::Path) -> Server {
    let port = free_port();
    let mut command = Command::new(minio_binary());
    command
        .args([
            "server",
            "--quiet",
            "--address",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--console-address", &format!("127.0.0.1:{}", free_port())])
        .arg(data)
        .env("MINIO_ROOT_USER", ACCESS_KEY)
        .env("MINIO_ROOT_PASSWORD", SECRET_KEY)
        .env("MINIO_BROWSER", "off");
    start_server(command, SocketAddr::from(([127, 0, 0, 1], port)), "minio")
}

/// Create the bucket with a signed request (boto3 from the test venv, which moto brings along).
fn create_bucket_signed(endpoint: SocketAddr) {
    let script = format!(
        "import boto3\n\
         s3 = boto3.client('s3', endpoint_url='http://{endpoint}', aws_access_key_id='{ACCESS_KEY}',\n\
                           aws_secret_access_key='{SECRET_KEY}', region_name='{REGION}')\n\
         s3.create_bucket(Bucket='{BUCKET}')\n"
    );
    let status = Command::new(venv_tool("python", "VISSL_PYTHON"))
        .args(["-c", &script])
        .status()
        .expect("running python");
    assert!(status.success(), "creating the bucket on MinIO failed");
}

fn train_args(dir: &str) -> Vec<String> {
    vec![
        "train".into(),
        "config=pretrain/simclr/quick_cpu_fmnist".into(),
        format!("config.CHECKPOINT.DIR={dir}"),
        "config.DATA.TRAIN.DATA_LIMIT=64".into(),
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32".into(),
        "config.OPTIMIZER.num_epochs=1".into(),
        "config.STORAGE.CONNECT_TIMEOUT_SEC=2.0".into(),
    ]
}

#[test]
fn wrong_credentials_fail_before_the_first_step_and_right_ones_train() {
    let data = tempfile::tempdir().unwrap();
    let minio = start_minio(data.path());
    create_bucket_signed(minio.address);
    let url = format!("s3://{BUCKET}/runs/creds");

    let mut wrong = s3_env(minio.address);
    for (key, value) in wrong.iter_mut() {
        if *key == "AWS_SECRET_ACCESS_KEY" {
            *value = "not-the-secret".into();
        }
    }
    let (out, text) = run(vissl(&train_args(&url), &wrong));
    assert!(
        !out.status.success(),
        "a run with a wrong secret key succeeded:\n{text}"
    );
    assert!(
        text.contains("CHECKPOINT.DIR") && text.contains(&url),
        "{text}"
    );
    assert!(
        text.contains("SignatureDoesNotMatch")
            || text.contains("403")
            || text.contains("Forbidden"),
        "the error should carry the store's refusal:\n{text}"
    );
    assert!(
        !text.contains("iter 1/"),
        "training started before the credentials were checked:\n{text}"
    );

    let (out, text) = run(vissl(&train_args(&url), &s3_env(minio.address)));
    assert!(out.status.success(), "{text}\nminio log:\n{}", minio.log());
    assert!(text.contains("checkpoint: s3://"), "{text}");
}
