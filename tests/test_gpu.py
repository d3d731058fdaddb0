"""CUDA paths: the vectorised and sequential farms on a GPU, mixed precision, one worker per device.

Skipped without a CUDA device (CI has none); run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mia_lightning.cli import train_main
from mia_lightning.farm.engine import FarmSetup, SequentialEngine
from mia_lightning.farm.vectorised import VectorisedEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from test_vectorised import make_jobs, make_setup  # noqa: E402  (shared builders)

ROOT = Path(__file__).resolve().parents[1]


def on_gpu(setup: FarmSetup, precision: str = "32-true") -> FarmSetup:
    return FarmSetup(setup.data, setup.model, {**setup.trainer, "accelerator": "gpu", "devices": 1, "precision": precision})


def test_lstm_ensemble_on_cuda_matches_cpu(tmp_path):
    """The stacked LSTM recurrence on CUDA (float32 and bf16-mixed) against the CPU ensemble."""
    from test_lstm_ensemble import text_jobs, text_setup, write_reviews

    setup, jobs = text_setup(write_reviews(tmp_path / "r.csv", n=60)), text_jobs(3)
    cpu = {r.index: r for r in VectorisedEngine(setup, group_size=3).run(jobs)}
    gpu = {r.index: r for r in VectorisedEngine(on_gpu(setup), group_size=3).run(jobs)}
    mixed = {r.index: r for r in VectorisedEngine(on_gpu(setup, "bf16-mixed"), group_size=3).run(jobs)}
    for index in cpu:
        np.testing.assert_allclose(gpu[index].logits, cpu[index].logits, rtol=1e-3, atol=1e-3)
        assert np.isfinite(mixed[index].logits).all() and abs(mixed[index].metrics["train_acc"] - cpu[index].metrics["train_acc"]) < 0.1


def test_vectorised_on_cuda_matches_cpu():
    setup, jobs = make_setup(batch_size=32), make_jobs(4)
    cpu = {r.index: r for r in VectorisedEngine(setup).run(jobs)}
    gpu = {r.index: r for r in VectorisedEngine(on_gpu(setup)).run(jobs)}
    for index in cpu:
        np.testing.assert_allclose(gpu[index].logits, cpu[index].logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("engine", [VectorisedEngine, SequentialEngine])
def test_mixed_precision_on_cuda(precision, engine):
    setup, jobs = make_setup(epochs=10, batch_size=32), make_jobs(2)
    full = {r.index: r for r in engine(on_gpu(setup)).run(jobs)}
    mixed = {r.index: r for r in engine(on_gpu(setup, precision)).run(jobs)}
    for index in full:
        assert mixed[index].logits.dtype == np.float32 and np.isfinite(mixed[index].logits).all()
        assert abs(mixed[index].metrics["val_acc"] - full[index].metrics["val_acc"]) < 0.05


def test_one_worker_per_gpu(tmp_path):
    """--trainer.devices [0,0] starts two workers on GPU 0: the per-device worker path on CUDA."""
    args = ["farm", "--config", str(ROOT / "configs/tabular/digits_quickstart.yaml"), "--experiment.root", str(tmp_path),
            "--plan.n_models", "8", "--trainer.max_epochs", "3", "--trainer.accelerator", "gpu", "--trainer.devices", "[0,0]",
            "--trainer.precision", "bf16-mixed", "--farm.group_size", "2", "--trainer.enable_progress_bar", "false"]
    assert train_main(args) == 0
    done = [json.loads(p.read_text()) for p in sorted((tmp_path / "digits_quickstart/models").glob("*/done.json"))]
    assert [d["index"] for d in done] == list(range(8)) and len({d["pid"] for d in done}) == 2
