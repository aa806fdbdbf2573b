"""`migrate exec`'s way into a running container: its namespaces, root and working directory,
then the command, confined as the container's init is (unless the container is privileged).

Run as: python -m runtime.nsexec [--privileged] [--env K=V]... PID -- CMD...

It does what `nsenter --mount --uts --ipc --pid --root --wd` did, and then confines: nsenter
could not, since a dropped CAP_SYS_ADMIN or a seccomp filter set before would stop it entering.
An unconfined command would run with every capability among files the container can change.
"""

import argparse
import errno
import os
import signal
import sys

from . import confine, linux

NAMESPACES = ("ipc", "uts", "pid", "mnt")  # mnt last: it changes this process's root


def enter(pid: int, argv: list[str], env: dict[str, str], privileged: bool) -> int:
    """Run argv in the container of init pid; its exit status, or minus the signal that ended it."""
    fds = [os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC) for ns in NAMESPACES]
    root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    cwd = os.open(f"/proc/{pid}/cwd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for fd in fds:
        linux.setns(fd)
        os.close(fd)
    child = os.fork()  # a pid namespace takes in only the children of who entered it
    if child == 0:
        _run(root, cwd, argv, env, privileged)
    for sig in (signal.SIGINT, signal.SIGQUIT):  # the terminal sends them to the command too
        signal.signal(sig, signal.SIG_IGN)
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])


def _run(root: int, cwd: int, argv: list[str], env: dict[str, str], privileged: bool) -> None:
    """In the forked child; never returns. Exit status 127/126 when the command cannot run, as a shell's."""
    try:
        os.fchdir(root)
        os.chroot(".")
        os.fchdir(cwd)
        if not privileged:
            confine.apply()
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        print(f"migrate: exec: cannot run {argv[0]!r}: {e.strerror}", file=sys.stderr, flush=True)
        os._exit(127 if e.errno == errno.ENOENT else 126)
    except BaseException as e:
        print(f"migrate: exec: {e}", file=sys.stderr, flush=True)
        os._exit(126)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m runtime.nsexec")
    p.add_argument("pid", type=int)
    p.add_argument("--privileged", action="store_true")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    try:
        code = enter(a.pid, command, dict(e.split("=", 1) for e in a.env), a.privileged)
    except OSError as e:  # the container ended meanwhile
        sys.exit(f"migrate: exec: cannot enter the container of pid {a.pid}: {e.strerror}")
    if code < 0:  # ended by a signal: end the same way, as a shell would show it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
