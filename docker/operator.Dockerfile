# syntax=docker/dockerfile:1
# The operator image: one static binary (no libtorch) plus the configs it validates SSLTraining configs against.
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/vissl-rs/operator:0.1.0 .

FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl \
 && apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p vissl-operator --target x86_64-unknown-linux-musl

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/vissl-operator /vissl-operator
COPY configs /configs
ENV VISSL_CONFIGS=/configs
USER 65532:65532
ENTRYPOINT ["/vissl-operator"]
CMD ["run"]
