"""Atomic file writes and checked reads: a killed process never leaves a half-written file.

Every JSON file the package writes is strict JSON (RFC 8259): a number that is not finite (NaN,
Infinity, -Infinity, which ``json.dumps`` would write as bare words other parsers reject) is written
as ``null``. Each file's documentation says what a ``null`` there means (e.g. ``dp_epsilon: null`` in
``done.json``: DP-SGD without noise, an infinite epsilon).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from mia_lightning.atomic import write_atomic, write_bytes_atomic
from mia_lightning.errors import MiaError


def check_writable_folder(folder: Path, what: str, fix: str = "fix its permissions or copy the experiment") -> None:
    """Refuse, before any work, a folder that cannot be made or written: a file where it (or a parent) should be, or no write permission."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise MiaError(f"{existing}: a file where a folder should be; {what} cannot be saved (move or delete the file)")
    if not os.access(existing, os.W_OK):
        raise MiaError(f"{existing}: not writable; {what} cannot be saved ({fix})")


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Save one array as ``.npy`` atomically, written straight into the temporary file (no in-memory copy)."""
    write_atomic(path, lambda handle: np.save(handle, np.asarray(array), allow_pickle=False))


def finite_json(payload: Any) -> Any:
    """``payload`` with every float that is not finite (NaN, +-inf) replaced by None, in nested dicts, lists and tuples: what strict JSON can hold."""
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {key: finite_json(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [finite_json(value) for value in payload]
    return payload


def save_json_atomic(path: Path, payload: Any) -> None:
    """Save strict JSON (indented, trailing newline; non-finite numbers as null, see the module docstring) atomically."""
    write_bytes_atomic(path, (json.dumps(finite_json(payload), indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def load_json(path: Path, fix: str = "delete it and re-run the stage that writes it") -> Any:
    """Read a JSON file or raise a one-line ``MiaError`` naming it and, when it is not JSON, the ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise MiaError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MiaError(f"{path}: not valid JSON ({err}); {fix}") from None


def load_npy(path: Path, what: str, fix: str) -> np.ndarray:
    """Read a ``.npy`` file (no pickles) or raise a one-line ``MiaError`` saying ``what`` it is and ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise MiaError(f"{path}: missing {what}; {fix}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise MiaError(f"{path}: unreadable {what} ({err}); {fix}") from None
