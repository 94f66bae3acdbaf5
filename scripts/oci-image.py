#!/usr/bin/env python3
"""Writes a one-layer OCI image archive without a container engine.

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...)
in a tar file, what `ctr images import` and `skopeo copy oci-archive:` read.
Everything in it is deterministic: entries sorted, owners and times fixed,
gzip without a timestamp, so the same inputs give the same image digest.

    oci-image.py --ref localhost/herald:TAG --out herald.oci.tar \\
        --user 65532:65532 --entrypoint '["/usr/local/bin/herald"]' \\
        --file /path/to/herald:/usr/local/bin/herald:0755 \\
        --libs-of /path/to/herald --nonroot-base

`--libs-of` adds exactly the shared libraries `ldd` lists for a binary (and
its ELF interpreter), copied from this machine at the paths ldd names.
`--nonroot-base` adds what a distroless "nonroot" base gives a program: an
/etc/passwd and /etc/group with root and nonroot (65532), /etc/nsswitch.conf,
the CA bundle at /etc/ssl/certs/ca-certificates.crt, /tmp and /home/nonroot.

Prints the manifest digest and the archive's size on success.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile

EPOCH = "1970-01-01T00:00:00Z"
NONROOT = 65532
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class Layer:
    """The files of the image's one layer, by path inside the image."""

    def __init__(self):
        self.entries = {}

    def add_dir(self, path, mode=0o755, owner=0):
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            self.entries.setdefault(parent, ("dir", None, 0o755, 0))
        self.entries[path] = ("dir", None, mode, owner)

    def add_bytes(self, path, data, mode=0o644, owner=0):
        path = path.strip("/")
        parent = os.path.dirname(path)
        if parent and parent not in self.entries:
            self.add_dir(parent)
        self.entries[path] = ("file", data, mode, owner)

    def add_file(self, source, path, mode):
        with open(source, "rb") as f:
            self.add_bytes(path, f.read(), mode)

    def tar(self):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                kind, data, mode, owner = self.entries[path]
                info = tarfile.TarInfo(path)
                info.mode = mode
                info.uid = info.gid = owner
                info.uname = info.gname = ""
                info.mtime = 0
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return out.getvalue()


def dockerfile_final_stage(path):
    """USER, ENTRYPOINT, WORKDIR, EXPOSE, LABEL and the COPY destination of
    the build stage's binary, from the Dockerfile's last stage: the image
    built here takes them from the production recipe, so they cannot drift."""
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    last_from = max(i for i, l in enumerate(lines) if l.upper().startswith("FROM "))
    stage = {"expose": [], "labels": [], "workdir": None}
    for line in lines[last_from + 1:]:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "USER":
            stage["user"] = rest
        elif instruction == "ENTRYPOINT":
            stage["entrypoint"] = json.dumps(json.loads(rest))
        elif instruction == "WORKDIR":
            stage["workdir"] = rest
        elif instruction == "EXPOSE":
            stage["expose"] += [p if "/" in p else p + "/tcp" for p in rest.split()]
        elif instruction == "LABEL":
            stage["labels"] += [f"{k}={v}" for k, v in re.findall(r'(\S+?)="([^"]*)"', rest)]
        elif instruction == "COPY" and rest.startswith("--from=build "):
            stage["binary_dest"] = rest.split()[-1]
    for key in ("user", "entrypoint", "binary_dest"):
        if key not in stage:
            sys.exit(f"oci-image: {path}: no {key} in the last stage")
    return stage


def shared_libraries(binary):
    """Paths of the libraries ldd resolves for binary, and its interpreter."""
    result = subprocess.run(["ldd", binary], capture_output=True, text=True)
    text = result.stdout + result.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if result.returncode != 0:
        sys.exit(f"oci-image: ldd {binary} failed:\n{text}")
    paths = []
    for line in text.splitlines():
        line = line.strip()
        if "not found" in line:
            sys.exit(f"oci-image: {binary} needs a library this machine lacks: {line}")
        match = re.match(r"^(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$", line)
        if match:
            paths.append(match.group(1))
    return paths


def add_nonroot_base(layer):
    layer.add_bytes(
        "etc/passwd",
        b"root:x:0:0:root:/root:/sbin/nologin\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
        b"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )
    layer.add_bytes(
        "etc/group",
        b"root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n",
    )
    layer.add_bytes("etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")
    layer.add_file(CA_BUNDLE, CA_BUNDLE, 0o644)
    layer.add_dir("tmp", 0o1777)
    layer.add_dir("home/nonroot", 0o700, NONROOT)
    # As distroless sets it: rustls-native-certs and OpenSSL-style readers look here first.
    return [f"SSL_CERT_FILE={CA_BUNDLE}"]


def blob(blobs, media_type, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def write_archive(args, layer):
    layer_tar = layer.tar()
    gzipped = io.BytesIO()
    with gzip.GzipFile(fileobj=gzipped, mode="wb", mtime=0, filename="", compresslevel=6) as gz:
        gz.write(layer_tar)
    blobs = {}
    layer_desc = blob(blobs, "application/vnd.oci.image.layer.v1.tar+gzip", gzipped.getvalue())
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": EPOCH,
        "config": {
            "User": args.user,
            "Entrypoint": json.loads(args.entrypoint),
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + args.env,
            "WorkingDir": args.workdir,
            "Labels": dict(label.split("=", 1) for label in args.label),
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()],
        },
        "history": [{"created": EPOCH, "created_by": "scripts/oci-image.py"}],
    }
    if args.cmd:
        config["config"]["Cmd"] = json.loads(args.cmd)
    if args.expose:
        config["config"]["ExposedPorts"] = {port: {} for port in args.expose}
    config_desc = blob(blobs, "application/vnd.oci.image.config.v1+json", canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = blob(blobs, "application/vnd.oci.image.manifest.v1+json", canonical(manifest))
    # containerd names the imported image from io.containerd.image.name; the
    # OCI annotation (a tag) is for skopeo and other readers of the layout.
    manifest_desc["annotations"] = {
        "io.containerd.image.name": args.ref,
        "org.opencontainers.image.ref.name": args.ref.rsplit(":", 1)[1],
    }
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [manifest_desc]}
    files = {
        "oci-layout": canonical({"imageLayoutVersion": "1.0.0"}),
        "index.json": canonical(index),
    }
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.split(":", 1)[1]] = data
    partial = args.out + ".partial"
    with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(files[path]), 0o644, 0
            tar.addfile(info, io.BytesIO(files[path]))
    os.replace(partial, args.out)
    print(f"{args.ref} {manifest_desc['digest']} {os.path.getsize(args.out)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="localhost/<name>:<tag>")
    parser.add_argument("--out", required=True, help="the archive to write")
    parser.add_argument("--user", help="uid:gid")
    parser.add_argument("--entrypoint", help="JSON array")
    parser.add_argument("--cmd", help="JSON array")
    parser.add_argument("--workdir", default="/")
    parser.add_argument("--env", action="append", default=[], help="NAME=value")
    parser.add_argument("--expose", action="append", default=[], help="9000/tcp")
    parser.add_argument("--label", action="append", default=[], help="key=value")
    parser.add_argument("--file", action="append", default=[], help="source:dest:octal-mode")
    parser.add_argument("--dir", action="append", default=[], help="dest:octal-mode:owner")
    parser.add_argument("--libs-of", action="append", default=[], help="a binary")
    parser.add_argument("--nonroot-base", action="store_true")
    parser.add_argument("--from-dockerfile", metavar="DOCKERFILE",
                        help="take user, entrypoint, workdir, ports and labels from its last stage")
    parser.add_argument("--binary", help="with --from-dockerfile: the file its COPY --from=build copies")
    args = parser.parse_args()
    if args.from_dockerfile:
        stage = dockerfile_final_stage(args.from_dockerfile)
        if args.user or args.entrypoint or not args.binary:
            sys.exit("oci-image: --from-dockerfile takes --binary and no --user or --entrypoint")
        args.user, args.entrypoint = stage["user"], stage["entrypoint"]
        args.workdir = stage["workdir"] or args.workdir
        args.expose += stage["expose"]
        args.label += stage["labels"]
        args.file.append(f"{args.binary}:{stage['binary_dest']}:0755")
        args.libs_of.append(args.binary)
    elif not (args.user and args.entrypoint):
        sys.exit("oci-image: --user and --entrypoint are required without --from-dockerfile")
    if not re.fullmatch(r"localhost/[a-z0-9._/-]+:[A-Za-z0-9._-]+", args.ref):
        sys.exit(f"oci-image: --ref {args.ref!r} is not localhost/<name>:<tag> "
                 "(a short name makes containerd look it up on docker.io)")

    layer = Layer()
    if args.nonroot_base:
        args.env = add_nonroot_base(layer) + args.env
    for spec in args.file:
        source, dest, mode = spec.rsplit(":", 2)
        layer.add_file(source, dest, int(mode, 8))
    for spec in args.dir:
        dest, mode, owner = spec.split(":")
        layer.add_dir(dest, int(mode, 8), int(owner))
    for binary in args.libs_of:
        for library in shared_libraries(binary):
            layer.add_file(os.path.realpath(library), library, 0o755)
    write_archive(args, layer)


if __name__ == "__main__":
    main()
