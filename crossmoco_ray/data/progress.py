"""Progress lines for long work (prepare, feature extraction): count, rate, ETA, every few seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``what: done/total (pct) rate/s ETA`` printed at most every ``every`` seconds, and once at the end."""

    def __init__(self, what: str, total: int | None = None, every: float = 5.0, stream: TextIO | None = None):
        self.what, self.total, self.every = what, total, every
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def close(self) -> None:
        self._print(time.monotonic(), final=True)

    def _print(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        line = f"{self.what}: {self.done}"
        if self.total:
            line += f"/{self.total} ({100 * self.done / self.total:.0f}%)"
        line += f", {rate:.1f}/s"
        if final:
            line += f", done in {elapsed:.1f}s"
        elif self.total and rate > 0:
            line += f", ETA {(self.total - self.done) / rate:.0f}s"
        print(line, file=self.stream, flush=True)
