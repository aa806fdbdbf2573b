"""Fixtures for driving the real `migrate` CLI as a subprocess, as root, with real CRIU.

`host` gives each test its own state root (MIGRATE_ROOT) and, whatever the test did or how it
failed, takes everything down again: `migrate rm -f` for every container, then any process
still in the root's cgroups (or carrying its MIGRATE_ROOT) is killed by PID, the cgroup
folders are removed, mounts under the root are detached and the root is deleted. Whatever had
to be cleaned up by force is a leak of the runtime and fails the test.
"""

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from clihost import BUSYBOX, IMAGE, MigrateHost

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
            _print_shim_logs(h)
        leaks = h.teardown()
        if leaks:
            pytest.fail("the runtime left things behind (cleaned up now):\n  " + "\n  ".join(leaks))


@pytest.fixture
def host(request, tmp_path):
    """A fresh state root of our own; torn down completely afterwards, even when the test fails."""

    def failed() -> bool:
        call = getattr(request.node, "rep_call", None)
        return call is not None and call.failed

    with _host(tmp_path / "work", failed) as h:
        yield h


@pytest.fixture(scope="module")
def module_host(request, tmp_path_factory):
    """One state root shared by the tests of a module (for many small checks against one setup)."""
    failures = request.session.testsfailed

    with _host(tmp_path_factory.mktemp("work") / "work", lambda: request.session.testsfailed > failures) as h:
        yield h


def _print_shim_logs(h: MigrateHost) -> None:
    """On failure, show what the shims said: it rarely reaches the CLI's one-line error."""
    if not h.state.containers.is_dir():
        return
    for log in sorted(h.state.containers.glob("*/shim.log")):
        text = log.read_text(errors="replace").strip()
        if text:
            print(f"--- {log}\n{text[-3000:]}")


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
