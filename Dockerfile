# syntax=docker/dockerfile:1
#
# Herald: one image, one binary (/usr/local/bin/herald); the Helm chart picks
# the role per Deployment with `args` (api, worker tasks, worker webhooks,
# worker mail, operator).
#
#   docker build -t ghcr.io/herald-dev/herald:0.1.0 .
#
# Needs BuildKit (the default builder of Docker 23+) for the cache mounts.

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and build output between builds;
# the binary is copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin herald \
    && install -D -m 0755 target/release/herald /out/herald

# glibc, libgcc and CA certificates, no shell; runs as uid/gid 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="herald" \
      org.opencontainers.image.description="Webhook and notification delivery on NATS JetStream" \
      org.opencontainers.image.source="https://github.com/herald-dev/herald" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/herald /usr/local/bin/herald
USER 65532:65532
# The base image's own working directory, stated so that the test image
# (scripts/build-images.sh takes USER, WORKDIR, EXPOSE, ENTRYPOINT and LABEL
# from this stage) matches it; docs/images.md says how the two differ.
WORKDIR /home/nonroot
# API (herald api --listen 0.0.0.0:9000) and the health/metrics port of the
# workers and the operator (HERALD_HEALTH__LISTEN=0.0.0.0:8081).
EXPOSE 9000 8081
ENTRYPOINT ["/usr/local/bin/herald"]
