"""Fuzzing the experiment loaders (hypothesis, bounded): random or truncated files in every slot of an experiment
give a result or one ``error:`` line with exit 2, never a traceback, and nothing is written outside the experiment."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import write_synthetic_experiment

from mia_lightning.cli import attack_main

SLOTS = ("keep.npy", "labels.npy", "population.npy", "groups.npy", "audit.npy", "plan.json", "unlearning.json", "config.yaml",
         "models/0000/logits.npy", "models/0003/logits.npy", "models/0001/done.json", "models/0002/signal.npy")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = write_synthetic_experiment(tmp_path_factory.mktemp("fuzz") / "base", n_models=4, n_samples=24, seed=2)
    (root / "plan.json").write_text(json.dumps({"version": 2, "kind": "lira_half", "info": {}, "recipe": {"model": {"lr": 0.1}}}))
    (root / "models/0001/done.json").write_text(json.dumps({"index": 1, "recipe": {"model": {"lr": 0.1}}}))
    return root


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


arrays = st.builds(
    lambda dtype, shape, seed: np.random.default_rng(seed).normal(0, 3, shape).astype(dtype),
    st.sampled_from(["float32", "float64", "int64", "uint64", "bool", "int8", "float16"]),
    st.lists(st.integers(0, 30), min_size=0, max_size=4).map(tuple),
    st.integers(0, 2**16),
)
contents = st.one_of(
    st.binary(max_size=400).map(lambda data: ("bytes", data)),
    st.floats(0, 1).map(lambda fraction: ("truncate", fraction)),
    arrays.map(lambda array: ("array", npy_bytes(array))),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["info", "target_models", "version", "recipe", "kind", "pairs"]), inner, max_size=3),
                 max_leaves=8).map(lambda value: ("json", json.dumps(value).encode())),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(slot=st.sampled_from(SLOTS), content=contents)
def test_damaged_slot_gives_a_result_or_one_line(base, capsys, slot, content):
    parent = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        experiment = parent / "exp"
        shutil.copytree(base, experiment)
        outside = {p.name for p in parent.iterdir()}
        path = experiment / slot
        kind, value = content
        if kind == "truncate":
            original = path.read_bytes() if path.is_file() else b""
            data = original[: int(len(original) * value)]
        else:
            data = value
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        capsys.readouterr()
        code = attack_main(["--experiment", str(experiment), "--attack", "lira", "--bootstrap", "0"])
        err = capsys.readouterr().err.strip()
        assert code in (0, 2), (slot, kind, err)
        if code == 2:
            assert err.startswith("error:") and err.count("\n") == 0 and "Traceback" not in err, (slot, kind, err)
        assert {p.name for p in parent.iterdir()} == outside  # nothing written beside the experiment
    finally:
        shutil.rmtree(parent)
