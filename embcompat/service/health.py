"""What this process has found damaged since it started: spaces whose files failed their
checks, and searches answered exactly from the store because an index file was damaged.
`/ready` and `/metrics` read it; a repair clears what it fixed."""

from __future__ import annotations

import logging
import threading

from embcompat.errors import CorruptArtifact

log = logging.getLogger("embcompat.health")


class Health:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._damaged: dict[tuple[str, str], str] = {}  # (gallery, space) -> problem
        self.index_fallbacks = 0  # searches answered from the store instead of the index

    def report(self, exc: CorruptArtifact) -> None:
        """Record a damaged artifact (logged the first time it is seen)."""
        key = (str(exc.context.get("gallery", "?")), str(exc.context.get("space", "?")))
        with self._lock:
            first = self._damaged.get(key) != exc.message
            self._damaged[key] = exc.message
        if first:
            log.warning("damaged: %s", exc.message)

    def index_fallback(self, exc: CorruptArtifact) -> None:
        """A search fell back to exact search from the store (correct, slower)."""
        with self._lock:
            self.index_fallbacks += 1
        self.report(exc)

    def clear(self, gallery: str, space: str | None = None) -> None:
        """Forget what was recorded for a gallery, or one of its spaces (repaired)."""
        with self._lock:
            for key in [k for k in self._damaged if k[0] == gallery and space in (None, k[1])]:
                del self._damaged[key]

    def degraded(self) -> dict[str, dict[str, str]]:
        """gallery -> {space: problem}."""
        out: dict[str, dict[str, str]] = {}
        with self._lock:
            for (gallery, space), problem in self._damaged.items():
                out.setdefault(gallery, {})[space] = problem
        return out
