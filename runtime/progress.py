"""One progress line for the long commands (precompute, train, evaluation), terminal or log.

On a terminal it is tqdm's bar, redrawn in place: count, rate, ETA, and the postfix the
caller sets (tokens/s). Elsewhere (a log file, a pipe, a cluster job's stdout) a redrawn bar
leaves a carriage return per refresh in the file, so the same status is written as a plain
line at most once per `interval` seconds, plus a last one when it closes.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

DEFAULT_INTERVAL_S = float(os.environ.get("KDSHARDS_PROGRESS_INTERVAL", "30"))


class LineProgress(tqdm):
    """tqdm that prints its status as whole lines, rate-limited, for non-terminal output."""

    def __init__(self, *args, interval: float = DEFAULT_INTERVAL_S, **kwargs):
        self._interval = interval
        self._printed_at = -float("inf")
        kwargs["leave"] = False  # the last line comes from close(), without tqdm's '\r'/'\n'
        kwargs.pop("dynamic_ncols", None)
        kwargs.setdefault("mininterval", interval)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing the line: nothing to clear in a log
            return False
        now = time.monotonic()
        if msg is None and now - self._printed_at < self._interval:
            return True
        self._printed_at = now
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        self.fp.flush()
        return True

    def close(self):
        if not self.disable and not getattr(self, "_closed_line", False):
            self._closed_line = True
            self._printed_at = -float("inf")
            self.display()
        super().close()


def progress(
    total: int | None,
    desc: str,
    unit: str,
    *,
    iterable=None,
    initial: int = 0,
    file=None,
    disable: bool = False,
    interval: float = DEFAULT_INTERVAL_S,
    **kwargs,
) -> tqdm:
    """A tqdm bar on a terminal, else a `LineProgress` writing a line every `interval` s."""
    file = sys.stderr if file is None else file
    common = {"total": total, "desc": desc, "unit": unit, "initial": initial, "file": file}
    if iterable is not None:
        common["iterable"] = iterable
    if disable:
        return tqdm(disable=True, **common)
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(**common, **kwargs)
    return LineProgress(interval=interval, **common, **kwargs)


def line_progress_factory(**defaults):
    """A tqdm factory for libraries that take one (vLLM's `use_tqdm=`): `progress` with the
    library's arguments."""

    def make(iterable=None, **kwargs):
        total = kwargs.pop("total", None)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        desc = kwargs.pop("desc", defaults.get("desc", ""))
        unit = kwargs.pop("unit", defaults.get("unit", "it"))
        return progress(total, desc, unit, iterable=iterable, **kwargs)

    return make
