"""Fixtures for driving the real `migrate` CLI as a subprocess, as root, with real CRIU.

`host` gives each test its own state root (MIGRATE_ROOT) and, whatever the test did or how it
failed, takes everything down again: `migrate rm -f` for every container, then any process
still in the root's cgroups (or carrying its MIGRATE_ROOT) is killed by PID, the cgroup
folders are removed, mounts under the root are detached and the root is deleted. Whatever had
to be cleaned up by force is a leak of the runtime and fails the test.
"""

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from clihost import BUSYBOX, IMAGE, MigrateHost, static_program
from cluster import REMOTE_COMMAND, Cluster, print_logs

from runtime.imagebuild import build_image, busybox_layer


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@contextlib.contextmanager
def _host(work: Path, failed: Callable[[], bool]):
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, mounts, cgroups and CRIU")
    # Short root paths keep overlay options and CRIU paths small; `work` holds the rest.
    root = Path(tempfile.mkdtemp(prefix="migrate-it-", dir="/tmp"))
    work.mkdir()
    h = MigrateHost(root, work)
    try:
        yield h
    finally:
        if failed():
            print(h.failure_logs())
        leaks = h.teardown()
        if leaks:
            pytest.fail("the runtime left things behind (cleaned up now):\n  " + "\n  ".join(leaks))


def _test_failed(request) -> Callable[[], bool]:
    def failed() -> bool:
        call = getattr(request.node, "rep_call", None)
        return call is not None and call.failed

    return failed


@pytest.fixture
def host(request, tmp_path):
    """A fresh state root of our own; torn down completely afterwards, even when the test fails."""
    with _host(tmp_path / "work", _test_failed(request)) as h:
        yield h


@pytest.fixture
def other(request, tmp_path):
    """A second host beside `host`: a state root of its own, torn down the same way, no image."""
    with _host(tmp_path / "work-b", _test_failed(request)) as h:
        yield h


@pytest.fixture(scope="module")
def module_host(request, tmp_path_factory):
    """One state root shared by the tests of a module (for many small checks against one setup)."""
    failures = request.session.testsfailed

    with _host(tmp_path_factory.mktemp("work") / "work", lambda: request.session.testsfailed > failures) as h:
        yield h


@pytest.fixture(scope="session")
def busybox_archives(tmp_path_factory) -> dict[str, Path]:
    """The busybox image in each format the importer takes, built once per session."""
    if not BUSYBOX.exists():
        pytest.fail(f"{BUSYBOX} missing: run ./scripts/setup (it installs busybox-static)")
    d = tmp_path_factory.mktemp("images")
    layer = busybox_layer(BUSYBOX)
    out = {}
    for fmt, filename in (("docker-archive", "bb-docker.tar"), ("oci-archive", "bb-oci.tar"),
                          ("oci-layout", "bb-layout")):
        path = d / filename
        if fmt == "oci-layout":
            path.mkdir()
        build_image(path, layer, fmt=fmt, name=IMAGE, config={"Cmd": ["sh"]})
        out[fmt] = path
    return out


@pytest.fixture
def bb(host, busybox_archives) -> "MigrateHost":
    """A host with busybox:latest imported."""
    host.import_busybox(busybox_archives["docker-archive"])
    return host


MEMHOG_C = r"""
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>


static void on_usr1(int sig) { (void)sig; }

static uint64_t checksum(const uint64_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

int main(int argc, char **argv) {
    size_t size = (argc > 1 ? strtoul(argv[1], NULL, 10) : 512UL) << 20;  /* MiB */
    size_t n = size / sizeof(uint64_t);
    uint64_t *p = malloc(size);
    if (!p) { puts("malloc failed"); return 1; }
    uint64_t x = 0x9e3779b97f4a7c15ULL;  /* xorshift64 from a fixed seed */
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        p[i] = x;
    }
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, &old);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    printf("expected %016llx\n", (unsigned long long)x);  /* last value: a check of the fill */
    printf("sum %016llx\n", (unsigned long long)checksum(p, n));
    fflush(stdout);
    for (;;) {
        sigsuspend(&old);  /* returns after each SIGUSR1 */
        printf("sum %016llx\n", (unsigned long long)checksum(p, n));
        fflush(stdout);
    }
}
"""


@pytest.fixture(scope="session")
def memhog_image(tmp_path_factory) -> Path:
    """busybox plus a static program holding 512 MiB (or argv[1] MiB) of deterministic data."""
    d = tmp_path_factory.mktemp("memhog")
    files = {**busybox_layer(), "bin/memhog": static_program(d, "memhog", MEMHOG_C)}
    build_image(d / "memhog.tar", files, fmt="oci-archive", name="memhog:latest", config={"Cmd": ["/bin/memhog"]})
    return d / "memhog.tar"


DEBIAN_BUILDER = Path(__file__).resolve().parents[1] / "images" / "build-debian-services"


@pytest.fixture(scope="session")
def debian_image() -> Path:
    """The Debian 12 image of the workload tests (python3, redis-server, sqlite3, procps; named
    clihost.DEBIAN_IMAGE) as an oci-archive. Made by tests/images/build-debian-services, which
    caches it (by default in /var/cache/migrate-tests): when the archive is current the builder
    only compares its key and returns at once, else it builds (about a minute, from the Debian
    mirror) and the tests wait."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the image is built with debootstrap")
    try:
        p = subprocess.run([sys.executable, str(DEBIAN_BUILDER)], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{DEBIAN_BUILDER} did not finish in 30 minutes")
    if p.returncode != 0:
        pytest.fail(f"{DEBIAN_BUILDER} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    lines = p.stdout.strip().splitlines()
    archive = Path(lines[-1]) if lines else None
    if archive is None or not archive.is_file():
        pytest.fail(f"{DEBIAN_BUILDER} named no archive: {p.stdout!r}\n{p.stderr[-3000:]}")
    return archive


@pytest.fixture
def cluster(test_hosts, tmp_path, request):
    """Factory: `c = cluster(2)`; hosts host-a, host-b, ... that run `python -m migrate.cli`."""
    made: list[Cluster] = []

    def make(n: int = 2) -> Cluster:
        c = Cluster(test_hosts(n, remote_command=REMOTE_COMMAND), tmp_path / f"work{len(made)}")
        made.append(c)
        return c

    yield make
    call = getattr(request.node, "rep_call", None)
    leaks: list[str] = []
    for c in made:
        if call is not None and call.failed:
            print_logs(c)
        leaks += c.teardown()
    if leaks:
        pytest.fail("the tool left things behind (cleaned up now):\n  " + "\n  ".join(leaks))


@pytest.fixture
def two(cluster, busybox_archives) -> Cluster:
    """host-a and host-b; busybox imported on host-a only."""
    c = cluster(2)
    c["host-a"].import_busybox(busybox_archives["docker-archive"])
    return c
