"""The default seccomp filter of a confined container, as a classic BPF program built here.

The allow-list follows Docker's default profile (moby profiles/seccomp/default.json) for a
container holding Docker's default capabilities: everything else, mount, umount2, unshare,
setns, bpf, kexec_load, the module and clock-setting calls among them, fails with EPERM.
Simplified from Docker, and why:
- x86_64 only (the runtime's other raw syscalls are x86_64 too): a call through another ABI
  (i386 `int 0x80`) kills the process, an x32 call (same audit arch, bit 30 set) fails.
- Argument checks look at the low 32 bits of an argument, which is all that clone's namespace
  flags, socket's address family and personality's persona use.
- clone3 fails with ENOSYS, as in Docker, so glibc falls back to clone, whose flags can be
  checked (its struct argument cannot).
- A syscall newer than the table (runtime/syscalls_x86_64.py) fails with ENOSYS, as runc makes
  it: libc then falls back to an older call, where EPERM would be taken as a real refusal.
CRIU dumps and restores such a filter with the process (it suspends it while its parasite runs).
"""

import errno
import struct
from dataclasses import dataclass

from .syscalls_x86_64 import NUMBERS

# classic BPF and seccomp constants (linux/filter.h, linux/seccomp.h, linux/audit.h)
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JA = 0x05
BPF_AND_K = 0x54
BPF_RET_K = 0x06
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
OFF_NR, OFF_ARCH = 0, 4
_JUMP_MAX = 255  # jt and jf are one byte

# Docker's unconditional allow-list, less the names that do not exist on x86_64, plus what it
# allows for x86_64 (arch_prctl, modify_ldt), for kernels since 4.8 (ptrace, process_vm_*), and
# for CAP_SYS_CHROOT (chroot), which a confined container keeps.
ALLOWED = """
accept accept4 access adjtimex alarm arch_prctl bind brk capget capset chdir chmod chown chroot
clock_adjtime clock_getres clock_gettime clock_nanosleep close close_range connect copy_file_range creat
dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait
epoll_wait_old eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64 fallocate
fanotify_mark fchdir fchmod fchmodat fchown fchownat fcntl fdatasync fgetxattr flistxattr flock fork
fremovexattr fsetxattr fstat fstatfs fsync ftruncate futex futex_waitv futimesat getcpu getcwd getdents
getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp getpid getppid
getpriority getrandom getresgid getresuid getrlimit get_robust_list getrusage getsid getsockname
getsockopt get_thread_area gettid gettimeofday getuid getxattr inotify_add_watch inotify_init
inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy io_getevents io_pgetevents ioprio_get
ioprio_set io_setup io_submit io_uring_enter io_uring_register io_uring_setup kill landlock_add_rule
landlock_create_ruleset landlock_restrict_self lchown lgetxattr link linkat listen listxattr llistxattr
lremovexattr lseek lsetxattr lstat madvise membarrier memfd_create memfd_secret mincore mkdir mkdirat
mknod mknodat mlock mlock2 mlockall mmap modify_ldt mprotect mq_getsetattr mq_notify mq_open
mq_timedreceive mq_timedsend mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock munlockall
munmap name_to_handle_at nanosleep newfstatat open openat openat2 pause pidfd_open pidfd_send_signal
pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll prctl pread64 preadv preadv2 prlimit64
process_mrelease process_vm_readv process_vm_writev pselect6 ptrace pwrite64 pwritev pwritev2 read
readahead readlink readlinkat readv recvfrom recvmmsg recvmsg remap_file_pages removexattr rename
renameat renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo
rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo sched_getaffinity sched_getattr
sched_getparam sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval
sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl
semget semop semtimedop sendfile sendmmsg sendmsg sendto setfsgid setfsuid setgid setgroups setitimer
setpgid setpriority setregid setresgid setresuid setreuid setrlimit set_robust_list setsid setsockopt
set_thread_area set_tid_address setuid setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd
signalfd4 socketpair splice stat statfs statx symlink symlinkat sync sync_file_range syncfs sysinfo tee
tgkill time timer_create timer_delete timer_getoverrun timer_gettime timer_settime timerfd_create
timerfd_gettime timerfd_settime times tkill truncate umask uname unlink unlinkat utime utimensat utimes
vfork vmsplice wait4 waitid write writev
""".split()

CLONE_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
AF_VSOCK = 40
PERSONAS = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)  # LINUX, UNAME26, ADDR_NO_RANDOMIZE, both; query


@dataclass(frozen=True)
class ArgRule:
    """Allow syscall `name` by one argument's low 32 bits: when (arg & mask) is one of `values`,
    `on_match` decides, else the opposite."""

    name: str
    arg: int
    values: tuple[int, ...]
    on_match: bool
    mask: int | None = None


ARG_RULES = (
    ArgRule("clone", 0, (0,), on_match=True, mask=CLONE_NAMESPACE_FLAGS),
    ArgRule("socket", 0, (AF_VSOCK,), on_match=False),
    ArgRule("personality", 0, PERSONAS, on_match=True),
)
ERRNO_RULES = {"clone3": errno.ENOSYS}


def _stmt(code: int, k: int) -> tuple[int, int, int, int]:
    return (code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> tuple[int, int, int, int]:
    assert jt <= _JUMP_MAX and jf <= _JUMP_MAX
    return (code, jt, jf, k)


def _arg_block(rule: ArgRule, deny: int) -> list:
    """nr matches: load the argument, (mask it,) compare, return; else jump over the block."""
    verdict = {True: RET_ALLOW, False: deny}
    body = [_stmt(BPF_LD_W_ABS, 16 + 8 * rule.arg)]
    if rule.mask is not None:
        body.append(_stmt(BPF_AND_K, rule.mask))
    n = len(rule.values)
    body += [_jump(BPF_JEQ_K, v, n - i, 0) for i, v in enumerate(rule.values)]  # to the matched return
    body += [_stmt(BPF_RET_K, verdict[not rule.on_match]), _stmt(BPF_RET_K, verdict[rule.on_match])]
    return [_jump(BPF_JEQ_K, NUMBERS[rule.name], 0, len(body)), *body]  # body always returns: A still holds nr


def _allow_chunk(numbers: list[int]) -> list:
    """k comparisons jumping to a shared RET_ALLOW behind them; a miss jumps over it."""
    k = len(numbers)
    return [*(_jump(BPF_JEQ_K, nr, k - i, 0) for i, nr in enumerate(numbers)),
            _jump(BPF_JA, 1, 0, 0), _stmt(BPF_RET_K, RET_ALLOW)]


def build(allowed=ALLOWED, deny_errno: int = errno.EPERM) -> list[tuple[int, int, int, int]]:
    """The program as (code, jt, jf, k) tuples: arch check first, then the rules, deny last."""
    deny = RET_ERRNO | deny_errno
    prog = [
        _stmt(BPF_LD_W_ABS, OFF_ARCH),
        _jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        _stmt(BPF_RET_K, RET_KILL_PROCESS),
        _stmt(BPF_LD_W_ABS, OFF_NR),
        _jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        _stmt(BPF_RET_K, deny),
        _jump(BPF_JGE_K, max(NUMBERS.values()) + 1, 0, 1),
        _stmt(BPF_RET_K, RET_ERRNO | errno.ENOSYS),
    ]
    for name, err in ERRNO_RULES.items():
        prog += [_jump(BPF_JEQ_K, NUMBERS[name], 0, 1), _stmt(BPF_RET_K, RET_ERRNO | err)]
    for rule in ARG_RULES:
        prog += _arg_block(rule, deny)
    numbers = sorted({NUMBERS[n] for n in allowed})
    chunk = _JUMP_MAX - 1
    for start in range(0, len(numbers), chunk):
        prog += _allow_chunk(numbers[start:start + chunk])
    prog.append(_stmt(BPF_RET_K, deny))
    return prog


def pack(prog: list[tuple[int, int, int, int]]) -> bytes:
    """struct sock_filter[]: u16 code, u8 jt, u8 jf, u32 k each."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)
