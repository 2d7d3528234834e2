# shellcheck shell=bash
# Environment for building and running vissl-rs against the libtorch that `scripts/setup` installs.
# Usage (bash): `source scripts/env.sh`. Other shells: `eval "$(scripts/setup --print-env)"`.
# Only computes paths (no Python start-up, no network), so sourcing it in every make recipe is free.

VISSL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VISSL_ROOT

# The venv's python minor version is whatever `python3` was at setup time, so find the folder instead of naming it.
vissl_site_packages=""
for vissl_candidate in "$VISSL_ROOT"/.venv/lib/python3.*/site-packages; do
    if [ -d "$vissl_candidate/torch" ]; then
        vissl_site_packages="$vissl_candidate"
    fi
done

if [ -n "$vissl_site_packages" ]; then
    export LIBTORCH="$vissl_site_packages/torch"
    # Binaries get an rpath to $LIBTORCH/lib from trainer/build.rs, and libtorch_cpu finds libcudart/libcupti
    # through its own $ORIGIN runpath, so linking needs nothing more. Doctests and any crate without that build
    # script get no rpath, so the loader path is still set for them.
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$LIBTORCH/lib:"*) ;;
        *) export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
else
    echo "scripts/env.sh: no libtorch under $VISSL_ROOT/.venv; run scripts/setup first" >&2
fi

# tch 0.24 targets torch 2.11.0, the pinned wheel, which has no build-version file for tch to check anyway;
# the bypass lets LIBTORCH point at a neighbouring libtorch release (a GPU image's own torch, say) that has one.
export LIBTORCH_BYPASS_VERSION_CHECK=1
# Tests compute numpy float64 and Pillow references with this interpreter.
export VISSL_PYTHON="$VISSL_ROOT/.venv/bin/python"
# `vissl bench data` runs bench/torchvision_reference.py with this interpreter (created by `scripts/setup --bench`).
export VISSL_BENCH_PYTHON="$VISSL_ROOT/.venv-bench/bin/python"

# `vissl` by name, as the README writes it, once `make build` has built it.
case ":$PATH:" in
    *":$VISSL_ROOT/target/release:"*) ;;
    *) export PATH="$VISSL_ROOT/target/release:$PATH" ;;
esac

unset vissl_site_packages vissl_candidate
