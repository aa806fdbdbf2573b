"""What both ends of the agent protocol agree on: its version, line limit and heartbeat.

One JSON object per line each way; every request and answer carries an id. Once `hello` has
found both ends on the same version, each end also sends HEARTBEAT every HEARTBEAT_INTERVAL
seconds, whatever else it is doing, and takes the other for gone when it has heard nothing at
all from it for HEARTBEAT_SILENCE seconds: a stopped process or a stalled network is then
treated like an EOF (the agent undoes what is uncommitted, the controller asks on a new
connection), not waited for until some long timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from runtime import faults

PROTOCOL = 7  # 7: direct page connections, `preload` memory as it is; 6: the final sync ends with `receive`
MAX_LINE = 4 << 20  # bytes of one line: no message of the protocol comes near it
HEARTBEAT = b'{"heartbeat":1}'
HEARTBEAT_INTERVAL = 5.0
HEARTBEAT_SILENCE = 20.0


class Heartbeat:
    """A thread that calls SEND(HEARTBEAT) every HEARTBEAT_INTERVAL until stopped or SEND fails.
    A process stopped at a `hang` fault point sends none, as a hung one would not."""

    def __init__(self, send: Callable[[bytes], object]):
        self._send = send
        self._interval = HEARTBEAT_INTERVAL
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(1.0)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            if faults.hanging():
                continue
            try:
                self._send(HEARTBEAT)
            except Exception:  # noqa: BLE001 - a peer that cannot be written to is the reader's to notice
                return
