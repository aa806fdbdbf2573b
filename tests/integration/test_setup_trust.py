"""scripts/setup, run as root, refuses a checkout that anyone but root could change (migrate
runs its code as root), before it changes anything; a root-only checkout passes that check."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

REPO = Path(__file__).resolve().parents[2]
LINK = Path("/usr/local/bin/migrate")


@pytest.fixture
def checkout(tmp_path):
    """The tracked files of this checkout, as they are, in a folder only root can write. Should
    a setup there not refuse, the `migrate` link it made is put back."""
    top = tmp_path / "top"
    top.mkdir(mode=0o755)
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    subprocess.run(["rsync", "-a", "--from0", "--files-from=-", f"{REPO}/", f"{top}/migrate/"], input=files, check=True)
    link = os.readlink(LINK) if LINK.is_symlink() else None
    try:
        yield top / "migrate"
    finally:
        if link is not None and os.readlink(LINK) != link:
            tmp = LINK.with_name(LINK.name + ".restore")
            tmp.symlink_to(link)
            tmp.rename(LINK)
        shutil.rmtree(top, ignore_errors=True)


def setup(checkout: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(checkout / "scripts" / "setup")], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("loosen", ["file-o+w", "file-g+w", "dir-owner", "parent-o+w"])
def test_a_checkout_others_can_change_is_refused_and_nothing_changes(checkout, loosen):
    link_before = os.readlink(LINK) if LINK.is_symlink() else None
    target = {"file-o+w": checkout / "runtime" / "shim.py", "file-g+w": checkout / "migrate" / "cli.py",
              "dir-owner": checkout / "runtime", "parent-o+w": checkout.parent}[loosen]
    if loosen == "dir-owner":
        os.chown(target, 1000, 1000)
    else:
        target.chmod(target.stat().st_mode | (0o002 if loosen.endswith("o+w") else 0o020))
    r = setup(checkout)
    assert r.returncode == 1, r
    assert r.stderr.startswith(f"setup: error: {target} (owner uid") and "runs this checkout's code as root" in r.stderr, r
    assert not (checkout / ".venv").exists()  # refused before anything was made
    assert (os.readlink(LINK) if LINK.is_symlink() else None) == link_before


def test_a_sticky_world_writable_parent_such_as_tmp_is_no_reason_to_refuse(checkout):
    checkout.parent.chmod(0o1777)
    r = subprocess.run(["bash", "-c", f'source <(sed -n "/^writable_by_others()/,/^}}/p" {checkout}/scripts/setup); '
                        f'writable_by_others {checkout}'], capture_output=True, text=True, check=True)
    assert r.stdout == "", r
