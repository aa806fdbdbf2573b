"""A bug in the CLI (an exception no code expected) is one line on stderr, exit code 1, and its
traceback kept in the state root: such bugs tend to show at a rare moment, and must be
reportable after the fact."""

import os
import stat

import pytest

from migrate import cli


@pytest.fixture
def broken(monkeypatch):
    def dispatch(_args):
        raise OSError(19, "No such device")
    monkeypatch.setattr(cli, "dispatch", dispatch)
    monkeypatch.delenv("MIGRATE_DEBUG", raising=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI runs as root")
def test_the_traceback_is_kept_root_only_and_named_in_the_one_line(broken, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIGRATE_ROOT", str(tmp_path))
    assert cli.main(["ps"]) == 1
    assert cli.main(["ps", "--json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    log = tmp_path / "internal-errors.log"
    assert err == [f"migrate: internal error: OSError: [Errno 19] No such device (the traceback is in {log})"] * 2
    text = log.read_text()
    assert text.count("Traceback (most recent call last)") == 2 and "migrate ps --json\n" in text
    assert "in dispatch" in text and stat.S_IMODE(log.stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI runs as root")
def test_without_a_state_root_it_says_how_to_see_the_traceback(broken, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIGRATE_ROOT", str(tmp_path / "none"))
    assert cli.main(["ps"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "migrate: internal error: OSError: [Errno 19] No such device (set MIGRATE_DEBUG=1 for details)"]
    assert not (tmp_path / "none").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI runs as root")
def test_the_log_keeps_about_the_newest_megabyte(broken, tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRATE_ROOT", str(tmp_path))
    log = tmp_path / "internal-errors.log"
    log.write_text("x" * (1 << 20) + "old\n")
    assert cli.main(["ps"]) == 1
    assert (tmp_path / "internal-errors.log.old").read_text().endswith("old\n")
    assert log.read_text().startswith("--- ")
