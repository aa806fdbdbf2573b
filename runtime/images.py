"""Imports image archives (docker-archive, oci-archive, OCI layout directory) into the layer store.

Archives are untrusted: every blob is checked against its digest and size before it is used, and
an import that fails for any reason removes the layers it added, so the store never holds half an
image.
"""

import bz2
import errno
import gzip
import hashlib
import json
import lzma
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from runtime.errors import ImageError, InvalidInput, NotFound
from runtime.layers import ImportBudget, LayerStore, tar_members

PLATFORM = {"os": "linux", "architecture": "amd64"}
CONFIG_MEDIA_TYPES = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
_MAX_JSON = 16 << 20  # manifests and configs are small; anything bigger is an attack or garbage
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_REPO = re.compile(r"[a-z0-9._/-]+")
_TAG = re.compile(r"[A-Za-z0-9_.-]{1,128}")
# docker-archive paths that name their content: blobs/sha256/<hex> (docker >= 25), <hex>.json
# (config) and <hex>.tar (skopeo). Old docker's <id>/layer.tar is not: <id> is a v1 layer id.
_CONTENT_PATH = re.compile(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json|\.tar)?")
# What reading a corrupt or truncated outer archive raises.
_CORRUPT = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
# Compressions an outer archive may have, by magic bytes (what tarfile's "r:*" read before).
_OUTER_CODECS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ": lzma.open}
# An image archive holds a few files per layer; its index is kept in memory, so it is small.
MAX_OUTER_MEMBERS = 10_000
MAX_OUTER_NAME = 4096
_CHUNK = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class ImportedImage:
    name: str  # repo:tag
    id: str  # config digest
    layers: tuple[str, ...]  # blob digests, bottom first
    env: tuple[str, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    working_dir: str
    size: int  # sum of the layer blob sizes


def parse_image_name(s: str) -> tuple[str, str]:
    """Split `repo[:tag]` (tag defaults to latest), refusing names that are not plain lowercase
    paths: they end up in file names and command lines."""
    if ":" in s.rpartition("/")[2]:
        repo, _, tag = s.rpartition(":")
    else:
        repo, tag = s, "latest"
    if not _REPO.fullmatch(repo) or any(c in ("", ".", "..") for c in repo.split("/")):
        raise InvalidInput(f"invalid image name {s!r}: the repository must be lowercase [a-z0-9._/-]")
    if not _TAG.fullmatch(tag):
        raise InvalidInput(f"invalid image name {s!r}: the tag must be 1-128 characters of [A-Za-z0-9_.-]")
    return repo, tag


def import_image(path: Path, store: LayerStore, name: str | None = None) -> ImportedImage:
    """Import the image at `path` into `store`; `name` overrides the name the archive carries
    (for a docker-archive with several images, it picks the one with that tag)."""
    path = Path(path)
    wanted = _full_name(name) if name is not None else None
    try:
        budget = store.import_budget()
        with _open_source(path, store, budget) as src:
            plan = _docker_plan(src, wanted) if src.exists("manifest.json") else _oci_plan(src, wanted)
            return _import_layers(src, store, plan, budget)
    except _CORRUPT as e:
        raise ImageError(f"{path}: corrupt or truncated archive ({e})") from None


@dataclass(frozen=True)
class _Blob:
    where: str  # path inside the archive or layout
    digest: str | None  # None: not named by the archive (old docker layer.tar), hashed on import
    size: int | None
    media_type: str | None


@dataclass(frozen=True)
class _Plan:
    name: str
    config_digest: str
    config: dict
    layers: tuple[_Blob, ...]


def _full_name(s: str) -> str:
    repo, tag = parse_image_name(s)
    return f"{repo}:{tag}"


def _archive_name(s: str) -> str:
    try:
        return _full_name(s)
    except InvalidInput:
        raise InvalidInput(f"the archive names the image {s!r}, which is not a valid name here; pass --name") from None


def _import_layers(src: "_Source", store: LayerStore, plan: _Plan, budget: ImportBudget) -> ImportedImage:
    rootfs = plan.config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(plan.layers):
        raise ImageError(f"config {plan.config_digest}: rootfs.diff_ids does not match the {len(plan.layers)} layers")
    for d in diff_ids:
        _check_digest(d, "config rootfs.diff_ids")
    added: list[str] = []
    digests = []
    try:
        for blob, diff_id in zip(plan.layers, diff_ids, strict=True):
            digest = blob.digest or _hash(src, blob.where)
            with src.open(blob.where) as f:
                if store.add_from_stream(digest, f, blob.media_type, size=blob.size, diff_id=diff_id, budget=budget):
                    added.append(digest)
            digests.append(digest)
    except BaseException:
        for d in reversed(added):
            with suppress(NotFound, OSError):  # keep the original error, the one worth reporting
                store.remove(d)
        raise
    c = plan.config.get("config") or {}
    if not isinstance(c, dict):
        raise ImageError(f"config {plan.config_digest}: 'config' is not an object")
    working_dir = c.get("WorkingDir") or ""
    if not isinstance(working_dir, str):
        raise ImageError(f"config {plan.config_digest}: WorkingDir is not a string")
    return ImportedImage(
        name=plan.name,
        id=plan.config_digest,
        layers=tuple(digests),
        env=_strings(c, "Env", plan.config_digest),
        entrypoint=_strings(c, "Entrypoint", plan.config_digest),
        cmd=_strings(c, "Cmd", plan.config_digest),
        working_dir=working_dir,
        size=sum(store.size_of(d) for d in digests),
    )


def _strings(c: dict, key: str, where: str) -> tuple[str, ...]:
    v = c.get(key) or []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ImageError(f"config {where}: {key} is not a list of strings")
    return tuple(v)


# --- docker-archive ---------------------------------------------------------------------------


def _docker_plan(src: "_Source", wanted: str | None) -> _Plan:
    entries, _ = _read_json(src, "manifest.json", what="manifest.json")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ImageError("manifest.json is not a list of images")
    tagged = [e for e in entries if wanted in (e.get("RepoTags") or [])]
    if len(tagged) == 1:
        entry = tagged[0]
    elif len(entries) == 1:
        entry = entries[0]
    else:
        raise ImageError(f"the archive holds {len(entries)} images; pass --name with the tag of one of them")
    config_path, layer_paths = entry.get("Config"), entry.get("Layers")
    if (
        not isinstance(config_path, str)
        or not isinstance(layer_paths, list)
        or not all(isinstance(p, str) for p in layer_paths)
    ):
        raise ImageError("manifest.json: an image lacks Config or Layers")
    config, config_digest = _read_json(
        src, config_path, digest=_content_digest(config_path), what=f"config {config_path!r}"
    )
    tags = entry.get("RepoTags") or []
    if wanted:
        name = wanted
    elif tags and isinstance(tags[0], str):
        name = _archive_name(tags[0])
    else:
        raise InvalidInput("the archive does not name the image; pass --name")
    layers = tuple(_Blob(p, _content_digest(p), None, None) for p in layer_paths)
    return _Plan(name, config_digest, _object(config, config_digest), layers)


def _content_digest(path: str) -> str | None:
    m = _CONTENT_PATH.fullmatch(_key(path))
    return f"sha256:{m.group(1)}" if m else None


# --- OCI image layout -------------------------------------------------------------------------


def _oci_plan(src: "_Source", wanted: str | None) -> _Plan:
    if not src.exists("index.json") or not src.exists("oci-layout"):
        raise ImageError("not an image archive: neither manifest.json nor oci-layout and index.json")
    node = _object(_read_json(src, "index.json", what="index.json")[0], "index.json")
    annotations: dict = {}
    while True:  # follow nested indexes down to one image manifest
        desc = _choose(node)
        if isinstance(desc.get("annotations"), dict):
            annotations = desc["annotations"] | annotations  # the outermost name wins
        node = _object(_read_descriptor(src, desc, "manifest"), desc["digest"])
        if "manifests" not in node:
            break
    if node.get("schemaVersion") != 2 or not isinstance(node.get("layers"), list):
        raise ImageError(f"manifest {desc['digest']}: not an image manifest (schema 2)")
    config_desc = _valid_descriptor(node.get("config"), f"manifest {desc['digest']}")
    if config_desc.get("mediaType", CONFIG_MEDIA_TYPES[0]) not in CONFIG_MEDIA_TYPES:
        raise ImageError(f"manifest {desc['digest']}: not a container image (config is {config_desc['mediaType']!r})")
    config = _object(_read_descriptor(src, config_desc, "config"), config_desc["digest"])
    layers = []
    for d in node["layers"]:
        d = _valid_descriptor(d, f"manifest {desc['digest']}")
        layers.append(_Blob(_blob_path(d["digest"]), d["digest"], d.get("size"), d.get("mediaType")))
    return _Plan(wanted or _oci_name(annotations), config_desc["digest"], config, tuple(layers))


def _oci_name(annotations: dict) -> str:
    """ref.name is a full name (skopeo, buildah) or, per the spec, a bare tag (docker puts its
    full name in the containerd annotation); a bare ref without that is taken as a repository."""
    ref, full = annotations.get(REF_NAME), annotations.get(CONTAINERD_NAME)
    if isinstance(ref, str) and ":" not in ref and isinstance(full, str):
        return _archive_name(full)
    if isinstance(ref, str):
        return _archive_name(ref)
    raise InvalidInput("the archive does not name the image; pass --name")


def _choose(index: dict) -> dict:
    """The only manifest of an index, or else its only linux/amd64 one."""
    found = index.get("manifests")
    if not isinstance(found, list) or not found:
        raise ImageError("image index lists no manifests")
    found = [_valid_descriptor(d, "image index") for d in found]
    if len(found) == 1:
        return found[0]
    ours = [d for d in found if isinstance(d.get("platform"), dict) and PLATFORM.items() <= d["platform"].items()]
    if len(ours) != 1:
        raise ImageError(
            f"image index lists {len(found)} manifests, {len(ours)} of them for linux/amd64; need exactly one"
        )
    return ours[0]


def _valid_descriptor(d, where: str) -> dict:
    if not isinstance(d, dict):
        raise ImageError(f"{where}: a descriptor is not an object")
    _check_digest(d.get("digest"), where)
    size = d.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ImageError(f"{where}: descriptor {d['digest']} has an invalid size")
    if not isinstance(d.get("mediaType") or "", str):
        raise ImageError(f"{where}: descriptor {d['digest']} has an invalid media type")
    return d


def _check_digest(digest, where: str) -> None:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ImageError(f"{where}: unsupported or malformed digest {digest!r} (only sha256)")


def _blob_path(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _read_descriptor(src: "_Source", desc: dict, what: str):
    where = _blob_path(desc["digest"])
    return _read_json(src, where, digest=desc["digest"], size=desc.get("size"), what=f"{what} {desc['digest']}")[0]


# --- reading ----------------------------------------------------------------------------------


def _object(v, where: str) -> dict:
    if not isinstance(v, dict):
        raise ImageError(f"{where}: not a JSON object")
    return v


def _read_json(src: "_Source", where: str, *, what: str, digest: str | None = None, size: int | None = None):
    """A JSON blob, parsed, and its actual digest; the digest and size are verified when given."""
    with src.open(where) as f:
        data = f.read(_MAX_JSON + 1)
    if len(data) > _MAX_JSON:
        raise ImageError(f"{what}: larger than {_MAX_JSON} bytes")
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if digest is not None and actual != digest:
        raise ImageError(f"{what}: digest mismatch, the blob hashes to {actual}")
    if size is not None and len(data) != size:
        raise ImageError(f"{what}: blob is {len(data)} bytes, the descriptor says {size}")
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise ImageError(f"{what}: invalid JSON ({e})") from None
    return obj, actual


def _hash(src: "_Source", where: str) -> str:
    h = hashlib.sha256()
    with src.open(where) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _key(path: str) -> str:
    """An archive path as the lookup key: `./a//b` and `a/b` are the same member."""
    return "/".join(p for p in path.split("/") if p not in ("", "."))


class _Source:
    """Files of an image, by path inside the archive or layout."""

    def exists(self, where: str) -> bool:
        raise NotImplementedError

    def open(self, where: str) -> BinaryIO:
        raise NotImplementedError


class _TarSource(_Source):
    """An outer archive, uncompressed, indexed in one bounded pass (tar_members: header size and
    member count) and then read by offset. Its symlinks and hard links resolve only to other
    members of the archive, never to the host."""

    def __init__(self, f: BinaryIO, label: str):
        self._fd = f.fileno()
        self._size = os.fstat(self._fd).st_size
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            for count, (_, m) in enumerate(tar_members(f, label), 1):
                if count > MAX_OUTER_MEMBERS or len(m.name) > MAX_OUTER_NAME or len(m.linkname) > MAX_OUTER_NAME:
                    raise ImageError(f"{label}: more than {MAX_OUTER_MEMBERS} members or a name of more than "
                                     f"{MAX_OUTER_NAME} characters: not an image archive")
                self._members[_key(m.name)] = m
        except tarfile.ReadError as e:
            if not self._members:
                raise ImageError(f"{label}: not a tar archive (plain or compressed)") from None
            raise ImageError(f"{label}: corrupt or truncated archive ({e})") from None

    def exists(self, where: str) -> bool:
        return _key(where) in self._members

    def open(self, where: str) -> BinaryIO:
        m = self._resolve(where)
        if m is None or not m.isreg() or m.issparse():
            raise ImageError(f"the archive has no file {where!r}")
        if m.offset_data + m.size > self._size:
            raise ImageError(f"the archive is truncated: {where!r} is cut short")
        return _Slice(self._fd, m.offset_data, m.size)

    def _resolve(self, where: str) -> tarfile.TarInfo | None:
        """The member at `where`, through at most 40 links (as tarfile resolves them)."""
        m = self._members.get(_key(where))
        for _ in range(40):
            if m is None or not (m.issym() or m.islnk()):
                return m
            target = m.linkname if m.islnk() else f"{os.path.dirname(m.name)}/{m.linkname}"
            m = self._members.get(_key(os.path.normpath(target)))
        return None


class _Slice:
    """One member's bytes of the archive, read with pread: independent of any other reader."""

    def __init__(self, fd: int, start: int, size: int):
        self._fd, self._pos, self._end = fd, start, start + size

    def read(self, n: int = -1) -> bytes:
        n = self._end - self._pos if n < 0 else min(n, self._end - self._pos)
        data = os.pread(self._fd, n, self._pos)
        if len(data) < n:
            raise EOFError("the archive ends inside a member")
        self._pos += n
        return data

    def __enter__(self) -> "_Slice":
        return self

    def __exit__(self, *exc) -> None:
        pass


class _DirSource(_Source):
    """An OCI layout directory, whose files are opened through directory fds without following
    any symlink and only if regular: a blob that is a symlink (to /dev/zero, to /etc/shadow), a
    FIFO or a device is refused instead of hanging or being read."""

    def __init__(self, root: Path):
        self._root = root

    def exists(self, where: str) -> bool:
        return os.path.lexists(self._root / _key(where))

    def open(self, where: str) -> BinaryIO:
        parts = _key(where).split("/")
        what = f"the layout's file {where!r}"
        if ".." in parts:
            raise ImageError(f"{what} is outside the layout")
        fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                nfd = _open_nofollow(part, what, os.O_DIRECTORY, fd)
                os.close(fd)
                fd = nfd
            return _open_regular(parts[-1], what, fd)
        finally:
            os.close(fd)


def _open_nofollow(name, what: str, flags: int = 0, dir_fd: int | None = None) -> int:
    """An fd of `name`, opened without following a symlink, and with O_NONBLOCK, so that a FIFO
    does not block the open."""
    try:
        return os.open(name, _OPEN_FLAGS | flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ImageError(f"{what} does not exist") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ImageError(f"{what} is a symlink or lies under a symlink or file, which is not followed") from None
        raise ImageError(f"{what}: cannot open it ({e.strerror})") from None


def _open_regular(name, what: str, dir_fd: int | None = None) -> BinaryIO:
    """`name` opened for reading if it is a regular file, checked by fstat before the first read
    (a FIFO would block it, /dev/zero never end it)."""
    fd = _open_nofollow(name, what, 0, dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"{what} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


@contextmanager
def _open_source(path: Path, store: LayerStore, budget: ImportBudget) -> Iterator[_Source]:
    if path.is_dir():
        yield _DirSource(path)
        return
    if not path.exists():
        raise NotFound(f"{path}: no such file or directory")
    with _open_regular(path.resolve(), str(path)) as f, _uncompressed(f, store, budget) as plain:
        yield _TarSource(plain, str(path))


@contextmanager
def _uncompressed(f: BinaryIO, store: LayerStore, budget: ImportBudget) -> Iterator[BinaryIO]:
    """The archive itself if plain; else decompressed once, as the budget allows, into an unnamed
    file in the store: a compressed stream read by offset is decompressed again from its start
    for every backward seek."""
    codec = next((c for magic, c in _OUTER_CODECS.items() if os.pread(f.fileno(), 6, 0).startswith(magic)), None)
    if codec is None:
        yield f
        return
    with store.scratch_file() as out:
        try:
            with codec(f) as z:
                while chunk := z.read(_CHUNK):
                    budget.charge("the decompressed archive", len(chunk))
                    out.write(chunk)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise  # the disk, not the archive
            raise ImageError(f"corrupt compressed archive ({e})") from None
        out.flush()
        out.seek(0)
        yield out
