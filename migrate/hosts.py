"""Resolve a host name exactly as `ssh HOST` would, plus this tool's own per-host settings.

The answer is OpenSSH's own: `ssh -G [-F CONFIG] HOST` prints the options ssh would use, after
Include, Match, canonicalization and %-tokens, so `migrate ctr host-b` reaches the same machine,
as the same user, with the same keys, known_hosts, HostKeyAlias and ProxyJump as `ssh host-b`.
The tool's TOML config only adds what ssh cannot know: how to run `migrate` on the other side,
where its state lives there, and whether memory may go to it by a direct, unencrypted connection.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import socket
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import InvalidInput, NotFound

__all__ = [
    "DEFAULT_REMOTE_COMMAND",
    "DEFAULT_TOOL_CONFIG",
    "HostSpec",
    "parse_ssh_g",
    "resolve_host",
    "validate_host_name",
]

DEFAULT_TOOL_CONFIG = Path("/etc/migrate/config.toml")
DEFAULT_REMOTE_COMMAND = ("migrate",)
SSH_G_TIMEOUT = 30.0  # a `Match exec` runs a command: it must not hang resolution forever
_HOST_TABLE_KEYS = {"command", "root", "env", "direct"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNSAFE_NAME = re.compile(r"[\s\x00-\x1f\x7f]")


@dataclass(frozen=True)
class HostSpec:
    """Everything needed to reach one host and run the tool there; resolved once, passed around.

    OpenSSH is always run with `-F ssh_config` (None: its own default files) and the alias, so it
    resolves the host itself; the resolved fields are for messages.
    """

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...] = ()
    known_hosts_files: tuple[str, ...] = ()
    remote_command: tuple[str, ...] = DEFAULT_REMOTE_COMMAND
    remote_root: str | None = None
    remote_env: tuple[tuple[str, str], ...] = ()
    ssh_config: str | None = None
    host_key_alias: str | None = None
    proxy_jump: str | None = None
    proxy_command: str | None = None
    connect_timeout: int | None = None
    direct: bool = False  # the network to it is trusted: memory pages go by plain TCP, not through SSH

    def remote_argv(self, *args: str) -> list[str]:
        """argv that runs the tool on the host with its MIGRATE_ROOT and extra env.

        Through `env`, because sshd drops client-sent variables unless AcceptEnv allows them.
        """
        assignments = list(self.remote_env)
        if self.remote_root is not None:
            assignments.append(("MIGRATE_ROOT", self.remote_root))
        prefix = ["env", *(f"{k}={v}" for k, v in assignments)] if assignments else []
        return [*prefix, *self.remote_command, *args]

    @property
    def where(self) -> str:
        """The host as messages name it: the alias, and the address it stands for."""
        address = self.hostname if self.port == 22 else f"{self.hostname}:{self.port}"
        return self.alias if self.alias == address else f"{self.alias} ({address})"


def validate_host_name(name: str) -> str:
    """Refuse names that ssh, rsync or a log line would misread (options, spaces, controls)."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("host name must not be empty")
    if name.startswith("-"):
        raise InvalidInput(f"host name must not start with '-': {name!r}")
    if _UNSAFE_NAME.search(name):
        raise InvalidInput(f"host name must not contain whitespace or control characters: {name!r}")
    if len(name) > 255:
        raise InvalidInput(f"host name is longer than 255 characters: {name[:40]!r}...")
    return name


def resolve_host(
    name: str,
    *,
    ssh_config: str | os.PathLike[str] | None = None,
    tool_config: str | os.PathLike[str] | None = None,
) -> HostSpec:
    """Resolve NAME through `ssh -G` and the tool config.

    The ssh config is SSH_CONFIG, else $MIGRATE_SSH_CONFIG, else OpenSSH's own defaults
    (~/.ssh/config and /etc/ssh/ssh_config); the tool config is TOOL_CONFIG, else $MIGRATE_CONFIG,
    else /etc/migrate/config.toml, which may be missing. A file named explicitly must exist.
    A host in no file is still valid: like ssh, its alias is its hostname.
    """
    validate_host_name(name)
    ssh_path = _pick_path(ssh_config, "MIGRATE_SSH_CONFIG")
    tool_path = _pick_path(tool_config, "MIGRATE_CONFIG") or DEFAULT_TOOL_CONFIG
    options = parse_ssh_g(ssh_g(name, ssh_path))
    table = _host_table(name, tool_path)
    return _spec(name, options, ssh_path, table)


def ssh_g(name: str, config: Path | None) -> str:
    """OpenSSH's resolution of NAME: the output of `ssh -G`. The seam unit tests replace."""
    argv = ["ssh", "-G", *(["-F", str(config)] if config is not None else []), "--", name]
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SSH_G_TIMEOUT)
    except FileNotFoundError:
        raise NotFound("ssh (the OpenSSH client) is not installed: it resolves and reaches hosts") from None
    except subprocess.TimeoutExpired:
        raise InvalidInput(f"`ssh -G {name}` did not answer within {SSH_G_TIMEOUT:.0f} s (a Match exec?)") from None
    if p.returncode != 0:
        lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("Pseudo-terminal")]
        raise InvalidInput(f"ssh config: cannot resolve {name}: {lines[0] if lines else f'status {p.returncode}'}")
    return p.stdout


def parse_ssh_g(text: str) -> dict[str, list[str]]:
    """`ssh -G` prints one `keyword value` a line, lowercase, a keyword once per value."""
    options: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            options.setdefault(key.lower(), []).append(value.strip())
    return options


def _spec(name: str, options: dict[str, list[str]], ssh_path: Path | None, table: dict) -> HostSpec:
    def one(key: str) -> str | None:
        value = options.get(key, [None])[0]
        return None if value is None or value.lower() == "none" else value

    hostname = validate_host_name(one("hostname") or name)
    port = _port(one("port") or "22", name)
    user = one("user") or pwd.getpwuid(os.getuid()).pw_name
    tokens = _Tokens(alias=name, hostname=hostname, port=port, user=user, host_key_alias=one("hostkeyalias"))
    known = [p for key in ("userknownhostsfile", "globalknownhostsfile") for p in (one(key) or "").split()]
    return HostSpec(
        alias=name,
        hostname=hostname,
        port=port,
        user=user,
        identity_files=tokens.paths(options.get("identityfile", [])),
        known_hosts_files=tuple(dict.fromkeys(p for p in tokens.paths(known) if p != "/dev/null")),
        remote_command=_remote_command(table.get("command"), name),
        remote_root=_remote_root(table.get("root"), name),
        remote_env=_remote_env(table.get("env", {}), name),
        direct=_direct(table.get("direct", False), name),
        ssh_config=None if ssh_path is None else str(ssh_path),
        host_key_alias=one("hostkeyalias"),
        proxy_jump=one("proxyjump"),
        proxy_command=one("proxycommand"),
        connect_timeout=None if one("connecttimeout") is None else _number(one("connecttimeout"), "ConnectTimeout"),
    )


def _pick_path(explicit: str | os.PathLike[str] | None, env_var: str) -> Path | None:
    chosen = explicit if explicit is not None else os.environ.get(env_var)
    if chosen is None or chosen == "":
        return None
    path = Path(chosen).expanduser()
    if not path.exists():
        source = "given" if explicit is not None else f"${env_var}"
        raise NotFound(f"config file {path} ({source}) does not exist")
    return path


def _number(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"ssh config: {what} is not a number: {value!r}") from None


def _port(value: str, name: str) -> int:
    port = _number(value, f"Port for {name}")
    if not 0 < port < 65536:
        raise InvalidInput(f"ssh config: Port for {name} is out of range: {port}")
    return port


@dataclass(frozen=True)
class _Tokens:
    """The %-tokens and ~ that OpenSSH expands in file names when it opens them (`ssh -G`
    prints IdentityFile and CertificateFile unexpanded); ~ is the passwd home, as for ssh."""

    alias: str
    hostname: str
    port: int
    user: str
    host_key_alias: str | None

    def paths(self, values: list[str]) -> tuple[str, ...]:
        return tuple(self.expand(v) for v in values if v.lower() != "none")

    def expand(self, path: str) -> str:
        me = pwd.getpwuid(os.getuid())
        table = {"%": "%", "d": me.pw_dir, "h": self.hostname, "p": str(self.port), "r": self.user,
                 "u": me.pw_name, "n": self.alias, "i": str(os.getuid()), "l": socket.gethostname(),
                 "k": self.host_key_alias or self.hostname}
        if path == "~" or path.startswith("~/"):
            path = me.pw_dir + path[1:]
        return re.sub(r"%(.)", lambda m: table.get(m.group(1), m.group(0)), path)


def _host_table(name: str, path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        with path.open("rb") as f:
            config = tomllib.load(f)
    except (tomllib.TOMLDecodeError, OSError) as e:
        raise InvalidInput(f"cannot read {path}: {e}") from None
    hosts = config.get("hosts", {})
    if not isinstance(hosts, dict):
        raise InvalidInput(f"{path}: 'hosts' must be a table of [hosts.NAME] tables")
    table = hosts.get(name, {})
    if not isinstance(table, dict):
        raise InvalidInput(f"{path}: [hosts.{name}] must be a table")
    unknown = sorted(set(table) - _HOST_TABLE_KEYS)
    if unknown:
        raise InvalidInput(f"{path}: [hosts.{name}] has unknown keys: {', '.join(unknown)}")
    return table


def _remote_command(value: object, name: str) -> tuple[str, ...]:
    """A list is taken as argv; a string is split like a shell would, so both spellings work."""
    if value is None:
        return DEFAULT_REMOTE_COMMAND
    if isinstance(value, str):
        argv = shlex.split(value)
    elif isinstance(value, list) and all(isinstance(a, str) for a in value):
        argv = list(value)
    else:
        raise InvalidInput(f"[hosts.{name}] command must be a string or a list of strings")
    if not argv:
        raise InvalidInput(f"[hosts.{name}] command must not be empty")
    return tuple(argv)


def _remote_root(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidInput(f"[hosts.{name}] root must be an absolute path")
    return value


def _direct(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"[hosts.{name}] direct must be true or false")
    return value


def _remote_env(value: object, name: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise InvalidInput(f"[hosts.{name}] env must be a table of NAME = \"value\"")
    pairs = []
    for key, val in value.items():
        if not _ENV_NAME.fullmatch(key) or not isinstance(val, str):
            raise InvalidInput(f"[hosts.{name}] env: bad entry {key!r}; want NAME = \"string\"")
        pairs.append((key, val))
    return tuple(pairs)
