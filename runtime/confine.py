"""Confining a container's init just before it execs: capabilities, no_new_privs, seccomp.

The same as Docker confines a root container, less CAP_MKNOD: Docker keeps it because its device
cgroup stops the nodes from being opened, and there is no such filter here on cgroup v2 (that
needs a BPF device program), so creating device nodes is refused instead. FIFOs and sockets
(mknod without a device) need no capability and still work. Everything set here is per process
state that CRIU dumps and restores (capability sets, no_new_privs, the seccomp filter).
"""

from . import linux, seccomp

# Docker's default capabilities (moby oci/caps/defaults.go) without CAP_MKNOD (27)
CAPS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7, "SETPCAP": 8,
    "NET_BIND_SERVICE": 10, "NET_RAW": 13, "SYS_CHROOT": 18, "AUDIT_WRITE": 29, "SETFCAP": 31,
}
KEPT_MASK = sum(1 << bit for bit in CAPS.values())


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def apply() -> None:
    """Bounding set first (dropping needs CAP_SETPCAP), then the process's own sets, then the
    filter (no_new_privs lets it be installed without CAP_SYS_ADMIN). Execve then gives root the
    kept set (its permitted set becomes the bounding set); inheritable stays empty, as in Docker
    since CVE-2022-24769."""
    for cap in range(last_cap() + 1):
        if not KEPT_MASK >> cap & 1:
            linux.drop_bounding_cap(cap)
    linux.clear_ambient_caps()
    linux.set_caps(effective=KEPT_MASK, permitted=KEPT_MASK, inheritable=0)
    linux.set_no_new_privs()
    linux.set_seccomp_filter(seccomp.pack(seccomp.build()))

