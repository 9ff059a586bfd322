# syntax=docker/dockerfile:1
#
# The warren image: `warren` (agent, CA, CLI) and `warren-cni` (the CNI plugin that
# `warren cni install` copies onto the node). Build from the repository root:
#   docker build -t ghcr.io/warren-mesh/warren:dev .

# The workspace's rust-version is 1.95 (Cargo.toml).
FROM rust:1.95-bookworm AS builder

# What `cargo xtask setup` installs to build the eBPF programs (agent/build.rs): the
# nightly toolchain with rust-src (for -Z build-std) and bpf-linker 0.10, which links
# with the LLVM that nightly ships (LLVM 22; bpf-linker 0.11+ wants LLVM 23). The build
# itself needs no Debian packages beyond the image's (gcc, the linker).
RUN rustup toolchain install nightly --profile minimal --component rust-src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    cargo +nightly install bpf-linker@0.10.0 --locked

WORKDIR /src
COPY . .
# target/ is a cache mount, so the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p warren --bins \
    && mkdir -p /out \
    && cp target/release/warren target/release/warren-cni /out/

FROM debian:bookworm-slim

# iptables and nftables: the iptables redirect mode (either backend); iproute2: netns
# and addresses; tcpdump: `warren verify`; ca-certificates: the system's root certificates.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iptables nftables iproute2 ca-certificates tcpdump \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /out/warren /out/warren-cni /usr/local/bin/

# No ENTRYPOINT: the manifests give the command (`warren agent`, `warren ca serve`,
# `warren cni install`).
CMD ["warren", "--help"]
