"""Kept CRIU logs of failed operations: names, modes, the newest ten per container, error messages."""

import os
import re
import stat

import pytest

from runtime import criulogs
from runtime.errors import CriuError
from runtime.paths import StateRoot


@pytest.fixture
def root(tmp_path) -> StateRoot:
    return StateRoot(tmp_path / "root")


def a_log(tmp_path, text: str = "(00.1) Error (criu/x.c:1): boom\n"):
    path = tmp_path / f"images-{len(os.listdir(tmp_path))}" / "dump.log"
    path.parent.mkdir()
    path.write_text(text)
    return path


def test_a_kept_log_is_a_root_only_copy_named_by_container_operation_and_utc_time(root, tmp_path):
    src = a_log(tmp_path)
    kept = criulogs.keep(root, "c1", "dump", src)
    assert kept.parent == root.criu_logs == root.root / "criu-logs"
    assert re.fullmatch(r"c1-dump-\d{8}T\d{6}\.\d{6}Z\.log", kept.name), kept.name
    assert kept.read_text() == src.read_text()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(root.criu_logs.stat().st_mode) == 0o700
    src.unlink()  # the folder it came from goes: the copy stays
    assert criulogs.newest(root, "c1") == kept
    with pytest.raises(ValueError):
        criulogs.keep(root, "c1", "pre-dump", a_log(tmp_path))


def test_the_newest_ten_per_container_are_kept(root, tmp_path):
    other = criulogs.keep(root, "c2", "restore", a_log(tmp_path, "c2's\n"))
    made = [criulogs.keep(root, "c1", ("dump", "restore", "lazy-pages")[i % 3], a_log(tmp_path, f"log {i}\n"))
            for i in range(13)]
    assert criulogs.kept(root, "c1") == made[-10:]
    assert not any(p.exists() for p in made[:3])
    assert criulogs.newest(root, "c1") == made[-1] and made[-1].read_text() == "log 12\n"
    assert criulogs.kept(root, "c2") == [other] and other.exists()  # another container's are its own


def test_names_that_contain_an_operation_are_not_confused(root, tmp_path):
    a = criulogs.keep(root, "a", "dump", a_log(tmp_path, "a\n"))
    a_dump = criulogs.keep(root, "a-dump", "restore", a_log(tmp_path, "a-dump\n"))
    a_lazy = criulogs.keep(root, "a-lazy", "dump", a_log(tmp_path, "a-lazy\n"))
    x = criulogs.keep(root, "x", "lazy-pages", a_log(tmp_path, "x\n"))
    assert criulogs.kept(root, "a") == [a]
    assert criulogs.kept(root, "a-dump") == [a_dump]
    assert criulogs.kept(root, "a-lazy") == [a_lazy]
    assert criulogs.kept(root, "x") == [x]
    (root.criu_logs / "a-dump-notes.txt").write_text("not a kept log\n")
    assert criulogs.kept(root, "a") == [a]


def test_no_log_kept(root):
    assert criulogs.newest(root, "c1") is None  # not even the folder
    root.criu_logs.mkdir(parents=True)
    assert criulogs.newest(root, "c1") is None


def test_a_criu_error_names_its_log_and_keep_failed_names_the_kept_copy(root, tmp_path):
    src = a_log(tmp_path)
    err = CriuError("CRIU dump failed: Error (criu/x.c:1): boom", log=src, op="dump")
    assert str(err) == f"CRIU dump failed: Error (criu/x.c:1): boom (CRIU log: {src})"
    kept = criulogs.keep_failed(root, "c1", err)
    assert isinstance(kept, CriuError) and kept.exit_code == 6
    assert kept.detail == err.detail and kept.op == "dump"
    assert kept.log == criulogs.newest(root, "c1") and kept.log.read_text() == src.read_text()
    assert str(kept) == f"{err.detail} (CRIU log: {kept.log})"
    # kept already: not copied twice
    assert criulogs.keep_failed(root, "c1", kept) is kept
    assert len(criulogs.kept(root, "c1")) == 1


def test_keep_failed_leaves_errors_without_a_log_to_keep(root, tmp_path):
    plain = CriuError("criu is not installed")
    assert str(plain) == "criu is not installed" and plain.log is None
    assert criulogs.keep_failed(root, "c1", plain) is plain
    gone = CriuError("CRIU restore failed: x", log=tmp_path / "nonexistent" / "restore.log", op="restore")
    assert criulogs.keep_failed(root, "c1", gone) is gone  # its log cannot be copied: the error still counts
    assert criulogs.newest(root, "c1") is None
