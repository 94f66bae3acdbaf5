#!/usr/bin/env bash
# Installs Debian's containerd and runc (apt), which the image tests run the
# images of scripts/build-images.sh with. Idempotent: does nothing when both
# are installed. The tests start their own containerd (root, state and
# socket under a temporary directory); this script never starts one.
set -euo pipefail

log() { printf 'install-containerd: %s\n' "$*"; }
die() { printf 'install-containerd: FAIL: %s\n' "$*" >&2; exit 1; }

missing=()
command -v containerd >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
if [ ${#missing[@]} -eq 0 ]; then
    log "containerd $(containerd --version | awk '{print $3}') and $(runc --version | head -1) already installed"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "${missing[*]} missing and not root: apt-get install ${missing[*]} as root"
command -v apt-get >/dev/null || die "${missing[*]} missing and no apt-get: install Debian's containerd and runc packages"
log "installing ${missing[*]} with apt-get"
# Another apt run (a parallel install script) holds the lock for a while.
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get install -y --no-install-recommends containerd runc \
    || { apt_get update && apt_get install -y --no-install-recommends containerd runc; } \
    || die "apt-get install containerd runc failed"
command -v ctr >/dev/null || die "containerd is installed but ctr is not on PATH"
log "installed containerd $(containerd --version | awk '{print $3}'), $(runc --version | head -1)"
