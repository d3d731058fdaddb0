"""Logging set-up shared by the command lines and benchmarks: our warnings via rich, Lightning's chatter off."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler


def configure_logging(lightning: bool = True) -> None:
    """mia_lightning warnings through rich on stderr; with ``lightning``, Lightning's per-run banners and tips silenced too.

    ``lightning=False`` leaves Lightning alone (and unimported), so option checks answer before torch
    loads; the command lines call ``quiet_lightning`` once the options are valid and real work starts.
    """
    ours = logging.getLogger("mia_lightning")
    if not ours.handlers:
        ours.addHandler(RichHandler(console=Console(stderr=True), show_path=False, show_time=False))
        ours.setLevel(logging.INFO)
        ours.propagate = False
    if lightning:
        quiet_lightning()


def quiet_lightning() -> None:
    """Silence Lightning's per-run banners, tips and the warnings our own use of it raises (a farm starts hundreds of runs);
    imports Lightning. The command lines and the Python API call it once a request is valid and work starts."""
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    warnings.filterwarnings("ignore", message=".*predict returned None.*")  # attack scoring writes its scores in predict_step
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")  # a DataModule without validation returns []
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # train.py fit hands the CLI its own argv
    import lightning  # noqa: F401  (Lightning sets its loggers up on import; adjust them afterwards)

    for noisy in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Log ``timing <stage>: <seconds>`` on stderr when ``MIA_LIGHTNING_TIMING`` is set (the scale benchmark reads it)."""
    if not os.environ.get("MIA_LIGHTNING_TIMING"):
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        print(f"timing {stage}: {time.perf_counter() - start:.2f} s (peak RSS so far {peak:.2f} GB)", file=sys.stderr, flush=True)
