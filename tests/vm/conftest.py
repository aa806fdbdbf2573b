"""The `guests` fixture: host-a and host-b booted once for the module, the checkout installed
in both; shut down (by vmhosts, which ends its QEMUs by their PIDs) whatever happens."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from guests import GUEST_ROOT, REPO, VMHOSTS, Guest, boot_and_install, shut_down

from runtime.imagebuild import build_image, busybox_layer
from runtime.paths import INTERNAL_ERRORS

BUSYBOX = Path("/bin/busybox")


def pytest_collection_modifyitems(config, items):
    reason = None
    if not VMHOSTS.exists():
        reason = f"no {VMHOSTS} here (real-machine tests boot QEMU guests with it)"
    elif os.geteuid() != 0:
        reason = "the guests need root"
    elif os.environ.get("MIGRATE_VM_TESTS") != "1":
        reason = "set MIGRATE_VM_TESTS=1 to boot two Debian 12 guests (about 15 minutes; .ci/run does)"
    if reason:
        for item in items:
            if "vm" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def guests(tmp_path_factory):
    src = tmp_path_factory.mktemp("checkout") / "migrate"
    # the tracked files as they are now (a clean checkout in CI), without .venv or caches
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    subprocess.run(["rsync", "-a", "--from0", "--files-from=-", f"{REPO}/", f"{src}/"], input=files, check=True)
    image = tmp_path_factory.mktemp("image") / "busybox.tar"
    build_image(image, busybox_layer(BUSYBOX), fmt="docker-archive", name="busybox:latest", config={"Cmd": ["sh"]})
    try:
        setups = boot_and_install(("host-a", "host-b"), src)
        nodes = {name: Guest(name) for name in setups}
        for guest in nodes.values():
            guest.setup_output = setups[guest.name]
        # on host-a only: a move to host-b brings the layers it lacks
        subprocess.run([str(VMHOSTS), "copy", "host-a", str(image), "/root/busybox.tar"], check=True,
                       capture_output=True, timeout=300)
        nodes["host-a"].ok("migrate image import /root/busybox.tar")
        yield nodes
    finally:
        if os.environ.get("MIGRATE_VM_KEEP") != "1":  # kept up, the next run reuses them (setup is quick then)
            shut_down()
        shutil.rmtree(src, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_internal_errors(request):
    """As on the namespaced hosts: a test after which a guest logged an internal error (a bug of
    the tool, whatever the test asserted) fails, with the traceback; the log is taken away."""
    yield
    if "guests" not in request.fixturenames:
        return
    log = f"{GUEST_ROOT}/{INTERNAL_ERRORS}"
    found = {name: r.stdout for name, guest in request.getfixturevalue("guests").items()
             if (r := guest.sh(f"cat {log} && rm -f {log}", timeout=60)).returncode == 0}
    if found:
        pytest.fail("internal errors on the guests:\n" + "\n".join(f"{n}: {t[-3000:]}" for n, t in found.items()))
