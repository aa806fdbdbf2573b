"""The OpenSSH side of a session without a network: the argv its clients get, and how ssh's
failures (as OpenSSH 9.2 prints them) become one line."""

import shlex
from pathlib import Path

import pytest

from migrate.hosts import HostSpec
from migrate.ssh import SSHSession, _login_error, rsync_target


def spec(**changes):
    base = dict(alias="host-b", hostname="10.1.2.3", port=2222, user="admin", ssh_config="/cfg/ssh_config")
    return HostSpec(**{**base, **changes})


def option(argv, name):
    pairs = zip(argv, argv[1:], strict=False)
    values = [v.split("=", 1)[1] for a, v in pairs if a == "-o" and v.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def test_session_clients_ride_only_on_the_master():
    argv = SSHSession(spec(), Path("/run/cm")).ssh_argv()
    assert argv[0] == "ssh" and argv[argv.index("-F") + 1] == "/cfg/ssh_config"
    assert option(argv, "StrictHostKeyChecking") == "yes"
    assert option(argv, "BatchMode") == "yes"
    assert option(argv, "UpdateHostKeys") == "no"
    assert option(argv, "ControlMaster") == "no"
    assert option(argv, "ControlPath") == "/run/cm/master"
    assert option(argv, "ProxyCommand") == "false"  # never a login of its own
    # nothing the config resolves is overridden: OpenSSH resolves the alias itself
    assert not {"-p", "-l", "-i"} & set(argv)
    # rsync splits -e like a shell: the joined form must come back as the same argv
    assert shlex.split(shlex.join(argv)) == argv


def test_without_a_config_ssh_reads_its_default_files():
    assert "-F" not in SSHSession(spec(ssh_config=None), Path("/run/cm")).ssh_argv()


def test_rsync_target():
    assert rsync_target(spec(), "/srv/x y") == "host-b:/srv/x y"
    assert rsync_target(spec(alias="fe80::1"), "/d") == "[fe80::1]:/d"


CHANGED = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Offending ED25519 key in /kh/one:1
Host key for 10.1.2.3 has changed and you have requested strict checking.
Host key verification failed.
"""
REVOKED = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@       WARNING: REVOKED HOST KEY DETECTED!               @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
The ED25519 host key for 10.1.2.3 is marked as revoked.
ED25519 host key for 10.1.2.3 was revoked and you have requested strict checking.
Host key verification failed.
"""
UNKNOWN = """\
No ED25519 host key is known for 10.1.2.3 and you have requested strict checking.
Host key verification failed.
"""
JUMP = """\
ssh: connect to host 10.1.2.1 port 2222: Connection refused\r
kex_exchange_identification: Connection closed by remote host\r
Connection closed by UNKNOWN port 65535\r
"""


@pytest.mark.parametrize("stderr, changes, message", [
    (CHANGED, {}, "host key for host-b (10.1.2.3:2222) does not match known_hosts (/kh/one): refusing"),
    (REVOKED, {}, "host key for host-b (10.1.2.3:2222) is marked @revoked in known_hosts (/kh/one): refusing"),
    (UNKNOWN, {"host_key_alias": "box"}, "host key for host-b (10.1.2.3:2222) (HostKeyAlias box) is not in "
     "known_hosts (/kh/one); add it with ssh-keyscan or ssh once"),
    ("admin@10.1.2.3: Permission denied (publickey).\r\n", {},
     "authentication as admin@host-b (10.1.2.3:2222) failed: Permission denied (publickey). (identity files: /k)"),
    ("ssh: Could not resolve hostname nowhere: Name or service not known\r\n", {},
     "ssh to host-b (10.1.2.3:2222) failed: Could not resolve hostname nowhere: Name or service not known"),
    (JUMP, {"proxy_jump": "gate:2222"}, "cannot reach host-b (10.1.2.3:2222) through jump host gate:2222: "
     "ssh: connect to host 10.1.2.1 port 2222: Connection refused"),
    ("", {}, "ssh to host-b (10.1.2.3:2222) failed: ssh failed without a message"),
])
def test_login_errors_are_one_line(stderr, changes, message):
    error = _login_error(spec(known_hosts_files=("/kh/one",), identity_files=("/k",), **changes), stderr)
    assert str(error) == message and "\n" not in str(error)
