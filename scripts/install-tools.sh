#!/usr/bin/env bash
# Installs the pinned external programs Herald's tests run against (nats-server,
# mailpit, a Python venv with the reference Standard Webhooks verifier and the
# schemathesis API fuzzer, Jaeger as the trace collector, promtool for the
# metrics and alert checks) and the cargo-deny linter `make lint` runs into a
# cache outside the repository, so every clone and every CI run shares one build.
#
# Idempotent: a tool already at its pinned version is left alone, so a second
# run takes seconds. Override the cache with HERALD_TOOLS.
set -euo pipefail

NATS_SERVER_VERSION=v2.15.2
MAILPIT_VERSION=v1.33.1
STANDARDWEBHOOKS_VERSION=1.1.0
SCHEMATHESIS_VERSION=4.32.5
CARGO_DENY_VERSION=0.20.2
# Prometheus 3.16.0: its Go module numbers releases v0.3xx.y. Its go.mod
# declares `go 1.26.7`, so go 1.26.0 to 1.26.6 refuse it (saying so).
PROMETHEUS_VERSION=v0.316.0
PROMTOOL_RELEASE=3.16.0
# Jaeger v2.13.0, which ships from the module's v1.76.0 tag; built from the
# wrapper module tools/observability (its go.mod says why), which must
# require this version.
JAEGER_VERSION=v1.76.0
JAEGER_RELEASE=v2.13.0
# The Go modules above declare `go 1.26.0` or later; GOTOOLCHAIN=local means
# we never download a toolchain, so the installed go must be at least this.
GO_MIN_MINOR=26

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OBSERVABILITY_MODULE=$ROOT/tools/observability
TOOLS=${HERALD_TOOLS:-$HOME/.cache/herald-tools}
BIN=$TOOLS/bin
STAMPS=$TOOLS/stamps
VENV=$TOOLS/venv
# promtool and jaeger are built here, checked, then renamed into $BIN: a test
# running the old binary meanwhile keeps it, a failed check leaves $BIN alone.
STAGING=$TOOLS/staging

log() { printf 'install-tools: %s\n' "$*"; }
die() { printf 'install-tools: ERROR: %s\n' "$*" >&2; exit 1; }

# Debian packages are the fallback for a missing go or python venv support; on
# anything else (or without root) we stop and say what is missing.
apt_install() {
    if ! command -v apt-get >/dev/null || [ "$(id -u)" -ne 0 ]; then
        die "need $* but cannot apt-get install it here (not Debian or not root): install it and re-run"
    fi
    log "apt-get install $*"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_go() {
    # The official tarball lives here and is not always on a non-login PATH.
    if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
        PATH=/usr/local/go/bin:$PATH
    fi
    command -v go >/dev/null || apt_install golang-go
    command -v go >/dev/null || die "go not found after installing golang-go"
    local minor
    minor=$(GOTOOLCHAIN=local go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
    if [ "$minor" -lt "$GO_MIN_MINOR" ]; then
        die "$(go version) is too old: nats-server $NATS_SERVER_VERSION and mailpit $MAILPIT_VERSION need go >= 1.$GO_MIN_MINOR"
    fi
}

go_install() { # <module>@<version>
    ensure_go
    log "go install $1 (this takes a few minutes the first time)"
    GOTOOLCHAIN=local GOBIN=$BIN go install "$1"
}

# The version a Go binary was built from, read from its embedded build info
# (`go version -m`), which works without running the program.
go_module_version() { # <binary> <module path>
    [ -x "$1" ] || return 0
    command -v go >/dev/null || return 0
    go version -m "$1" 2>/dev/null | awk -v m="$2" '$1 == "mod" && $2 == m { print $3 }'
}

install_nats_server() {
    local have=""
    [ -x "$BIN/nats-server" ] && have=$("$BIN/nats-server" --version 2>/dev/null || true)
    if [ "$have" = "nats-server: $NATS_SERVER_VERSION" ]; then
        log "nats-server $NATS_SERVER_VERSION already installed"
    else
        go_install "github.com/nats-io/nats-server/v2@$NATS_SERVER_VERSION"
        have=$("$BIN/nats-server" --version)
        [ "$have" = "nats-server: $NATS_SERVER_VERSION" ] || die "installed nats-server reports '$have'"
        log "installed nats-server $NATS_SERVER_VERSION"
    fi
    touch "$STAMPS/nats-server-$NATS_SERVER_VERSION"
}

install_mailpit() {
    # Never run `mailpit version`: it calls home to check for updates.
    local stamp=$STAMPS/mailpit-$MAILPIT_VERSION
    if [ -f "$stamp" ] && [ -x "$BIN/mailpit" ]; then
        log "mailpit $MAILPIT_VERSION already installed"
        return
    fi
    ensure_go
    if [ "$(go_module_version "$BIN/mailpit" github.com/axllent/mailpit)" = "$MAILPIT_VERSION" ]; then
        log "mailpit $MAILPIT_VERSION found without a stamp (build info matches), recording it"
    else
        go_install "github.com/axllent/mailpit@$MAILPIT_VERSION"
        [ "$(go_module_version "$BIN/mailpit" github.com/axllent/mailpit)" = "$MAILPIT_VERSION" ] \
            || die "installed mailpit is not $MAILPIT_VERSION"
        log "installed mailpit $MAILPIT_VERSION"
    fi
    touch "$stamp"
}

# The venv's pinned Python packages; the stamp names them all, so changing a
# pin (or adding a package) makes existing caches install it.
PYTHON_PACKAGES=("standardwebhooks==$STANDARDWEBHOOKS_VERSION" "schemathesis==$SCHEMATHESIS_VERSION")
PYTHON_IMPORTS='import standardwebhooks, schemathesis'

install_venv() {
    local stamp=$STAMPS/venv-standardwebhooks-$STANDARDWEBHOOKS_VERSION-schemathesis-$SCHEMATHESIS_VERSION
    # The import check also catches a venv whose base python has since vanished.
    if [ -f "$stamp" ] && "$VENV/bin/python" -c "$PYTHON_IMPORTS" 2>/dev/null; then
        log "python venv with ${PYTHON_PACKAGES[*]} already installed"
        return
    fi
    # A working venv from an older stamp is upgraded in place (tests running
    # meanwhile keep their verifier); anything else is rebuilt from scratch.
    if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        command -v python3 >/dev/null || apt_install python3 python3-venv
        command -v python3 >/dev/null || die "python3 not found after installing it"
        rm -rf "$VENV" # a venv without a working python may be half-built: start clean
        if ! python3 -m venv "$VENV" 2>/dev/null; then
            # Debian's python3 ships venv's ensurepip separately.
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV" || die "python3 -m venv failed even with python3-venv installed"
        fi
    fi
    log "pip install ${PYTHON_PACKAGES[*]} (a minute the first time)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PYTHON_PACKAGES[@]}" \
        || die "pip install ${PYTHON_PACKAGES[*]} failed"
    "$VENV/bin/python" -c "$PYTHON_IMPORTS" || die "the venv cannot import its packages"
    [ -x "$VENV/bin/schemathesis" ] || die "schemathesis installed no $VENV/bin/schemathesis"
    touch "$stamp"
    log "installed python venv with ${PYTHON_PACKAGES[*]}"
}

# rust-toolchain.toml names a release (say 1.95.0), and rustup would try to
# download a toolchain of that name even when the installed `stable` is that
# very release; this machine reaches no download server. So when the pinned
# release is missing and `stable` is it, the stable toolchain is linked under
# the pinned name; otherwise rustup installs it as usual (or says why not).
ensure_pinned_toolchain() {
    command -v rustup >/dev/null || return 0
    local pinned
    pinned=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")
    [ -n "$pinned" ] || die "rust-toolchain.toml names no channel"
    if RUSTUP_TOOLCHAIN=$pinned rustc --version >/dev/null 2>&1; then
        return 0
    fi
    local stable
    stable=$(RUSTUP_TOOLCHAIN=stable rustc --version 2>/dev/null | awk '{print $2}')
    if [ "$stable" = "$pinned" ]; then
        # `rustup toolchain link` refuses a release's name, so the link goes
        # into rustup's toolchains directory itself.
        local sysroot triple
        sysroot=$(RUSTUP_TOOLCHAIN=stable rustc --print sysroot)
        triple=$(RUSTUP_TOOLCHAIN=stable rustc -vV | sed -n 's/^host: //p')
        log "linking toolchain $pinned-$triple to the installed stable ($pinned)"
        ln -sfn "$sysroot" "$(dirname "$sysroot")/$pinned-$triple"
    else
        log "rustup toolchain install $pinned (stable here is ${stable:-missing})"
        rustup toolchain install "$pinned" --profile minimal --component rustfmt,clippy
    fi
}

# `make test` checks formatting and lints: the toolchain needs both.
ensure_rust_components() {
    command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs)"
    local component
    for component in rustfmt clippy; do
        local probe=fmt
        [ "$component" = clippy ] && probe=clippy
        if ! cargo "$probe" --version >/dev/null 2>&1; then
            command -v rustup >/dev/null || die "cargo $probe is missing and there is no rustup to add $component"
            log "rustup component add $component"
            rustup component add "$component"
        fi
    done
}

install_cargo_deny() {
    local have=""
    [ -x "$BIN/cargo-deny" ] && have=$("$BIN/cargo-deny" --version 2>/dev/null || true)
    if [ "$have" = "cargo-deny $CARGO_DENY_VERSION" ]; then
        log "cargo-deny $CARGO_DENY_VERSION already installed"
    else
        # Its own target directory (CARGO_DENY_BUILD_DIR, else a temporary
        # one), removed afterwards: the build is only needed for the one
        # binary it leaves in $BIN, and never mixes with the project's.
        local target=${CARGO_DENY_BUILD_DIR:-}
        [ -n "$target" ] || target=$(mktemp -d "${TMPDIR:-/tmp}/herald-cargo-deny.XXXXXX")
        log "cargo install cargo-deny $CARGO_DENY_VERSION (a few minutes the first time)"
        if ! CARGO_TARGET_DIR=$target cargo install --locked "cargo-deny@$CARGO_DENY_VERSION" --root "$TOOLS"; then
            rm -rf "$target"
            die "cargo install cargo-deny@$CARGO_DENY_VERSION failed"
        fi
        rm -rf "$target"
        have=$("$BIN/cargo-deny" --version)
        [ "$have" = "cargo-deny $CARGO_DENY_VERSION" ] || die "installed cargo-deny reports '$have'"
        log "installed cargo-deny $CARGO_DENY_VERSION"
    fi
    touch "$STAMPS/cargo-deny-$CARGO_DENY_VERSION"
}

# promtool and jaeger leave a stamp holding their recipe (version, build
# flags, the wrapper's go.sum): a binary is current when its stamp says
# exactly the recipe this script would build.
stamp_current() { # <tool> <version> <recipe>
    [ -x "$BIN/$1" ] && [ -f "$STAMPS/$1-$2" ] && [ "$(cat "$STAMPS/$1-$2")" = "$3" ]
}

write_stamp() { # <tool> <version> <recipe>
    rm -f "$STAMPS/$1"-*
    printf '%s\n' "$3" >"$STAMPS/$1-$2"
}

# Runs a build niced (it takes minutes and both cores), logging its wall
# time and peak RSS (GNU time, when there is one).
timed_build() { # <what> <command...>
    local what=$1 started=$SECONDS report
    shift
    if [ -x /usr/bin/time ]; then
        report=$(mktemp)
        if ! /usr/bin/time -o "$report" -f '%e s wall, %U s user, peak RSS %M KiB' nice -n 10 "$@"; then
            rm -f "$report"
            die "building $what failed (see the go output above)"
        fi
        log "built $what: $(tail -n 1 "$report")"
        rm -f "$report"
    else
        nice -n 10 "$@" || die "building $what failed (see the go output above)"
        log "built $what in $((SECONDS - started)) s"
    fi
}

# promtool (`check metrics`, `check rules`, `test rules`): Prometheus' go.mod
# has no replace directives, so it is `go install`ed, with the version
# ldflags of upstream's .promu.yml so that `promtool --version` names it.
install_promtool() {
    local v=github.com/prometheus/common/version
    local ldflags="-s -w -X $v.Version=$PROMTOOL_RELEASE -X $v.Revision=module-proxy-$PROMETHEUS_VERSION -X $v.Branch=HEAD -X $v.BuildUser=herald"
    local recipe="github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION tags=netgo trimpath ldflags=[$ldflags]"
    if stamp_current promtool "$PROMETHEUS_VERSION" "$recipe"; then
        log "promtool $PROMTOOL_RELEASE already installed"
        return
    fi
    ensure_go
    log "go install github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION (about 10 minutes on 2 busy cores the first time)"
    # `go install pkg@version` ignores the current module; run it from the
    # cache so no go.mod around us matters.
    timed_build "promtool $PROMTOOL_RELEASE" env -C "$TOOLS" GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOBIN="$STAGING" \
        go install -trimpath -buildvcs=false -tags netgo -ldflags "$ldflags" \
        "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
    local have
    have=$("$STAGING/promtool" --version 2>&1) || die "the built promtool does not run"
    have=${have%%$'\n'*}
    [[ $have == "promtool, version $PROMTOOL_RELEASE "* ]] || die "the built promtool reports '$have', not $PROMTOOL_RELEASE"
    mv -f "$STAGING/promtool" "$BIN/promtool"
    write_stamp promtool "$PROMETHEUS_VERSION" "$recipe"
    log "installed promtool $PROMTOOL_RELEASE"
}

# Jaeger v2 (cmd/jaeger), from the wrapper module, with the build-info
# ldflags of upstream's Makefile (scripts/makefiles/BuildInfo.mk); the date
# is the release's, so the same inputs give the same binary.
install_jaeger() {
    [ -f "$OBSERVABILITY_MODULE/go.sum" ] || die "the wrapper module $OBSERVABILITY_MODULE is missing"
    ensure_go
    local have
    have=$(cd "$OBSERVABILITY_MODULE" && GOTOOLCHAIN=local GOWORK=off go list -mod=readonly -m -f '{{.Version}}' github.com/jaegertracing/jaeger) \
        || die "cannot read the version of Jaeger from $OBSERVABILITY_MODULE/go.mod"
    [ "$have" = "$JAEGER_VERSION" ] || die "$OBSERVABILITY_MODULE/go.mod requires Jaeger $have but this script pins $JAEGER_VERSION: update one to match the other"
    local date
    date=$(cd "$OBSERVABILITY_MODULE" && GOTOOLCHAIN=local GOWORK=off go list -mod=readonly -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' github.com/jaegertracing/jaeger) \
        || die "cannot read the release time of Jaeger $JAEGER_VERSION"
    local v=github.com/jaegertracing/jaeger/internal/version
    local ldflags="-s -w -X $v.commitSHA=module-proxy-$JAEGER_VERSION -X $v.latestVersion=$JAEGER_RELEASE -X $v.date=$date"
    local recipe
    recipe="github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION go.sum=$(sha256sum "$OBSERVABILITY_MODULE/go.sum" | cut -d' ' -f1) trimpath ldflags=[$ldflags]"
    if stamp_current jaeger "$JAEGER_VERSION" "$recipe"; then
        log "jaeger $JAEGER_RELEASE already installed"
        return
    fi
    log "building jaeger $JAEGER_RELEASE from $OBSERVABILITY_MODULE (about 12 minutes on 2 busy cores the first time)"
    # -mod=readonly: the committed go.sum must already cover the build; a
    # drifted go.mod fails here instead of being rewritten.
    timed_build "jaeger $JAEGER_RELEASE" env -C "$OBSERVABILITY_MODULE" GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 \
        go build -mod=readonly -trimpath -buildvcs=false -ldflags "$ldflags" \
        -o "$STAGING/jaeger" github.com/jaegertracing/jaeger/cmd/jaeger
    have=$("$STAGING/jaeger" version 2>/dev/null) || die "the built jaeger does not run"
    [[ $have == *"\"gitVersion\":\"$JAEGER_RELEASE\""* ]] || die "the built jaeger reports '$have', not $JAEGER_RELEASE"
    mv -f "$STAGING/jaeger" "$BIN/jaeger"
    write_stamp jaeger "$JAEGER_VERSION" "$recipe"
    log "installed jaeger $JAEGER_RELEASE"
}

mkdir -p "$BIN" "$STAMPS" "$STAGING"
ensure_pinned_toolchain
ensure_rust_components
log "tools directory: $TOOLS"
install_nats_server
install_mailpit
install_venv
install_cargo_deny
install_promtool
install_jaeger
log "done: nats-server $NATS_SERVER_VERSION, mailpit $MAILPIT_VERSION, standardwebhooks $STANDARDWEBHOOKS_VERSION, schemathesis $SCHEMATHESIS_VERSION, cargo-deny $CARGO_DENY_VERSION, promtool $PROMTOOL_RELEASE, jaeger $JAEGER_RELEASE"
