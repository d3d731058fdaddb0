"""Disk full (a 40 MB tmpfs): one line naming the file, nothing half-published, the previous run intact, resume after freeing space.

Needs root (``mount -t tmpfs``); skipped cleanly otherwise.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from mia_lightning.cli import attack_main, train_main

ROOT = Path(__file__).resolve().parents[1]
FARM = ["farm", "--config", str(ROOT / "configs/tabular/digits_sequential.yaml"), "--plan.n_models", "3", "--trainer.max_epochs", "1",
        "--model.init_args.hidden", "[8]", "--trainer.enable_progress_bar", "false", "--experiment.name", "exp"]


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40M", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 16))
                handle.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err and err.count("\n") == 0, err
    return err


def test_disk_full_farm_and_attack(small_disk, capsys):
    experiment = small_disk / "exp"
    filler = fill(small_disk)
    assert train_main([*FARM, "--experiment.root", str(small_disk)]) == 2
    err = error_line(capsys)
    assert str(small_disk) in err and "No space left on device" in err and ": a file:" not in err, err
    filler.unlink()
    assert train_main([*FARM, "--experiment.root", str(small_disk)]) == 0  # resume once space is free
    assert attack_main(["--experiment", str(experiment), "--attack", "lira", "--bootstrap", "0"]) == 0
    published = files(experiment / "attacks/latest")
    latest = os.readlink(experiment / "attacks/latest")
    capsys.readouterr()

    filler = fill(small_disk)
    assert attack_main(["--experiment", str(experiment), "--attack", "lira", "--bootstrap", "0"]) == 2
    err = error_line(capsys)
    assert f"{experiment / 'attacks'}" in err and "No space left on device" in err, err
    assert os.readlink(experiment / "attacks/latest") == latest and files(experiment / "attacks/latest") == published
    assert not list((experiment / "attacks/runs").glob(".staging-*"))  # nothing half-published left behind
    filler.unlink()
    assert attack_main(["--experiment", str(experiment), "--attack", "lira", "--bootstrap", "0"]) == 0
    assert os.readlink(experiment / "attacks/latest") != latest


def test_processes_filling_the_same_cache_entry_at_once_never_collide(tmp_path):
    """The cache is shared by every shard of a cluster farm: two writers of one entry each use their own temporary file."""
    from concurrent.futures import ThreadPoolExecutor

    from mia_lightning.atomic import write_bytes_atomic

    target = tmp_path / "cache" / "weights.safetensors"
    payloads = [bytes([k]) * 200_000 for k in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda data: [write_bytes_atomic(target, data) for _ in range(5)], payloads))
    assert target.read_bytes() in payloads
    assert [p.name for p in target.parent.iterdir()] == ["weights.safetensors"]  # no temporary file left behind
