# Entry points for developers and CI. Every recipe runs in one bash shell with scripts/env.sh sourced, so
# cargo finds libtorch (LIBTORCH) and tests find the reference interpreter (VISSL_PYTHON).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.NOTPARALLEL:
.DEFAULT_GOAL := help

ENV := source scripts/env.sh
VISSL := ./target/release/vissl
QUICKSTART_CONFIG ?= pretrain/simclr/quick_cpu_fmnist
QUICKSTART_KNN_CONFIG ?= benchmark/nearest_neighbor/quick_cpu_fmnist_knn
CORPUS_DIR ?= data/bench_corpus
BENCH_PIPELINES ?= simclr swav
BENCH_ARGS ?=

.PHONY: help setup setup-wallpapers setup-bench build quickstart test test-scripts corpus bench-data

help:
	@echo "make setup       install libtorch (.venv), Gloo headers, Fashion-MNIST, rustfmt/clippy (scripts/setup)"
	@echo "make build       release build of the vissl binary"
	@echo "make quickstart  setup, build, SimCLR on Fashion-MNIST on the CPU, then its kNN benchmark"
	@echo "make test        setup, cargo test (release), clippy -D warnings, fmt --check, script tests"
	@echo "make corpus      JPEG benchmark corpus in $(CORPUS_DIR) from Debian's wallpaper photographs"
	@echo "make bench-data  corpus + .venv-bench (~4.7 GB torch/torchvision), then vissl bench data"

setup:
	scripts/setup

setup-wallpapers:
	scripts/setup --wallpapers

setup-bench:
	scripts/setup --bench

build: setup
	$(ENV)
	cargo build --release --bin vissl

# A fresh run each time: the previous quickstart checkpoints are removed first (the trainer itself would
# resume from them and, being finished, do nothing).
quickstart: build
	$(ENV)
	rm -rf checkpoints/quick_cpu_fmnist checkpoints/quick_cpu_fmnist_knn
	$(VISSL) train config=$(QUICKSTART_CONFIG)
	$(VISSL) benchmark knn config=$(QUICKSTART_KNN_CONFIG) --baselines

# Release profile: the numeric tests are slow unoptimised, and it reuses the target that `make build` warmed.
# The end-to-end tests (crate tests/) run the real `vissl` and `vissl-operator` binaries, so they are built first.
test: setup test-scripts
	$(ENV)
	cargo build --workspace --release --bins
	cargo test --workspace --release
	cargo clippy --workspace --release -- -D warnings
	cargo fmt --all --check

test-scripts: setup
	$(ENV)
	bash -n scripts/setup scripts/env.sh .ci/run
	if command -v shellcheck >/dev/null; then shellcheck -x scripts/setup scripts/env.sh .ci/run; fi
	"$$VISSL_PYTHON" -m unittest discover --start-directory scripts/tests

corpus: setup-wallpapers
	$(ENV)
	"$$VISSL_PYTHON" scripts/make_bench_corpus.py --out $(CORPUS_DIR)

bench-data: setup-bench corpus build
	$(ENV)
	for pipeline in $(BENCH_PIPELINES); do
		$(VISSL) bench data config=bench/$${pipeline}_pipeline $(BENCH_ARGS)
	done
