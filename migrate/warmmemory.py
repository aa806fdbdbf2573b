"""Memory the target touches before the freeze and gives back as the restore begins.

A VM whose RAM the hypervisor backs only on the guest's first touch (Firecracker, many clouds)
makes a restore pay for that touch: 1.5-2.5 s per GiB on this project's test machines, against
0.25 s for memory touched before. With free page reporting (virtio-balloon) the hypervisor also
takes back what the guest frees, within half a second here, so memory touched and freed at once
is cold again by the time the restore fills it (and lazy mode fills it for seconds after). Held
until the moment it is needed and freed then, the kernel hands it out first (reported pages go
to the back of its free lists), still warm. On a host without that cost it is a few hundred ms of
the target's time per GiB, before the freeze.
"""

import mmap
import threading


class WarmMemory:
    """PARTS equal parts of NBYTES in all, touched now, each held until released."""

    def __init__(self, nbytes: int, parts: int):
        size = nbytes // parts if parts > 0 else 0
        self._held = [mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
                      for _ in range(parts)] if size >= mmap.PAGESIZE else []
        self._lock = threading.Lock()

    @property
    def parts(self) -> int:
        return len(self._held)

    def release(self, parts: int | None = None) -> threading.Thread | None:
        """Give PARTS back (all by default), freed in the background (~25 ms per GiB) beside
        the work that needs them. Returns that thread, if anything was held."""
        with self._lock:
            count = len(self._held) if parts is None else parts
            freed, self._held = self._held[:count], self._held[count:]
        if not freed:
            return None
        thread = threading.Thread(target=lambda: [m.close() for m in freed], name="warm-memory", daemon=True)
        thread.start()
        return thread
