"""The farm: resume after kill -9, concurrent processes, export from checkpoints, status, plan checks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mia_lightning.cli import train_main
from mia_lightning.farm.shards import Shard, resolve_shard

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tabular/digits_sequential.yaml"


def farm_args(root: Path, n_models: int = 4, epochs: int = 2, *extra: str) -> list[str]:
    return [
        "farm", "--config", str(RECIPE), "--experiment.root", str(root), "--experiment.name", "exp",
        "--plan.n_models", str(n_models), "--trainer.max_epochs", str(epochs),
        "--model.init_args.hidden", "[32]", "--trainer.enable_progress_bar", "false", *extra,
    ]


def start_farm(root: Path, *extra: str, n_models: int = 4, epochs: int = 2) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *farm_args(root, n_models, epochs, *extra)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def all_logits(exp: Path, n_models: int) -> np.ndarray:
    return np.stack([np.load(exp / "models" / f"{i:04d}" / "logits.npy") for i in range(n_models)])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted sequential farm of 6 models."""
    root = tmp_path_factory.mktemp("reference")
    assert train_main(farm_args(root, 6, 3)) == 0
    return root / "exp"


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path, reference_run):
    proc = start_farm(tmp_path, n_models=6, epochs=3)
    models = tmp_path / "exp" / "models"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(models.glob("*/done.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(models.glob("*/done.json")))
    assert 2 <= done_before < 6
    assert train_main(farm_args(tmp_path, 6, 3)) == 0
    assert len(list(models.glob("*/done.json"))) == 6
    assert not list(models.glob("*/.*.tmp")) and not list(models.glob("*/claim.json"))
    np.testing.assert_array_equal(all_logits(tmp_path / "exp", 6), all_logits(reference_run, 6))


def test_two_concurrent_processes_train_every_model_once(tmp_path):
    procs = [start_farm(tmp_path, n_models=6), start_farm(tmp_path, n_models=6)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    trained = [int(line.split()[2]) for out in outputs for line in out.splitlines() if line.startswith("farm: model")]
    assert sorted(trained) == list(range(6)), outputs
    assert len(list((tmp_path / "exp" / "models").glob("*/done.json"))) == 6


def test_one_worker_per_device_on_cpu(tmp_path):
    assert train_main(farm_args(tmp_path, 4, 1, "--trainer.devices", "2")) == 0
    done = [json.loads(p.read_text()) for p in sorted((tmp_path / "exp" / "models").glob("*/done.json"))]
    assert [d["index"] for d in done] == [0, 1, 2, 3]
    assert len({d["pid"] for d in done}) == 2  # two worker processes shared the models


def recipe_for(argv: list[str]):
    from mia_lightning.console import parse
    from mia_lightning.farm.config import farm_parser, recipe_from_namespace

    parser = farm_parser()
    return recipe_from_namespace(parser, parse(parser, argv[1:]))


def test_devices_auto_fills_the_cpu_cores_at_the_farm_thread_count(tmp_path, monkeypatch):
    from mia_lightning.contract.identity import DONE_FILE
    from mia_lightning.farm import workers

    monkeypatch.setattr(workers, "usable_cores", lambda: 4)
    auto = ("--trainer.devices", "auto")
    count, gpu_ids, why = workers.farm_workers(recipe_for(farm_args(tmp_path, 4, 1, *auto, "--farm.threads", "1")), "cpu")
    assert (count, gpu_ids) == (4, None) and "4 cores at 1 torch thread per worker, farm.threads" in why
    assert workers.farm_workers(recipe_for(farm_args(tmp_path, 4, 1, *auto, "--farm.threads", "2")), "cpu")[0] == 2
    assert workers.farm_workers(recipe_for(farm_args(tmp_path, 4, 1, *auto)), "cpu")[0] == 1  # torch's default threads use every core
    assert workers.farm_workers(recipe_for(farm_args(tmp_path, 4, 1, "--farm.threads", "1")), "cpu")[0] == 1  # the recipe's devices: 1
    recipe = recipe_for(farm_args(tmp_path, 4, 1, *auto, "--farm.threads", "1"))
    for index in (0, 1, 3):
        recipe.experiment.model_dir(index).mkdir(parents=True, exist_ok=True)
        (recipe.experiment.model_dir(index) / DONE_FILE).write_text("{}")
    assert workers.farm_workers(recipe, "cpu")[0] == 1  # one model left: no worker start-up for nothing


def test_shards_partition_models_and_read_cluster_env():
    shards = [Shard(i, 3) for i in range(3)]
    chosen = [shard.select(list(range(10))) for shard in shards]
    assert sorted(sum(chosen, [])) == list(range(10))
    assert resolve_shard(None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}) == Shard(2, 4)
    assert resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert resolve_shard("0/2", {"RANK": "1", "WORLD_SIZE": "2"}) == Shard(0, 2)
    assert Shard(1, 2).split(2, 1) == Shard(3, 4)


def test_shard_runs_only_its_models_and_status(tmp_path, capsys):
    assert train_main(farm_args(tmp_path, 4, 1, "--farm.shard", "1/2")) == 0
    models = tmp_path / "exp" / "models"
    assert sorted(p.parent.name for p in models.glob("*/done.json")) == ["0001", "0003"]
    capsys.readouterr()
    assert train_main(farm_args(tmp_path, 4, 1, "--status")) == 0
    out = capsys.readouterr().out
    assert "done" in out and "missing" in out and "0, 2" in out


def test_export_from_checkpoints_reproduces_logits(tmp_path, reference_run):
    import shutil

    exp = tmp_path / "copy"
    shutil.copytree(reference_run, exp)
    for logits in exp.glob("models/*/logits.npy"):
        logits.unlink()
    assert train_main(["export", "--experiment", str(exp)]) == 0
    np.testing.assert_allclose(all_logits(exp, 6), all_logits(reference_run, 6), rtol=0, atol=1e-6)


def test_export_refuses_foreign_checkpoint(tmp_path, reference_run, capsys):
    import shutil

    import torch

    exp = tmp_path / "copy"
    shutil.copytree(reference_run, exp)
    torch.save({"state_dict": {}}, exp / "models/0002/model.ckpt")
    before = (exp / "models/0000/logits.npy").read_bytes()
    assert train_main(["export", "--experiment", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "models/0002/model.ckpt" in err and "not a mia-lightning checkpoint" in err
    assert (exp / "models/0000/logits.npy").read_bytes() == before


def test_changed_recipe_is_refused(tmp_path, capsys):
    assert train_main(farm_args(tmp_path, 2, 1)) == 0
    assert train_main(farm_args(tmp_path, 2, 1, "--model.init_args.lr", "0.5")) == 2
    assert "different recipe" in capsys.readouterr().err


def test_plan_files_follow_the_contract(reference_run):
    keep = np.load(reference_run / "keep.npy")
    labels = np.load(reference_run / "labels.npy")
    plan = json.loads((reference_run / "plan.json").read_text())
    assert keep.dtype == bool and keep.shape == (6, 1797) and (keep.sum(0) == 3).all()
    assert labels.dtype == np.int64 and labels.shape == (1797,)
    assert plan["n_models"] == 6 and plan["version"] == 2 and plan["dataset"] == "digits" and plan["kind"] == "lira_half"
    assert plan["recipe"]["model"]["init_args"]["n_features"] == 64 and len(plan["recipe"]["pool_fingerprint"]) == 64
    assert np.load(reference_run / "models/0000/logits.npy").shape == (1797, 1, 10)
    done = json.loads((reference_run / "models/0005/done.json").read_text())
    assert done["n_train"] == int(keep[5].sum())


@pytest.mark.parametrize(
    "override,phrase",
    [
        (["--model.init_args.optimizer", "rmsprop"], "bad init_args"),
        (["--model.init_args.hidden", "[0]"], "every hidden width must be >= 1"),
        (["--model.init_args.dropout", "1.0"], "dropout lie in [0, 1)"),
        (["--model.class_path", "no.such.Model"], "no.such.Model"),
        (["--plan.n_models", "many"], "plan.n_models"),
        (["--data.init_args.source", "/nonexistent.csv", "--data.init_args.label_column", "y"], "no such CSV"),
    ],
)
def test_bad_recipe_fails_in_one_line_before_writing(tmp_path, capsys, override, phrase):
    assert train_main(farm_args(tmp_path, 2, 1, *override)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and phrase in err and "Traceback" not in err, err
    assert not (tmp_path / "exp").exists()


def test_derived_models_train_after_their_parents_and_start_from_them(tmp_path, monkeypatch):
    import lightning as L

    from mia_lightning.data.plan import PLAN_KINDS
    from mia_lightning.contract.experiment import ExperimentDir
    from mia_lightning.farm.engine import ModelJob, SequentialEngine

    monkeypatch.setitem(PLAN_KINDS, "with_parents", "synthetic:parent_plan")
    assert train_main(farm_args(tmp_path, 4, 1, "--plan.kind", "with_parents")) == 0
    exp = tmp_path / "exp"
    done = {i: json.loads((exp / "models" / f"{i:04d}" / "done.json").read_text()) for i in range(4)}
    assert [done[i]["parent"] for i in range(4)] == [None, None, 0, 1]
    assert done[2]["finished_at"] > done[0]["finished_at"] and done[3]["finished_at"] > done[1]["finished_at"]
    assert json.loads((exp / "plan.json").read_text())["parents"] == {"2": 0, "3": 1}
    # a derived job that takes no training step reproduces its parent exactly
    from mia_lightning.farm.config import farm_parser, recipe_from_namespace

    parser = farm_parser()
    recipe = recipe_from_namespace(parser, parser.parse_args(farm_args(tmp_path, 4, 1)[1:] + ["--trainer.limit_train_batches", "0"]))
    engine = SequentialEngine(recipe.setup, experiment=ExperimentDir(exp))
    [result] = list(engine.run([ModelJob(9, np.arange(100), 123, parent=0)]))
    np.testing.assert_array_equal(result.logits, np.load(exp / "models/0000/logits.npy"))
    assert isinstance(result.module, L.LightningModule)


def test_a_claim_the_heartbeat_cannot_touch_is_dropped_and_the_others_keep_beating(tmp_path, monkeypatch):
    """One claim failing with PermissionError (taken over by another user) must not stop the thread: the other claims would go stale."""
    import os

    from mia_lightning.farm import locks

    lost, kept = tmp_path / "0000", tmp_path / "0001"
    for folder in (lost, kept):
        folder.mkdir()
        (folder / locks.CLAIM_FILE).write_text("{}")
        os.utime(folder / locks.CLAIM_FILE, (0, 0))
    touch = os.utime

    def utime(path, *args, **kwargs):
        if Path(path).parent == lost:
            raise PermissionError(13, "Permission denied", str(path))
        return touch(path, *args, **kwargs)

    monkeypatch.setattr(locks.os, "utime", utime)
    with locks.Heartbeat(interval_s=0.02) as heartbeat:
        heartbeat.paths |= {lost, kept}
        deadline = time.time() + 10
        while time.time() < deadline and (lost in heartbeat.paths or (kept / locks.CLAIM_FILE).stat().st_mtime == 0):
            time.sleep(0.02)
        beats = (kept / locks.CLAIM_FILE).stat().st_mtime
        os.utime(kept / locks.CLAIM_FILE, (0, 0))
        time.sleep(0.2)
        assert lost not in heartbeat.paths and beats > 0
        assert (kept / locks.CLAIM_FILE).stat().st_mtime > 0  # still beating after the failure


@pytest.mark.parametrize("native, trainer, warned", [
    (False, {"precision": "bf16-mixed", "accelerator": "cpu"}, True),
    (False, {"precision": "bf16-mixed"}, True),  # auto: the CPU when no GPU is visible
    (False, {"precision": "bf16-true", "accelerator": "cpu"}, True),
    (False, {"precision": "32-true", "accelerator": "cpu"}, False),
    (False, {"precision": 32}, False),
    (False, {"precision": "bf16-mixed", "accelerator": "gpu"}, False),
    (True, {"precision": "bf16-mixed", "accelerator": "cpu"}, False),
])
def test_bfloat16_on_a_cpu_without_native_bfloat16_is_named_before_training(monkeypatch, native, trainer, warned):
    """oneDNN emulates bfloat16 on such CPUs (one step 7.5-16x slower): the LM recipes, then in bf16-mixed, took hours there unannounced."""
    import torch

    from mia_lightning.farm.config import emulated_bfloat16

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    warning = emulated_bfloat16(trainer)
    assert (warning is not None) == warned
    if warned:
        assert "without native bfloat16" in warning and warning.endswith("the point") and "--trainer.precision 32-true" in warning
