"""Resolve a host name the way `ssh HOST` would, plus this tool's own per-host settings.

Users already describe their hosts in ~/.ssh/config; reading it (with paramiko.SSHConfig) means
`migrate ctr host-b` reaches the same machine, as the same user, with the same keys and the same
known_hosts as `ssh host-b`. The tool's TOML config only adds what ssh cannot know: how to run
`migrate` on the other side and where its state lives there.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import paramiko

from runtime.errors import InvalidInput, NotFound

__all__ = [
    "DEFAULT_REMOTE_COMMAND",
    "DEFAULT_TOOL_CONFIG",
    "HostSpec",
    "resolve_host",
    "validate_host_name",
]

DEFAULT_TOOL_CONFIG = Path("/etc/migrate/config.toml")
DEFAULT_REMOTE_COMMAND = ("migrate",)
_HOST_TABLE_KEYS = {"command", "root", "env"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNSAFE_NAME = re.compile(r"[\s\x00-\x1f\x7f]")


@dataclass(frozen=True)
class HostSpec:
    """Everything needed to reach one host and run the tool there; resolved once, passed around."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    known_hosts_files: tuple[str, ...]
    remote_command: tuple[str, ...] = DEFAULT_REMOTE_COMMAND
    remote_root: str | None = None
    remote_env: tuple[tuple[str, str], ...] = ()
    ssh_config: str | None = None

    def remote_argv(self, *args: str) -> list[str]:
        """argv that runs the tool on the host with its MIGRATE_ROOT and extra env.

        Through `env`, because sshd drops client-sent variables unless AcceptEnv allows them.
        """
        assignments = list(self.remote_env)
        if self.remote_root is not None:
            assignments.append(("MIGRATE_ROOT", self.remote_root))
        prefix = ["env", *(f"{k}={v}" for k, v in assignments)] if assignments else []
        return [*prefix, *self.remote_command, *args]


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
    """Resolve NAME through the ssh config and the tool config.

    Paths default to $MIGRATE_SSH_CONFIG or ~/.ssh/config, and $MIGRATE_CONFIG or
    /etc/migrate/config.toml. A default file may be missing; an explicitly named one may not.
    A host in neither file is still valid: like ssh, its alias is its hostname.
    """
    validate_host_name(name)
    ssh_path = _pick_path(ssh_config, "MIGRATE_SSH_CONFIG", Path("~/.ssh/config").expanduser())
    tool_path = _pick_path(tool_config, "MIGRATE_CONFIG", DEFAULT_TOOL_CONFIG)

    options = _ssh_options(name, ssh_path)
    hostname = options.get("hostname", name)
    validate_host_name(hostname)
    port = _port(options.get("port", "22"), name)
    user = options.get("user") or getpass.getuser()
    identity_files = tuple(os.path.expanduser(p) for p in options.get("identityfile", []) if p.lower() != "none")
    user_files = _file_list(options.get("userknownhostsfile"), "~/.ssh/known_hosts")
    global_files = _file_list(options.get("globalknownhostsfile"), "/etc/ssh/ssh_known_hosts")
    known_hosts = tuple(
        dict.fromkeys(_expand_tokens(p, hostname=hostname, port=port, user=user) for p in user_files + global_files)
    )

    table = _host_table(name, tool_path)
    return HostSpec(
        alias=name,
        hostname=hostname,
        port=port,
        user=user,
        identity_files=identity_files,
        known_hosts_files=known_hosts,
        remote_command=_remote_command(table.get("command"), name),
        remote_root=_remote_root(table.get("root"), name),
        remote_env=_remote_env(table.get("env", {}), name),
        ssh_config=str(ssh_path) if ssh_path.exists() else None,
    )


def _pick_path(explicit: str | os.PathLike[str] | None, env_var: str, default: Path) -> Path:
    chosen = explicit if explicit is not None else os.environ.get(env_var)
    if chosen is None or chosen == "":
        return default
    path = Path(chosen).expanduser()
    if not path.exists():
        source = "given" if explicit is not None else f"${env_var}"
        raise NotFound(f"config file {path} ({source}) does not exist")
    return path


def _ssh_options(name: str, path: Path) -> dict:
    if not path.exists():
        return {"hostname": name}
    try:
        return dict(paramiko.SSHConfig.from_path(str(path)).lookup(name))
    except (paramiko.ssh_exception.ConfigParseError, OSError, ValueError) as e:
        raise InvalidInput(f"cannot read ssh config {path}: {e}") from None


def _port(value: str, name: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise InvalidInput(f"ssh config: Port for {name} is not a number: {value!r}") from None
    if not 0 < port < 65536:
        raise InvalidInput(f"ssh config: Port for {name} is out of range: {port}")
    return port


def _file_list(value: str | None, default: str) -> list[str]:
    """Known-hosts options hold several paths; "none" and /dev/null mean no file at all."""
    paths = shlex.split(value if value is not None else default)
    return [os.path.expanduser(p) for p in paths if p.lower() != "none" and p != "/dev/null"]


def _expand_tokens(path: str, *, hostname: str, port: int, user: str) -> str:
    """The ssh_config %-tokens that make sense in a known_hosts path (paramiko expands none)."""
    tokens = {"%": "%", "d": os.path.expanduser("~"), "h": hostname, "p": str(port), "r": user,
              "u": getpass.getuser()}
    return re.sub(r"%(.)", lambda m: tokens.get(m.group(1), m.group(0)), path)


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


def _remote_env(value: object, name: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise InvalidInput(f"[hosts.{name}] env must be a table of NAME = \"value\"")
    pairs = []
    for key, val in value.items():
        if not _ENV_NAME.fullmatch(key) or not isinstance(val, str):
            raise InvalidInput(f"[hosts.{name}] env: bad entry {key!r}; want NAME = \"string\"")
        pairs.append((key, val))
    return tuple(pairs)
