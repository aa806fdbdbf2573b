import os
import pwd

import pytest

from migrate import hosts
from migrate.hosts import HostSpec, parse_ssh_g, resolve_host, validate_host_name
from runtime.errors import InvalidInput, NotFound

HOME = pwd.getpwuid(os.getuid()).pw_dir  # what OpenSSH's ~ means: the passwd home, not $HOME


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Neither /etc/migrate/config.toml nor this machine's ssh config leaks into these tests."""
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("MIGRATE_SSH_CONFIG", str(empty))
    monkeypatch.setenv("MIGRATE_CONFIG", str(empty))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def fake_ssh_g(monkeypatch):
    """Replace `ssh -G` by canned output; records the (name, config) it was asked for."""
    asked = []

    def install(output: str):
        def ssh_g(name, config):
            asked.append((name, config))
            return output

        monkeypatch.setattr(hosts, "ssh_g", ssh_g)
        return asked

    return install


# What OpenSSH 9.2 prints, cut down to what the tool reads, plus a few it ignores.
SSH_G = """\
user admin
hostname 10.1.2.3
port 2222
stricthostkeychecking ask
hostkeyalias box-b
identityfile ~/.ssh/id_%h
identityfile /keys/second
certificatefile ~/.ssh/id_b-cert.pub
globalknownhostsfile /etc/ssh/ssh_known_hosts /dev/null
userknownhostsfile /root/kh/one /root/kh/two
connecttimeout 7
proxyjump jump@gate:2200,inner
proxycommand none
"""


def test_ssh_g_output_makes_the_spec(fake_ssh_g, tmp_path):
    config = write(tmp_path / "ssh_config", "")
    asked = fake_ssh_g(SSH_G)
    spec = resolve_host("host-b", ssh_config=config)
    assert asked == [("host-b", config)]
    assert (spec.alias, spec.hostname, spec.user, spec.port) == ("host-b", "10.1.2.3", "admin", 2222)
    assert spec.identity_files == (f"{HOME}/.ssh/id_10.1.2.3", "/keys/second")
    assert spec.known_hosts_files == ("/root/kh/one", "/root/kh/two", "/etc/ssh/ssh_known_hosts")
    assert (spec.host_key_alias, spec.proxy_jump, spec.proxy_command) == ("box-b", "jump@gate:2200,inner", None)
    assert spec.connect_timeout == 7 and spec.ssh_config == str(config)
    assert spec.where == "host-b (10.1.2.3:2222)"


def test_parse_keeps_every_value_of_a_repeated_keyword():
    assert parse_ssh_g("identityfile a\nIdentityFile b c\n\nport 22\n") == {
        "identityfile": ["a", "b c"], "port": ["22"]}


def test_none_values_mean_nothing(fake_ssh_g):
    fake_ssh_g("user u\nhostname h\nport 22\nidentityfile none\nuserknownhostsfile none\n"
               "globalknownhostsfile /dev/null\nhostkeyalias none\nconnecttimeout none\n")
    spec = resolve_host("h")
    assert spec.identity_files == spec.known_hosts_files == ()
    assert spec.host_key_alias is None and spec.connect_timeout is None and spec.where == "h"


def test_without_a_config_ssh_uses_its_own_defaults(fake_ssh_g, tmp_path, monkeypatch):
    asked = fake_ssh_g("user u\nhostname h\nport 22\n")
    monkeypatch.delenv("MIGRATE_SSH_CONFIG")
    assert resolve_host("h").ssh_config is None
    monkeypatch.setenv("MIGRATE_SSH_CONFIG", str(write(tmp_path / "env_config", "")))
    resolve_host("h")
    assert asked == [("h", None), ("h", tmp_path / "env_config")]


@pytest.mark.parametrize("port", ["abc", "0", "70000"])
def test_bad_port(fake_ssh_g, port):
    fake_ssh_g(f"user u\nhostname h\nport {port}\n")
    with pytest.raises(InvalidInput, match="Port"):
        resolve_host("h")


def test_hostname_from_ssh_is_validated_too(fake_ssh_g):
    fake_ssh_g("user u\nhostname -oProxyCommand=x\nport 22\n")
    with pytest.raises(InvalidInput, match="must not start with '-'"):
        resolve_host("h")


# The real `ssh -G` on config files: what it resolves that paramiko's parser did not.


def test_include_match_and_tokens_resolve_as_openssh_does(tmp_path):
    included = write(tmp_path / "conf.d" / "lab.conf",
                     "Host lab-*\n  User labuser\nHost lab-b\n  HostName 10.9.0.2\n  HostKeyAlias lab-b.key\n"
                     "  ProxyJump lab-gate\n  IdentityFile %d/.ssh/lab_%r\n  UserKnownHostsFile /kh/%h\n")
    config = write(tmp_path / "ssh_config", f"Include {included.parent}/*.conf\n"
                   "Match originalhost lab-b exec true\n  Port 2202\n")
    spec = resolve_host("lab-b", ssh_config=config)
    assert (spec.hostname, spec.user, spec.port) == ("10.9.0.2", "labuser", 2202)
    assert (spec.host_key_alias, spec.proxy_jump) == ("lab-b.key", "lab-gate")
    assert spec.identity_files == (f"{HOME}/.ssh/lab_labuser",)
    assert spec.known_hosts_files[0] == "/kh/10.9.0.2"


def test_unknown_host_is_its_own_hostname(tmp_path):
    spec = resolve_host("plain.example", ssh_config=write(tmp_path / "c", ""))
    assert (spec.hostname, spec.port, spec.user) == ("plain.example", 22, pwd.getpwuid(os.getuid()).pw_name)
    assert spec.proxy_jump is None and spec.host_key_alias is None
    assert spec.remote_command == ("migrate",) and spec.remote_root is None and spec.remote_env == ()


def test_bad_ssh_config_is_one_line(tmp_path):
    config = write(tmp_path / "c", "Host h\n  Bogus 1\n")
    with pytest.raises(InvalidInput, match=r"^ssh config: cannot resolve h: .*line 2: Bad configuration option"):
        resolve_host("h", ssh_config=config)


@pytest.mark.parametrize("kind", ["ssh_config", "tool_config"])
def test_missing_named_config_is_not_found(tmp_path, kind):
    with pytest.raises(NotFound, match="does not exist"):
        resolve_host("h", **{kind: tmp_path / "nope"})


def test_missing_env_config_is_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRATE_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(NotFound, match="MIGRATE_CONFIG"):
        resolve_host("h")


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


def test_direct_is_per_host_and_off_unless_said(tmp_path):
    tool = write(tmp_path / "t.toml", "[hosts.lab]\ndirect = true\n[hosts.far]\nroot = \"/r\"\n")
    assert resolve_host("lab", tool_config=tool).direct
    assert not resolve_host("far", tool_config=tool).direct
    assert not resolve_host("elsewhere", tool_config=tool).direct


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
        ('[hosts.h]\ndirect = "yes"\n', "direct must be true or false"),
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


def test_spec_is_frozen_and_hashable():
    def spec():
        return HostSpec(alias="host-b", hostname="10.1.2.3", port=2222, user="admin", identity_files=("/k",))

    s = spec()
    with pytest.raises(AttributeError):
        s.port = 22  # type: ignore[misc]
    assert hash(s) == hash(spec())
