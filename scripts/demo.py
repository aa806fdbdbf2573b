"""The demo behind ./scripts/demo: every step is a real `migrate` command, shown as it runs."""

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from migrate.ssh import SSHSession
from migrate.testhosts import TestHosts
from runtime.imagebuild import build_image, busybox_layer

console = Console(highlight=False)
MIGRATE = [sys.executable, "-m", "migrate.cli"]
COUNTER = 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.2; done'


def migrate(hosts: TestHosts, host: str, *args: str) -> str:
    """Run `migrate ARGS` on HOST, logged in over SSH like a user would be."""
    console.print(f"[bold cyan]root@{host}#[/] migrate {shlex.join(args)}")
    spec = hosts.spec(host)
    with SSHSession.connect(spec) as session:
        rc, out, err = session.run(spec.remote_argv(*args), timeout=120)
    if out.strip():
        console.print(out.decode().rstrip(), markup=False)
    if rc != 0:
        raise SystemExit(f"demo: `migrate {shlex.join(args)}` failed on {host}: {err.decode().strip()}")
    return out.decode()


def ticks(host) -> list[int]:
    log = host.root / "containers" / "ctr1" / "container.log"
    return [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("tick ")]


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (containers, namespaces and CRIU need it)")
    started = time.monotonic()
    console.rule("two test hosts: network namespaces with their own sshd and state")
    with TestHosts(2, remote_command=MIGRATE) as hosts, tempfile.TemporaryDirectory() as tmp:
        a, b = hosts["host-a"], hosts["host-b"]
        for h in hosts:
            console.print(f"{h.name}: {h.ip}, state in {h.root}")
        console.rule("a busybox image, built from this machine's busybox-static")
        image = Path(tmp) / "busybox.tar"  # one filesystem: host-a sees this path too
        build_image(image, busybox_layer(), fmt="docker-archive", name="busybox:latest", config={"Cmd": ["sh"]})
        migrate(hosts, "host-a", "image", "import", str(image))
        console.rule("a container on host-a whose only state is a counter in memory")
        migrate(hosts, "host-a", "run", "--name", "ctr1", "--memory", "64m", "busybox", "sh", "-c", COUNTER)
        time.sleep(1.5)
        migrate(hosts, "host-a", "ps")
        before = ticks(a)
        console.print(f"its log so far ends with: tick {before[-1]}")
        console.rule("move it, live, to host-b")
        migrate(hosts, "host-a", "ctr1", "host-b")
        time.sleep(1.0)
        console.rule("on host-b")
        migrate(hosts, "host-b", "ps")
        migrate(hosts, "host-a", "ps")
        after = ticks(b)
        console.print(f"log on host-b: ... tick {before[-1]} ... tick {after[-1]}")
        if after != list(range(1, len(after) + 1)) or len(after) <= len(before):
            raise SystemExit("demo: the counter did not continue where it was")
        console.print(f"[bold green]the counter continued without a gap or restart "
                      f"(ticks 1..{after[-1]}, {len(before)} of them before the move)[/]")
        console.rule("clean up")
        migrate(hosts, "host-b", "rm", "-f", "ctr1")
    console.print(f"demo finished in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
