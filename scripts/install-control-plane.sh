#!/usr/bin/env bash
# Builds a Kubernetes control plane for tests, without Docker: pinned helm,
# etcd, kube-apiserver and kubectl, compiled from the Go module proxy into the
# same cache as scripts/install-tools.sh (`$HERALD_TOOLS/bin`, default
# ~/.cache/herald-tools). crates/herald-testkit's ControlPlane runs them on
# loopback the way controller-runtime's envtest does.
#
# etcd and kube-apiserver/kubectl cannot be `go install`ed (their go.mod files
# have replace directives), so they are built from the wrapper modules in
# tools/control-plane/{etcd,k8s}, whose committed go.mod and go.sum pin every
# dependency. helm has no replaces and is `go install`ed directly.
#
# Idempotent: each tool leaves a stamp in `$HERALD_TOOLS/stamps` holding its
# version, build flags and the hash of its wrapper's go.sum; a tool whose stamp
# matches is left alone, so a second run takes seconds. The first run takes a
# while: about 12 minutes on 2 cores with an empty Go build and module cache,
# 8 of them for kube-apiserver; its link step peaks at about 2.2 GiB RSS.
set -euo pipefail

HELM_VERSION=v4.3.2
ETCD_VERSION=v3.7.3
KUBERNETES_VERSION=v1.37.2
# All four modules declare `go 1.26.0`; GOTOOLCHAIN=local means we never
# download a toolchain, so the installed go must be at least this.
GO_MIN_MINOR=26

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
K8S_MODULE=$ROOT/tools/control-plane/k8s
ETCD_MODULE=$ROOT/tools/control-plane/etcd
TOOLS=${HERALD_TOOLS:-$HOME/.cache/herald-tools}
BIN=$TOOLS/bin
STAMPS=$TOOLS/stamps
# Binaries are built here, checked, then renamed into $BIN: a test running the
# old kube-apiserver meanwhile keeps it, and a failed check leaves $BIN alone.
STAGING=$TOOLS/staging

# Never fetch a newer toolchain behind our back, never let a go.work elsewhere
# join the wrapper modules, and build static binaries as upstream does.
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0

log() { printf 'install-control-plane: %s\n' "$*"; }
die() { printf 'install-control-plane: ERROR: %s\n' "$*" >&2; exit 1; }

ensure_go() {
    # The official tarball lives here and is not always on a non-login PATH.
    if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
        PATH=/usr/local/go/bin:$PATH
    fi
    command -v go >/dev/null || die "go not found: run scripts/install-tools.sh (make tools) or install go >= 1.$GO_MIN_MINOR"
    local minor
    minor=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
    if ! [ "$minor" -ge "$GO_MIN_MINOR" ] 2>/dev/null; then
        die "$(go version) is too old (or unparsable): helm, etcd and kubernetes need go >= 1.$GO_MIN_MINOR"
    fi
}

# The version a module is required at in a wrapper module's go.mod: the
# script's pins and the committed go.mod must agree, or we stop.
check_pin() { # <module dir> <module path> <expected version>
    local have
    have=$(cd "$1" && go list -mod=readonly -m -f '{{.Version}}' "$2") \
        || die "cannot read the version of $2 from $1/go.mod"
    [ "$have" = "$3" ] || die "$1/go.mod requires $2 $have but this script pins $3: update one to match the other"
}

# A stamp records how a binary was built; a tool is current when its binary
# is there and its stamp says exactly this recipe.
stamp_current() { # <tool> <version> <recipe>
    local stamp=$STAMPS/$1-$2
    [ -x "$BIN/$1" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$3" ]
}

write_stamp() { # <tool> <version> <recipe>
    rm -f "$STAMPS/$1"-*
    printf '%s\n' "$3" >"$STAMPS/$1-$2"
}

# Runs a build, logging its wall time and the peak RSS of its largest process
# (GNU time, when there is one).
timed() { # <what> <command...>
    local what=$1 started=$SECONDS report
    shift
    if [ -x /usr/bin/time ]; then
        report=$(mktemp)
        if ! /usr/bin/time -o "$report" -f '%e s wall, %U s user, peak RSS %M KiB' "$@"; then
            rm -f "$report"
            die "building $what failed (see the go output above)"
        fi
        log "built $what: $(tail -n 1 "$report")"
        rm -f "$report"
    else
        "$@" || die "building $what failed (see the go output above)"
        log "built $what in $((SECONDS - started)) s"
    fi
}

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

promote() { mv -f "$STAGING/$1" "$BIN/$1"; }

install_helm() {
    local ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
    ldflags+=" -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
    local recipe="helm.sh/helm/v4/cmd/helm@$HELM_VERSION trimpath ldflags=[$ldflags]"
    if stamp_current helm "$HELM_VERSION" "$recipe"; then
        log "helm $HELM_VERSION already installed"
        return
    fi
    log "go install helm.sh/helm/v4/cmd/helm@$HELM_VERSION (a few minutes the first time)"
    # `go install pkg@version` ignores the current module; run it from the
    # cache so no go.mod around us matters.
    timed "helm $HELM_VERSION" env -C "$TOOLS" GOBIN="$STAGING" \
        go install -trimpath -buildvcs=false -ldflags "$ldflags" \
        "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
    local have
    have=$("$STAGING/helm" version --template '{{.Version}}') || die "the built helm does not run"
    [ "$have" = "$HELM_VERSION" ] || die "the built helm reports '$have', not $HELM_VERSION"
    promote helm
    write_stamp helm "$HELM_VERSION" "$recipe"
    log "installed helm $HELM_VERSION"
}

install_etcd() {
    check_pin "$ETCD_MODULE" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
    # etcd's own build sets only the commit; its version is a constant.
    local ldflags="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=module-proxy-$ETCD_VERSION"
    local recipe="go.etcd.io/etcd/server/v3@$ETCD_VERSION go.sum=$(sha_of "$ETCD_MODULE/go.sum") trimpath ldflags=[$ldflags]"
    if stamp_current etcd "$ETCD_VERSION" "$recipe"; then
        log "etcd $ETCD_VERSION already installed"
        return
    fi
    log "building etcd $ETCD_VERSION from $ETCD_MODULE (a few minutes the first time)"
    # -mod=readonly: the committed go.sum must already cover the build; a
    # drifted go.mod fails here instead of being rewritten.
    timed "etcd $ETCD_VERSION" env -C "$ETCD_MODULE" \
        go build -mod=readonly -trimpath -buildvcs=false -ldflags "$ldflags" \
        -o "$STAGING/etcd" go.etcd.io/etcd/server/v3
    # Whole output, then its first line: `| head -n 1` would SIGPIPE etcd
    # and fail under pipefail.
    local have
    have=$("$STAGING/etcd" --version) || die "the built etcd does not run"
    have=${have%%$'\n'*}
    [ "$have" = "etcd Version: ${ETCD_VERSION#v}" ] || die "the built etcd reports '$have', not ${ETCD_VERSION#v}"
    promote etcd
    write_stamp etcd "$ETCD_VERSION" "$recipe"
    log "installed etcd $ETCD_VERSION"
}

# kube-apiserver and kubectl, with the tags and version ldflags of upstream's
# hack/lib/golang.sh and hack/lib/version.sh, so that /version reports a clean
# semver (helm parses it) instead of v0.0.0-master+$Format:%H$.
kube_ldflags() {
    local version=$KUBERNETES_VERSION minor major build_date pkg key value
    major=${version#v}
    major=${major%%.*}
    minor=${version#v*.}
    minor=${minor%%.*}
    # The release's publication time, not now: the same inputs give the same
    # binary.
    build_date=$(cd "$K8S_MODULE" && go list -mod=readonly -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes) \
        || die "cannot read the release time of k8s.io/kubernetes $version"
    local flags="-s -w"
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
        for key in gitVersion gitMajor gitMinor gitCommit gitTreeState buildDate; do
            case $key in
                gitVersion) value=$version ;;
                gitMajor) value=$major ;;
                gitMinor) value=$minor ;;
                # The module proxy serves no commit hash.
                gitCommit) value=module-proxy-$version ;;
                gitTreeState) value=clean ;;
                buildDate) value=$build_date ;;
            esac
            flags+=" -X $pkg.$key=$value"
        done
    done
    printf '%s' "$flags"
}

KUBE_TAGS=selinux,notest,grpcnotrace

install_kube_binary() { # <name>
    local name=$1 ldflags recipe
    ldflags=$(kube_ldflags)
    recipe="k8s.io/kubernetes/cmd/$name@$KUBERNETES_VERSION go.sum=$(sha_of "$K8S_MODULE/go.sum") tags=$KUBE_TAGS trimpath ldflags=[$ldflags]"
    if stamp_current "$name" "$KUBERNETES_VERSION" "$recipe"; then
        log "$name $KUBERNETES_VERSION already installed"
        return
    fi
    local expect="under a minute after kube-apiserver: they share most packages"
    [ "$name" = kube-apiserver ] && expect="about 8 minutes on 2 cores the first time"
    log "building $name $KUBERNETES_VERSION from $K8S_MODULE ($expect)"
    timed "$name $KUBERNETES_VERSION" env -C "$K8S_MODULE" \
        go build -mod=readonly -trimpath -buildvcs=false -tags "$KUBE_TAGS" \
        -ldflags "all=$ldflags" -o "$STAGING/$name" "k8s.io/kubernetes/cmd/$name"
    local have
    case $name in
        kube-apiserver) have=$("$STAGING/$name" --version) ;;
        kubectl) have=$("$STAGING/$name" version --client -o json) ;;
    esac || die "the built $name does not run"
    # kubectl's JSON: the first gitVersion is clientVersion's.
    if [ "$name" = kubectl ] && [[ $have =~ \"gitVersion\":\ \"([^\"]*)\" ]]; then
        have="Kubernetes ${BASH_REMATCH[1]}"
    fi
    [ "$have" = "Kubernetes $KUBERNETES_VERSION" ] || die "the built $name reports '$have', not $KUBERNETES_VERSION"
    promote "$name"
    write_stamp "$name" "$KUBERNETES_VERSION" "$recipe"
    log "installed $name $KUBERNETES_VERSION"
}

mkdir -p "$BIN" "$STAMPS" "$STAGING"
ensure_go
[ -f "$K8S_MODULE/go.sum" ] && [ -f "$ETCD_MODULE/go.sum" ] \
    || die "the wrapper modules are missing from $ROOT/tools/control-plane"
log "tools directory: $TOOLS"
install_helm
install_etcd
check_pin "$K8S_MODULE" k8s.io/kubernetes "$KUBERNETES_VERSION"
install_kube_binary kube-apiserver
install_kube_binary kubectl
log "done: helm $HELM_VERSION, etcd $ETCD_VERSION, kube-apiserver and kubectl $KUBERNETES_VERSION"
