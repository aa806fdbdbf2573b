"""What a container's processes hold that decides whether (and how) they can be dumped, read
from /proc: TCP connections, databases open for writing, credentials.

Each reader is a thin function over a pure parser of /proc's text, so the decisions are
unit-tested from text. Nothing here changes anything: it runs before a freeze, to refuse in one
line what CRIU would otherwise fail on (or silently break) after it.
"""

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass

TCP_LISTEN = 0x0A
TCP_CLOSE = 0x07
CAP_SYS_RESOURCE = 24
SQLITE_MAGIC = b"SQLite format 3\0"


@dataclass(frozen=True)
class TcpSocket:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    inode: int


@dataclass(frozen=True)
class Connection:
    """An established TCP connection of the container whose other end is not the container's."""

    local: tuple[str, int]
    remote: tuple[str, int]

    def __str__(self) -> str:
        return f"{_endpoint(self.local)} -> {_endpoint(self.remote)}"


def _endpoint(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address(hex_addr: str) -> tuple[str, int]:
    """'0100007F:1F90' (kernel byte order, per 32-bit word) -> ('127.0.0.1', 8080)."""
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    native = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(native)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def parse_tcp_table(text: str) -> list[TcpSocket]:
    """/proc/net/tcp or /proc/net/tcp6."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        out.append(TcpSocket(_address(f[1]), _address(f[2]), int(f[3], 16), int(f[9])))
    return out


def socket_inodes(fd_targets: Iterable[str]) -> set[int]:
    """Inodes of the sockets among readlink() results of /proc/PID/fd/* ('socket:[123]')."""
    return {int(t[8:-1]) for t in fd_targets if t.startswith("socket:[") and t.endswith("]")}


def outside_connections(table: list[TcpSocket], ours: set[int]) -> list[Connection]:
    """Established connections held by the container (socket inodes `ours`) whose peer socket is
    not the container's: a process on the host or another machine. Connections between the
    container's own processes are dumped and restored whole (both ends are in the images)."""
    by_tuple = {(s.local, s.remote): s for s in table}
    found = []
    for s in table:
        if s.inode not in ours or s.state in (TCP_LISTEN, TCP_CLOSE):
            continue
        peer = by_tuple.get((s.remote, s.local))
        if peer is None or peer.inode not in ours:
            found.append(Connection(s.local, s.remote))
    return sorted(set(found), key=str)


@dataclass(frozen=True)
class Port:
    """A TCP port listened on or a UDP port bound: the container takes it wherever it runs."""

    proto: str  # "tcp" or "udp"
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.proto} {_endpoint((self.address, self.port))}"

    def to_json(self) -> list:
        return [self.proto, self.address, self.port]

    @classmethod
    def from_json(cls, value) -> "Port":
        proto, address, port = value
        if proto not in ("tcp", "udp") or not isinstance(port, int):
            raise ValueError(f"not a port: {value!r}")
        return cls(proto, str(ipaddress.ip_address(address)), port)


def _bound(tables: dict[str, list[TcpSocket]]):
    """(proto, socket) of every listening TCP and every bound, unconnected UDP socket."""
    for s in tables.get("tcp", []):
        if s.state == TCP_LISTEN:
            yield "tcp", s
    for s in tables.get("udp", []):
        if s.local[1] and not s.remote[1]:
            yield "udp", s


def bound_ports(tables: dict[str, list[TcpSocket]], ours: set[int]) -> list[Port]:
    return sorted({Port(p, *s.local) for p, s in _bound(tables) if s.inode in ours}, key=str)


def _overlap(a: str, b: str) -> bool:
    return a == b or ipaddress.ip_address(a).is_unspecified or ipaddress.ip_address(b).is_unspecified


def port_clashes(wanted: list[Port], tables: dict[str, list[TcpSocket]]) -> list[Port]:
    """The ports of `wanted` that something in these tables holds already (a restore there
    would fail: `Address already in use`)."""
    taken = [(p, s.local) for p, s in _bound(tables)]
    return [w for w in wanted if any(p == w.proto and port == w.port and _overlap(addr, w.address)
                                     for p, (addr, port) in taken)]


def ids_from_status(text: str) -> set[int]:
    """Every uid and gid (real, effective, saved, filesystem) in /proc/PID/status."""
    ids: set[int] = set()
    for line in text.splitlines():
        if line.startswith(("Uid:", "Gid:")):
            ids.update(int(x) for x in line.split()[1:])
    return ids


def has_capability(status_text: str, cap: int) -> bool:
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def root_mount_id(mountinfo_text: str) -> int | None:
    """The mount id of '/' in a process's /proc/PID/mountinfo (the last mount there wins)."""
    found = None
    for line in mountinfo_text.splitlines():
        f = line.split()
        if len(f) > 4 and f[4] == "/":
            found = int(f[0])
    return found


def shared_writable_mappings(maps_text: str) -> set[str]:
    """The files a /proc/PID/maps text maps shared and writable (as paths there): writes through
    such a mapping change the file without a write(), and need not show in its ctime each time."""
    found = set()
    for line in maps_text.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[1][1:2] == "w" and fields[1][3:4] == "s" and fields[5].startswith("/"):
            if not fields[5].endswith(" (deleted)"):
                found.add(fields[5])
    return found


def fdinfo_fields(text: str) -> tuple[int, int]:
    """(flags, mnt_id) of /proc/PID/fdinfo/FD."""
    flags = mnt_id = -1
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "flags":
            flags = int(value.strip(), 8)
        elif key == "mnt_id":
            mnt_id = int(value.strip())
    return flags, mnt_id


# ------------------------------------------------------------------ readers (the thin part)

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # a process that exited meanwhile holds nothing
        return ""


def _fd_targets(pid: int) -> dict[str, str]:
    targets = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return targets
    for fd in names:
        try:
            targets[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return targets


def _tables(proc: str) -> dict[str, list[TcpSocket]]:
    """The TCP and UDP tables (v4 and v6) of the network namespace of /proc/PID (or self)."""
    return {proto: parse_tcp_table(_read(f"/proc/{proc}/net/{proto}")) + parse_tcp_table(
        _read(f"/proc/{proc}/net/{proto}6")) for proto in ("tcp", "udp")}


def _sockets_of(pids: list[int]) -> set[int]:
    ours: set[int] = set()
    for pid in pids:
        ours |= socket_inodes(_fd_targets(pid).values())
    return ours


def connections_to_outside(pids: Iterable[int]) -> list[Connection]:
    pids = sorted(pids)
    if not pids:
        return []
    # the container's network namespace, seen through one of its processes
    return outside_connections(_tables(str(pids[0]))["tcp"], _sockets_of(pids))


def tcp_connections(pids: Iterable[int]) -> list[TcpSocket]:
    """The container's TCP sockets other than listening ones: what CRIU's network lock holds still."""
    pids = sorted(pids)
    if not pids:
        return []
    ours = _sockets_of(pids)
    return [s for s in _tables(str(pids[0]))["tcp"] if s.inode in ours and s.state != TCP_LISTEN]


def ports_of(pids: Iterable[int]) -> list[Port]:
    pids = sorted(pids)
    return bound_ports(_tables(str(pids[0])), _sockets_of(pids)) if pids else []


def ports_taken(wanted: list[Port]) -> list[Port]:
    """Which of these ports something holds in this process's network namespace (the host's)."""
    return port_clashes(wanted, _tables("self"))


def foreign_ids(pids: Iterable[int]) -> set[int]:
    """The uids and gids other than root that the container's processes run with."""
    ids: set[int] = set()
    for pid in pids:
        ids |= ids_from_status(_read(f"/proc/{pid}/status"))
    return ids - {0}


def can_dump_other_users() -> bool:
    """CRIU reads every process's rlimits with prlimit(), which needs CAP_SYS_RESOURCE for a
    process of another user (else `Can't get rlimit 0: Operation not permitted`)."""
    return has_capability(_read("/proc/self/status"), CAP_SYS_RESOURCE)


def open_databases(pids: Iterable[int]) -> list[str]:
    """SQLite databases in the container's own root filesystem that its processes have open for
    writing (paths as the container sees them). SQLite refuses to write once the file's inode
    number differs from the one it opened (SQLITE_READONLY_DBMOVED)."""
    found = set()
    for pid in pids:
        root_id = root_mount_id(_read(f"/proc/{pid}/mountinfo"))
        for fd, target in _fd_targets(pid).items():
            if not target.startswith("/"):
                continue
            flags, mnt_id = fdinfo_fields(_read(f"/proc/{pid}/fdinfo/{fd}"))
            if mnt_id != root_id or flags & os.O_ACCMODE == os.O_RDONLY:
                continue
            try:
                with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                    if f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC:
                        found.add(target.removesuffix(" (deleted)"))
            except OSError:
                pass
    return sorted(found)


def mapped_for_writing(pids: Iterable[int]) -> set[str]:
    """Files the processes map shared and writable (paths as /proc shows them to this process)."""
    found: set[str] = set()
    for pid in pids:
        found |= shared_writable_mappings(_read(f"/proc/{pid}/maps"))
    return found


def bytes_read(pid: int | None) -> int | None:
    """What the process has read so far, sockets included (/proc/PID/io rchar); None if gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None
