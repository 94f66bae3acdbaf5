#!/usr/bin/env bash
# Builds a Kubernetes control plane and node for tests, without Docker: pinned
# helm, etcd, kube-apiserver, kubectl, kube-controller-manager,
# kube-scheduler, kube-proxy, kubelet and CoreDNS, compiled from the Go module
# proxy into the same cache as scripts/install-tools.sh (`$HERALD_TOOLS/bin`,
# default ~/.cache/herald-tools), plus the Debian packages the node runs
# (containerd, runc, the CNI plugins, iptables, conntrack) and the local image
# its pods run (`$HERALD_TOOLS/images/test-pod.oci.tar`).
# crates/herald-testkit's ControlPlane runs etcd and kube-apiserver on
# loopback the way controller-runtime's envtest does; its Cluster runs all of
# it as a single node (docs/kubernetes-node.md).
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
# The node's binaries add about 15 minutes more the first time (kubelet and
# kube-controller-manager are the big ones); see docs/kubernetes-node.md.
set -euo pipefail

HELM_VERSION=v4.3.2
ETCD_VERSION=v3.7.3
KUBERNETES_VERSION=v1.37.2
COREDNS_VERSION=v1.15.0
# What the node runs that Debian packages: the container runtime (containerd
# 1.6 and runc; why not containerd 2 is in docs/kubernetes-node.md), the
# bridge, host-local and loopback CNI plugins, and what kube-proxy and the
# cluster's isolation rules call.
NODE_PACKAGES=(containerd runc containernetworking-plugins iptables conntrack)
# All four modules declare `go 1.26.0`; GOTOOLCHAIN=local means we never
# download a toolchain, so the installed go must be at least this.
GO_MIN_MINOR=26

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
K8S_MODULE=$ROOT/tools/control-plane/k8s
ETCD_MODULE=$ROOT/tools/control-plane/etcd
POD_MODULE=$ROOT/tools/test-pod
TOOLS=${HERALD_TOOLS:-$HOME/.cache/herald-tools}
BIN=$TOOLS/bin
STAMPS=$TOOLS/stamps
# Binaries are built here, checked, then renamed into $BIN: a test running the
# old kube-apiserver meanwhile keeps it, and a failed check leaves $BIN alone.
STAGING=$TOOLS/staging
IMAGES=$TOOLS/images

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
    case $name in
        kube-apiserver) expect="about 8 minutes on 2 cores the first time" ;;
        kube-controller-manager) expect="about 3 minutes after kube-apiserver" ;;
        kubelet) expect="about 6 minutes after kube-apiserver: cadvisor and the CRI client are its own" ;;
    esac
    log "building $name $KUBERNETES_VERSION from $K8S_MODULE ($expect)"
    timed "$name $KUBERNETES_VERSION" env -C "$K8S_MODULE" \
        go build -mod=readonly -trimpath -buildvcs=false -tags "$KUBE_TAGS" \
        -ldflags "all=$ldflags" -o "$STAGING/$name" "k8s.io/kubernetes/cmd/$name"
    local have
    case $name in
        kubectl) have=$("$STAGING/$name" version --client -o json) ;;
        *) have=$("$STAGING/$name" --version) ;;
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

# Debian's packages, installed when one is missing (first, as it fails fastest).
install_node_packages() {
    local missing=() package
    for package in "${NODE_PACKAGES[@]}"; do
        [ "$(dpkg-query -W -f '${Status}' "$package" 2>/dev/null)" = "install ok installed" ] \
            || missing+=("$package")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "Debian packages already installed: ${NODE_PACKAGES[*]}"
        return
    fi
    command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ] \
        || die "the test node needs the Debian packages ${missing[*]}: not Debian or not root, install them and re-run"
    log "apt-get install ${missing[*]}"
    # The package lists may be stale or absent on a fresh machine.
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
}

# CoreDNS's go.mod has no replace directives, so it is `go install`ed like
# helm, with every plugin it ships (the cluster's Corefile uses a few).
install_coredns() {
    local ldflags="-s -w -X github.com/coredns/coredns/coremain.GitCommit=module-proxy-$COREDNS_VERSION"
    local recipe="github.com/coredns/coredns@$COREDNS_VERSION trimpath ldflags=[$ldflags]"
    if stamp_current coredns "$COREDNS_VERSION" "$recipe"; then
        log "coredns $COREDNS_VERSION already installed"
        return
    fi
    log "go install github.com/coredns/coredns@$COREDNS_VERSION (a few minutes the first time)"
    timed "coredns $COREDNS_VERSION" env -C "$TOOLS" GOBIN="$STAGING" \
        go install -trimpath -buildvcs=false -ldflags "$ldflags" \
        "github.com/coredns/coredns@$COREDNS_VERSION"
    local have
    have=$("$STAGING/coredns" -version) || die "the built coredns does not run"
    have=${have%%$'\n'*}
    [ "$have" = "CoreDNS-${COREDNS_VERSION#v}" ] || die "the built coredns reports '$have', not CoreDNS-${COREDNS_VERSION#v}"
    promote coredns
    write_stamp coredns "$COREDNS_VERSION" "$recipe"
    log "installed coredns $COREDNS_VERSION"
}

# The local image every test-cluster pod runs, also its sandbox ("pause")
# image: tools/test-pod as a static binary, alone in one layer, user 65532,
# written as an OCI image layout by hand (no Docker, no buildah) and archived
# for `ctr images import`. Its name is fixed by the io.containerd.image.name
# annotation; Cluster in herald-testkit imports it.
TEST_POD_IMAGE=localhost/herald-test-pod:v1

install_test_pod_image() {
    local sources recipe
    sources=$(cat "$POD_MODULE/go.mod" "$POD_MODULE/main.go" | sha256sum | cut -d' ' -f1)
    recipe="$TEST_POD_IMAGE sources=$sources go=$(go env GOVERSION) arch=$(go env GOARCH)"
    if [ -f "$IMAGES/test-pod.oci.tar" ] && [ -f "$STAMPS/test-pod-image-v1" ] \
        && [ "$(cat "$STAMPS/test-pod-image-v1")" = "$recipe" ]; then
        log "image $TEST_POD_IMAGE already built"
        return
    fi
    local work
    work=$(mktemp -d "$STAGING/test-pod.XXXXXX")
    mkdir -p "$work/rootfs" "$work/layout/blobs/sha256"
    env -C "$POD_MODULE" go build -mod=readonly -trimpath -buildvcs=false -ldflags '-s -w' \
        -o "$work/rootfs/pod" . || die "building tools/test-pod failed"
    # Reproducible: sorted, owned by root, dated 1970.
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        -cf "$work/layer.tar" -C "$work/rootfs" pod
    local layer_digest layer_size
    layer_digest=$(sha_of "$work/layer.tar")
    layer_size=$(stat -c %s "$work/layer.tar")
    mv "$work/layer.tar" "$work/layout/blobs/sha256/$layer_digest"
    blob() { # <json>: stores it as a blob, prints "<digest> <size>"
        local digest
        digest=$(printf '%s' "$1" | sha256sum | cut -d' ' -f1)
        printf '%s' "$1" >"$work/layout/blobs/sha256/$digest"
        printf '%s %s' "$digest" "${#1}"
    }
    local config manifest config_digest config_size manifest_digest manifest_size
    config='{"architecture":"'"$(go env GOARCH)"'","os":"linux","config":{"User":"65532:65532","Entrypoint":["/pod"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:'"$layer_digest"'"]}}'
    read -r config_digest config_size <<<"$(blob "$config")"
    manifest='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config_digest"'","size":'"$config_size"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:'"$layer_digest"'","size":'"$layer_size"'}]}'
    read -r manifest_digest manifest_size <<<"$(blob "$manifest")"
    printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$manifest_digest"'","size":'"$manifest_size"',"annotations":{"io.containerd.image.name":"'"$TEST_POD_IMAGE"'","org.opencontainers.image.ref.name":"'"${TEST_POD_IMAGE##*:}"'"}}]}' \
        >"$work/layout/index.json"
    printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$work/layout/oci-layout"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        -cf "$STAGING/test-pod.oci.tar" -C "$work/layout" oci-layout index.json blobs
    rm -rf "$work"
    mv -f "$STAGING/test-pod.oci.tar" "$IMAGES/test-pod.oci.tar"
    printf '%s\n' "$recipe" >"$STAMPS/test-pod-image-v1"
    log "built image $TEST_POD_IMAGE into $IMAGES/test-pod.oci.tar"
}

mkdir -p "$BIN" "$STAMPS" "$STAGING" "$IMAGES"
install_node_packages
ensure_go
[ -f "$K8S_MODULE/go.sum" ] && [ -f "$ETCD_MODULE/go.sum" ] \
    || die "the wrapper modules are missing from $ROOT/tools/control-plane"
log "tools directory: $TOOLS"
install_helm
install_etcd
check_pin "$K8S_MODULE" k8s.io/kubernetes "$KUBERNETES_VERSION"
install_kube_binary kube-apiserver
install_kube_binary kubectl
for name in kube-controller-manager kube-scheduler kube-proxy kubelet; do
    install_kube_binary "$name"
done
install_coredns
install_test_pod_image
log "done: helm $HELM_VERSION, etcd $ETCD_VERSION, Kubernetes $KUBERNETES_VERSION, CoreDNS $COREDNS_VERSION, ${NODE_PACKAGES[*]}"
