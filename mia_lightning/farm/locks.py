"""Claim files that let many processes (shards, SLURM array tasks, torchrun ranks) share one farm.

A model is claimed by hard-linking a complete ``models/NNNN/claim.json`` into place (atomic, fails if present). The holder touches it
every ``HEARTBEAT_S`` seconds; a claim is stale when its process is gone (same host) or it has not
been touched for ``stale_after_s`` (any host). A stale claim is taken over by renaming it away
first, so of two processes racing for it only one wins.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from mia_lightning.contract.owners import pid_alive

log = logging.getLogger("mia_lightning")

CLAIM_FILE = "claim.json"
HEARTBEAT_S = 20.0


def claim_state(model_dir: Path, stale_after_s: float) -> str:
    """'free', 'running' or 'stale' for a model folder's claim file (unreadable, not a JSON object or a pid that is no integer: stale, as no live process writes it)."""
    path = model_dir / CLAIM_FILE
    try:
        info = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "free"
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return "stale"
    pid = info.get("pid", -1) if isinstance(info, dict) else None
    if type(pid) is not int:  # not a claim this package wrote
        return "stale"
    if info.get("host") == socket.gethostname() and not pid_alive(pid):
        return "stale"
    return "stale" if age > stale_after_s else "running"


def _take_over_stale(model_dir: Path, stale_after_s: float) -> None:
    """Move a stale claim out of the way; if another process replaced it meanwhile, put theirs back."""
    path = model_dir / CLAIM_FILE
    if claim_state(model_dir, stale_after_s) != "stale":
        return
    try:
        judged = path.read_bytes()
        moved = model_dir / f".stale-{uuid.uuid4().hex}"
        os.rename(path, moved)
    except FileNotFoundError:
        return
    if moved.read_bytes() != judged:  # a fresh claim appeared between the check and the rename
        try:
            os.link(moved, path)
        except FileExistsError:
            pass
    moved.unlink()


def try_claim(model_dir: Path, stale_after_s: float) -> bool:
    """Claim a model folder for this process; False when another live process holds it."""
    model_dir.mkdir(parents=True, exist_ok=True)
    _take_over_stale(model_dir, stale_after_s)
    # write the claim's content first, then hard-link it into place: the link either fails (someone
    # holds the model) or publishes a complete file, so no reader ever sees an empty claim
    staged = model_dir / f".claim-{uuid.uuid4().hex}"
    staged.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
    try:
        os.link(staged, model_dir / CLAIM_FILE)
    except FileExistsError:
        return False
    finally:
        staged.unlink()
    for leftover in model_dir.glob(".*.tmp"):  # a killed holder's half-written files (io.write_bytes_atomic)
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
        """Touch every claim each interval; a claim that cannot be touched is dropped, never the thread (the other claims would go stale)."""
        while not self._stop.wait(self.interval_s):
            for path in list(self.paths):
                try:
                    os.utime(path / CLAIM_FILE)
                except FileNotFoundError:
                    self.paths.discard(path)
                except OSError as err:  # e.g. a claim taken over by another user's process, a network file system error
                    self.paths.discard(path)
                    log.warning("%s: cannot refresh this claim (%s); another process may take the model over", path / CLAIM_FILE, err.strerror or err)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
