import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from migrate.hosts import resolve_host
from migrate.ssh import SSHSession
from migrate.transfer import Rsync
from runtime.errors import RemoteError

root = pytest.mark.root

ECHO_PEER = """\
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("die"):
        print("peer giving up: " + msg["die"], file=sys.stderr, flush=True)
        sys.exit(3)
    print("log line", file=sys.stderr, flush=True)
    print(json.dumps({"echo": msg}), flush=True)
"""


@root
def test_each_host_has_its_own_state_root_and_name(test_hosts, monkeypatch):
    hosts = test_hosts(2)
    for key, value in hosts.env().items():
        monkeypatch.setenv(key, value)
    assert resolve_host("host-b") == hosts.spec("host-b")
    seen = {}
    for host in hosts:
        with SSHSession.connect(hosts.spec(host.name)) as session:
            assert session.run(["hostname"]) == (0, f"{host.name}\n".encode(), b"")
            rc, out, _ = session.run(["sh", "-c", 'echo "$MIGRATE_ROOT"'])
            assert rc == 0
            seen[host.name] = out.decode().strip()
    assert seen == {h.name: str(h.root) for h in hosts}
    assert len(set(seen.values())) == 2


HOP = """\
from migrate.hosts import resolve_host
from migrate.ssh import SSHSession
with SSHSession.connect(resolve_host("host-b")) as session:
    print(session.run(["sh", "-c", "hostname; echo $HOME"])[1].decode(), end="")
"""


@root
def test_hosts_reach_each_other_by_name(test_hosts):
    """The tool running on host-a resolves host-b through host-a's own ~/.ssh/config."""
    hosts = test_hosts(2)
    repo = Path(__file__).resolve().parents[2]
    with SSHSession.connect(hosts.spec("host-a")) as session:
        rc, out, err = session.run(["env", f"PYTHONPATH={repo}", sys.executable, "-c", HOP])
    assert (rc, out.decode(), err) == (0, f"host-b\n{hosts['host-b'].home}\n", b"")


@root
def test_run_passes_argv_verbatim_and_streams(test_hosts):
    hosts = test_hosts(1)
    with SSHSession.connect(hosts.spec("host-a")) as session:
        tricky = ["a b", "$HOME", "'q'", ";echo no", "*", ""]
        rc, out, err = session.run(["printf", "%s|", *tricky])
        assert (rc, out, err) == (0, "|".join(tricky).encode() + b"|", b"")
        assert session.run(["sh", "-c", "echo oops >&2; exit 3"]) == (3, b"", b"oops\n")
        # more than the SSH window in both directions at once must not deadlock
        blob = os.urandom(8 << 20)
        rc, out, _ = session.run(["cat"], input=blob)
        assert rc == 0 and out == blob
        # stdin is closed even without input, so a reader of stdin finishes
        assert session.run(["cat"]) == (0, b"", b"")
        started = time.monotonic()
        with pytest.raises(RemoteError, match="did not finish within 0.5 s"):
            session.run(["sleep", "30"], timeout=0.5)
        assert time.monotonic() - started < 5
        # the session is still usable after a timed-out command
        assert session.run(["true"])[0] == 0


def resolve(hosts, tmp_path, text, name):
    """NAME resolved through an ssh config holding TEXT (and this set's tool config)."""
    config = tmp_path / f"ssh_config-{name}"
    config.write_text(text)
    return resolve_host(name, ssh_config=config, tool_config=hosts.tool_config)


@root
def test_changed_host_key_is_refused(test_hosts, tmp_path):
    hosts = test_hosts(2)
    a, b = hosts["host-a"], hosts["host-b"]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{a.ip} {b.host_key}\n")
    spec = resolve(hosts, tmp_path, hosts.client_entry("changed", "host-a", UserKnownHostsFile=wrong), "changed")
    with pytest.raises(RemoteError, match=r"^host key for changed \(.*\) does not match known_hosts.*refusing$"):
        SSHSession.connect(spec)


@root
def test_unknown_host_key_is_refused_and_not_added(test_hosts, tmp_path):
    hosts = test_hosts(1)
    other = tmp_path / "known_hosts"
    other.write_text("10.0.0.1 " + hosts["host-a"].host_key + "\n")
    entry = hosts.client_entry("stranger", "host-a", UserKnownHostsFile=f"{other} {tmp_path / 'absent'}",
                               StrictHostKeyChecking="accept-new")  # the tool insists on strict all the same
    with pytest.raises(RemoteError, match=r"is not in known_hosts \(.*known_hosts.*\); add it with ssh-keyscan"):
        SSHSession.connect(resolve(hosts, tmp_path, entry, "stranger"))
    assert other.read_text() == "10.0.0.1 " + hosts["host-a"].host_key + "\n"
    assert not (tmp_path / "absent").exists()


@root
def test_authentication_failures(test_hosts, tmp_path):
    hosts = test_hosts(1)
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    for key in (stranger, tmp_path / "missing"):
        # written out: IdentityFile adds to a list, so client_entry's own key would be tried too
        entry = (f"Host h\n  HostName {hosts['host-a'].ip}\n  User root\n  IdentityFile {key}\n"
                 f"  IdentitiesOnly yes\n  UserKnownHostsFile {hosts.known_hosts}\n")
        spec = resolve(hosts, tmp_path, entry, "h")
        with pytest.raises(RemoteError, match=r"^authentication as root@h \(.*\) failed: Permission denied"):
            SSHSession.connect(spec)


@root
def test_rsync_rides_on_the_control_connection(test_hosts, tmp_path):
    hosts = test_hosts(2)
    source = tmp_path / "src"
    (source / "sub dir").mkdir(parents=True)
    (source / "sub dir" / "file one").write_bytes(b"x" * 100_000)
    (source / "top").write_text("top\n")
    target = hosts["host-b"].root / "copy"
    with SSHSession.connect(hosts.spec("host-b")) as session:
        Rsync(session).send([source], f"{target}/", "test files", 0)
        Rsync(session).send([source], f"{target}/", "test files", 0)
    assert (target / "src" / "sub dir" / "file one").read_bytes() == b"x" * 100_000
    assert (target / "src" / "top").read_text() == "top\n"
    assert logins(hosts["host-b"]) == [bridge(hosts)]  # one login, from here: both rsyncs rode on it


def logins(host):
    """The address each login to HOST came from, as its sshd logged it."""
    lines = host.sshd_log.read_text().splitlines()
    return [ln.split(" from ")[1].split()[0] for ln in lines if ln.startswith("Accepted publickey")]


def bridge(hosts):
    """This machine's address on the hosts' bridge: where a direct login comes from."""
    return hosts["host-a"].ip.rsplit(".", 1)[0] + ".1"


@root
def test_json_peer_over_open_process(test_hosts):
    hosts = test_hosts(1)
    with SSHSession.connect(hosts.spec("host-a")) as session:
        peer = session.open_process([sys.executable, "-c", ECHO_PEER])
        for i in range(50):
            peer.send({"n": i, "text": "line\nbreak é"})
        for i in range(50):
            assert peer.recv(timeout=10) == {"echo": {"n": i, "text": "line\nbreak é"}}
        with pytest.raises(RemoteError, match="no message from"):
            peer.recv(timeout=0.2)
        assert peer.close() == 0

        dying = session.open_process([sys.executable, "-c", ECHO_PEER])
        dying.send({"die": "bad request"})
        with pytest.raises(RemoteError, match=r"exited \(status 3\): peer giving up: bad request"):
            dying.recv(timeout=10)
        assert dying.close() == 3

        liar = session.open_process(["echo", "not json"])
        with pytest.raises(RemoteError, match="not JSON"):
            liar.recv(timeout=10)
        liar.close()


SIGNALLED = """\
import os, signal, sys
from migrate.hosts import resolve_host
from migrate.ssh import SSHSession
with SSHSession.connect(resolve_host("host-a")) as session:
    peer = session.open_process([sys.executable, "-c", sys.argv[1]])
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
        os.killpg(0, sig)  # as the terminal would: to this process's whole group
    peer.send({"still": "there"})
    print(peer.recv(timeout=10), peer.close())
"""


@root
def test_a_signal_to_the_terminals_process_group_spares_the_peer(test_hosts):
    """Ctrl-C or a dropped login (SIGINT, SIGHUP to the process group) is the CLI's to handle: it
    unwinds and tells the agent. The agent's session must not die with the group before that.
    (Run in a process group of its own, so the signals reach nothing of the test run's.)"""
    hosts = test_hosts(1)
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", SIGNALLED, ECHO_PEER], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **hosts.env(), "PYTHONPATH": str(repo)}, start_new_session=True)
    assert (result.returncode, result.stdout) == (0, "{'echo': {'still': 'there'}} 0\n"), result.stderr


@root
def test_tool_config_command_and_root_reach_the_host(test_hosts):
    show = [sys.executable, "-c", "import os, sys; print(os.environ['MIGRATE_ROOT'], *sys.argv[1:], sep='|')"]
    hosts = test_hosts(1, remote_command=show)
    spec = hosts.spec("host-a")
    assert spec.remote_command == tuple(show)
    with SSHSession.connect(spec) as session:
        rc, out, _ = session.run(spec.remote_argv("agent", "a b"))
        assert (rc, out.decode()) == (0, f"{hosts['host-a'].root}|agent|a b\n")
        other_root = dataclasses.replace(spec, remote_root="/elsewhere", remote_env=(("X", "1"),))
        assert session.run(other_root.remote_argv())[1] == b"/elsewhere\n"


@root
def test_teardown_leaves_nothing(test_hosts):
    hosts = test_hosts(2)
    with SSHSession.connect(hosts.spec("host-a")) as session:
        # a session process that outlives both the command and sshd itself
        _, out, _ = session.run(["sh", "-c", "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!"])
        leftover = int(out)
    (hosts["host-b"].root / "mnt").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(hosts["host-b"].root / "mnt")], check=True)
    names = [h.netns for h in hosts]
    pids = [h.sshd_pid for h in hosts] + [leftover]
    hosts.teardown()

    assert not set(names) & set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert hosts.bridge not in links
    assert not any(h.veth in links for h in hosts)
    for pid in pids:
        assert not _alive(pid), pid
    assert not hosts.base.exists()
    assert str(hosts.base) not in Path("/proc/self/mountinfo").read_text()


@root
def test_lost_connection_is_an_error_not_a_status(test_hosts):
    hosts = test_hosts(1)
    session = SSHSession.connect(hosts.spec("host-a"))
    threading.Timer(0.3, session.close).start()
    with pytest.raises(RemoteError, match="lost the connection to host-a while running `sleep 30`"):
        session.run(["sleep", "30"], timeout=10)
    with pytest.raises(RemoteError, match="connection to host-a is closed"):
        session.run(["true"])


def _alive(pid):
    """A zombie waiting for PID 1 to reap it holds nothing, so it counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _loopback(tmp_path, port):
    config = tmp_path / "ssh_config"
    config.write_text(f"Host lo-test\n    HostName 127.0.0.1\n    Port {port}\n")
    return resolve_host("lo-test", ssh_config=config)


def test_connection_refused_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteError, match=rf"^ssh to lo-test \(127.0.0.1:{port}\) failed: connect to host "
                                          rf"127.0.0.1 port {port}: Connection refused$"):
        SSHSession.connect(_loopback(tmp_path, port))


def test_silent_server_times_out(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        started = time.monotonic()
        with pytest.raises(RemoteError, match=r"^ssh to lo-test .* failed: Connection timed out during banner"):
            SSHSession.connect(_loopback(tmp_path, s.getsockname()[1]), timeout=0.5)
        assert time.monotonic() - started < 5


def test_unknown_host_is_one_line(tmp_path):
    (tmp_path / "empty").write_text("")
    spec = resolve_host("nowhere.invalid", ssh_config=tmp_path / "empty")
    with pytest.raises(RemoteError, match="^ssh to nowhere.invalid failed: Could not resolve hostname nowhere.invalid"):
        SSHSession.connect(spec)
