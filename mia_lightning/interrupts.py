"""How a command stops early: SIGTERM ends it the way Ctrl-C does, and farm workers stop with their farm.

``kill PID``, a job runner's timeout or a notebook kernel's shutdown send SIGTERM, whose default
kills the process mid-write and leaves the farm's worker processes training on their own. Inside
``terminate_as_interrupt`` a SIGTERM raises ``KeyboardInterrupt`` instead, so every command takes the
one interruption path it already has for Ctrl-C (claims released, finished models and results
kept, one ``interrupted`` line) and exits with 128 + the signal (130 for Ctrl-C, 143 for SIGTERM).
``call_trainer`` keeps Lightning from turning the interrupt into a silent ``exit(1)``.
A farm worker also watches the process that started it (``watch_parent``) and stops the same way
when that process is gone, even after a ``kill -9``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

PARENT_ENV = "MIA_FARM_PARENT"
"""Environment variable carrying the process id of the farm that started a worker."""

PARENT_POLL_S = 1.0

_received: list[int] = []
_Result = TypeVar("_Result")


def _interrupt_on_signal(signum: int, frame: object) -> None:
    """Raise ``KeyboardInterrupt`` for the first signal only: a repeated SIGTERM must not break the clean-up it started."""
    if _received:
        return
    _received.append(signum)
    raise KeyboardInterrupt


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM raises ``KeyboardInterrupt`` (main thread only; elsewhere Python cannot set handlers)."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_signal() -> int:
    """The signal that interrupted this command: SIGTERM if one arrived, else SIGINT (Ctrl-C)."""
    return _received[0] if _received else int(signal.SIGINT)


def call_trainer(entry_point: Callable[..., _Result], *args: Any, **kwargs: Any) -> _Result:
    """Call a Lightning entry point (``trainer.fit``, ``trainer.predict``, a ``LightningCLI``) so an interruption stays ``KeyboardInterrupt``.

    Lightning catches the ``KeyboardInterrupt`` of a Ctrl-C (or of SIGTERM here), tears the run down and
    calls ``sys.exit(1)``, which would end the command silently with exit code 1; where no handler of
    this module is installed, its own SIGTERM handling raises ``SIGTERMException`` (a ``SystemExit``).
    Any other ``SystemExit`` (a user's ``sys.exit`` in a hook, ``--help``) passes through.
    """
    try:
        return entry_point(*args, **kwargs)
    except SystemExit as exit_:
        from lightning.pytorch.utilities.exceptions import SIGTERMException  # loaded already: a Trainer ran

        if isinstance(exit_.__context__, KeyboardInterrupt) or isinstance(exit_, SIGTERMException):
            raise KeyboardInterrupt from None
        raise


def is_worker_of_a_running_farm() -> bool:
    """Whether this process is a farm's worker whose farm still runs (the farm prints the interruption, once)."""
    return os.environ.get(PARENT_ENV) == str(os.getppid())


def watch_parent(parent_pid: int) -> None:
    """Send this process SIGTERM once ``parent_pid`` is no longer its parent (the farm exited or was killed)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-farm-parent", daemon=True).start()
