#!/usr/bin/env bash
# Builds the images of the Kubernetes tests as OCI archives, without a
# container engine (scripts/oci-image.py writes the OCI layout itself):
#
#   localhost/herald               the release `herald` binary; user, entrypoint,
#                                  workdir, ports and labels taken from the
#                                  Dockerfile's last stage (docs/images.md)
#   localhost/nats-server          the pinned nats-server of scripts/install-tools.sh
#   localhost/mailpit              the pinned mailpit
#   localhost/herald-test-receiver the test webhook receiver (herald-testkit)
#
# Each holds its binary, exactly the shared libraries `ldd` lists for it, and
# a distroless-like non-root base (passwd/group with uid 65532, CA bundle,
# /tmp). The tag is a hash of everything that goes into the image, so an
# unchanged image is not rebuilt and a changed one gets a new tag.
#
# Archives go to $HERALD_IMAGES (default ~/.cache/herald-images), with
# images.json naming each image's ref and archive for the tests. Loading
# them is the test's job (`ctr images import`), never a registry pull.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${HERALD_TOOLS:-$HOME/.cache/herald-tools}
IMAGES=${HERALD_IMAGES:-$HOME/.cache/herald-images}
PYTHON=${PYTHON:-python3}

log() { printf 'build-images: %s\n' "$*"; }
die() { printf 'build-images: FAIL: %s\n' "$*" >&2; exit 1; }

for tool in nats-server mailpit; do
    [ -x "$TOOLS/bin/$tool" ] || die "$TOOLS/bin/$tool is missing: run make tools (scripts/install-tools.sh)"
done
mkdir -p "$IMAGES"

# Both binaries in one cargo invocation, so their dependencies are built
# once with the same features.
cargo build --release --locked -p herald --bin herald -p herald-testkit --bin herald-test-receiver
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps \
    | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
RELEASE=$TARGET_DIR/release

# The hash of an image's inputs: the writer, its arguments, and the content
# of every file that goes in (binaries, the libraries ldd resolves, the CA
# bundle, the Dockerfile).
image_key() { # <binary> <args...>
    local binary=$1
    shift
    {
        sha256sum scripts/oci-image.py Dockerfile /etc/ssl/certs/ca-certificates.crt "$binary"
        ldd "$binary" 2>/dev/null | grep -o '/[^ ]*' | xargs -r readlink -f | xargs -r sha256sum
        printf '%s\n' "$@"
    } | sha256sum | cut -c1-12
}

IMAGES_JSON=()
build_image() { # <name> <binary> <oci-image.py args...>
    local name=$1 binary=$2
    shift 2
    local tag archive
    tag=$(image_key "$binary" "$@")
    archive=$IMAGES/$name-$tag.oci.tar
    if [ -f "$archive" ]; then
        log "localhost/$name:$tag is up to date ($(du -h "$archive" | cut -f1))"
    else
        local started=$SECONDS
        "$PYTHON" scripts/oci-image.py --ref "localhost/$name:$tag" --out "$archive" --nonroot-base "$@" >/dev/null
        log "built localhost/$name:$tag in $((SECONDS - started))s ($(du -h "$archive" | cut -f1))"
    fi
    # Older archives of this image are never used again. (Twelve ?: not
    # herald-test-receiver-<tag> when cleaning up after herald.)
    find "$IMAGES" -maxdepth 1 -name "$name-????????????.oci.tar" ! -name "$name-$tag.oci.tar" -delete
    IMAGES_JSON+=("\"$name\": {\"ref\": \"localhost/$name:$tag\", \"archive\": \"$archive\"}")
}

build_image herald "$RELEASE/herald" \
    --from-dockerfile Dockerfile --binary "$RELEASE/herald"

build_image nats-server "$TOOLS/bin/nats-server" \
    --user 65532:65532 --entrypoint '["/usr/local/bin/nats-server"]' \
    --cmd '["--jetstream", "--store_dir", "/data"]' \
    --file "$TOOLS/bin/nats-server:/usr/local/bin/nats-server:0755" --libs-of "$TOOLS/bin/nats-server" \
    --dir data:0755:65532 --expose 4222/tcp --expose 6222/tcp --expose 8222/tcp

# MP_DISABLE_VERSION_CHECK: mailpit must never call home from a test.
build_image mailpit "$TOOLS/bin/mailpit" \
    --user 65532:65532 --entrypoint '["/usr/local/bin/mailpit"]' \
    --env MP_DISABLE_VERSION_CHECK=true \
    --file "$TOOLS/bin/mailpit:/usr/local/bin/mailpit:0755" --libs-of "$TOOLS/bin/mailpit" \
    --expose 1025/tcp --expose 8025/tcp

build_image herald-test-receiver "$RELEASE/herald-test-receiver" \
    --user 65532:65532 --entrypoint '["/usr/local/bin/herald-test-receiver"]' \
    --file "$RELEASE/herald-test-receiver:/usr/local/bin/herald-test-receiver:0755" \
    --libs-of "$RELEASE/herald-test-receiver" --expose 8080/tcp

joined=$(printf ',\n  %s' "${IMAGES_JSON[@]}")
printf '{%s\n}\n' "${joined:1}" >"$IMAGES/images.json.partial"
mv "$IMAGES/images.json.partial" "$IMAGES/images.json"
log "done: $IMAGES/images.json"
