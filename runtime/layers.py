"""Content-addressed store of image layers: each one's blob as its image had it, and the tree
extracted from it, ready to be an overlayfs lowerdir.

A layer lives at `<store>/sha256/<hex>/`, named by the sha256 of its blob (the digest its image
lists, compressed or plain), with `<hex>.json` beside it (blob size, diff_id) and the blob itself
at `<store>/blobs/sha256/<hex>`. Layers come from untrusted archives, so the extractor walks every
path itself through directory fds opened with O_NOFOLLOW instead of trusting tarfile: nothing it
writes can land outside the layer, whatever the symlinks inside say.

The blob is kept because a tree cannot be checked against its digest (it does not give back the
tar it came from): another host (a migration, a snapshot archive) is sent the blob, verifies it
against the digest and extracts it itself, as an import does (REVIEW S6). A blob that does not
hash to its name is refused, so no host ever holds a tree under a digest it did not verify.
"""

import contextlib
import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import BinaryIO

import zstandard

from runtime import linux
from runtime.errors import ImageError, InvalidInput, MigrateError, NotFound

LAYER_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What a corrupt or truncated stream raises while being decompressed or untarred.
CORRUPT = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)
OPAQUE_MARKER = ".wh..wh..opq"
WHITEOUT_PREFIX = ".wh."
# Bounds on what one tar stream may make the reader do (REVIEW S3): tarfile reads a pax or GNU
# long-name header whole into memory, and every member costs an inode.
MAX_HEADER_BYTES = 1 << 20
MAX_MEMBERS = 1_000_000
# Bounds on what one import may write (REVIEW S3), over its outer archive and all its layers (their
# trees and kept blobs): the caps stop an archive that claims absurd sizes (a sparse member counts
# at the size it expands to, since it is written out densely), and the reserve keeps an import
# from filling the filesystem the running containers write to.
MAX_MEMBER_BYTES = 32 << 30
MAX_IMPORT_BYTES = 128 << 30
# What an import leaves free for the containers' logs and snapshots: 5% of the filesystem (1%
# of its inodes), at most these, so that a small disk is not refused outright
FREE_BYTES_RESERVE = 1 << 30
FREE_INODES_RESERVE = 10_000
# xattrs an overlay-native tree (an upper dir, a stored layer) may carry; others are dropped
NATIVE_XATTRS = ("trusted.overlay.", "user.", "security.capability", "system.posix_acl_access",
                 "system.posix_acl_default")
XATTR_PAX = "SCHILY.xattr."


def parse_digest(digest: str) -> str:
    """The hex part of a `sha256:<hex>` digest; only sha256 is supported."""
    m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise InvalidInput(f"not a sha256 digest: {digest!r}")
    return m.group(1)


class OverlayWhiteouts:
    """Writes OCI whiteouts in overlayfs form. A seam: tests without root pass a recorder instead."""

    def whiteout(self, dir_fd: int, name: str, member: str) -> None:
        """Hide `name` of the lower layers: a 0:0 character device (needs CAP_MKNOD)."""
        try:
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)
        except PermissionError:
            raise MigrateError(f"whiteout {member!r}: creating overlayfs whiteouts needs root") from None

    def opaque(self, dir_fd: int, member: str) -> None:
        """Hide everything the lower layers have in this directory (trusted xattr, needs root)."""
        try:
            os.setxattr(dir_fd, "trusted.overlay.opaque", b"y")
        except PermissionError:
            raise MigrateError(f"opaque marker {member!r}: setting trusted.* xattrs needs root") from None


def free_space(path: Path) -> tuple[int, int | None]:
    """Bytes and inodes an import may use on path's filesystem: what is left for unprivileged
    users (root's reserved blocks stay for the system) less the reserve; None for inodes where
    the filesystem has no fixed number (btrfs)."""
    st = os.statvfs(path)
    reserve = min(FREE_BYTES_RESERVE, st.f_blocks * st.f_frsize // 20)
    inodes = max(0, st.f_favail - min(FREE_INODES_RESERVE, st.f_files // 100)) if st.f_files else None
    return max(0, st.f_bavail * st.f_frsize - reserve), inodes


class ImportBudget:
    """What one import may still write: its caps, and the store's free space less a reserve, read
    once at the start, so that an archive too big is refused before the disk is full."""

    def __init__(self, store: Path):
        self._store = store
        self._free_bytes, self._free_inodes = free_space(store)
        self._bytes = self._inodes = 0

    def charge(self, what: str, nbytes: int, inodes: int = 0) -> None:
        self._bytes += nbytes
        self._inodes += inodes
        if self._bytes > MAX_IMPORT_BYTES:
            raise ImageError(f"{what}: the image expands to more than {MAX_IMPORT_BYTES} bytes, the limit of one import")
        if self._bytes > self._free_bytes or (self._free_inodes is not None and self._inodes > self._free_inodes):
            raise ImageError(f"{what}: not enough free space in {self._store} (an import leaves 5% of the disk, "
                             "at most 1 GiB, and 1% of its inodes, at most 10,000, free)")

    def charge_member(self, what: str, m: tarfile.TarInfo) -> None:
        """One tar member: its size (expanded, if sparse) against the cap per file, then its bytes
        and inode against the budget."""
        if m.size > MAX_MEMBER_BYTES:
            sparse = " (sparse)" if m.issparse() else ""
            raise ImageError(f"{what} is {m.size} bytes{sparse}, more than the {MAX_MEMBER_BYTES} a file may have")
        self.charge(what, m.size if m.isreg() else 0, inodes=1)


class LayerStore:
    def __init__(self, path: Path, whiteouts: OverlayWhiteouts | None = None):
        self.path = Path(path)
        self._whiteouts = whiteouts or OverlayWhiteouts()

    def has(self, digest: str) -> bool:
        return self._tree(digest).is_dir()

    def path_of(self, digest: str) -> Path:
        """The layer's tree."""
        tree = self._tree(digest)
        if not tree.is_dir():
            raise NotFound(f"layer {digest} is not in the store")
        return tree

    def size_of(self, digest: str) -> int:
        """Size of the layer's blob (compressed, as in the archive), not of the extracted tree."""
        return self.meta(digest)["size"]

    def meta(self, digest: str) -> dict:
        """The layer's sidecar: its blob's `size` and its `diff_id` (the sha256 of the tar inside)."""
        return json.loads((self.path_of(digest).with_suffix(".json")).read_text())

    def has_blob(self, digest: str) -> bool:
        """False for a layer imported before the store kept blobs: it cannot be sent to another host."""
        return self._blob(digest).is_file()

    def blob_of(self, digest: str) -> Path:
        """The layer's blob, as its image had it: what another host verifies and extracts."""
        if not self.has_blob(digest):
            if self.has(digest):
                raise NotFound(f"layer {digest} has no blob here (it was imported before the store kept them): "
                               "import its image again on this host to keep it")
            raise NotFound(f"layer {digest} is not in the store")
        return self._blob(digest)

    def digests(self) -> list[str]:
        """The layers held: those with a tree."""
        return _names(self.path / "sha256", dirs=True)

    def stored(self) -> list[str]:
        """Every digest the store has anything of, a tree or a blob alone (an import that died
        between the two leaves one): what garbage collection goes through."""
        return sorted(set(self.digests()) | set(_names(self._blobs(), dirs=False)))

    def remove(self, digest: str) -> None:
        """The tree, its sidecar and its blob."""
        layer, blob = self._tree(digest), self._blob(digest)
        if not layer.is_dir() and not blob.is_file():
            raise NotFound(f"layer {digest} is not in the store")
        if layer.is_dir():
            self._tmp().mkdir(parents=True, exist_ok=True)
            doomed = Path(tempfile.mkdtemp(dir=self._tmp(), prefix="rm-")) / "layer"
            layer.rename(doomed)  # the layer vanishes atomically; deleting the tree may take a while
            layer.with_suffix(".json").unlink(missing_ok=True)
            _force_rmtree(doomed.parent)
        blob.unlink(missing_ok=True)

    def remove_unused(self, digest: str, in_use: Collection[str]) -> bool:
        """Remove one layer unless `in_use` (the digests the catalog's images, containers and
        snapshots refer to, taken under its write lock) names it; False if kept or absent."""
        if digest in in_use or not self.has(digest):
            return False
        self.remove(digest)
        return True

    def add_from_stream(
        self,
        digest: str,
        fileobj: BinaryIO,
        media_type: str | None,
        *,
        size: int | None = None,
        diff_id: str | None = None,
        budget: ImportBudget | None = None,
        scratch: Path | None = None,
    ) -> bool:
        """Verify the blob read from `fileobj` against `digest` (and `size`, `diff_id` when given),
        and store it and the tree extracted from it. Returns False when the layer was already
        there (the stream is still verified, and kept if the layer had no blob yet). On any
        failure nothing new is left in the store.

        The compression (gzip, zstd or none) is taken from the magic bytes, not the media type,
        which only has to be a known layer type (None for docker-archive layers, which have none).
        `budget` is the import's, shared by its layers (the blob counts too); without one, the
        layer gets its own. The work is done in a folder made in `scratch` (default: the store's
        tmp), which must be on the store's filesystem.
        """
        hex_ = parse_digest(digest)
        if diff_id is not None:
            parse_digest(diff_id)
        if media_type is not None and media_type not in LAYER_MEDIA_TYPES:
            raise ImageError(f"layer {digest}: unsupported media type {media_type!r}")
        final, blob_path = self._tree(digest), self._blob(digest)
        present = final.is_dir()
        if present and blob_path.is_file():
            self._verify_present(digest, fileobj, size, diff_id)
            return False
        budget = budget or self.import_budget()
        for d in (self.path / "sha256", blob_path.parent):
            d.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=scratch or self._tmp(), prefix=f"{hex_[:12]}-"))
        sidecar = final.with_suffix(".json")
        try:
            with open(work / "blob", "xb") as kept:
                def keep(data: bytes) -> None:
                    budget.charge(f"layer {digest}", len(data))
                    kept.write(data)

                blob = Digesting(fileobj, keep)
                if present:  # imported before the store kept blobs: verified, and its blob kept now
                    drain(blob)
                    diff_id_found = self.meta(digest)["diff_id"]
                else:
                    tar_stream = Digesting(_decompressor(blob, digest))
                    (work / "tree").mkdir()
                    _Extractor(work / "tree", f"layer {digest}", self._whiteouts, budget=budget).run(tar_stream)
                    drain(tar_stream)
                    drain(blob)
                    diff_id_found = "sha256:" + tar_stream.hexdigest()
            _check(digest, blob, size, diff_id_found, diff_id)
            # The blob and the sidecar first: a layer directory never exists without them.
            os.replace(work / "blob", blob_path)
            if present:
                return False
            linux.write_atomic(sidecar, json.dumps({"size": blob.size, "diff_id": diff_id_found}).encode())
            try:
                (work / "tree").rename(final)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                return False  # another import stored the same layer meanwhile
        except BaseException as e:
            if not final.exists():
                sidecar.unlink(missing_ok=True)
                blob_path.unlink(missing_ok=True)
            if isinstance(e, CORRUPT):
                raise ImageError(f"layer {digest}: corrupt or truncated data ({e})") from None
            raise
        finally:
            _force_rmtree(work)
        return True

    def import_budget(self) -> ImportBudget:
        """A fresh budget for one import into this store (which it creates if need be)."""
        self._tmp().mkdir(parents=True, exist_ok=True)
        return ImportBudget(self.path)

    def scratch_file(self) -> BinaryIO:
        """An unnamed file on the store's filesystem: it vanishes when closed or when the process
        dies, so no interrupted import leaves it behind."""
        self._tmp().mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryFile(dir=self._tmp())

    def staging_dir(self) -> Path:
        """A fresh folder on the store's filesystem, for layer blobs arriving from another host."""
        self._tmp().mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self._tmp(), prefix="incoming-"))

    def adopt(self, digest: str, staged: Path, budget: ImportBudget | None = None) -> bool:
        """Add the layer whose blob another host copied into `staged` (by blob_of's name): it must
        hash to `digest` before anything is extracted, then it is extracted as an import does.
        The staged file is consumed either way, and the extraction is done inside `staged`, which
        is swept with it if this process dies; False if the store held the layer already."""
        where = staged / parse_digest(digest)
        try:
            with _open_staged(where, digest) as f:
                blob = Digesting(f)
                drain(blob)
                _check(digest, blob, None, None, None)
                f.seek(0)
                return self.add_from_stream(digest, f, None, budget=budget, scratch=staged)
        finally:
            with contextlib.suppress(OSError):
                where.unlink()

    def _verify_present(self, digest: str, fileobj: BinaryIO, size: int | None, diff_id: str | None) -> None:
        blob = Digesting(fileobj)
        drain(blob)
        _check(digest, blob, size, self.meta(digest)["diff_id"], diff_id)

    def _tree(self, digest: str) -> Path:
        return self.path / "sha256" / parse_digest(digest)

    def _blob(self, digest: str) -> Path:
        return self._blobs() / parse_digest(digest)

    def _blobs(self) -> Path:
        return self.path / "blobs" / "sha256"

    def _tmp(self) -> Path:
        return self.path / "tmp"


def _names(folder: Path, dirs: bool) -> list[str]:
    """The digests named by the folders (or the files) in `folder`."""
    if not folder.is_dir():
        return []
    return sorted(f"sha256:{p.name}" for p in folder.iterdir()
                  if re.fullmatch("[0-9a-f]{64}", p.name) and (p.is_dir() if dirs else p.is_file()))


def _open_staged(path: Path, digest: str) -> BinaryIO:
    """A staged blob, opened without following a symlink and only if it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise ImageError(f"layer {digest} did not arrive (no plain file {path.name} in staging)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"layer {digest} did not arrive as a plain file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _check(digest: str, blob: "Digesting", size: int | None, actual_diff_id: str | None, diff_id: str | None) -> None:
    actual = "sha256:" + blob.hexdigest()
    if actual != digest:
        raise ImageError(f"layer {digest}: digest mismatch, the blob hashes to {actual}")
    if size is not None and blob.size != size:
        raise ImageError(f"layer {digest}: blob is {blob.size} bytes, the manifest says {size}")
    if diff_id is not None and actual_diff_id != diff_id:
        raise ImageError(f"layer {digest}: uncompressed content hashes to {actual_diff_id}, the config says {diff_id}")


class Digesting:
    """Passes a stream through, hashing and counting every byte read (and handing it to `sink`)."""

    def __init__(self, src, sink: Callable[[bytes], None] | None = None):
        self._src = src
        self._sink = sink
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        self._hash.update(data)
        self.size += len(data)
        if self._sink is not None:
            self._sink(data)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _Rewound:
    """A stream with its first bytes, already read to sniff the magic, put back in front."""

    def __init__(self, head: bytes, rest):
        self._head = head
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(n)
        if n < 0:
            data, self._head = self._head + self._rest.read(), b""
        else:
            data, self._head = self._head[:n], self._head[n:]
        return data


def _decompressor(blob: Digesting, digest: str):
    head = b""
    while len(head) < 4:
        more = blob.read(4 - len(head))
        if not more:
            break
        head += more
    raw = _Rewound(head, blob)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
    if head.startswith((b"BZh", b"\xfd7zX")):
        raise ImageError(f"layer {digest}: bzip2/xz compressed layers are not supported")
    return raw


class _Bounded:
    """A stream that refuses to be read past a limit the reader moves forward member by member:
    what a tar header may make tarfile read into memory stays bounded."""

    def __init__(self, src, label: str):
        self._src = src
        self._label = label
        self.consumed = 0
        self.limit = MAX_HEADER_BYTES

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n if n >= 0 else _CHUNK)
        self.consumed += len(data)
        if self.consumed > self.limit:
            raise ImageError(f"{self._label}: a tar header is larger than {MAX_HEADER_BYTES} bytes")
        return data


def tar_members(stream, label: str):
    """(tar, member) of a tar stream read front to back, with its headers and member count
    bounded (MAX_HEADER_BYTES, MAX_MEMBERS); each member's data must be read before the next."""
    bounded = _Bounded(stream, label)
    with tarfile.open(fileobj=bounded, mode="r|") as tar:
        for count, member in enumerate(tar, 1):
            if count > MAX_MEMBERS:
                raise ImageError(f"{label}: more than {MAX_MEMBERS} members")
            bounded.limit = bounded.consumed + member.size + MAX_HEADER_BYTES
            yield tar, member


def drain(stream) -> None:
    while stream.read(_CHUNK):
        pass


def _force_rmtree(path: Path) -> None:
    """rmtree that also gets through read-only directories an unprivileged extraction may leave."""
    if not os.path.lexists(path):
        return
    if not os.path.islink(path):
        os.chmod(path, 0o700)
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    shutil.rmtree(path)


def _member_parts(name: str, what: str) -> tuple[str, ...]:
    """Path components of an archive path, refusing anything that could leave the layer."""
    if name.startswith("/"):
        raise ImageError(f"{what} has an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ImageError(f"{what} has a '..' component")
    return parts


class _Extractor:
    """Extracts one tar stream into an empty directory, member by member.

    An image layer comes in OCI form (`.wh.` files are whiteouts). A `native` tree (a snapshot's
    upper dir, a stored layer, as runtime/archive.py carries them) is already in overlayfs form:
    its whiteouts are 0:0 character devices (no other device is accepted), and its opaque
    directories and other overlay marks are the xattrs NATIVE_XATTRS allows.
    """

    def __init__(
        self, root: Path, label: str, whiteouts: OverlayWhiteouts, native: bool = False,
        budget: ImportBudget | None = None,
    ):
        self._root = root
        self._budget = budget
        self._label = label
        self._whiteouts = whiteouts
        self._native = native
        self._privileged = os.geteuid() == 0
        self._extracted: set[tuple[str, ...]] = set()  # non-directories, the valid hard link targets
        self._dir_attrs: dict[tuple[str, ...], tarfile.TarInfo] = {}
        self._root_fd = -1

    def run(self, stream) -> None:
        self._root_fd = os.open(self._root, _DIR_FLAGS)
        member = None
        try:
            os.chmod(self._root_fd, 0o755)  # the container's "/" unless the layer says otherwise
            for tar, member in tar_members(stream, self._label):
                self._member(tar, member)
            member = None
            for parts in sorted(self._dir_attrs, reverse=True):  # children before their parents
                fd = self._open_dir(parts, create=False, what=f"directory {'/'.join(parts)!r}")
                try:
                    self._set_attrs(fd, None, self._dir_attrs[parts])
                    self._set_xattrs(fd, None, self._dir_attrs[parts])
                finally:
                    os.close(fd)
        except CORRUPT:
            raise
        except (OSError, ValueError, OverflowError) as e:
            what = f"member {member.name!r}" if member else "directory attributes"
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MigrateError(f"{self._label}: {what}: {reason}") from None
            raise ImageError(f"{self._label}: cannot extract {what}: {reason}") from None
        finally:
            os.close(self._root_fd)

    def _what(self, member: tarfile.TarInfo) -> str:
        return f"{self._label}: member {member.name!r}"

    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _member_parts(m.name, self._what(m))
        if self._budget is not None:
            self._budget.charge_member(self._what(m), m)
        if not parts:  # the "./" entry: the layer root itself
            if m.isdir():
                self._dir_attrs[()] = m
            return
        parent = self._open_dir(parts[:-1], create=True, what=self._what(m))
        try:
            leaf = parts[-1]
            if leaf.startswith(WHITEOUT_PREFIX) and not self._native:
                self._whiteout(parent, leaf, m)
            elif self._make_room(parent, leaf, m):
                self._create(tar, parent, parts, m)
        finally:
            os.close(parent)

    def _open_dir(self, parts: tuple[str, ...], create: bool, what: str) -> int:
        """An fd of the directory at `parts`, reached without following any symlink."""
        fd = os.dup(self._root_fd)
        try:
            for i, comp in enumerate(parts):
                nfd = self._open_child(fd, comp, create, what, "/".join(parts[: i + 1]))
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _open_child(fd: int, comp: str, create: bool, what: str, where: str) -> int:
        try:
            return os.open(comp, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ImageError(f"{what} would be written through {where!r}, which is not a directory") from None
            raise
        os.mkdir(comp, 0o700, dir_fd=fd)
        nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
        os.chmod(nfd, 0o755)  # an implied parent; an explicit entry may set it later
        return nfd

    def _whiteout(self, parent: int, leaf: str, m: tarfile.TarInfo) -> None:
        if leaf == OPAQUE_MARKER:
            self._whiteouts.opaque(parent, m.name)
            return
        if leaf.startswith(WHITEOUT_PREFIX * 2):
            return  # other .wh..wh. names are AUFS bookkeeping, meaningless here
        name = leaf[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", ".."):
            raise ImageError(f"{self._what(m)} is a whiteout of nothing")
        if _lstat(name, parent) is None:  # a whiteout never hides what its own layer adds
            self._whiteouts.whiteout(parent, name, m.name)

    def _make_room(self, parent: int, leaf: str, m: tarfile.TarInfo) -> bool:
        """Clears the way for `m` the way tar does: a later entry replaces an earlier one.
        Returns False for a directory entry over an existing directory (only its attributes change)."""
        st = _lstat(leaf, parent)
        if st is None:
            return True
        if stat.S_ISDIR(st.st_mode):
            if m.isdir():
                return False
            raise ImageError(f"{self._what(m)} would replace a directory")
        os.unlink(leaf, dir_fd=parent)
        return True

    def _create(self, tar: tarfile.TarFile, parent: int, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        leaf = parts[-1]
        if self._native and m.issparse():
            raise ImageError(f"{self._what(m)} is a sparse file, which a native tree never holds")
        if m.isreg():
            fd = os.open(
                leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
            )
            try:
                src = tar.extractfile(m)
                while chunk := src.read(_CHUNK):
                    _write_all(fd, chunk)
                self._set_attrs(fd, None, m)
                self._set_xattrs(fd, None, m)
            finally:
                os.close(fd)
        elif m.isdir():
            os.mkdir(leaf, 0o700, dir_fd=parent)
            self._dir_attrs[parts] = m
            return
        elif m.issym():
            os.symlink(m.linkname, leaf, dir_fd=parent)  # may point anywhere: never followed here
            self._set_attrs(parent, leaf, m)
        elif m.islnk():
            self._hardlink(parent, leaf, m)
        elif m.isfifo() or m.ischr() or m.isblk():
            self._node(parent, leaf, m)
            self._set_attrs(parent, leaf, m)
            self._set_xattrs(parent, leaf, m)
        else:
            raise ImageError(f"{self._what(m)} has unsupported tar type {m.type!r}")
        self._extracted.add(parts)

    def _hardlink(self, parent: int, leaf: str, m: tarfile.TarInfo) -> None:
        what = f"{self._what(m)} (hard link to {m.linkname!r})"
        target = _member_parts(m.linkname, what)
        if target not in self._extracted:
            raise ImageError(f"{what} does not link to a file extracted before it in this layer")
        tdir = self._open_dir(target[:-1], create=False, what=what)
        try:
            os.link(target[-1], leaf, src_dir_fd=tdir, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(tdir)

    def _node(self, parent: int, leaf: str, m: tarfile.TarInfo) -> None:
        if m.isfifo():
            os.mkfifo(leaf, 0o600, dir_fd=parent)
            return
        if self._native and not (m.ischr() and (m.devmajor, m.devminor) == (0, 0)):
            raise ImageError(f"{self._what(m)} is a device node, and only overlay whiteouts (0:0) are accepted")
        kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
        try:
            os.mknod(leaf, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=parent)
        except PermissionError:
            raise MigrateError(f"{self._what(m)}: creating device nodes needs root") from None

    def _set_attrs(self, fd: int, leaf: str | None, m: tarfile.TarInfo) -> None:
        """Owner, then mode (chown clears setuid bits), then mtime; of `fd` itself, or of `leaf` in
        directory `fd`, which this extractor has just created so it is no symlink unless m is one."""
        mtime = int(m.mtime * 1_000_000_000)
        if leaf is None:
            if self._privileged:
                os.chown(fd, m.uid, m.gid)
            os.chmod(fd, m.mode & 0o7777)
            os.utime(fd, ns=(mtime, mtime))
            return
        if self._privileged:
            os.chown(leaf, m.uid, m.gid, dir_fd=fd, follow_symlinks=False)
        if not m.issym():  # Linux has no mode for symlinks
            os.chmod(leaf, m.mode & 0o7777, dir_fd=fd)
        os.utime(leaf, ns=(mtime, mtime), dir_fd=fd, follow_symlinks=False)


    def _set_xattrs(self, fd: int, leaf: str | None, m: tarfile.TarInfo) -> None:
        """A native tree's allowed xattrs (pax SCHILY.xattr.*), of `fd` or of `leaf` in directory `fd`."""
        if not self._native:
            return  # an image's xattrs are ignored: a layer must not inject trusted.overlay.*
        for key, value in m.pax_headers.items():
            name = key[len(XATTR_PAX):]
            if not key.startswith(XATTR_PAX) or not name.startswith(NATIVE_XATTRS):
                continue
            raw = value.encode("utf-8", "surrogateescape")
            if leaf is None:
                os.setxattr(fd, name, raw)
            else:  # reached through the directory fd, the leaf itself never followed
                os.setxattr(f"/proc/self/fd/{fd}/{leaf}", name, raw, follow_symlinks=False)


def extract_native_tree(stream, dest: Path, label: str) -> None:
    """Extract a tar written by native_tree_tar into the empty folder dest, as safely as a layer."""
    _Extractor(dest, label, OverlayWhiteouts(), native=True).run(stream)


def native_tree_tar(src: Path, out: BinaryIO) -> None:
    """Write the tree at src as a pax tar to `out`, in the form a native _Extractor reads back:
    numeric owners, hard links, whiteout devices, xattrs; sockets (recreated by whoever binds
    them) are left out."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirs, files in os.walk(src):
            dirs.sort()
            rel = os.path.relpath(dirpath, src)
            links = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]  # never walked into
            for name in [None, *sorted(files), *links]:
                path = dirpath if name is None else os.path.join(dirpath, name)
                arcname = rel if name is None else os.path.normpath(os.path.join(rel, name))
                info = tar.gettarinfo(path, arcname)
                if info is None:
                    continue  # a socket
                info.uname = info.gname = ""
                info.pax_headers = {XATTR_PAX + k: os.getxattr(path, k, follow_symlinks=False).decode(
                    "utf-8", "surrogateescape") for k in os.listxattr(path, follow_symlinks=False)}
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
