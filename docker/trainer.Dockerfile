# syntax=docker/dockerfile:1
# The trainer image: the `vissl` binary, the configs it resolves `config=...` against, and the pinned torch's
# libraries (CUDA 13.0 build, the same torch==2.11.0 wheel the repository builds against).
#
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/vissl-rs/trainer:0.1.0 .
#
# The operator runs it as `vissl wait-for-master` (init container) and `vissl train config=/etc/vissl/config.yaml`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS torch
# The full wheel brings the NVIDIA runtime libraries (cuBLAS, cuDNN, NCCL, ...) as pip dependencies.
RUN pip install --no-cache-dir torch==2.11.0 \
 && ln -s "$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')" /opt/torch

FROM torch AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config libgloo-dev \
 && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:$PATH LIBTORCH=/opt/torch LIBTORCH_BYPASS_VERSION_CHECK=1
WORKDIR /src
COPY . .
# NCCL for DISTRIBUTED.BACKEND=nccl (the CUDA headers come with the wheel's nvidia-* packages).
RUN cargo build --release --bin vissl --features vissl-trainer/nccl

FROM torch
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home vissl
COPY --from=build /src/target/release/vissl /opt/vissl/bin/vissl
COPY configs /opt/vissl/configs
ENV PATH=/opt/vissl/bin:$PATH VISSL_CONFIGS=/opt/vissl/configs LD_LIBRARY_PATH=/opt/torch/lib
USER 10001
WORKDIR /home/vissl
ENTRYPOINT ["vissl"]
CMD ["--help"]
