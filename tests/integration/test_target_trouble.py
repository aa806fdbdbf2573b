"""Trouble on the target that can be known before the freeze is refused there, in one line, with
nothing changed on either host: a full disk (a small tmpfs as its state root), CRIU missing or
older than here, a migrate there that speaks another protocol (a name taken there:
test_migration.py). What cannot be known before (a
restore that fails, a commit refused) rolls back with the source running: test_migration.py, test_commit.py."""

import os
import subprocess
import sys

import pytest
from cluster import (
    assert_no_migration_leftovers,
    assert_refused_and_unchanged,
    set_host_command,
    set_host_env,
    start_counter,
)

from migrate.protocol import PROTOCOL
from runtime.criu import find_binary

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def _refused(two, *move_args: str) -> str:
    a, b = two["host-a"], two["host-b"]
    nums = a.wait_count("c1", 3)
    pid = a.container("c1")["pid"]
    before, before_b = a.snapshot_of_state(), b.snapshot_of_state()
    r = two.move("host-a", "c1", "host-b", *move_args)
    assert_refused_and_unchanged(two, r, 8, before, pid, nums)
    assert b.snapshot_of_state() == before_b and b.ps() == {}
    assert_no_migration_leftovers(a, b)
    return r.err


def test_a_target_without_room_is_refused_before_anything_freezes(two):
    a, b = two["host-a"], two["host-b"]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(b.root)], check=True)
    try:
        start_counter(two)
        a.ok("exec", "c1", "sh", "-c", "dd if=/dev/urandom of=/big bs=1M count=24 2>/dev/null")
        err = _refused(two)
        assert "host-b has" in err and "free under" in err and "needs about" in err, err
    finally:
        subprocess.run(["umount", "-l", str(b.root)], check=False)


def test_a_target_whose_criu_is_missing_is_refused(two):
    set_host_env(two.hosts, "host-b", {"MIGRATE_CRIU": "/nonexistent/criu"})
    start_counter(two)
    err = _refused(two)
    assert "criu does not work on host-b" in err and "not installed" in err, err


OLD_CRIU = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "Version: 3.1"; exit 0; fi
exec {criu} "$@"
"""


def test_a_target_whose_criu_is_older_is_refused(two, tmp_path):
    wrapper = tmp_path / "old-criu"
    wrapper.write_text(OLD_CRIU.format(criu=find_binary()))
    wrapper.chmod(0o755)
    set_host_env(two.hosts, "host-b", {"MIGRATE_CRIU": str(wrapper)})
    start_counter(two)
    err = _refused(two)
    assert "host-b has CRIU 3.1, older than" in err and "cannot read these images" in err, err



OLD_AGENT = """import json, sys
for line in sys.stdin:
    request = json.loads(line)
    print(json.dumps({{"id": request.get("id"), "ok": True, "protocol": {protocol}, "facts": {{}}}}), flush=True)
"""


def test_a_target_that_speaks_another_protocol_is_refused_at_hello(two, tmp_path):
    """An older migrate on the target (here: a stand-in that answers hello as the previous protocol version would)."""
    old = tmp_path / "old-agent.py"
    old.write_text(OLD_AGENT.format(protocol=PROTOCOL - 1))
    set_host_command(two.hosts, "host-b", [sys.executable, str(old)])
    start_counter(two)
    err = _refused(two)
    assert f"its migrate speaks protocol {PROTOCOL - 1}, this one {PROTOCOL}" in err, err
    assert "install the same version on both" in err, err
