"""The syscalls the runtime needs and Python 3.11 lacks, through ctypes, in one place.

Raising OSError with errno like the os module does keeps callers uniform.
"""

import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import stat
import struct
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

_SYS_PIVOT_ROOT = 155  # x86_64
_SYS_MOUNT_SETATTR = 442


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                    ctypes.c_ulong(flags), data.encode() if data else None),
        f"mount {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")


def mount_setattr_recursive(target: str, attr_set: int) -> None:
    """Set MOUNT_ATTR_* on target and every mount below it at once (Linux 5.12), unlike a bind remount."""
    attr = struct.pack("=QQQQ", attr_set, 0, 0, 0)  # struct mount_attr: set, clr, propagation, userns_fd
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, AT_FDCWD, target.encode(), AT_RECURSIVE, attr, len(attr)),
           f"mount_setattr {target}")


def _prctl(option: int, arg: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), what)


def drop_bounding_cap(cap: int) -> None:
    _prctl(PR_CAPBSET_DROP, cap, f"prctl(PR_CAPBSET_DROP, {cap})")


def clear_ambient_caps() -> None:
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")


def set_caps(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) for this process: each set a bit mask of CAP_* numbers (two 32-bit halves in v3)."""
    header = struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = b"".join(struct.pack("=III", effective >> s & 0xFFFFFFFF, permitted >> s & 0xFFFFFFFF,
                                inheritable >> s & 0xFFFFFFFF) for s in (0, 32))
    _check(_libc.capset(header, data), "capset")


def set_no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


def set_seccomp_filter(program: bytes) -> None:
    """Install a classic BPF seccomp filter (packed struct sock_filter[]) on this thread."""
    insns = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("=H6xQ", len(program) // 8, ctypes.addressof(insns))  # struct sock_fprog
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog, 0, 0), "prctl(PR_SET_SECCOMP)")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def die_with_parent() -> None:
    """In a child before its exec: SIGTERM when the thread that started it ends (the tool killed,
    say), so a helper of ours never outlives us."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "prctl")


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """PATH holds DATA whole or not at all (a temporary file beside it, renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def set_child_subreaper() -> None:
    """Orphans in our subtree become our children, so we reap them (PID 1 here reaps slowly)."""
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl")


def send_signal(pid: int | None, sig: int) -> None:
    """Signal a process by PID; one that is already gone (or no PID at all) is fine."""
    if pid:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stat(pid: int | None) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, start time at 19)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def proc_state(pid: int | None) -> str | None:
    """R, S, D, T (stopped), Z (zombie)...; None once it is gone."""
    fields = _stat(pid)
    return fields[0] if fields else None


def proc_identity(pid: int | None) -> tuple[int, int] | None:
    """(pid, start time in clock ticks): tells a process from a later one that reuses its PID."""
    fields = _stat(pid)
    return (pid, int(fields[19])) if fields else None


def proc_gone(ident: tuple[int, int] | None) -> bool:
    """True when that very process is gone, or only a zombie left for a slow PID 1 to reap."""
    fields = _stat(ident[0]) if ident else None
    return fields is None or fields[0] == "Z" or int(fields[19]) != ident[1]


def pid_running(pid: int) -> bool:
    """Alive and not a zombie waiting for a slow PID 1 (a zombie holds no namespaces or mounts)."""
    return proc_state(pid) not in (None, "Z")


def is_mountpoint(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below prefix, deepest first (the order to unmount them)."""
    prefix = os.path.realpath(prefix)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def reader_gone(stream) -> bool:
    """Whether STREAM (a pipe or socket) has nobody left to read it, as `migrate ps | head`'s
    standard output once head has exited."""
    try:
        poll = select.poll()
        poll.register(stream.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def detach(stream) -> None:
    """Point STREAM's descriptor at /dev/null once its reader is gone: what is still buffered
    for it must not fail again when the interpreter flushes it at exit."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.dup2(null, stream.fileno())
    os.close(null)


def fsync_tree(path: str | os.PathLike) -> None:
    """Every regular file and folder below path on disk (before what they replace goes)."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # a symlink, a socket, a device node: nothing of ours to flush
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or unlink in that folder durable."""
    fd = os.open(path, os.O_DIRECTORY | os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
