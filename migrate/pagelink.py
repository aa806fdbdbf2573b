"""The page connection: one socket between this host's CRIU and the target's, carried by the SSH
connection rsync already holds, made before either CRIU is given its end.

Both ends are unix sockets only root can reach: here one listening in a fresh 0700 folder, there
one that sshd makes (mode 0600) in the migration's 0700 incoming folder, which the agent
connects to and removes at once. So no TCP port is opened on either host: CRIU's own page
server would listen on one, on a loopback every container of the host shares, for whoever
connects first, who could then read the container's memory or end the transfer. The bytes go
from CRIU to ssh to sshd to CRIU: OpenSSH's speed, no copy through Python.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from runtime.errors import RemoteError

from .transfer import Rsync

ACCEPT_TIMEOUT = 30.0
SOCKET_NAME = "pages-{}.sock"  # in the target's incoming folder; the agent checks the name


def connect(rsync: Rsync, incoming: str, ask_target: Callable[[str], None]) -> socket.socket:
    """The connected socket here. ask_target(path) has the agent connect to PATH there (and do
    what the connection is for: start a page server on it, or keep it for a lazy restore)."""
    here = Path(tempfile.mkdtemp(prefix="migrate-pages-"))  # 0700
    local = here / "s"
    remote = f"{incoming}/{SOCKET_NAME.format(secrets.token_hex(4))}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(local))
        listener.listen(1)
        rsync.forward_socket(remote, local)
        try:
            ask_target(remote)
            # sshd has the agent's connection already; its channel may still be on the way, so
            # the forward is cancelled only once that has arrived
            listener.settimeout(ACCEPT_TIMEOUT)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                raise RemoteError(f"the page connection to {rsync.spec.alias} did not arrive within "
                                  f"{ACCEPT_TIMEOUT:.0f} s") from None
        finally:
            rsync.cancel_socket_forward(remote, local)
    finally:
        listener.close()
        shutil.rmtree(here, ignore_errors=True)
    conn.settimeout(None)
    return conn
