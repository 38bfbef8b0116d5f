"""Progress bars on stderr: calibration passes, candidate scoring, sweep cells, fine-tune steps.

A bar is drawn when stderr is a terminal, or anywhere when asked (`--progress`); it is never
written into a pipe or a log file unless asked, so redirected output stays clean. `shown(...)`
sets that choice for a block of code (the CLI wraps each command in it); inside worker processes
and parallel cells bars are switched off, since several processes redrawing one line garble it.
On a terminal a bar redraws one line (`\\r`) at most ten times a second; forced onto something
that is not a terminal, it writes a plain line at every tenth of the way instead.

No third-party bar library is installed with onnxprune's dependencies, so this is the small one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO, TypeVar

T = TypeVar("T")
WIDTH = 24  # characters of the bar itself
_SHOWN: ContextVar[bool | None] = ContextVar("onnxprune_progress", default=None)


@contextmanager
def shown(enabled: bool | None) -> Iterator[None]:
    """Within the block, draw bars always (True), never (False) or on a terminal only (None)."""
    token = _SHOWN.set(enabled)
    try:
        yield
    finally:
        _SHOWN.reset(token)


def progress(iterable: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """Yield from `iterable`, advancing a bar of `total` steps labelled `desc`."""
    with Bar(total, desc) as bar:
        for item in iterable:
            yield item
            bar.update()


class Bar:
    """A progress bar of `total` steps on stderr, drawn only where `shown` allows it.

    Use as a context manager (the line is finished on exit) and call `update(n, note)`; `note`
    (e.g. the current loss) is shown after the count.
    """

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done, self.note = max(int(total), 0), desc, 0, ""
        self.stream: TextIO = sys.stderr
        self.tty = _isatty(self.stream)
        wanted = _SHOWN.get()
        self.enabled = self.tty if wanted is None else wanted
        self._last_time, self._last_tenth = 0.0, -1

    def __enter__(self) -> Bar:
        self._draw(force=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def update(self, n: int = 1, note: str = "") -> None:
        """Advance by `n` steps and redraw if due."""
        self.done += n
        self.note = note or self.note
        self._draw(force=self.done >= self.total)

    def line(self) -> str:
        """The bar's text: `desc [####----] done/total note`."""
        filled = WIDTH * min(self.done, self.total) // self.total if self.total else 0
        bar = "#" * filled + "-" * (WIDTH - filled)
        note = f" {self.note}" if self.note else ""
        return f"{self.desc} [{bar}] {self.done}/{self.total}{note}"

    def _draw(self, *, force: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            now = time.monotonic()
            if force or now - self._last_time >= 0.1:
                self.stream.write("\r" + self.line())
                self.stream.flush()
                self._last_time = now
            return
        tenth = 10 * self.done // self.total if self.total else 10
        if tenth > self._last_tenth:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last_tenth = tenth


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
