"""Moving files to the other host: which layers it lacks, and rsync over SSH with progress.

rsync runs over the control connection itself (a session multiplexed on its OpenSSH master),
so it reaches the host exactly as that did, and the runs inside the freeze window do not pay
for a new SSH login each.
"""

import contextlib
import math
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from runtime.errors import RemoteError

from .hosts import HostSpec
from .output import err
from .ssh import SSHSession, rsync_target

# --modify-window=-1: compare mtimes to the nanosecond (receiver rsync >= 3.1.3). By default
# rsync compares whole seconds, and a file rewritten in place with the same size within the
# second of the running pre-sync would be skipped by the frozen final sync: stale contents.
RSYNC_FLAGS = ("-aHAX", "--numeric-ids", "--modify-window=-1", "--stats", "--info=progress2",
               "--no-inc-recursive")
_PROGRESS = re.compile(rb"^\s*([\d,]+)\s+(\d+)%")
_SENT = re.compile(r"Total bytes sent:\s*([\d,]+)")
RSYNC_VANISHED = 24  # "some files vanished before they could be transferred"
PROGRESS_AFTER = 1.0


def missing_layers(wanted: Iterable[str], present: Iterable[str]) -> list[str]:
    """The layers to send: wanted ones the other host lacks, in order, each once."""
    have = set(present)
    out: list[str] = []
    for digest in wanted:
        if digest not in have and digest not in out:
            out.append(digest)
    return out


class DelayedProgress:
    """A progress bar on stderr that appears only once a transfer has taken over a second,
    and only on a terminal: short transfers and scripts see nothing."""

    def __init__(self, label: str, total: int):
        self.label = label
        self.total = max(total, 1)
        self.started = time.monotonic()
        self._bar: Progress | None = None
        self._task = None

    def update(self, done: int) -> None:
        if self._bar is None:
            if time.monotonic() - self.started < PROGRESS_AFTER or not err.is_terminal:
                return
            self._bar = Progress(TextColumn(self.label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=err, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total)
        self._bar.update(self._task, completed=done)

    def __enter__(self) -> "DelayedProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


@dataclass
class Rsync:
    session: SSHSession

    @property
    def spec(self) -> HostSpec:
        return self.session.spec

    def argv(self, sources: list[Path], dest: str, delete: bool = False, timeout: float | None = None,
             keep: tuple[str, ...] = ()) -> list[str]:
        """keep: patterns of files there that --delete must leave (what another writer put there)."""
        argv = ["rsync", *RSYNC_FLAGS, "-e", shlex.join(self.session.ssh_argv())]
        if delete:
            argv.append("--delete")
        argv += [f"--exclude={pattern}" for pattern in keep]
        if timeout is not None:  # no data for that long: rsync gives up by itself
            argv.append(f"--timeout={max(1, math.ceil(timeout))}")
        return [*argv, "--", *map(str, sources), rsync_target(self.spec, dest)]

    def send(self, sources: list[Path], dest: str, label: str, total: int, delete: bool = False,
             timeout: float | None = None, keep: tuple[str, ...] = (), running: bool = False) -> int:
        """Copy sources into dest on the host; returns the bytes rsync sent. A bar after a second.
        With timeout, rsync is killed once that many seconds have passed, whatever it does.
        running: the sources are a running container's files, and a file it removed meanwhile
        is no failure (the frozen final sync brings the tree as it is)."""
        argv = self.argv(sources, dest, delete, timeout, keep)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        watchdog = threading.Timer(timeout, proc.kill) if timeout is not None else None
        if watchdog is not None:
            watchdog.daemon = True
            watchdog.start()
        output: list[bytes] = []
        try:
            with DelayedProgress(label, total) as progress:
                for line in _lines(proc.stdout):
                    output.append(line)
                    m = _PROGRESS.match(line)
                    if m:
                        progress.update(int(m.group(1).replace(b",", b"")))
            stderr = proc.stderr.read().decode(errors="replace")
            code = proc.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if proc.poll() is None:  # interrupted (Ctrl-C): never leave it behind
                proc.kill()
                proc.wait()
        if code < 0 and timeout is not None:
            raise RemoteError(f"rsync of {label} to {self.spec.alias} did not finish within {timeout:.0f} s")
        if code == RSYNC_VANISHED and running:
            code = 0
        if code != 0:
            last = [ln for ln in stderr.splitlines() if ln.strip()][-1:] or [f"exit status {code}"]
            raise RemoteError(f"rsync of {label} to {self.spec.alias} failed: {last[0]}")
        m = _SENT.search(b"\n".join(output).decode(errors="replace"))
        return int(m.group(1).replace(",", "")) if m else 0

    def forward_socket(self, remote: str, local: Path) -> None:
        """The unix socket REMOTE there (made by sshd, mode 0600) forwarded, in the shared SSH
        connection, to the one listening at LOCAL here: no new login, no TCP port on either host,
        and OpenSSH's speed."""
        self._forwarding("forward", f"{remote}:{local}")

    def cancel_socket_forward(self, remote: str, local: Path) -> None:
        """Stop the forward: connections made through it go on."""
        with contextlib.suppress(RemoteError):
            self._forwarding("cancel", f"{remote}:{local}")

    def _forwarding(self, command: str, forward: str) -> None:
        p = subprocess.run([*self.session.ssh_argv(), "-O", command, "-R", forward, "--", self.spec.alias],
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise RemoteError(f"cannot {command} a socket to {self.spec.alias}: {p.stderr.strip() or p.returncode}")


def _lines(stream):
    """rsync ends progress lines with \\r: split on both."""
    buf = b""
    while chunk := stream.read1(65536):
        buf += chunk
        *done, buf = re.split(rb"[\r\n]", buf)
        yield from done
    if buf:
        yield buf
