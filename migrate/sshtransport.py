"""A paramiko connection to a resolved host, for the one user left: the lazy-pages reverse tunnel
(migrate/tunnel.py needs a paramiko Transport), until that tunnel moves to OpenSSH forwards.

It honours what `ssh -G` resolved: HostName, Port, User, IdentityFile, the known_hosts files,
HostKeyAlias, and ProxyJump (through `ssh -W`, built the way OpenSSH builds it). Host keys are
strict: an unknown key is refused, never added, and a key on any `@revoked` line is refused
before logging in, whatever host the line names (stricter than ssh; paramiko's own parser
takes no marker lines). What paramiko cannot do as OpenSSH does is refused with a clear error,
never ignored: ProxyCommand, CertificateFile, and a host trusted only through a
`@cert-authority` line (its key is then reported as unknown). Every paramiko and socket
exception is translated into a one-line RemoteError.
"""

from __future__ import annotations

import os
import subprocess
import threading
import socket
from errno import ECONNREFUSED

import paramiko

from migrate.hosts import HostSpec
from migrate.ssh import KEEPALIVE_INTERVAL
from runtime.errors import RemoteError

__all__ = ["open_transport"]

_WHY = "the lazy-pages tunnel (paramiko)"


class _UnknownHostKey(paramiko.SSHException):
    """Raised by the policy so an unknown key can be told apart from other SSH failures."""


class _Revoked(paramiko.SSHException):
    """The server's key is on a @revoked line."""


class _RejectUnknown(paramiko.RejectPolicy):
    """Called, before any login, for a key known_hosts does not trust: revoked keys never are."""

    def __init__(self, revoked: dict[str, str]):
        self.revoked = revoked  # base64 key -> the file revoking it

    def missing_host_key(self, client, hostname, key):
        path = self.revoked.get(key.get_base64())
        raise _Revoked(path) if path is not None else _UnknownHostKey(hostname)


def open_transport(spec: HostSpec, timeout: float = 10.0) -> paramiko.SSHClient:
    """Log in to SPEC's host with paramiko; the client's get_transport() is the connection."""
    if spec.proxy_command:
        raise RemoteError(f"{_WHY} cannot use ProxyCommand for {spec.alias}; use ProxyJump, or copy mode")
    if spec.certificate_files:
        raise RemoteError(f"{_WHY} cannot log in to {spec.alias} with CertificateFile; use copy mode")
    client = paramiko.SSHClient()
    lines: dict[str, list[str]] = {}
    try:
        for path in spec.known_hosts_files:
            lines[path] = _lines(path)
        revoked = {fields[3]: path for path, fields in _marked(lines, "@revoked")}
        for path in lines:
            _load_host_keys(client.get_host_keys(), lines[path], revoked)
    except (OSError, paramiko.SSHException, ValueError) as e:
        client.close()
        raise RemoteError(f"cannot read known_hosts file {path}: {e}") from None
    client.set_missing_host_key_policy(_RejectUnknown(revoked))
    sock, jump = None, None
    try:
        if spec.proxy_jump:
            sock, jump = _jump(spec)
        else:
            sock = socket.create_connection((spec.hostname, spec.port), timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # paramiko only sends keepalives
        # with a sock, the name is only the known_hosts key, which HostKeyAlias replaces (port and all)
        client.connect(
            spec.host_key_alias or spec.hostname,
            port=22 if spec.host_key_alias else spec.port,
            sock=sock,
            username=spec.user,
            key_filename=[p for p in spec.identity_files if os.path.isfile(p)] or None,
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )
    except Exception as e:
        client.close()
        if sock is not None:
            sock.close()  # the jump's ssh, if any, sees EOF and ends
        error = _connect_error(spec, e, timeout, jump)
        if error is None:
            raise
        raise error from None
    if jump is not None:  # its stderr drained and its exit reaped once the connection ends
        threading.Thread(target=jump.communicate, daemon=True).start()
    client.get_transport().set_keepalive(KEEPALIVE_INTERVAL)
    return client


def _lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        return []
    with open(path, errors="replace") as f:
        return f.readlines()


def _marked(lines: dict[str, list[str]], marker: str):
    """(file, fields) of each line with MARKER (`@revoked host-patterns type base64`)."""
    for path, text in lines.items():
        for line in text:
            fields = line.split()
            if len(fields) >= 4 and fields[0] == marker:
                yield path, fields


def _load_host_keys(keys: paramiko.HostKeys, lines: list[str], revoked: dict[str, str]) -> None:
    """The plain lines, but no revoked key (paramiko's own loader fails on a whole file for one
    marker line; @cert-authority lines are not understood and so trust nothing)."""
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith(("@", "#")) or not line.strip():
            continue
        entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
        if entry is None or entry.key.get_base64() in revoked:
            continue
        for name in entry.hostnames:
            keys.add(name, entry.key.get_name(), entry.key)


def _jump(spec: HostSpec) -> tuple[socket.socket, subprocess.Popen]:
    """OpenSSH's own route through the jump hosts: `ssh [-F config] [-J earlier hops] -W host:port
    last-hop`, as ssh itself runs for ProxyJump, on one end of a socket pair whose other end is
    paramiko's socket (paramiko's ProxyCommand spins on a dead command until its timeout)."""
    *earlier, last = spec.proxy_jump.split(",")
    argv = ["ssh", *(["-F", spec.ssh_config] if spec.ssh_config else []), "-o", "BatchMode=yes",
            *(["-J", ",".join(earlier)] if earlier else []), "-W", f"[{spec.hostname}]:{spec.port}",
            "--", last if last.startswith("ssh://") else f"ssh://{last}"]
    ours, theirs = socket.socketpair()
    with theirs:
        proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE)
    return ours, proc


def _connect_error(spec: HostSpec, e: BaseException, timeout: float,
                   jump: subprocess.Popen | None) -> RemoteError | None:
    where = spec.where
    key_name = spec.host_key_alias or (spec.hostname if spec.port == 22 else f"[{spec.hostname}]:{spec.port}")
    files = ", ".join(spec.known_hosts_files) or "no file configured"
    if jump is not None:
        first = _end(jump)
        if first and not isinstance(e, (paramiko.BadHostKeyException, _UnknownHostKey, _Revoked,
                                        paramiko.AuthenticationException)):
            return RemoteError(f"cannot reach {where} through jump host {spec.proxy_jump}: {first}")
    if isinstance(e, _UnknownHostKey):
        return RemoteError(f"host key for {where} ({key_name}) is not in known_hosts ({files}); add it with "
                           f"ssh-keyscan or ssh once ({_WHY} does not take @cert-authority lines)")
    if isinstance(e, paramiko.BadHostKeyException):
        return RemoteError(f"host key for {where} ({key_name}) does not match known_hosts ({files}): refusing")
    if isinstance(e, _Revoked):
        return RemoteError(f"host key for {where} ({key_name}) is marked @revoked in {e}: refusing")
    if isinstance(e, paramiko.PasswordRequiredException):
        return RemoteError(f"identity file for {spec.user}@{where} needs a passphrase, which {_WHY} cannot ask for")
    if isinstance(e, paramiko.AuthenticationException):
        tried = ", ".join(spec.identity_files) or "none"
        return RemoteError(f"authentication as {spec.user}@{where} failed (keys: {tried}; {_WHY} uses no agent)")
    if isinstance(e, paramiko.SSHException) and "No authentication methods" in str(e):
        return RemoteError(f"no usable identity file to log in as {spec.user}@{where} "
                           f"({', '.join(spec.identity_files) or 'none configured'})")
    if isinstance(e, socket.gaierror):
        return RemoteError(f"cannot resolve host name {spec.hostname}: {e.strerror}")
    if isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == ECONNREFUSED:
        return RemoteError(f"connection to {where} refused")
    if isinstance(e, (socket.timeout, TimeoutError)):
        return RemoteError(f"connection to {where} timed out after {timeout} s")
    if isinstance(e, paramiko.SSHException) and ("protocol banner" in str(e) or "No existing session" in str(e)):
        # paramiko reports a stalled handshake either way, depending on which timer fires first
        return RemoteError(f"{where} did not complete the SSH handshake within {timeout} s")
    if isinstance(e, (OSError, paramiko.SSHException, EOFError)):
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        return RemoteError(f"ssh to {where} failed: {reason}")
    return None


def _end(jump: subprocess.Popen, wait: float = 5.0) -> str:
    """Reap the jump's ssh (killed if it outlives its EOF by WAIT seconds); the first line it wrote."""
    try:
        _, err = jump.communicate(timeout=wait)
    except subprocess.TimeoutExpired:
        jump.kill()
        _, err = jump.communicate()
    return next((ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()), "")
