"""Hosts resolved exactly as OpenSSH resolves them (`ssh -G`), with the real ssh and sshd of the test
hosts: the control connection and rsync (which rides on it, as the page connection's forwards do)
go where the user's ssh config says, and refuse what the user's known_hosts refuses."""

import os
import signal
import subprocess
import time

import pytest

from migrate.hosts import resolve_host
from migrate.ssh import SSHSession
from migrate.transfer import Rsync
from runtime.errors import RemoteError

root = pytest.mark.root


def resolve(hosts, config, name):
    return resolve_host(name, ssh_config=config, tool_config=hosts.tool_config)


def logins(host):
    """The address each login to HOST came from, as its sshd logged it."""
    lines = host.sshd_log.read_text().splitlines()
    return [ln.split(" from ")[1].split()[0] for ln in lines if ln.startswith("Accepted publickey")]


def reach(session, host, tmp_path):
    """Run a command and an rsync through SESSION; both must land on HOST."""
    assert session.run(["hostname"]) == (0, f"{host.name}\n".encode(), b"")
    (tmp_path / "payload").write_text("through the resolved route\n")
    Rsync(session).send([tmp_path / "payload"], f"{host.root}/", "payload", 0)
    assert (host.root / "payload").read_text() == "through the resolved route\n"


@root
def test_host_only_in_an_included_file(test_hosts, tmp_path):
    hosts = test_hosts(2)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "lab.conf").write_text(hosts.client_entry("lab-b", "host-b"))
    config = tmp_path / "ssh_config"
    config.write_text(f"Include {tmp_path}/conf.d/*.conf\n")
    spec = resolve(hosts, config, "lab-b")
    assert spec.hostname == hosts["host-b"].ip
    with SSHSession.connect(spec) as session:
        reach(session, hosts["host-b"], tmp_path)
    assert len(logins(hosts["host-b"])) == 1  # the master: the command and rsync ride on it


@root
def test_proxyjump_goes_through_the_jump_host(test_hosts, tmp_path):
    hosts = test_hosts(2)
    a, b = hosts["host-a"], hosts["host-b"]
    config = tmp_path / "ssh_config"
    config.write_text(f"Include {hosts.ssh_config}\n" + hosts.client_entry("far-b", "host-b", ProxyJump="host-a"))
    spec = resolve(hosts, config, "far-b")
    assert spec.proxy_jump == "host-a"
    with SSHSession.connect(spec) as session:
        reach(session, b, tmp_path)
    # host-b saw the login come from host-a, which was logged in to for the jump
    assert logins(b) == [a.ip]
    assert len(logins(a)) == 1


@root
def test_unreachable_jump_host_is_one_line(test_hosts, tmp_path):
    hosts = test_hosts(2)
    config = tmp_path / "ssh_config"
    config.write_text(hosts.client_entry("far-b", "host-b", ProxyJump=f"root@{hosts['host-a'].ip}:2222"))
    spec = resolve(hosts, config, "far-b")
    a = hosts["host-a"].ip
    pattern = (rf"^cannot reach far-b \({hosts['host-b'].ip}\) through jump host root@\[?{a}\]?:2222: "
               rf".*connect to host {a} port 2222: Connection refused$")
    with pytest.raises(RemoteError, match=pattern):
        SSHSession.connect(spec)


@root
def test_host_key_alias(test_hosts, tmp_path):
    hosts = test_hosts(2)
    b = hosts["host-b"]
    known = tmp_path / "known_hosts"
    known.write_text(f"box-b.example {b.host_key}\n")  # under the alias only, not the address
    config = tmp_path / "ssh_config"
    config.write_text(hosts.client_entry("aliased", "host-b", HostKeyAlias="box-b.example", UserKnownHostsFile=known)
                      + hosts.client_entry("plain", "host-b", UserKnownHostsFile=known))
    spec = resolve(hosts, config, "aliased")
    assert spec.host_key_alias == "box-b.example"
    with SSHSession.connect(spec) as session:
        reach(session, b, tmp_path)
    with pytest.raises(RemoteError, match=r"^host key for plain \(.*\) is not in known_hosts"):
        SSHSession.connect(resolve(hosts, config, "plain"))


@root
def test_revoked_host_key_is_refused(test_hosts, tmp_path):
    hosts = test_hosts(1)
    a = hosts["host-a"]
    known = tmp_path / "known_hosts"
    known.write_text(f"{a.ip} {a.host_key}\n@revoked * {a.host_key}\n")
    config = tmp_path / "ssh_config"
    config.write_text(hosts.client_entry("revoked", "host-a", UserKnownHostsFile=known))
    spec = resolve(hosts, config, "revoked")
    refused = r"^host key for revoked \(.*\) is marked @revoked in .*known_hosts.*refusing"
    with pytest.raises(RemoteError, match=refused):
        SSHSession.connect(spec)
    assert logins(a) == []  # refused before any login


def _keygen(path, *args):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path), *args], check=True)


def _reconfigure(hosts, name, *lines):
    """Add LINES to host NAME's sshd_config; SIGHUP makes sshd exec itself again and reread it."""
    host = hosts[name]
    config = hosts.base / name / "sshd_config"
    config.write_text(config.read_text() + "".join(f"{line}\n" for line in lines))
    listening = host.sshd_log.read_text().count("Server listening")
    os.kill(host.sshd_pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while host.sshd_log.read_text().count("Server listening") == listening:
        assert time.monotonic() < deadline, host.sshd_log.read_text()[-500:]
        time.sleep(0.02)


@root
def test_certificates_host_and_user(test_hosts, tmp_path):
    """The host is trusted only through a @cert-authority line, and the user logs in only with a
    certificate (CertificateFile; the key itself is in no authorized_keys): OpenSSH's own work."""
    hosts = test_hosts(1)
    a = hosts["host-a"]
    _keygen(tmp_path / "ca")
    host_key = hosts.base / "host-a" / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-s", str(tmp_path / "ca"), "-I", "host-a", "-h", "-n", a.ip,
                    f"{host_key}.pub"], check=True)
    _keygen(tmp_path / "user")
    subprocess.run(["ssh-keygen", "-q", "-s", str(tmp_path / "ca"), "-I", "user", "-n", "root",
                    "-O", "source-address=" + a.ip.rsplit(".", 1)[0] + ".0/24", f"{tmp_path / 'user'}.pub"], check=True)
    _reconfigure(hosts, "host-a", f"HostCertificate {host_key}-cert.pub", f"TrustedUserCAKeys {tmp_path / 'ca'}.pub")
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority * {(tmp_path / 'ca.pub').read_text()}")
    config = tmp_path / "ssh_config"
    config.write_text(f"Host certified\n  HostName {a.ip}\n  User root\n  IdentityFile {tmp_path / 'user'}\n"
                      f"  CertificateFile {tmp_path / 'user'}-cert.pub\n  IdentitiesOnly yes\n"
                      f"  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n")
    spec = resolve(hosts, config, "certified")
    with SSHSession.connect(spec) as session:
        reach(session, a, tmp_path)
    assert "Accepted publickey for root" in a.sshd_log.read_text()
    assert "ED25519-CERT" in a.sshd_log.read_text()
