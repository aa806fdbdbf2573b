"""Images as the host knows them: imported archives in the catalog, their layers in the store."""

from __future__ import annotations  # the method `list` shadows the builtin in later annotations

import time
from pathlib import Path

from .container import Runtime
from .errors import Conflict, NotFound
from .images import import_image
from .store import ImageRecord


class Images:
    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.catalog = runtime.catalog

    def import_(self, path: Path, name: str | None = None) -> ImageRecord:
        if not path.exists():
            raise NotFound(f"no such file or directory: {path}")
        self.rt.root.layers.mkdir(parents=True, exist_ok=True, mode=0o700)
        img = import_image(path, self.rt.layers, name)
        rec = ImageRecord(
            name=img.name, id=img.id, layers=tuple(img.layers),
            config={"env": list(img.env), "entrypoint": list(img.entrypoint), "cmd": list(img.cmd),
                    "working_dir": img.working_dir},
            size=img.size, created=time.time(),
        )
        self.catalog.add_image(rec)
        return rec

    def list(self) -> list[ImageRecord]:
        return self.catalog.images()

    def remove(self, name: str) -> None:
        img = self.catalog.image(name)
        users = [c.name for c in self.catalog.containers() if c.spec.image_id == img.id]
        if users:
            raise Conflict(f"image {img.name} is used by container(s): {', '.join(users)}")
        self.catalog.remove_image(img.name)
        self.collect_garbage()

    def collect_garbage(self) -> list[str]:
        """Drop layers that no image, container or snapshot refers to, with their blobs (and a
        blob an interrupted import left without its tree)."""
        used = self.catalog.layers_in_use()
        dropped = [d for d in self.rt.layers.stored() if d not in used]
        for digest in dropped:
            self.rt.layers.remove(digest)
        return dropped
