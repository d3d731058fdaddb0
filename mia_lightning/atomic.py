"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``; a killed process never leaves a half-written file.

Used for the experiment directory (``contract.io``) and the user cache alike: the temporary name is
unique (``mkstemp``), so processes that fill the same cache entry at once (the shards of a cluster
farm on first use) never write into each other's file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from mia_lightning.errors import MiaError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``write_atomic``)."""
    write_atomic(path, lambda handle: handle.write(data))


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` on a temporary file in ``path``'s folder, then ``fsync`` it and ``os.replace`` it onto ``path``.

    A failed write (disk full, permissions) leaves the previous file untouched and raises a
    one-line ``MiaError`` naming ``path`` (``write()`` itself reports no file name). Writing straight
    into the file (e.g. ``np.save``) spares an in-memory copy of a large array.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise MiaError(
            f"{path}: cannot write it ({err.strerror or err}); free space or fix the permissions and re-run (the previous file and finished work are kept)"
        ) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
