"""The check every stacking family shares: the same jobs on the sequential and the vectorised engine give the same models."""

from __future__ import annotations

import json

import numpy as np
import torch

from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.farm.engine import FarmSetup, ModelJob, SequentialEngine
from mia_lightning.farm.vectorised import VectorisedEngine


def assert_engines_agree(setup: FarmSetup, jobs: list[ModelJob], module_type: type, logits_shape: tuple[int, ...],
                         state_tol: tuple[float, float], logits_tol: tuple[float, float]) -> dict:
    """Train ``jobs`` on both engines (groups of 2), assert every model's state_dict and pool logits agree to (rtol, atol); the vectorised results by index."""
    sequential = {r.index: r for r in SequentialEngine(setup).run(jobs)}
    vectorised = {r.index: r for r in VectorisedEngine(setup, group_size=2).run(jobs)}
    assert sorted(sequential) == sorted(vectorised) == [job.index for job in jobs]
    for index, seq in sequential.items():
        vec = vectorised[index]
        assert type(vec.module) is module_type and vec.logits.shape == logits_shape and vec.logits.dtype == np.float32
        seq_state, vec_state = seq.module.state_dict(), vec.module.state_dict()
        assert seq_state.keys() == vec_state.keys()
        for key in seq_state:
            torch.testing.assert_close(vec_state[key], seq_state[key], rtol=state_tol[0], atol=state_tol[1], msg=lambda m, key=key: f"{key}: {m}")
        np.testing.assert_allclose(vec.logits, seq.logits, rtol=logits_tol[0], atol=logits_tol[1])
    return vectorised


def assert_experiments_agree(sequential: ExperimentDir, vectorised: ExperimentDir, n_models: int) -> None:
    """Two experiments trained by ``train.py farm`` on the two engines: same keep masks and labels, same files per model, logits to 1e-4, done.json names the engine."""
    np.testing.assert_array_equal(vectorised.keep, sequential.keep)
    np.testing.assert_array_equal(np.load(vectorised.root / "labels.npy"), np.load(sequential.root / "labels.npy"))
    for index in range(n_models):
        seq, vec = sequential.model_dir(index), vectorised.model_dir(index)
        assert sorted(p.name for p in vec.iterdir()) == sorted(p.name for p in seq.iterdir())
        np.testing.assert_allclose(np.load(vec / "logits.npy"), np.load(seq / "logits.npy"), rtol=1e-4, atol=1e-4)
        assert json.loads((vec / "done.json").read_text())["engine"] == "vectorised"
