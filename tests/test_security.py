"""Files from elsewhere never execute code: crafted checkpoints and stored configs are refused before anything is called."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mia_lightning.cli import train_main
from mia_lightning.contract.components import ComponentSpec, resolve_class
from mia_lightning.errors import MiaError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tabular/digits_sequential.yaml"


@pytest.fixture(scope="module")
def farm(tmp_path_factory) -> Path:
    """A finished 2-model experiment (1 epoch, tiny MLPs) to tamper with."""
    root = tmp_path_factory.mktemp("secure")
    args = ["farm", "--config", str(RECIPE), "--experiment.root", str(root), "--experiment.name", "exp", "--plan.n_models", "2",
            "--trainer.max_epochs", "1", "--model.init_args.hidden", "[8]", "--trainer.enable_progress_bar", "false"]
    assert train_main(args) == 0
    return root / "exp"


def crafted(marker: Path) -> dict[str, tuple[str, dict]]:
    """class_path + hyper_parameters that would run code if a loader called them."""
    command = f"touch {marker}"
    return {
        "os.system": ("os.system", {"command": command}),
        "subprocess.Popen": ("subprocess.Popen", {"args": ["touch", str(marker)]}),
        "builtins.eval": ("builtins.eval", {"source": f"open({str(marker)!r}, 'w')"}),
        "non-Lightning class": ("mia_lightning.farm.locks.Heartbeat", {"interval_s": 1.0}),
    }


@pytest.mark.parametrize("case", ["os.system", "subprocess.Popen", "builtins.eval", "non-Lightning class"])
def test_crafted_checkpoint_runs_nothing(case, farm, tmp_path, capsys):
    experiment = tmp_path / "copy"
    shutil.copytree(farm, experiment)
    marker = tmp_path / "pwned"
    class_path, hparams = crafted(marker)[case]
    payload = torch.load(experiment / "models/0001/model.ckpt", weights_only=True)
    payload["mia_lightning"]["class_path"] = class_path
    payload["hyper_parameters"] = hparams
    torch.save(payload, experiment / "models/0001/model.ckpt")
    before = (experiment / "models/0000/logits.npy").read_bytes()
    capsys.readouterr()
    assert train_main(["export", "--experiment", str(experiment)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "models/0001/model.ckpt" in err and class_path in err and "refusing" in err, err
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert not marker.exists()
    assert (experiment / "models/0000/logits.npy").read_bytes() == before  # nothing written


def test_trusting_a_package_still_requires_a_lightning_module(farm, tmp_path, capsys):
    experiment = tmp_path / "copy"
    shutil.copytree(farm, experiment)
    marker = tmp_path / "pwned"
    payload = torch.load(experiment / "models/0000/model.ckpt", weights_only=True)
    payload["mia_lightning"]["class_path"], payload["hyper_parameters"] = "os.system", {"command": f"touch {marker}"}
    torch.save(payload, experiment / "models/0000/model.ckpt")
    assert train_main(["export", "--experiment", str(experiment), "--trust", "os"]) == 2
    assert "is not a lightning.LightningModule subclass" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("case", ["os.system", "subprocess.Popen", "builtins.eval", "non-Lightning class"])
def test_crafted_config_data_section_runs_nothing(case, farm, tmp_path, capsys):
    experiment = tmp_path / "copy"
    shutil.copytree(farm, experiment)
    marker = tmp_path / "pwned"
    class_path, init_args = crafted(marker)[case]
    config = yaml.safe_load((experiment / "config.yaml").read_text())
    config["data"] = {"class_path": class_path, "init_args": init_args}
    (experiment / "config.yaml").write_text(yaml.safe_dump(config))
    assert train_main(["export", "--experiment", str(experiment)]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.yaml: data section" in err and class_path in err and "refusing" in err, err
    assert not marker.exists()


def test_export_as_a_process_prints_one_line(farm, tmp_path):
    experiment = tmp_path / "copy"
    shutil.copytree(farm, experiment)
    marker = tmp_path / "pwned"
    payload = torch.load(experiment / "models/0000/model.ckpt", weights_only=True)
    payload["mia_lightning"]["class_path"], payload["hyper_parameters"] = "subprocess.Popen", {"args": ["touch", str(marker)]}
    torch.save(payload, experiment / "models/0000/model.ckpt")
    proc = subprocess.run([sys.executable, "train.py", "export", "--experiment", str(experiment)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()


def test_resolve_class_checks_the_base_and_the_trusted_packages():
    import lightning as L

    assert resolve_class("mia_lightning.models.tabular_mlp.TabularMLP", L.LightningModule, ("mia_lightning",)).__name__ == "TabularMLP"
    with pytest.raises(MiaError, match="outside mia_lightning"):
        resolve_class("os.system", L.LightningModule, ("mia_lightning",))
    with pytest.raises(MiaError, match="not a lightning.LightningDataModule subclass"):
        resolve_class("mia_lightning.models.tabular_mlp.TabularMLP", L.LightningDataModule)
    with pytest.raises(MiaError, match="not a dotted class path"):
        resolve_class("eval", L.LightningModule)
    with pytest.raises(MiaError, match="is not a lightning.Callback subclass"):
        ComponentSpec("mia_lightning.models.tabular_mlp.TabularMLP", base=L.Callback).build()
