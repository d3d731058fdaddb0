"""Runtime defaults for busy machines: set before torch loads, never over a value the user set, and switchable off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("from mia_lightning.runtime import apply_runtime_defaults; apply_runtime_defaults(); import os; "
         "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ.get('MALLOC_TOP_PAD_'))")


def run(env_changes: dict[str, str | None]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_WAIT", "MIA_LIGHTNING_RUNTIME"))}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout.split()


def test_defaults_are_applied_once_and_the_process_continues():
    assert run({}) == ["PASSIVE", str(2**31), str(2**28)]


def test_a_value_the_user_set_is_kept():
    assert run({"OMP_WAIT_POLICY": "ACTIVE", "MALLOC_TOP_PAD_": "0"})[::2] == ["ACTIVE", "0"]


def test_switched_off():
    assert run({"MIA_LIGHTNING_RUNTIME": "0"}) == ["None", "None", "None"]


def test_numpy_parallel_map_keeps_order_and_stays_within_the_cores(monkeypatch):
    """Results come back in the items' order whatever the threads finish first; the thread count never exceeds the usable cores."""
    import threading
    import time

    from mia_lightning import runtime

    monkeypatch.setattr(runtime, "MAX_NUMPY_THREADS", 64)
    assert runtime.numpy_threads() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(runtime, "numpy_threads", lambda: 3)
    seen = set()

    def slow_square(x: int) -> int:
        time.sleep(0.01 * (5 - x))  # the first items finish last
        seen.add(threading.get_ident())
        return x * x

    assert runtime.numpy_parallel_map(slow_square, range(5)) == [0, 1, 4, 9, 16]
    assert len(seen) > 1


def test_a_failed_parallel_map_sets_stop_and_drops_the_items_not_started(monkeypatch):
    """An item that raises (as a Ctrl-C does) sets ``stop`` before the map waits for the running items: running items that check it end early,
    and the items not started are dropped."""
    import threading

    from mia_lightning import runtime

    monkeypatch.setattr(runtime, "numpy_threads", lambda: 2)
    stop, started, ended_by_stop = threading.Event(), [], []

    def work(item: int) -> None:
        started.append(item)
        if item == 0:
            stop.wait(0.2)  # item 1 is running by now
            raise KeyboardInterrupt
        ended_by_stop.append(stop.wait(60))  # True when stop was set, False after a minute

    with pytest.raises(KeyboardInterrupt):
        runtime.numpy_parallel_map(work, range(20), stop=stop)
    assert stop.is_set() and ended_by_stop and all(ended_by_stop)
    assert len(started) < 20
