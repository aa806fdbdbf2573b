"""CRIU's kernel-facts cache where /run is not a tmpfs (runtime/criukdat.py): made once per boot
with the real CRIU, read by the next CRIU run, and made anew when it is of another boot."""

import os
import subprocess

import pytest

from runtime import criukdat
from runtime.criu import find_binary

pytestmark = pytest.mark.skipif(criukdat.run_is_tmpfs(), reason="/run is a tmpfs here: CRIU keeps its own cache")


def _criu_check_log(tmp_path) -> str:
    subprocess.run([find_binary(), "check", "-v4", "-o", str(tmp_path / "check.log")], capture_output=True,
                   timeout=60)
    return (tmp_path / "check.log").read_text()


def test_the_cache_is_made_for_this_boot_and_criu_reads_it(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    criukdat.CACHE.unlink(missing_ok=True)
    criukdat.ensure(find_binary())
    assert criukdat.CACHE.stat().st_size > 0
    assert oct(criukdat.CACHE.stat().st_mode & 0o777) == oct(0o600)
    assert criukdat.BOOT_NOTE.read_text().strip() == criukdat.BOOT_ID.read_text().strip()
    log = _criu_check_log(tmp_path)
    assert f"Loaded kdat cache from {criukdat.CACHE}" in log
    assert "Dumping netns links" not in log  # the probes were skipped


def test_a_cache_of_another_boot_is_replaced_before_criu_runs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    criukdat.ensure(find_binary())
    criukdat.CACHE.write_bytes(b"of another boot")
    criukdat.BOOT_NOTE.write_text("00000000-0000-0000-0000-000000000000\n")
    criukdat.ensure(find_binary())
    assert criukdat.CACHE.read_bytes() != b"of another boot"
    assert criukdat.BOOT_NOTE.read_text().strip() == criukdat.BOOT_ID.read_text().strip()
    assert f"Loaded kdat cache from {criukdat.CACHE}" in _criu_check_log(tmp_path)
