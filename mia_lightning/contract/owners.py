"""Which process owns a folder, whether it still runs, and an exclusive lock for publishing.

Several processes may work on one experiment at once (two users, a cron job, farm shards). A folder
that only its writer may touch records its owner (host and pid); another process on the same host
removes it only when that pid is gone. Steps that change what readers see (publishing an attack
run, pruning runs) hold ``exclusive_lock`` on a lock file, so they happen one at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from mia_lightning.contract.io import save_json_atomic

OWNER_FILE = ".owner.json"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_owner(folder: Path) -> None:
    """Record this process (host, pid) as the owner of ``folder``."""
    save_json_atomic(Path(folder) / OWNER_FILE, {"host": socket.gethostname(), "pid": os.getpid()})


def owner_gone(folder: Path) -> bool:
    """True when ``folder``'s owner ran on this host and its process is gone (an unreadable record counts as gone)."""
    try:
        info = json.loads((Path(folder) / OWNER_FILE).read_text())
        host, pid = info["host"], int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return host == socket.gethostname() and not pid_alive(pid)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block; waits for other holders."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
