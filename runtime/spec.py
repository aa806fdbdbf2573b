"""What a container is, as plain frozen data: stored in the catalog and shipped with snapshots."""

import json
import re
from dataclasses import asdict, dataclass, field

from .errors import InvalidInput

_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def validate_name(name: str, what: str = "container") -> str:
    """Names become paths, cgroup folders and hostnames: keep them to a safe alphabet."""
    if not _NAME.fullmatch(name or ""):
        raise InvalidInput(
            f"invalid {what} name {name!r}: use 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def parse_size(text: str) -> int:
    """'512m', '1G', '1048576' -> bytes."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise InvalidInput(f"invalid size {text!r}: use a number with an optional k, m, g or t suffix")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'2s', '10m', '1.5h', '30' (seconds) -> seconds, more than zero."""
    m = _DURATION.fullmatch(text.strip())
    seconds = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()] if m else 0
    if seconds <= 0:
        raise InvalidInput(f"invalid duration {text!r}: use a positive number with an optional ms, s, m, h or d suffix")
    return seconds


@dataclass(frozen=True)
class Volume:
    """A host directory bind-mounted into the container; CRIU sees it as a declared external mount."""

    host_path: str
    container_path: str
    read_only: bool = False

    @property
    def criu_key(self) -> str:
        return "vol" + re.sub(r"[^A-Za-z0-9]", "_", self.container_path)

    @classmethod
    def parse(cls, text: str) -> "Volume":
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise InvalidInput(f"invalid volume {text!r}: use /host/path:/container/path[:ro]")
        if len(parts) == 3 and parts[2] not in ("ro", "rw"):
            raise InvalidInput(f"invalid volume option {parts[2]!r}: use ro or rw")
        return cls.checked(parts[0], parts[1], len(parts) == 3 and parts[2] == "ro")

    @classmethod
    def checked(cls, host_path: object, container_path: object, read_only: object = False) -> "Volume":
        """A volume by the command line's rules, whoever wrote it: a spec from another host
        (a migration, an archive) says which host paths are mounted where, read-write."""
        for path in (host_path, container_path):
            if not isinstance(path, str) or not path.startswith("/") or ":" in path or "\0" in path:
                raise InvalidInput(f"invalid volume {host_path!r}:{container_path!r}: use /host/path:/container/path")
        if ".." in container_path.split("/"):
            raise InvalidInput(f"invalid container path {container_path!r}: '..' is not allowed")
        if not isinstance(read_only, bool):
            raise InvalidInput(f"invalid volume read_only {read_only!r}: true or false")
        return cls(host_path.rstrip("/") or "/", container_path.rstrip("/") or "/", read_only)


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None


DRAIN_POLICIES = ("live", "checkpoint", "stop")


@dataclass(frozen=True)
class Schedule:
    """Leave-running snapshots every `every` seconds, the newest `keep` of them kept."""

    every: float
    keep: int = 3


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start the container again from its image layers, here or elsewhere."""

    name: str
    image: str
    image_id: str
    layers: tuple[str, ...]
    argv: tuple[str, ...]
    env: tuple[str, ...] = ()
    working_dir: str = "/"
    volumes: tuple[Volume, ...] = ()
    limits: Limits = field(default_factory=Limits)
    schedule: Schedule | None = None
    drain_policy: str | None = None  # what `migrate drain` does with it: one of DRAIN_POLICIES; None: unset
    privileged: bool = False  # `run --privileged`: every capability, no seccomp filter, no masked paths

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ContainerSpec":
        d = json.loads(text)
        return cls(
            name=d["name"],
            image=d["image"],
            image_id=d["image_id"],
            layers=tuple(d["layers"]),
            argv=tuple(d["argv"]),
            env=tuple(d["env"]),
            working_dir=d["working_dir"],
            volumes=tuple(_volume(v) for v in d["volumes"]),
            limits=Limits(**d["limits"]),
            schedule=Schedule(**d["schedule"]) if d.get("schedule") else None,  # absent before schedules
            drain_policy=d.get("drain_policy"),
            # absent: written before containers were confined, so it was not, and a restore of it
            # (CRIU brings back its capabilities, filter and mounts as they were) is not either
            privileged=d.get("privileged", True),
        )

    def renamed(self, name: str) -> "ContainerSpec":
        return ContainerSpec(**{**self.__dict__, "name": name})


def _volume(v: object) -> Volume:
    """A volume of a spec's JSON, checked as the command line checks one."""
    if not isinstance(v, dict) or not {"host_path", "container_path"} <= set(v) <= {
            "host_path", "container_path", "read_only"}:
        raise InvalidInput(f"invalid volume in a spec: {v!r}")
    return Volume.checked(**v)
