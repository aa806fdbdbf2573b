"""The container's root filesystem: an overlay of the image layers, and the mounts inside it.

The overlay is mounted on the host at the container's rootfs folder, so CRIU can be pointed at
the same kind of mount (`--root`) when it restores, here or on another host. Everything else
(/proc, /dev, volumes) is mounted only inside the container's own mount namespace.
"""

import os
from pathlib import Path

from . import linux
from .errors import MigrateError
from .spec import Volume

# Docker's masked and read-only paths (moby oci/defaults.go) that lie in /proc: the container
# gets no /sys at all. A path this kernel lacks is skipped.
MASKED = ("/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi")
READ_ONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
_LOCKED = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}


def mount_overlay(lower_dirs: list[Path], upper: Path, work: Path, target: Path, *, confined: bool) -> None:
    """lower_dirs are top layer first, as overlayfs wants them. A confined container's root is
    nosuid,nodev: setuid files and device nodes from an image give nothing."""
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    if linux.is_mountpoint(str(target)):
        return
    options = f"lowerdir={':'.join(str(d) for d in lower_dirs)},upperdir={upper},workdir={work}"
    if len(options) > 4000:
        raise MigrateError(f"too many image layers for one overlay mount ({len(lower_dirs)})")
    linux.mount("overlay", str(target), "overlay", linux.MS_NOSUID | linux.MS_NODEV if confined else 0, options)


def unmount_all(target: Path) -> None:
    """Unmount target and anything below it, deepest first."""
    for point in linux.mounts_under(str(target)):
        linux.umount(point, linux.MNT_DETACH)


def enter(rootfs: Path, hostname: str, volumes: tuple[Volume, ...], working_dir: str, *, confined: bool) -> None:
    """In the container's first process, in fresh mount/uts namespaces: build its view and pivot into it.
    A confined one gets Docker's masked and read-only paths, and nosuid,nodev volumes."""
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.sethostname(hostname)
    root = str(rootfs)
    _mount_in(root, "/proc", "proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    _mount_in(root, "/dev", "tmpfs", "tmpfs", linux.MS_NOSUID, "mode=755,size=65536k")
    for name, (major, minor) in _DEVICES.items():
        path = f"{root}/dev/{name}"
        os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(path, 0o666)
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
        os.symlink(target, f"{root}/dev/{link}")
    _mount_in(root, "/dev/pts", "devpts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=620")
    _mount_in(root, "/dev/shm", "shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777,size=65536k")
    _mount_in(root, "/dev/mqueue", "mqueue", "mqueue", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    if confined:
        _mask_proc(root)
    for vol in volumes:
        _bind_volume(root, vol, confined)
    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.umount(".", linux.MNT_DETACH)
    os.chdir("/")
    os.chdir(working_dir)


def _mount_in(root: str, path: str, source: str, fstype: str, flags: int, data: str | None = None) -> None:
    target = root + path
    os.makedirs(target, exist_ok=True)
    linux.mount(source, target, fstype, flags, data)


def _mask_proc(root: str) -> None:
    """/dev/null over masked files, an empty read-only tmpfs over masked folders (both inside the
    container, so CRIU dumps them as its own mounts), read-only binds of the read-only paths."""
    for path in MASKED:
        target = root + path
        if os.path.isdir(target):
            linux.mount("tmpfs", target, "tmpfs", linux.MS_RDONLY | _LOCKED, "size=0")
        elif os.path.exists(target):
            linux.mount(root + "/dev/null", target, None, linux.MS_BIND)
    for path in READ_ONLY:
        target = root + path
        if os.path.exists(target):
            linux.mount(target, target, None, linux.MS_BIND | linux.MS_REC)
            linux.mount("none", target, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | _LOCKED)


def _bind_volume(root: str, vol: Volume, confined: bool) -> None:
    target = root + vol.container_path
    if os.path.realpath(target) != os.path.normpath(target):
        raise MigrateError(f"volume target {vol.container_path} goes through a symlink in the image")
    if os.path.isdir(vol.host_path):
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    linux.mount(vol.host_path, target, None, linux.MS_BIND | linux.MS_REC)
    attrs = (linux.MOUNT_ATTR_RDONLY if vol.read_only else 0) | (
        linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV if confined else 0)
    if attrs:  # the mounts below the host path too, which a bind remount would leave as they were
        linux.mount_setattr_recursive(target, attrs)
