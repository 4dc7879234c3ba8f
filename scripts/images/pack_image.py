#!/usr/bin/env python3
"""Write container images without Docker: layer tars from root-filesystem directories, and a
``docker save`` style archive that ``ctr -n k8s.io images import`` (and ``docker load``) accept.

Only the standard library is used, so any Python >= 3.9 runs it.

    pack_image.py layer ROOTFS OUT.tar [--mtime EPOCH] [--empty-dir PATH ...]
        Tar ROOTFS (its contents become the image's /) into OUT.tar, an uncompressed layer.
        Writes OUT.tar.sha256 with the layer's diff_id ("sha256:<hex>") and prints it.
        --mtime clamps every entry's mtime to EPOCH, for a reproducible layer (same files ->
        same digest); without it mtimes are kept (as whole seconds).
        --empty-dir keeps PATH (relative to ROOTFS, e.g. proc) but not its contents.

    pack_image.py oci-stream IMAGE.tar --name FULL_NAME [--have DIGESTS_FILE] | ctr images import -
        Stream the archive as an OCI image layout, without the layers listed in DIGESTS_FILE (those the
        importing containerd already has): re-importing an image whose base layer is unchanged then
        costs seconds instead of re-reading gigabytes.

    pack_image.py image --tag NAME:TAG --layer L1.tar [--layer L2.tar ...] --out IMAGE.tar
                  [--user U] [--workdir DIR] [--env K=V ...] [--entrypoint JSON] [--cmd JSON]
                  [--label K=V ...] [--created RFC3339] [--history TEXT ...]
        Write the docker-save archive (manifest.json, the config JSON, the layer tars) and print
        the image ID (the config's digest). The archive is only rewritten when that ID changes
        (IMAGE.tar.id records it), so repeated builds of unchanged content cost nothing.

    pack_image.py sizes IMAGE.tar
        Print the image's tag, its unpacked size (the layer tars: what the node's disk holds once
        unpacked) and its compressed size (each layer through gzip -6, as a registry stores and a node
        pulls it), in MB. Reads the whole archive once (the compression dominates: ~1 min per GB).

A layer's whiteouts (deleted files) are not produced: build each layer as a tree of added files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 20


class _HashingWriter(io.RawIOBase):
    """A write-only file object that hashes (and counts) what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.raw.write(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def cmd_layer(args: argparse.Namespace) -> int:
    root = Path(args.rootfs).resolve()
    if not root.is_dir():
        print(f"pack_image: {root} is not a directory", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    empty = {p.strip("/") for p in args.empty_dir}
    started = time.monotonic()
    skipped: list[str] = []

    def normalize(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = ti.name
        # The contents of pseudo-filesystem mount points (and anything else asked for) stay out.
        for e in empty:
            if name.startswith(e + "/"):
                return None
        ti.uname = ti.gname = ""
        ti.mtime = int(ti.mtime) if args.mtime is None else min(int(ti.mtime), args.mtime)
        return ti

    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as raw:
        writer = _HashingWriter(raw)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:
            # Sorted walk (tarfile.add sorts directory listings) -> deterministic entry order.
            for entry in sorted(os.listdir(root)):
                path = root / entry
                if path.is_socket():
                    skipped.append(entry)
                    continue
                tar.add(str(path), arcname=entry, recursive=True, filter=normalize)
    diff_id = "sha256:" + writer.sha.hexdigest()
    os.replace(tmp, out)
    Path(str(out) + ".sha256").write_text(diff_id + "\n")
    print(
        f"pack_image: layer {out} {writer.size / 1e6:.1f} MB {diff_id[:19]} in {time.monotonic() - started:.1f}s",
        file=sys.stderr,
    )
    print(diff_id)
    return 0


def _diff_id(layer: Path) -> str:
    side = Path(str(layer) + ".sha256")
    if side.is_file() and side.stat().st_mtime >= layer.stat().st_mtime:
        return side.read_text().strip()
    return _sha256_file(layer)


def cmd_image(args: argparse.Namespace) -> int:
    started = time.monotonic()
    layers = [Path(p) for p in args.layer]
    diff_ids = [_diff_id(p) for p in layers]
    created = args.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    history_text = list(args.history) + [""] * (len(layers) - len(args.history))
    env = list(args.env)
    config: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {"Env": env},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": text or f"layer {i}"} for i, text in enumerate(history_text)],
    }
    c = config["config"]
    if args.user:
        c["User"] = args.user
    if args.workdir:
        c["WorkingDir"] = args.workdir
    if args.entrypoint:
        c["Entrypoint"] = json.loads(args.entrypoint)
    if args.cmd:
        c["Cmd"] = json.loads(args.cmd)
    if args.label:
        c["Labels"] = dict(kv.split("=", 1) for kv in args.label)
    if args.stop_signal:
        c["StopSignal"] = args.stop_signal
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()

    out = Path(args.out)
    id_file = Path(str(out) + ".id")
    if out.is_file() and id_file.is_file() and id_file.read_text().strip() == image_id:
        print(f"pack_image: {out} unchanged ({image_id[:19]})", file=sys.stderr)
        print(image_id)
        return 0

    manifest = [
        {
            "Config": image_id.split(":", 1)[1] + ".json",
            "RepoTags": [args.tag],
            "Layers": [f"{d.split(':', 1)[1]}/layer.tar" for d in diff_ids],
        }
    ]
    name, _, tag = args.tag.rpartition(":")
    repositories = {name: {tag: diff_ids[-1].split(":", 1)[1]}}

    def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mode = 0o644
        ti.mtime = 0
        tar.addfile(ti, io.BytesIO(data))

    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen = set()
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            hexid = diff_id.split(":", 1)[1]
            if hexid in seen:
                continue
            seen.add(hexid)
            d = tarfile.TarInfo(hexid)
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(d)
            ti = tarfile.TarInfo(f"{hexid}/layer.tar")
            ti.size, ti.mode, ti.mtime = layer.stat().st_size, 0o644, 0
            with open(layer, "rb") as f:
                tar.addfile(ti, f)
        add_bytes(tar, image_id.split(":", 1)[1] + ".json", config_bytes)
        add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
        add_bytes(tar, "repositories", json.dumps(repositories).encode())
    os.replace(tmp, out)
    id_file.write_text(image_id + "\n")
    print(
        f"pack_image: image {args.tag} -> {out} {out.stat().st_size / 1e6:.1f} MB {image_id[:19]} "
        f"in {time.monotonic() - started:.1f}s",
        file=sys.stderr,
    )
    print(image_id)
    return 0


def cmd_oci_stream(args: argparse.Namespace) -> int:
    """Re-express a docker-save archive as an OCI image layout on stdout, leaving out the layer blobs
    the importing containerd already has: `ctr images import -` then reads a few MB instead of GBs.
    The config (so the image ID) is byte-identical to the archive's."""
    have = set(Path(args.have).read_text().split()) if args.have else set()
    with tarfile.open(args.archive, "r:") as src:
        entry = json.load(src.extractfile("manifest.json"))[0]  # type: ignore[arg-type]
        config_bytes = src.extractfile(entry["Config"]).read()  # type: ignore[union-attr]
        config = json.loads(config_bytes)
        diff_ids = config["rootfs"]["diff_ids"]
        members = [src.getmember(p) for p in entry["Layers"]]
        layers = [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": m.size}
            for d, m in zip(diff_ids, members, strict=True)
        ]
        config_desc: dict[str, Any] = {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
            "size": len(config_bytes),
        }
        manifest_bytes = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc,
                "layers": layers,
            },
            separators=(",", ":"),
        ).encode()
        manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
        tag = args.name.rpartition(":")[2]
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest_bytes),
                    "platform": {"architecture": config.get("architecture", "amd64"), "os": config.get("os", "linux")},
                    "annotations": {"io.containerd.image.name": args.name, "org.opencontainers.image.ref.name": tag},
                }
            ],
        }

        def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, io.BytesIO(data))

        sent = 0
        with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as out:
            add_bytes(out, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            add_bytes(out, "blobs/sha256/" + config_desc["digest"].split(":", 1)[1], config_bytes)
            add_bytes(out, "blobs/sha256/" + manifest_digest.split(":", 1)[1], manifest_bytes)
            for layer, member in zip(layers, members, strict=True):
                if layer["digest"] in have:
                    continue
                ti = tarfile.TarInfo("blobs/sha256/" + layer["digest"].split(":", 1)[1])
                ti.size, ti.mode = member.size, 0o644
                out.addfile(ti, src.extractfile(member))
                sent += member.size
            add_bytes(out, "index.json", json.dumps(index).encode())
    print(
        f"pack_image: OCI stream of {args.name}: {len(layers)} layers, "
        f"{sum(1 for ly in layers if ly['digest'] in have)} already present, {sent / 1e6:.1f} MB of layers sent",
        file=sys.stderr,
    )
    return 0


def cmd_sizes(args: argparse.Namespace) -> int:
    import zlib

    with tarfile.open(args.archive, "r:") as src:
        entry = json.load(src.extractfile("manifest.json"))[0]  # type: ignore[arg-type]
        unpacked = compressed = 0
        for path in entry["Layers"]:
            member = src.getmember(path)
            unpacked += member.size
            gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: the gzip format
            stream = src.extractfile(member)
            assert stream is not None
            while chunk := stream.read(CHUNK):
                compressed += len(gz.compress(chunk))
            compressed += len(gz.flush())
    tag = entry["RepoTags"][0]
    print(f"{tag:<32} {unpacked / 1e6:9.1f} MB {compressed / 1e6:9.1f} MB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layer", help="tar a root-filesystem directory into an image layer")
    p.add_argument("rootfs")
    p.add_argument("out")
    p.add_argument("--mtime", type=int, default=None, help="clamp mtimes to this epoch (reproducible layers)")
    p.add_argument("--empty-dir", action="append", default=[], help="keep this directory but not its contents")
    p.set_defaults(func=cmd_layer)

    p = sub.add_parser("image", help="write a docker-save archive from layer tars")
    p.add_argument("--tag", required=True, help="e.g. finetune-trainer:0.1.0 or registry.k8s.io/pause:3.6")
    p.add_argument("--layer", action="append", required=True, help="layer tar, bottom first (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--user")
    p.add_argument("--workdir")
    p.add_argument("--env", action="append", default=[], help="K=V (repeatable)")
    p.add_argument("--entrypoint", help="JSON list, e.g. '[\"/pause\"]'")
    p.add_argument("--cmd", help="JSON list")
    p.add_argument("--label", action="append", default=[], help="K=V (repeatable)")
    p.add_argument("--stop-signal")
    p.add_argument("--created", help="RFC 3339 time for the config (fix it for reproducible image IDs)")
    p.add_argument("--history", action="append", default=[], help="created_by text per layer (repeatable)")
    p.set_defaults(func=cmd_image)

    p = sub.add_parser("oci-stream", help="write a docker-save archive as an OCI layout tar to stdout")
    p.add_argument("archive")
    p.add_argument("--name", required=True, help="full image name, e.g. docker.io/library/finetune-trainer:0.1.0")
    p.add_argument("--have", help="file listing digests the importer already has (their blobs are left out)")
    p.set_defaults(func=cmd_oci_stream)

    p = sub.add_parser("sizes", help="print an archive's unpacked and compressed (gzip) size")
    p.add_argument("archive")
    p.set_defaults(func=cmd_sizes)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
