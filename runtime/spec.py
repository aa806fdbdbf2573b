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
        if len(parts) not in (2, 3) or not parts[0].startswith("/") or not parts[1].startswith("/"):
            raise InvalidInput(f"invalid volume {text!r}: use /host/path:/container/path[:ro]")
        if len(parts) == 3 and parts[2] not in ("ro", "rw"):
            raise InvalidInput(f"invalid volume option {parts[2]!r}: use ro or rw")
        if ".." in parts[1].split("/"):
            raise InvalidInput(f"invalid container path {parts[1]!r}: '..' is not allowed")
        return cls(parts[0].rstrip("/") or "/", parts[1].rstrip("/") or "/", len(parts) == 3 and parts[2] == "ro")


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None


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
            volumes=tuple(Volume(**v) for v in d["volumes"]),
            limits=Limits(**d["limits"]),
        )

    def renamed(self, name: str) -> "ContainerSpec":
        return ContainerSpec(**{**self.__dict__, "name": name})
