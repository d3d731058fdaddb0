"""Process-wide runtime defaults for shared, busy machines, applied by ``train.py`` / ``attack.py`` before anything heavy loads.

- ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning. On a busy machine
  spinning threads take the cores the working threads need (measured: several-fold more CPU time
  per training step under contention).
- ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_``: large temporaries
  (a batch of activations, a million-pair score array) come from the heap and are reused instead
  of being mapped, page-faulted and unmapped on every allocation, which cost more than the
  arithmetic (``benchmarks/farm_throughput.py`` and ``benchmarks/audit_scale.py`` measure both).

With idle threads asleep, waking a second torch thread for every small kernel can cost more than it
computes: the LSTM family's farms train with one thread on the CPU (``farm.threads``,
``farm/vectorised.py``). ``numpy_parallel_map`` runs independent blocks of numpy work (bootstrap
replicates, sample blocks, target batches) one thread per usable core.

A variable already set in the environment is left alone; ``MIA_LIGHTNING_RUNTIME=0`` turns all of
this off. glibc reads ``MALLOC_*`` only at start-up, so when one is added the process re-executes
itself once (before torch is imported).
"""

from __future__ import annotations

import os
import platform
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

DEFAULTS: dict[str, str] = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "MALLOC_MMAP_THRESHOLD_": str(2**31),
    "MALLOC_TRIM_THRESHOLD_": str(2**33),
    "MALLOC_TOP_PAD_": str(2**28),
}


def apply_runtime_defaults() -> None:
    """Set the defaults that are missing and, if an allocator setting was added on glibc, re-execute this command once."""
    if os.environ.get("MIA_LIGHTNING_RUNTIME") == "0":
        return
    missing = {key: value for key, value in DEFAULTS.items() if key not in os.environ}
    if not missing:
        return
    os.environ.update(missing)
    if any(key.startswith("MALLOC_") for key in missing) and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")
MAX_NUMPY_THREADS = 4


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def numpy_threads() -> int:
    """Threads for ``numpy_parallel_map``: the cores this process may run on, at most ``MAX_NUMPY_THREADS``."""
    return max(1, min(usable_cores(), MAX_NUMPY_THREADS))


def numpy_parallel_map(function: Callable[[_Item], _Result], items: Iterable[_Item], stop: threading.Event | None = None) -> list[_Result]:
    """``[function(item) for item in items]`` in ``numpy_threads()`` threads: numpy releases the GIL in its array loops,
    so independent blocks of array work (models, replicates, samples) run on every core; results keep the items' order.

    When the map fails (Ctrl-C, or an item raised), the items not started are dropped and ``stop`` is set
    before waiting for the running ones: threads cannot be stopped, but work that checks ``stop`` ends early.
    """
    items = list(items)
    if len(items) < 2 or numpy_threads() == 1:
        return [function(item) for item in items]
    pool = ThreadPoolExecutor(max_workers=min(numpy_threads(), len(items)))
    try:
        return list(pool.map(function, items))
    except BaseException:
        if stop is not None:
            stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads (None: leave them), then restore the process's count (a study farms and audits in-process).

    Work made of thousands of small kernels (an LSTM step, the attack classifiers' batched MLP) runs
    faster on one thread when idle OpenMP threads sleep: waking the second costs more than it computes.
    """
    import torch  # here, not at import: this module is applied before torch loads

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
