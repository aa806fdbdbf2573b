"""The default seccomp filter, run through a small classic-BPF interpreter: what it lets through."""

import errno
import struct

import pytest

from runtime import seccomp
from runtime.syscalls_x86_64 import NUMBERS

ALLOW = seccomp.RET_ALLOW
EPERM = seccomp.RET_ERRNO | errno.EPERM
AUDIT_ARCH_I386 = 0x40000003


def run(prog, nr: int, args=(0,) * 6, arch=seccomp.AUDIT_ARCH_X86_64) -> int:
    """What the kernel would return for struct seccomp_data {nr, arch, ip, args[6]}."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
    a, pc = 0, 0
    for _ in range(len(prog)):  # classic BPF only jumps forward: at most len(prog) steps
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == seccomp.BPF_LD_W_ABS:
            a = struct.unpack_from("=I", data, k)[0]
        elif code == seccomp.BPF_AND_K:
            a &= k
        elif code == seccomp.BPF_JEQ_K:
            pc += jt if a == k else jf
        elif code == seccomp.BPF_JGE_K:
            pc += jt if a >= k else jf
        elif code == seccomp.BPF_JA:
            pc += k
        elif code == seccomp.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
    raise AssertionError("ran off the end of the program")


PROG = seccomp.build()


def test_program_shape_arch_check_first_deny_last():
    assert PROG[:3] == [(seccomp.BPF_LD_W_ABS, 0, 0, seccomp.OFF_ARCH),
                        (seccomp.BPF_JEQ_K, 1, 0, seccomp.AUDIT_ARCH_X86_64),
                        (seccomp.BPF_RET_K, 0, 0, seccomp.RET_KILL_PROCESS)]
    assert PROG[-1] == (seccomp.BPF_RET_K, 0, 0, EPERM)
    assert len(PROG) < 4096  # BPF_MAXINSNS
    for pc, (code, jt, jf, k) in enumerate(PROG):  # every jump lands inside the program
        if code != seccomp.BPF_RET_K:
            assert pc + 1 + max(jt, jf, k if code == seccomp.BPF_JA else 0) < len(PROG)
    assert len(seccomp.pack(PROG)) == 8 * len(PROG)


def test_every_allowed_name_is_an_x86_64_syscall():
    assert set(seccomp.ALLOWED) <= set(NUMBERS)


@pytest.mark.parametrize("name", sorted(seccomp.ALLOWED))
def test_allowed(name):
    assert run(PROG, NUMBERS[name]) == ALLOW


@pytest.mark.parametrize("name", ["mount", "umount2", "init_module", "finit_module", "delete_module", "kexec_load",
                                  "kexec_file_load", "unshare", "setns", "pivot_root", "bpf", "reboot", "swapon",
                                  "sethostname", "open_by_handle_at", "keyctl", "add_key", "perf_event_open",
                                  "clock_settime", "settimeofday", "acct", "iopl", "userfaultfd", "fsopen",
                                  "move_mount", "mount_setattr", "syslog", "quotactl"])
def test_denied_with_eperm(name):
    assert run(PROG, NUMBERS[name]) == EPERM


def test_every_syscall_not_allowed_is_denied():
    special = {"clone", "clone3", "socket", "personality"}
    for name, nr in NUMBERS.items():
        if name not in seccomp.ALLOWED and name not in special:
            assert run(PROG, nr) == EPERM, name


def test_other_abis_killed_or_denied():
    assert run(PROG, 11, arch=AUDIT_ARCH_I386) == seccomp.RET_KILL_PROCESS  # i386 munmap via int 0x80
    assert run(PROG, seccomp.X32_SYSCALL_BIT | NUMBERS["read"]) == EPERM
    assert run(PROG, -1) == EPERM  # above the x32 bit


def test_syscalls_newer_than_the_table_are_unknown_not_refused():
    newest = max(NUMBERS.values())
    assert run(PROG, newest + 1) == seccomp.RET_ERRNO | errno.ENOSYS  # e.g. cachestat, fchmodat2 (Linux 6.5, 6.6)
    assert run(PROG, 460) == seccomp.RET_ERRNO | errno.ENOSYS
    assert run(PROG, NUMBERS["futex_waitv"]) == ALLOW


def test_clone_only_without_namespace_flags_and_clone3_falls_back():
    clone = NUMBERS["clone"]
    assert run(PROG, clone, (0x01200011,) + (0,) * 5) == ALLOW  # fork(): CLONE_CHILD_SETTID|CLEARTID|SIGCHLD
    assert run(PROG, clone, (0x003D0F00,) + (0,) * 5) == ALLOW  # pthread_create
    for flag in (0x00020000, 0x10000000, 0x20000000, 0x40000000):  # NEWNS, NEWUSER, NEWPID, NEWNET
        assert run(PROG, clone, (flag | 17,) + (0,) * 5) == EPERM
    assert run(PROG, NUMBERS["clone3"]) == seccomp.RET_ERRNO | errno.ENOSYS


def test_socket_but_not_vsock_and_personality_only_harmless_personas():
    assert run(PROG, NUMBERS["socket"], (2, 1, 0, 0, 0, 0)) == ALLOW  # AF_INET
    assert run(PROG, NUMBERS["socket"], (seccomp.AF_VSOCK, 1, 0, 0, 0, 0)) == EPERM
    for persona in seccomp.PERSONAS:
        assert run(PROG, NUMBERS["personality"], (persona,) + (0,) * 5) == ALLOW
    assert run(PROG, NUMBERS["personality"], (0x0040000,) + (0,) * 5) == EPERM  # READ_IMPLIES_EXEC


def test_long_allow_lists_are_split_where_a_jump_still_reaches():
    names = sorted(NUMBERS)  # every syscall: more than one chunk of 254
    prog = seccomp.build(allowed=names)
    assert all(run(prog, NUMBERS[n]) == ALLOW for n in names if n not in ("clone3",))
