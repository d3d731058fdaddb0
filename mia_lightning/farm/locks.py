"""Claim files that let many processes (shards, SLURM array tasks, torchrun ranks) share one farm.

A model is claimed by creating ``models/NNNN/claim.json`` with ``O_EXCL``. The holder touches it
every ``HEARTBEAT_S`` seconds; a claim is stale when its process is gone (same host) or it has not
been touched for ``stale_after_s`` (any host). A stale claim is taken over by renaming it away
first, so of two processes racing for it only one wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

CLAIM_FILE = "claim.json"
HEARTBEAT_S = 20.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_state(model_dir: Path, stale_after_s: float) -> str:
    """'free', 'running' or 'stale' for a model folder's claim file."""
    path = model_dir / CLAIM_FILE
    try:
        info = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "free"
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return "stale"
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
        return "stale"
    return "stale" if age > stale_after_s else "running"


def try_claim(model_dir: Path, stale_after_s: float) -> bool:
    """Claim a model folder for this process; False when another live process holds it."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / CLAIM_FILE
    if claim_state(model_dir, stale_after_s) == "stale":
        try:
            os.rename(path, model_dir / f".stale-{uuid.uuid4().hex}")
        except FileNotFoundError:
            pass
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, handle)
    for pattern in (".stale-*", ".*.tmp"):  # a killed holder's leftovers: its claim and half-written files
        for leftover in model_dir.glob(pattern):
            leftover.unlink(missing_ok=True)
    return True


def release(model_dir: Path) -> None:
    """Drop this process's claim (after done.json is written, or on failure)."""
    (model_dir / CLAIM_FILE).unlink(missing_ok=True)


class Heartbeat:
    """Background thread touching the claim files of the models this process is training."""

    def __init__(self, interval_s: float = HEARTBEAT_S) -> None:
        self.interval_s = interval_s
        self.paths: set[Path] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            for path in list(self.paths):
                try:
                    os.utime(path / CLAIM_FILE)
                except FileNotFoundError:
                    self.paths.discard(path)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
