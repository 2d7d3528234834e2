// Builds the c10d bridge (trainer/csrc/) against the libtorch that tch links, and gives our binaries an
// rpath to it (torch-sys adds none, so they would not run without LD_LIBRARY_PATH).
//
// The `nccl` feature also compiles csrc/nccl_backend.cpp and links torch_cuda/c10_cuda. It needs the
// CUDA libtorch (the PyPI wheel is one) plus CUDA and NCCL headers: by default the `include` folders of
// the `nvidia-*` wheels next to torch (nvidia-cuda-runtime, nvidia-cuda-crt, nvidia-cuda-cccl,
// nvidia-nccl) and /usr/local/cuda/include; `VISSL_CUDA_INCLUDE` (':'-separated) replaces the search.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VISSL_CUDA_INCLUDE");
    println!("cargo:rerun-if-changed=csrc");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        panic!(
            "LIBTORCH is not set: point it at the torch package of the venv, e.g. \
             LIBTORCH=$PWD/.venv/lib/python3.11/site-packages/torch (see DESIGN.md)"
        );
    };
    let libtorch = PathBuf::from(libtorch);
    println!(
        "cargo:rustc-link-arg=-Wl,-rpath,{}",
        libtorch.join("lib").display()
    );
    let nccl = std::env::var_os("CARGO_FEATURE_NCCL").is_some();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .include("csrc")
        // libtorch's headers warn a lot under -Wall; our own file is kept clean by review.
        .warnings(false)
        .file("csrc/dist_bridge.cpp");
    if nccl {
        build
            .define("VISSL_WITH_NCCL", None)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .file("csrc/nccl_backend.cpp");
        for dir in cuda_include_dirs(&libtorch) {
            build.include(dir);
        }
    }
    build.compile("vissl_dist_bridge");

    if nccl {
        println!(
            "cargo:rustc-link-search=native={}",
            libtorch.join("lib").display()
        );
        // The bridge is the only user of these libraries; --as-needed would drop them before it links.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// Include folders holding the CUDA runtime, crt, cccl and NCCL headers.
fn cuda_include_dirs(libtorch: &Path) -> Vec<PathBuf> {
    if let Ok(list) = std::env::var("VISSL_CUDA_INCLUDE") {
        return std::env::split_paths(&list).collect();
    }
    let mut dirs = Vec::new();
    if let Some(site_packages) = libtorch.parent() {
        let nvidia = site_packages.join("nvidia");
        // Wheels put headers at nvidia/<pkg>/include (CUDA 12) or nvidia/<cuXX>/include (CUDA 13).
        for entry in std::fs::read_dir(&nvidia).into_iter().flatten().flatten() {
            let include = entry.path().join("include");
            if include.is_dir() {
                dirs.push(include);
            }
        }
    }
    let system = PathBuf::from("/usr/local/cuda/include");
    if system.is_dir() {
        dirs.push(system);
    }
    if dirs.is_empty() {
        panic!(
            "the `nccl` feature needs CUDA and NCCL headers: install the nvidia-cuda-runtime, \
             nvidia-cuda-crt, nvidia-cuda-cccl and nvidia-nccl wheels next to torch, or set VISSL_CUDA_INCLUDE"
        );
    }
    dirs.sort();
    dirs
}
