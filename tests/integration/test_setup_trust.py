"""scripts/setup, run as root, refuses a checkout that anyone but root could change (migrate
runs its code as root), before it changes anything. The check it runs, scripts/trusted-checkout,
is also run alone on small trees: what passes (a root-only checkout below a sticky /tmp-like
folder, a venv's link to the system's python) and what is named (a writable file or folder, one
above, a symlinked checkout in a user's folder, a symlink out to what others can change)."""

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


def trusted(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "scripts" / "trusted-checkout"), str(path)], capture_output=True, text=True,
                          timeout=30)


@pytest.fixture
def tree(tmp_path):
    """A root-only checkout at TOP/ci/main, as CI clones one, with a symlink to the system's python
    in it as a venv has; TOP itself is world-writable and sticky, like /tmp."""
    top = tmp_path / "top"
    (top / "ci" / "main" / "pkg").mkdir(parents=True)
    top.chmod(0o1777)
    for d in (top / "ci", top / "ci" / "main", top / "ci" / "main" / "pkg"):
        d.chmod(0o755)
    (top / "ci" / "main" / "pkg" / "code.py").write_text("print('hello')\n")
    (top / "ci" / "main" / "python3").symlink_to("/usr/bin/python3")
    return top


def test_a_root_only_checkout_in_a_sticky_world_writable_folder_such_as_tmp_is_trusted(tree):
    r = trusted(tree / "ci" / "main")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r


@pytest.mark.parametrize("loosen,culprit", [
    ("checkout-o+w", "ci/main"),
    ("folder-above-g+w-not-sticky", "ci"),
    ("folder-above-not-root-s", "ci"),
    ("file-o+w", "ci/main/pkg/code.py"),
    ("file-not-root-s", "ci/main/pkg/code.py"),
])
def test_what_others_could_change_is_named(tree, loosen, culprit):
    path = tree / culprit
    if loosen.endswith("not-root-s"):
        os.chown(path, 1000, 1000)
    else:
        path.chmod(path.stat().st_mode | (0o002 if "o+w" in loosen else 0o020))
    r = trusted(tree / "ci" / "main")
    assert r.returncode == 1 and r.stdout.startswith(f"{path} (owner uid "), r
    assert r.stdout.count("\n") == 1


def test_a_checkout_reached_through_a_symlink_is_judged_where_it_really_is(tree, tmp_path):
    """Root's link to the checkout does not make a checkout in a folder a user owns root's alone."""
    home = tmp_path / "home" / "alice"
    home.mkdir(parents=True)
    (tree / "ci" / "main").rename(home / "main")
    os.chown(home, 1000, 1000)
    (tree / "ci" / "main").symlink_to(home / "main")
    r = trusted(tree / "ci" / "main")
    assert r.returncode == 1 and r.stdout == f"{tree}/ci/main -> {home} (owner uid 1000, mode 755)\n", r


@pytest.mark.parametrize("target", ["writable", "absent-in-writable"])
def test_a_symlink_in_the_checkout_to_what_others_can_change_is_named(tree, tmp_path, target):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    if target == "writable":
        (shared / "evil.py").write_text("")
    link = tree / "ci" / "main" / "pkg" / "evil.py"
    link.symlink_to("../../../../shared/evil.py")  # relative, as a link in a repository is
    r = trusted(tree / "ci" / "main")
    assert r.returncode == 1 and r.stdout.startswith(f"{link} -> {shared} (owner uid 0, mode 777)"), r


def test_a_symlink_loop_is_refused_not_followed_forever(tree):
    main = tree / "ci" / "main"
    (main / "a").symlink_to(main / "b")
    (main / "b").symlink_to(main / "a")
    r = trusted(main)
    assert r.returncode == 1 and "too many levels of symbolic links" in r.stdout, r
