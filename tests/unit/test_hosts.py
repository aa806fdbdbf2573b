import getpass
import shlex

import pytest

from migrate.hosts import HostSpec, resolve_host, validate_host_name
from migrate.ssh import rsync_ssh_command, rsync_target
from runtime.errors import InvalidInput, NotFound


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real ~/.ssh/config or /etc/migrate/config.toml leaks into these tests."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MIGRATE_SSH_CONFIG", raising=False)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    monkeypatch.setenv("MIGRATE_CONFIG", str(empty))
    return home


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


SSH_CONFIG = """\
Host host-b
    HostName 10.1.2.3
    User admin
    Port 2222
    IdentityFile ~/.ssh/id_b
    IdentityFile /keys/second
    UserKnownHostsFile ~/kh/one "/with space/two"

Host *
    IdentityFile ~/.ssh/id_all
    GlobalKnownHostsFile none
"""


def test_ssh_config_is_honoured(tmp_path, isolated):
    config = write(tmp_path / "ssh_config", SSH_CONFIG)
    spec = resolve_host("host-b", ssh_config=config)
    assert (spec.alias, spec.hostname, spec.user, spec.port) == ("host-b", "10.1.2.3", "admin", 2222)
    assert spec.identity_files == (f"{isolated}/.ssh/id_b", "/keys/second", f"{isolated}/.ssh/id_all")
    assert spec.known_hosts_files == (f"{isolated}/kh/one", "/with space/two")
    assert spec.ssh_config == str(config)


def test_unknown_host_is_its_own_hostname(isolated):
    spec = resolve_host("plain.example")
    assert (spec.hostname, spec.port, spec.user) == ("plain.example", 22, getpass.getuser())
    assert spec.identity_files == ()
    assert spec.known_hosts_files == (f"{isolated}/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts")
    assert spec.remote_command == ("migrate",) and spec.remote_root is None and spec.remote_env == ()
    assert spec.ssh_config is None


def test_default_ssh_config_is_home_one(isolated):
    write(isolated / ".ssh" / "config", "Host h\n  HostName 10.9.9.9\n")
    assert resolve_host("h").hostname == "10.9.9.9"


def test_env_var_then_explicit_argument_win(tmp_path, monkeypatch):
    from_env = write(tmp_path / "env_config", "Host h\n  Port 2001\n")
    explicit = write(tmp_path / "explicit", "Host h\n  Port 2002\n")
    monkeypatch.setenv("MIGRATE_SSH_CONFIG", str(from_env))
    assert resolve_host("h").port == 2001
    assert resolve_host("h", ssh_config=explicit).port == 2002


@pytest.mark.parametrize("kind", ["ssh_config", "tool_config"])
def test_missing_named_config_is_not_found(tmp_path, kind):
    with pytest.raises(NotFound, match="does not exist"):
        resolve_host("h", **{kind: tmp_path / "nope"})


def test_missing_env_config_is_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRATE_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(NotFound, match="MIGRATE_CONFIG"):
        resolve_host("h")


def test_known_hosts_tokens_and_none(tmp_path, isolated):
    config = write(
        tmp_path / "c",
        "Host t\n  HostName 10.0.0.7\n  Port 2200\n  User u\n"
        "  UserKnownHostsFile %d/kh-%h-%p-%r 100%%\n  GlobalKnownHostsFile /dev/null\n"
        "Host n\n  UserKnownHostsFile none\n  GlobalKnownHostsFile none\n  IdentityFile none\n",
    )
    assert resolve_host("t", ssh_config=config).known_hosts_files == (f"{isolated}/kh-10.0.0.7-2200-u", "100%")
    none = resolve_host("n", ssh_config=config)
    assert none.known_hosts_files == () and none.identity_files == ()


@pytest.mark.parametrize("port", ["abc", "0", "70000"])
def test_bad_port(tmp_path, port):
    config = write(tmp_path / "c", f"Host h\n  Port {port}\n")
    with pytest.raises(InvalidInput, match="Port"):
        resolve_host("h", ssh_config=config)


def test_hostname_from_config_is_validated_too(tmp_path):
    config = write(tmp_path / "c", "Host h\n  HostName -oProxyCommand=x\n")
    with pytest.raises(InvalidInput, match="must not start with '-'"):
        resolve_host("h", ssh_config=config)


TOOL_CONFIG = """\
[defaults]
something_else = 1

[hosts.host-b]
command = "/opt/migrate/bin/python -m migrate.cli"
root = "/srv/migrate"
env = { PATH = "/opt/bin:/usr/bin", MIGRATE_LOG = "debug" }

[hosts.listed]
command = ["/usr/local/bin/migrate", "--quiet"]
"""


def test_tool_config_tables(tmp_path):
    tool = write(tmp_path / "config.toml", TOOL_CONFIG)
    spec = resolve_host("host-b", tool_config=tool)
    assert spec.remote_command == ("/opt/migrate/bin/python", "-m", "migrate.cli")
    assert spec.remote_root == "/srv/migrate"
    assert spec.remote_env == (("PATH", "/opt/bin:/usr/bin"), ("MIGRATE_LOG", "debug"))
    assert spec.remote_argv("agent", "a b") == [
        "env", "PATH=/opt/bin:/usr/bin", "MIGRATE_LOG=debug", "MIGRATE_ROOT=/srv/migrate",
        "/opt/migrate/bin/python", "-m", "migrate.cli", "agent", "a b",
    ]
    listed = resolve_host("listed", tool_config=tool)
    assert listed.remote_argv("agent") == ["/usr/local/bin/migrate", "--quiet", "agent"]
    assert resolve_host("other", tool_config=tool).remote_argv("x") == ["migrate", "x"]


def test_tool_config_via_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRATE_CONFIG", str(write(tmp_path / "t.toml", '[hosts.h]\nroot = "/r"\n')))
    assert resolve_host("h").remote_root == "/r"


@pytest.mark.parametrize(
    "table, message",
    [
        ('[hosts.h]\ncomand = "x"\n', "unknown keys: comand"),
        ('[hosts.h]\nroot = "relative"\n', "absolute"),
        ("[hosts.h]\ncommand = []\n", "must not be empty"),
        ("[hosts.h]\ncommand = 3\n", "string or a list"),
        ('[hosts.h]\nenv = { "1BAD" = "x" }\n', "bad entry"),
        ("[hosts.h]\nenv = { A = 1 }\n", "bad entry"),
        ('hosts = "x"\n', "must be a table"),
        ('[hosts]\nh = "x"\n', "must be a table"),
        ("[hosts.h\n", "cannot read"),
    ],
)
def test_bad_tool_config(tmp_path, table, message):
    tool = write(tmp_path / "t.toml", table)
    with pytest.raises(InvalidInput, match=message):
        resolve_host("h", tool_config=tool)


@pytest.mark.parametrize("name", ["host-b", "10.1.2.3", "a.example.org", "fe80::1", "h_1"])
def test_valid_names(name):
    assert validate_host_name(name) == name


@pytest.mark.parametrize("name", ["", "-oProxyCommand=x", "a b", "a\tb", "a\nb", "a\x00b", "a\x7f", "x" * 256])
def test_invalid_names(name):
    with pytest.raises(InvalidInput):
        validate_host_name(name)
    with pytest.raises(InvalidInput):
        resolve_host(name)


def spec(**changes):
    base = dict(
        alias="host-b", hostname="10.1.2.3", port=2222, user="admin",
        identity_files=("/keys/a", "/keys/b"), known_hosts_files=("/kh/one", "/with space/two"),
        ssh_config="/cfg/ssh_config",
    )
    return HostSpec(**{**base, **changes})


def option(argv, name):
    pairs = zip(argv, argv[1:], strict=False)
    values = [v.split("=", 1)[1] for a, v in pairs if a == "-o" and v.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def test_rsync_ssh_command():
    argv = rsync_ssh_command(spec())
    assert argv[0] == "ssh"
    assert argv[argv.index("-F") + 1] == "/cfg/ssh_config"
    assert argv[argv.index("-p") + 1] == "2222"
    assert argv[argv.index("-l") + 1] == "admin"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-i"] == ["/keys/a", "/keys/b"]
    assert option(argv, "HostName") == "10.1.2.3"
    assert option(argv, "StrictHostKeyChecking") == "yes"
    assert option(argv, "BatchMode") == "yes"
    assert option(argv, "IdentitiesOnly") == "yes"
    assert option(argv, "UserKnownHostsFile") == '/kh/one "/with space/two"'
    assert option(argv, "GlobalKnownHostsFile") == "/dev/null"
    assert option(argv, "UpdateHostKeys") == "no"
    # rsync splits -e like a shell: the joined form must come back as the same argv
    assert shlex.split(shlex.join(argv)) == argv


def test_rsync_ssh_command_without_config_or_keys():
    argv = rsync_ssh_command(spec(ssh_config=None, identity_files=(), known_hosts_files=()))
    assert argv[argv.index("-F") + 1] == "/dev/null"
    assert "-i" not in argv
    assert option(argv, "UserKnownHostsFile") == "/dev/null"


def test_rsync_target():
    assert rsync_target(spec(), "/srv/x y") == "host-b:/srv/x y"
    assert rsync_target(spec(alias="fe80::1"), "/d") == "[fe80::1]:/d"


def test_spec_is_frozen_and_hashable():
    s = spec()
    with pytest.raises(AttributeError):
        s.port = 22  # type: ignore[misc]
    assert hash(s) == hash(spec())

