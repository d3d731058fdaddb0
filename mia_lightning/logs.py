"""Logging set-up shared by the command lines and benchmarks: our warnings via rich, Lightning's chatter off."""

from __future__ import annotations

import logging
import warnings

from rich.console import Console
from rich.logging import RichHandler


def configure_logging() -> None:
    """mia_lightning warnings through rich on stderr; Lightning's per-run banners and tips silenced (a farm starts hundreds of runs)."""
    import lightning  # noqa: F401  (Lightning sets its loggers up on import; adjust them afterwards)

    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    ours = logging.getLogger("mia_lightning")
    if not ours.handlers:
        ours.addHandler(RichHandler(console=Console(stderr=True), show_path=False, show_time=False))
        ours.setLevel(logging.INFO)
        ours.propagate = False
    for noisy in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
