"""Progress reporting for long loops, on a terminal and in log files.

On a terminal this is a tqdm bar (rate and ETA). When stderr is not a terminal (``nohup``, CI, a
job scheduler's log) tqdm stays silent, which leaves a long run with no sign of life; there a
plain line ``desc: done/total unit (rate/s, ETA ...)`` is written to stderr at most once every
``MEDIT_PROGRESS_EVERY`` seconds (default 60; 0 turns the lines off). Runs shorter than that
interval print nothing.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

ENV = "MEDIT_PROGRESS_EVERY"
DEFAULT_EVERY = 60.0


def _every() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV, DEFAULT_EVERY)))
    except ValueError:
        return DEFAULT_EVERY


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LineProgress:
    """The tqdm subset medit uses (``n``, ``update``, ``set_postfix``, ``close``), as log lines."""

    def __init__(self, total: int, desc: str, unit: str, every: float, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = initial
        self._start_n = initial
        self._start = self._last = time.monotonic()
        self._postfix = ""

    def set_postfix(self, **kw: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if self.every and now - self._last >= self.every:
            self._last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
        eta = f", ETA {_duration((self.total - self.n) / rate)}" if rate > 0 and self.total else ""
        extra = f", {self._postfix}" if self._postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({rate:.3g} {self.unit}/s, "
              f"elapsed {_duration(now - self._start)}{eta}{extra})", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 unit_scale: bool = False) -> Any:
    """A tqdm bar on a terminal, periodic log lines otherwise, nothing when ``enabled`` is false
    or on a torchrun rank other than 0 (one progress report per launch)."""
    from tqdm.auto import tqdm

    from medit.core import distributed

    enabled = enabled and distributed.is_main()

    if enabled and not sys.stderr.isatty() and _every() > 0:
        return LineProgress(total, desc, unit, _every(), initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                disable=None if enabled else True, leave=False)
