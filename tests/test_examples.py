"""The worked examples in examples/ run end to end (small sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_sklearn_farm_exported_and_audited(tmp_path):
    out = tmp_path / "sk"
    run([sys.executable, "examples/export_sklearn_farm.py", "--out", str(out), "--models", "4", "--max_iter", "40", "--attack", "lira", "thresholds"])
    record = json.loads((out / "attacks/lira_online/results.json").read_text())
    assert record["n_members"] + record["n_nonmembers"] == 4 * 1797 and record["auc"] > 0.5


def test_pytorch_farm_with_two_queries(tmp_path):
    out = tmp_path / "pt"
    run([sys.executable, "examples/export_pytorch_farm.py", "--out", str(out), "--models", "4", "--epochs", "5"])
    assert json.loads((out / "attacks/rmia_online/results.json").read_text())["auc"] > 0.5


def test_farm_on_your_csv(tmp_path):
    run(["bash", "examples/farm_on_your_csv.sh", "--plan.n_models", "4", "--trainer.max_epochs", "5"], PY=sys.executable, OUT=str(tmp_path), NAME="csv")
    plan = json.loads((tmp_path / "csv/plan.json").read_text())
    assert plan["recipe"]["model"]["init_args"]["n_features"] == 30


def test_python_api_example(tmp_path):
    proc = run([sys.executable, "examples/python_api.py", "--out", str(tmp_path), "--models", "4", "--epochs", "3"])
    root = tmp_path / "api_demo"
    assert "refused: --attack 'lirra': unknown attack" in proc.stdout
    assert (root / "report.html").is_file() and (root / "report.md").is_file()
    run_id = json.loads((root / "attacks/latest/run.json").read_text())["id"]
    assert (root / "logs/audit" / run_id / "metrics.csv").is_file()
