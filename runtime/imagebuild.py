"""Builds small image archives from dicts of files, for the tests and the demo (no docker needed).

A layer is a dict mapping tar member names, written verbatim and in order, to contents. Verbatim
means a test can write the malicious members an importer must refuse (`../evil`, `/abs`), and
whiteouts are plain members too (`whiteout("etc/passwd")` is `etc/.wh.passwd`).

    build_image(out, busybox_layer(), fmt="oci-archive", config={"Cmd": ["sh"]})
"""

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

FORMATS = ("docker-archive", "docker-archive-legacy", "oci-archive", "oci-layout")
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass(frozen=True)
class FileSpec:
    """One tar member. `kind`: file, dir, symlink, hardlink, fifo, chardev or blockdev."""

    kind: str = "file"
    data: bytes = b""
    mode: int | None = None  # default: 0o755 for dirs, 0o777 for symlinks, 0o644 otherwise
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    target: str = ""  # symlink or hard link target, verbatim
    major: int = 0
    minor: int = 0

    @classmethod
    def directory(cls, mode: int = 0o755, **kw) -> "FileSpec":
        return cls("dir", mode=mode, **kw)

    @classmethod
    def symlink(cls, target: str, **kw) -> "FileSpec":
        return cls("symlink", target=target, **kw)

    @classmethod
    def hardlink(cls, target: str, **kw) -> "FileSpec":
        return cls("hardlink", target=target, **kw)


Layer = Mapping[str, "FileSpec | bytes | Path"]


@dataclass(frozen=True)
class BuiltImage:
    """Digests the importer should find: config per platform ("linux/amd64"), layer blobs bottom first."""

    configs: dict[str, str]
    layers: tuple[str, ...]


def whiteout(path: str) -> str:
    """Member name that deletes `path` of the lower layers."""
    head, _, name = path.rpartition("/")
    return f"{head}/.wh.{name}" if head else f".wh.{name}"


def opaque(directory: str) -> str:
    """Member name that hides everything the lower layers have in `directory`."""
    return f"{directory.rstrip('/')}/.wh..wh..opq"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layer(files: Layer, compression: str = "none") -> bytes:
    """A layer blob: the tar of `files`, compressed reproducibly (same files, same digest)."""
    return _compress(_tar(files), compression)


def build_image(
    out: Path,
    files: Layer | None = None,
    *,
    layers: Sequence[Layer] | None = None,
    fmt: str = "oci-archive",
    name: str | None = "busybox:latest",
    config: Mapping | None = None,
    compression: str = "gzip",
    platforms: Sequence[str] = ("linux/amd64",),
) -> BuiltImage:
    """Write an image with one layer (`files`) or several (`layers`, bottom first) to `out`.

    fmt: "oci-layout" (a directory), "oci-archive" (that directory as a tar), "docker-archive"
    (`docker save` of docker >= 25: manifest.json next to an OCI layout) or "docker-archive-legacy"
    (older `docker save`: `<config hex>.json`, `<id>/layer.tar`). `config` is the image config's
    "config" object (Cmd, Env, Entrypoint, WorkingDir...). `name=None` writes no name at all.
    Several `platforms` (OCI formats only) make a nested index with one manifest per platform.
    """
    if (files is None) == (layers is None):
        raise ValueError("give either files or layers")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    if len(platforms) > 1 and fmt.startswith("docker"):
        raise ValueError("docker archives hold a single platform")
    layers = [files] if files is not None else list(layers)
    tars = [_tar(layer) for layer in layers]
    blobs = [_compress(t, compression) for t in tars]
    diff_ids = [digest_of(t) for t in tars]
    config_blobs = {}
    for platform in platforms:
        os_, arch = platform.split("/")
        config_blobs[platform] = _json(
            {
                "architecture": arch,
                "os": os_,
                "config": dict(config or {}),
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [{"created_by": "runtime.imagebuild"} for _ in layers],
            }
        )
    first_config = config_blobs[platforms[0]]
    if fmt == "docker-archive-legacy":
        entries = _legacy_docker(first_config, blobs, name)
    else:
        entries = _oci_layout(config_blobs, blobs, compression, name, docker=fmt == "docker-archive")
        if fmt == "docker-archive":
            entry = {
                "Config": _blob_path(first_config),
                "RepoTags": [name] if name else None,
                "Layers": [_blob_path(b) for b in blobs],
            }
            entries["manifest.json"] = _json([entry])

    if fmt == "oci-layout":
        for path, data in entries.items():
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            (out / path).write_bytes(data)
    else:
        _write_tar(out, entries)
    return BuiltImage(
        configs={p: digest_of(c) for p, c in config_blobs.items()},
        layers=tuple(digest_of(b) for b in blobs),
    )


def busybox_layer(busybox_path: Path = Path("/bin/busybox")) -> dict[str, FileSpec | bytes | Path]:
    """A minimal root filesystem: busybox, a symlink per applet in /bin, /etc/passwd and the
    empty mount points the runtime needs. Busybox must be statically linked (Debian:
    busybox-static), as the image holds no libc."""
    out = subprocess.run([str(busybox_path), "--list"], capture_output=True, text=True, check=True).stdout
    applets = sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})
    files: dict[str, FileSpec | bytes | Path] = {"bin": FileSpec.directory(), "bin/busybox": busybox_path}
    files.update({f"bin/{a}": FileSpec.symlink("busybox") for a in applets})
    files.update(
        {
            "etc": FileSpec.directory(),
            "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
            "etc/group": b"root:x:0:\n",
            "root": FileSpec.directory(0o700),
            "tmp": FileSpec.directory(0o1777),
            "proc": FileSpec.directory(0o555),
            "sys": FileSpec.directory(0o555),
            "dev": FileSpec.directory(),
        }
    )
    return files


def _tar(files: Layer) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, spec in files.items():
            if isinstance(spec, Path):
                spec = FileSpec(data=spec.read_bytes(), mode=spec.stat().st_mode & 0o7777)
            elif isinstance(spec, bytes):
                spec = FileSpec(data=spec)
            info = tarfile.TarInfo(name)
            info.type = {
                "file": tarfile.REGTYPE,
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
                "chardev": tarfile.CHRTYPE,
                "blockdev": tarfile.BLKTYPE,
            }[spec.kind]
            default_mode = {"dir": 0o755, "symlink": 0o777}.get(spec.kind, 0o644)
            info.mode = default_mode if spec.mode is None else spec.mode
            info.uid, info.gid, info.mtime = spec.uid, spec.gid, spec.mtime
            info.linkname = spec.target
            info.devmajor, info.devminor = spec.major, spec.minor
            info.size = len(spec.data) if spec.kind == "file" else 0
            tar.addfile(info, io.BytesIO(spec.data) if spec.kind == "file" else None)
    return buf.getvalue()


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def _descriptor(media_type: str, data: bytes, **extra) -> dict:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


def _blob_path(data: bytes) -> str:
    return "blobs/sha256/" + hashlib.sha256(data).hexdigest()


def _oci_layout(
    config_blobs: dict[str, bytes], blobs: list[bytes], compression: str, name: str | None, docker: bool
) -> dict[str, bytes]:
    """Archive path -> content of an OCI layout. index.json points at the manifest, or with several
    platforms at a nested index that points at one manifest per platform (as buildx writes)."""
    entries = {_blob_path(b): b for b in [*config_blobs.values(), *blobs]}
    descriptors = []
    for platform, cfg in config_blobs.items():
        os_, arch = platform.split("/")
        manifest = _json(
            {
                "schemaVersion": 2,
                "mediaType": MT_MANIFEST,
                "config": _descriptor(MT_CONFIG, cfg),
                "layers": [_descriptor(MT_LAYER[compression], b) for b in blobs],
            }
        )
        entries[_blob_path(manifest)] = manifest
        descriptors.append(_descriptor(MT_MANIFEST, manifest, platform={"os": os_, "architecture": arch}))
    if len(descriptors) > 1:
        nested = _json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": descriptors})
        entries[_blob_path(nested)] = nested
        descriptors = [_descriptor(MT_INDEX, nested)]
    if name and docker:  # docker names the image in its own annotation, ref.name is just the tag
        descriptors[0]["annotations"] = {
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": name.rpartition(":")[2],
        }
    elif name:
        descriptors[0]["annotations"] = {"org.opencontainers.image.ref.name": name}
    entries["oci-layout"] = _json({"imageLayoutVersion": "1.0.0"})
    entries["index.json"] = _json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": descriptors})
    return entries


def _legacy_docker(config: bytes, blobs: list[bytes], name: str | None) -> dict[str, bytes]:
    config_path = hashlib.sha256(config).hexdigest() + ".json"
    entries = {config_path: config}
    layer_paths = []
    layer_id = ""
    for b in blobs:
        layer_id = hashlib.sha256((layer_id + digest_of(b)).encode()).hexdigest()  # a v1 id, not a content digest
        layer_paths.append(f"{layer_id}/layer.tar")
        entries[f"{layer_id}/layer.tar"] = b
    entries["manifest.json"] = _json(
        [{"Config": config_path, "RepoTags": [name] if name else None, "Layers": layer_paths}]
    )
    return entries


def _write_tar(out: Path, entries: dict[str, bytes]) -> None:
    with tarfile.open(out, "w") as tar:
        for path, data in entries.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
