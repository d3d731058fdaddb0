"""The built wheel, installed into a fresh virtual environment offline, runs the quickstart through the ``mia-lightning`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_wheel_installs_offline_and_runs_the_quickstart(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path / "dist"), str(ROOT)], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("mia_lightning-*.whl"))
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).stdout.strip())
    # the dependencies come from this environment (a path entry, so its editable install of the repository is not seen)
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path, env)
    command = str(target / "bin" / "mia-lightning")
    work = tmp_path / "work"  # not the repository: everything must come from the wheel
    work.mkdir()
    located = run([str(python), "-c", "import mia_lightning; print(mia_lightning.__file__)"], work, env).stdout.strip()
    assert located.startswith(str(target)), located
    assert "recipe:tabular/digits_quickstart" in run([command, "recipes"], work, env).stdout.split()
    run([command, "train", "farm", "--config", "recipe:tabular/digits_quickstart", "--plan.n_models", "4", "--farm.group_size", "4",
         "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"], work, env)
    out = run([command, "attack", "--experiment", "checkpoints/digits_quickstart", "--attack", "lira", "--bootstrap", "20", "--report"], work, env)
    assert "lira_online" in out.stdout
    experiment = work / "checkpoints" / "digits_quickstart"
    assert json.loads((experiment / "attacks/lira_online/results.json").read_text())["n_members"] > 0
    assert (experiment / "report.html").is_file()
    bad = subprocess.run([command, "attack", "--experiment", "checkpoints/nowhere"], cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: checkpoints/nowhere: no such experiment directory")
