"""The paramiko connection left for lazy mode's tunnel: what it takes from known_hosts, and what
it refuses before connecting at all."""

import subprocess

import paramiko
import pytest

from migrate.hosts import HostSpec
from migrate.sshtransport import _load_host_keys, _marked, open_transport
from runtime.errors import RemoteError


def spec(**changes):
    return HostSpec(**{"alias": "h", "hostname": "10.0.0.9", "port": 22, "user": "root", **changes})


def public_key(tmp_path, name):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)
    return " ".join((tmp_path / f"{name}.pub").read_text().split()[:2])


def test_marker_lines_are_skipped_and_revoked_keys_never_trusted(tmp_path):
    good, bad, ca = (public_key(tmp_path, n) for n in ("good", "bad", "ca"))
    text = [f"10.0.0.9 {good}\n", f"10.0.0.8 {bad}\n", f"@revoked * {bad}\n", f"@cert-authority *.lab {ca}\n",
            "# a comment\n", "\n"]
    revoked = {fields[3]: path for path, fields in _marked({"/kh": text}, "@revoked")}
    assert revoked == {bad.split()[1]: "/kh"}
    keys = paramiko.HostKeys()
    _load_host_keys(keys, text, revoked)
    assert list(keys.keys()) == ["10.0.0.9"]


@pytest.mark.parametrize("changes, refused", [
    ({"proxy_command": "nc %h %p"}, "cannot use ProxyCommand for h"),
    ({"certificate_files": ("/k-cert.pub",)}, "cannot log in to h with CertificateFile"),
])
def test_what_paramiko_cannot_honour_is_refused_before_connecting(changes, refused):
    with pytest.raises(RemoteError, match=rf"^the lazy-pages tunnel \(paramiko\) {refused}; .*copy mode$"):
        open_transport(spec(**changes))
