//! Runs the float64 numpy reference scripts beside this file and moves tensors to and from JSON.
//! Included by the `losses*` / `optim*` integration tests with `#[path]`.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use tch::{Kind, Tensor};

/// The Python with numpy: `VISSL_PYTHON`, else the workspace's `.venv`.
pub fn python() -> String {
    std::env::var("VISSL_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python").into())
}

/// Runs `tests/reference/<script>` with `input` on stdin and returns its JSON output.
pub fn run_reference(script: &str, input: &Value) -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/").to_string() + script;
    let mut child = Command::new(python())
        .arg("-B") // no __pycache__ beside the scripts
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} (set VISSL_PYTHON): {e}", python()));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(input.to_string().as_bytes())
        .expect("write reference input");
    drop(stdin);
    let out = child.wait_with_output().expect("reference script runs");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference output is JSON")
}

/// A tensor as `{"shape", "data"}` (values as f64).
pub fn to_json(t: &Tensor) -> Value {
    let flat = t.to_kind(Kind::Double).flatten(0, -1);
    let data: Vec<f64> = Vec::try_from(&flat).expect("tensor data");
    json!({ "shape": t.size(), "data": data })
}

/// The `{"shape", "data"}` of a reference output as a float64 tensor.
pub fn from_json(v: &Value) -> Tensor {
    let shape: Vec<i64> = serde_json::from_value(v["shape"].clone()).expect("shape");
    let data: Vec<f64> = serde_json::from_value(v["data"].clone()).expect("data");
    Tensor::from_slice(&data).view(shape.as_slice())
}

/// Asserts `actual` is within `rtol * max|expected| + atol` of `expected`, elementwise.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, rtol: f64, atol: f64) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let actual = actual.to_kind(Kind::Double);
    let scale = expected.abs().max().double_value(&[]);
    let worst = (&actual - expected).abs().max().double_value(&[]);
    assert!(
        worst <= rtol * scale + atol,
        "{what}: max abs difference {worst:e} exceeds {rtol:e} x {scale:e} + {atol:e}\nactual {actual}\nexpected {expected}"
    );
}

/// Deterministic test data in [-1, 1) from a seed (no libtorch RNG, so the values are stable).
pub fn uniform(shape: &[i64], seed: u64, kind: Kind) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f64> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_slice(&data).view(shape).to_kind(kind)
}
