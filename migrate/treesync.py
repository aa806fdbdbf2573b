"""Sending the changes a frozen container made to a tree since a walk of it, over the agent channel.

A full `rsync -aHAX --numeric-ids --delete` of the overlay upper dir inside the freeze costs an SSH
channel and two file lists, however little changed. Instead the tree is walked (lstat only) just
before the running rsync copies it; in the freeze it is walked again, and only the entries that
differ are packed as a JSON-able packet and applied on the other host into rsync's copy, with the
same result a frozen rsync would have had. Small folders (CRIU's images) go whole the same way.

The packet comes from another host: unpack validates all of it before writing anything, and
reaches every path through directory fds opened with O_NOFOLLOW, so nothing lands outside root.
"""

import base64
import binascii
import errno
import os
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from runtime.errors import InvalidInput, MigrateError

# The kernel's ctime ticks coarsely: a change right after the walk's lstat may leave every field as
# it was (git's "racy git"). Entries whose ctime was this close to the walk's start, or after it,
# are resent whatever their stat says.
RACY_NS = 1_000_000_000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TYPES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
    stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}
_NODE_BITS = {"char": stat.S_IFCHR, "block": stat.S_IFBLK, "socket": stat.S_IFSOCK}
_COMMON_KEYS = {"path", "type", "mode", "uid", "gid", "mtime_ns", "xattrs"}
_TYPE_KEYS = {"file": {"data"}, "symlink": {"target"}, "char": {"rdev"}, "block": {"rdev"}}
_XATTR_NAMESPACES = ("user.", "trusted.", "security.", "system.")
_PATH_MAX = 4095  # bytes, as Linux's PATH_MAX less the NUL
_NAME_MAX = 255
_XATTR_SIZE_MAX = 65536
_ID_MAX = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to chown
_INT64 = 2**63


class Entry(NamedTuple):
    """One entry as lstat'ed: a difference in any field means it changed."""

    mode: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    uid: int
    gid: int
    rdev: int


@dataclass(frozen=True)
class Walk:
    """A tree's entries as lstat'ed, and when the walk started."""

    entries: dict[str, Entry]
    started_ns: int

    def data_bytes(self, paths: Iterable[str] | None = None) -> int:
        """Regular-file data of these entries (all by default), hard-linked files once."""
        sizes = {}
        for path in self.entries if paths is None else paths:
            entry = self.entries[path]
            if stat.S_ISREG(entry.mode):
                sizes[entry.ino] = entry.size
        return sum(sizes.values())


@dataclass(frozen=True)
class Changes:
    """What changed in a tree since a walk: parents before children, so the packet applies in order."""

    changed: tuple[str, ...]
    removed: tuple[str, ...]
    now: Walk

    @property
    def data_bytes(self) -> int:
        """Regular-file data a pack of `changed` carries (hard-linked files once)."""
        return self.now.data_bytes(self.changed)


def walk(root: Path) -> Walk:
    """Every entry below root, lstat'ed; a missing root is an empty walk.

    Each directory is listed through an fd checked to be the very directory its parent's listing
    lstat'ed: a container swapping one for a symlink while the running walk reads it cannot lead
    the walk out of the tree. Listing parents before descending puts parents before children.
    """
    started_ns = time.time_ns()
    entries: dict[str, Entry] = {}
    try:
        top = os.stat(root)  # the caller's path, which may itself go through symlinks
    except FileNotFoundError:
        return Walk(entries, started_ns)
    pending = [("", os.path.realpath(root), top.st_dev, top.st_ino)]
    while pending:
        prefix, folder, dev, ino = pending.pop()
        try:
            fd = os.open(folder, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            if e.errno == errno.ELOOP:
                continue
            raise
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (dev, ino):
                continue  # replaced since its parent was listed: the next walk sees what is there now
            with os.scandir(fd) as listing:
                for item in listing:
                    try:
                        st = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    path = prefix + item.name
                    entries[path] = Entry(st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                          st.st_nlink, st.st_uid, st.st_gid, st.st_rdev)
                    if stat.S_ISDIR(st.st_mode):
                        pending.append((path + "/", f"{folder}/{item.name}", st.st_dev, st.st_ino))
        finally:
            os.close(fd)
    return Walk(entries, started_ns)


def changes(before: Walk, root: Path, always: Iterable[str] = ()) -> Changes:
    """Walks root again: the entries new or different since `before`, racy ones, and `always` (files the
    frozen processes map shared-writable, whose writes need not touch ctime); and the entries gone.
    An entry whose file type changed is both removed and changed. A removed directory stands for its tree."""
    now = walk(root)
    forced = set(always)
    racy_since = before.started_ns - RACY_NS
    changed: list[str] = []
    removed: list[str] = []
    for path, entry in now.entries.items():
        old = before.entries.get(path)
        if old is None:
            changed.append(path)
        elif stat.S_IFMT(old.mode) != stat.S_IFMT(entry.mode):
            removed.append(path)
            changed.append(path)
        elif old != entry or old.ctime_ns >= racy_since or path in forced:
            changed.append(path)
    removed.extend(path for path in before.entries if path not in now.entries)
    gone = set(removed)
    outermost = sorted(path for path in gone if not _under_any(path, gone))
    return Changes(tuple(changed), tuple(outermost), now)


def _under_any(path: str, folders: set[str]) -> bool:
    parent, sep, _ = path.rpartition("/")
    while sep:
        if parent in folders:
            return True
        parent, sep, _ = parent.rpartition("/")
    return False


def pack(root: Path, paths: Iterable[str], removed: Iterable[str] = ()) -> dict:
    """The packet that makes the other host's copy of these entries (parents before children, as walk and
    changes list them) what rsync -aHAX --numeric-ids would make it. Entries gone since the walk are
    sent as removed; of hard-linked names among `paths`, the first carries the data, the others link to it."""
    entries: list[dict] = []
    gone = list(removed)
    first_names: dict[tuple[int, int], str] = {}
    for path in paths:
        item = _describe(os.path.join(root, path), path, first_names)
        if item is None:
            gone.append(path)
        else:
            entries.append(item)
    return {"entries": entries, "removed": gone}


def full(root: Path) -> dict:
    """The packet of a whole tree (every entry below root)."""
    return pack(root, walk(root).entries)


def _describe(full_path: str, path: str, first_names: dict[tuple[int, int], str]) -> dict | None:
    """One entry of a packet; None if it is gone (the container is frozen, but the walk was before pack)."""
    try:
        st = os.lstat(full_path)
        kind = _TYPES[stat.S_IFMT(st.st_mode)]
        inode = (st.st_dev, st.st_ino)
        if kind != "dir" and st.st_nlink > 1 and inode in first_names:
            return {"path": path, "link": first_names[inode]}
        item = {"path": path, "type": kind}
        if kind == "file":
            fd = os.open(full_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                st = os.fstat(fd)
                item["data"] = _b64(f.read())
                item["xattrs"] = _read_xattrs(fd)
        else:
            item["xattrs"] = _read_xattrs(full_path)
            if kind == "symlink":
                item["target"] = os.readlink(full_path)
            elif kind in ("char", "block"):
                item["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    item.update(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns)
    if kind != "dir" and st.st_nlink > 1:
        first_names[inode] = path
    return item


def _read_xattrs(target: int | str) -> dict[str, str]:
    nofollow = {} if isinstance(target, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(target, **nofollow)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return {}
        raise
    return {name: _b64(os.getxattr(target, name, **nofollow)) for name in names}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Item(NamedTuple):
    """A packet entry, validated and decoded."""

    parts: tuple[str, ...]
    kind: str  # one of _TYPES' names, or "link"
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: dict[str, bytes] = {}
    data: bytes = b""
    target: str = ""
    rdev: tuple[int, int] = (0, 0)
    link: tuple[str, ...] = ()


def unpack(root: Path, packet: dict) -> None:
    """Applies a packet of pack or full to root (created if missing): removed first, then the entries
    in order, then directory mtimes, deepest first, since creating children changes them."""
    removed, items = _validate(packet)
    os.makedirs(root, mode=0o700, exist_ok=True)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _Applier(root_fd, items).run(removed, items)
    finally:
        os.close(root_fd)


def _bad(what: str, problem: str) -> InvalidInput:
    return InvalidInput(f"tree packet: {what} {problem}")


def _validate(packet) -> tuple[list[tuple[str, ...]], list[_Item]]:
    """The packet's removed paths and entries, or InvalidInput for the first thing wrong in it."""
    if not isinstance(packet, dict) or set(packet) != {"entries", "removed"}:
        raise _bad("packet", "is not an object of exactly 'entries' and 'removed'")
    if not isinstance(packet["entries"], list) or not isinstance(packet["removed"], list):
        raise _bad("packet", "has 'entries' or 'removed' that is not a list")
    removed = [_parts(path, f"removed path {i}") for i, path in enumerate(packet["removed"])]
    items: list[_Item] = []
    kinds: dict[tuple[str, ...], str] = {}
    for i, raw in enumerate(packet["entries"]):
        if not isinstance(raw, dict):
            raise _bad(f"entry {i}", "is not an object")
        item = _item(raw, f"entry {i}", kinds)
        if item.parts in kinds:
            raise _bad(f"entry {i}", f"repeats path {raw['path']!r:.100}")
        kinds[item.parts] = item.kind
        items.append(item)
    positions = {item.parts: i for i, item in enumerate(items)}
    for i, item in enumerate(items):  # what is written under a packet entry is written after it, into a dir
        for depth in range(1, len(item.parts)):
            ancestor = positions.get(item.parts[:depth])
            if ancestor is not None and (items[ancestor].kind != "dir" or ancestor > i):
                raise _bad(f"entry {i}", f"lies under entry {ancestor}, which is no directory made before it")
    return removed, items


def _item(raw: dict, what: str, earlier: dict[tuple[str, ...], str]) -> _Item:
    parts = _parts(raw.get("path"), f"{what} path")
    what = f"{what} ({raw['path']!r:.100})"
    if "link" in raw:
        if set(raw) != {"path", "link"}:
            raise _bad(what, "is a hard link with other fields")
        link = _parts(raw["link"], f"{what} link")
        if earlier.get(link) in (None, "dir", "link"):
            raise _bad(what, f"links to {raw['link']!r}, which is no earlier non-directory entry of the packet")
        return _Item(parts, "link", link=link)
    kind = raw.get("type")
    if kind not in _TYPES.values():
        raise _bad(what, f"has unknown type {kind!r}")
    if set(raw) != _COMMON_KEYS | _TYPE_KEYS.get(kind, set()):
        raise _bad(what, f"does not have exactly the fields of a {kind}")
    item = _Item(
        parts, kind, mode=_int(raw["mode"], 0, 0o7777, what, "mode"), uid=_int(raw["uid"], 0, _ID_MAX, what, "uid"),
        gid=_int(raw["gid"], 0, _ID_MAX, what, "gid"),
        mtime_ns=_int(raw["mtime_ns"], -_INT64, _INT64 - 1, what, "mtime_ns"), xattrs=_xattrs(raw["xattrs"], what),
    )
    if kind == "file":
        return item._replace(data=_unb64(raw["data"], what, "data"))
    if kind == "symlink":
        target = raw["target"]
        if not isinstance(target, str) or not target or "\0" in target or len(_encoded(target, what)) > _PATH_MAX:
            raise _bad(what, "has a symlink target that is not a non-empty path without NUL")
        return item._replace(target=target)
    if kind in ("char", "block"):
        rdev = raw["rdev"]
        if not isinstance(rdev, list) or len(rdev) != 2:
            raise _bad(what, "has an rdev that is not [major, minor]")
        major = _int(rdev[0], 0, 2**12 - 1, what, "major")  # the kernel's dev_t: 12 bits, then 20
        return item._replace(rdev=(major, _int(rdev[1], 0, 2**20 - 1, what, "minor")))
    return item


def _parts(path, what: str) -> tuple[str, ...]:
    """A packet path's components: relative, normalized, without NUL, and of a length Linux takes."""
    if not isinstance(path, str) or not path:
        raise _bad(what, "is not a non-empty string")
    if "\0" in path:
        raise _bad(what, f"{path!r:.100} contains NUL")
    if len(_encoded(path, what)) > _PATH_MAX:
        raise _bad(what, "is longer than PATH_MAX")
    parts = tuple(path.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise _bad(what, f"{path!r:.100} is not relative and normalized")
        if len(_encoded(part, what)) > _NAME_MAX:
            raise _bad(what, f"{path!r:.100} has a name longer than NAME_MAX")
    return parts


def _encoded(text: str, what: str) -> bytes:
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:
        raise _bad(what, f"{text!r:.100} is not a file name this host can encode") from None


def _int(value, low: int, high: int, what: str, field: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _bad(what, f"has {field} {value!r:.40} outside {low}..{high}")
    return value


def _unb64(value, what: str, field: str) -> bytes:
    try:
        if not isinstance(value, str):
            raise ValueError
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(what, f"has {field} that is not base64") from None


def _xattrs(raw, what: str) -> dict[str, bytes]:
    if not isinstance(raw, dict):
        raise _bad(what, "has xattrs that are not an object")
    out = {}
    for name, value in raw.items():
        if not name.startswith(_XATTR_NAMESPACES) or "\0" in name or len(_encoded(name, what)) > _NAME_MAX:
            raise _bad(what, f"has xattr name {name!r:.100} outside user., trusted., security., system.")
        out[name] = _unb64(value, what, f"xattr {name!r}")
        if len(out[name]) > _XATTR_SIZE_MAX:
            raise _bad(what, f"has xattr {name!r} larger than {_XATTR_SIZE_MAX} bytes")
    return out


class _Applier:
    """Writes validated entries into the tree at root_fd, never through a symlink of the tree; puts back the
    mtimes of directories whose listing it changed that the packet does not set (replacing a file does that)."""

    def __init__(self, root_fd: int, items: list[_Item]):
        self._root_fd = root_fd
        self._dir_mtimes = {item.parts: item.mtime_ns for item in items if item.kind == "dir"}
        self._touched: dict[tuple[str, ...], tuple[int, int]] = {}  # -> (atime_ns, mtime_ns) before

    def run(self, removed: list[tuple[str, ...]], items: list[_Item]) -> None:
        current = "the packet"
        try:
            for parts in removed:
                current = "/".join(parts)
                self._remove(parts)
            for item in items:
                current = "/".join(item.parts)
                self._put(item)
            current = "directory times"
            self._set_dir_times()
        except OSError as e:
            raise MigrateError(f"tree packet: cannot apply {current!r}: {e.strerror or e}") from None

    def _open_dir(self, parts: tuple[str, ...]) -> int:
        """An fd of the directory at parts, no component followed if it is a symlink."""
        fd = os.dup(self._root_fd)
        try:
            for part in parts:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _touch(self, parent_fd: int, parent: tuple[str, ...]) -> None:
        """Notes a directory's times before its listing first changes, unless the packet sets them."""
        if parent not in self._dir_mtimes and parent not in self._touched:
            st = os.fstat(parent_fd)
            self._touched[parent] = (st.st_atime_ns, st.st_mtime_ns)

    def _remove(self, parts: tuple[str, ...]) -> None:
        """Removes a file, symlink or directory tree; a path already gone, or under a non-directory, is fine."""
        try:
            parent_fd = self._open_dir(parts[:-1])
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return
            raise
        try:
            st = _lstat(parts[-1], parent_fd)
            if st is not None:
                self._unlink(parent_fd, parts, st)
        finally:
            os.close(parent_fd)

    def _unlink(self, parent_fd: int, parts: tuple[str, ...], st: os.stat_result) -> None:
        self._touch(parent_fd, parts[:-1])
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(parts[-1], dir_fd=parent_fd)
        else:
            os.unlink(parts[-1], dir_fd=parent_fd)

    def _put(self, item: _Item) -> None:
        try:
            parent_fd = self._open_dir(item.parts[:-1])
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                where = "/".join(item.parts)
                raise _bad(f"entry {where!r}", "would be written through something that is no directory") from None
            raise
        try:
            leaf = item.parts[-1]
            st = _lstat(leaf, parent_fd)
            keep_dir = st is not None and item.kind == "dir" and stat.S_ISDIR(st.st_mode)
            if st is not None and not keep_dir:
                self._unlink(parent_fd, item.parts, st)
            if not keep_dir:
                self._touch(parent_fd, item.parts[:-1])
            self._create(parent_fd, leaf, item, keep_dir)
        finally:
            os.close(parent_fd)

    def _create(self, parent_fd: int, leaf: str, item: _Item, keep_dir: bool) -> None:
        if item.kind == "link":
            target_fd = self._open_dir(item.link[:-1])
            try:
                os.link(item.link[-1], leaf, src_dir_fd=target_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
            finally:
                os.close(target_fd)
        elif item.kind == "file":
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent_fd)
            try:
                _write_all(fd, item.data)
                _set_meta(fd, item)
            finally:
                os.close(fd)
        elif item.kind == "dir":
            if not keep_dir:
                os.mkdir(leaf, 0o700, dir_fd=parent_fd)
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=parent_fd)
            try:
                _set_meta(fd, item)
            finally:
                os.close(fd)
        else:
            if item.kind == "symlink":
                os.symlink(item.target, leaf, dir_fd=parent_fd)  # may point anywhere: never followed here
            elif item.kind == "fifo":
                os.mkfifo(leaf, 0o600, dir_fd=parent_fd)
            else:
                os.mknod(leaf, _NODE_BITS[item.kind] | 0o600, os.makedev(*item.rdev), dir_fd=parent_fd)
            _set_meta(f"/proc/self/fd/{parent_fd}/{leaf}", item)  # the leaf itself, reached through the dir fd

    def _set_dir_times(self) -> None:
        times = {**self._touched, **{parts: (mtime, mtime) for parts, mtime in self._dir_mtimes.items()}}
        for parts in sorted(times, key=len, reverse=True):
            try:
                fd = self._open_dir(parts)
            except OSError as e:
                if parts in self._touched and e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # a directory removed after its listing changed
                raise
            try:
                os.utime(fd, ns=times[parts])
            finally:
                os.close(fd)


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _set_meta(target: int | str, item: _Item) -> None:
    """Owner, then xattrs exactly (chown drops security.capability), then mode (chown clears setuid
    bits; chmod also sets an ACL's mask to match), then mtime but a directory's (set last)."""
    nofollow = {} if isinstance(target, int) else {"follow_symlinks": False}
    os.chown(target, item.uid, item.gid, **nofollow)
    for name in os.listxattr(target, **nofollow):
        if name not in item.xattrs:
            os.removexattr(target, name, **nofollow)
    for name, value in item.xattrs.items():
        os.setxattr(target, name, value, **nofollow)
    if item.kind != "symlink":  # Linux has no mode for symlinks; a path here is a node just made
        os.chmod(target, item.mode)
    if item.kind != "dir":
        os.utime(target, ns=(item.mtime_ns, item.mtime_ns), **nofollow)
