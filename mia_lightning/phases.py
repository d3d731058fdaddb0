"""Long phases the user should see: a rich progress line on a terminal, plain heartbeat lines in a log.

A phase that ends within ``FIRST_LINE_S`` seconds prints nothing (quick steps stay quiet). A longer
one shows, on a terminal, a transient spinner (a bar with ETA when its size is known); when output
goes to a file or pipe, plain lines instead: ``<what>: 12 s elapsed, 3/8, about 20 s left`` after
``FIRST_LINE_S`` seconds and then every ``EVERY_S`` seconds, and ``<what>: done in 40 s`` at the end.
Lines go to standard output beside the farm's and audit's own lines; standard error stays for errors.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

FIRST_LINE_S = 2.0
"""Seconds before a phase first reports itself (quick phases print nothing)."""
EVERY_S = 30.0
"""Seconds between heartbeat lines of a long phase in a log."""


class Phase:
    """``with Phase("caching backbone features of 2,000 images", total=32) as phase: ... phase.advance()``."""

    def __init__(self, description: str, total: int | None = None, console: Console | None = None) -> None:
        self.description, self.total = description, total
        self.console = console or Console()
        self.done = 0
        self.reported = False
        self._stop = threading.Event()

    def __enter__(self) -> "Phase":
        self.started = time.perf_counter()
        if self.console.is_terminal:
            columns = [SpinnerColumn(), TextColumn("{task.description}")]
            if self.total:
                columns += [BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
            self.progress = Progress(*columns, TimeElapsedColumn(), console=self.console, transient=True)
            self.task = self.progress.add_task(self.description, total=self.total)
            self._thread = threading.Timer(FIRST_LINE_S, self.progress.start)
        else:
            self.progress = None
            self._thread = threading.Thread(target=self._heartbeat)
        self._thread.daemon = True  # never keeps a failing process alive
        self._thread.start()
        return self

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` more units of work done (drives the bar and the ETA)."""
        self.done += steps
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done)

    def _heartbeat(self) -> None:
        wait = FIRST_LINE_S
        while not self._stop.wait(wait):
            self._line(self.status())
            wait = EVERY_S

    def status(self) -> str:
        """``<what>: 12 s elapsed[, 3/8, about 20 s left]``."""
        elapsed = time.perf_counter() - self.started
        text = f"{self.description}: {elapsed:.0f} s elapsed"
        if self.total:
            text += f", {self.done}/{self.total}"
            if 0 < self.done < self.total:
                text += f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
        return text

    def _line(self, text: str) -> None:
        self.reported = True
        print(text, file=self.console.file, flush=True)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._stop.set()
        if isinstance(self._thread, threading.Timer):
            self._thread.cancel()
        self._thread.join()
        if self.progress is not None:
            self.progress.stop()
        elif self.reported and kind is None:
            self._line(f"{self.description}: done in {time.perf_counter() - self.started:.0f} s")
