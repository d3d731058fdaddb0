"""Help and option / name errors answer before torch, Lightning, timm or transformers are imported (not a timed test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from synthetic import write_synthetic_experiment

from mia_lightning.attacks.base import ATTACKS, BUILT_IN_ATTACKS, BUILT_IN_OUTPUTS

HEAVY = ("torch", "lightning", "timm", "transformers", "matplotlib")
ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import contextlib, io, json, sys
from mia_lightning.cli import attack_main, train_main
codes = []
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    for main, argv in json.loads(sys.argv[1]):
        try:
            codes.append({"attack": attack_main, "train": train_main}[main](argv))
        except SystemExit as done:  # --help prints and exits
            codes.append(done.code)
print(json.dumps({"codes": codes, "loaded": [name for name in %r if name in sys.modules]}))
""" % (HEAVY,)


def probe(calls: list[tuple[str, list[str]]]) -> dict:
    """Run the command lines in a fresh interpreter; their exit codes and which heavy modules they imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MIA_LIGHTNING_RUNTIME": "0"}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(calls)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_and_bad_requests_are_answered_before_torch_loads(tmp_path):
    experiment = write_synthetic_experiment(tmp_path / "exp", n_models=4, n_samples=20, seed=1)
    calls = [
        ("attack", ["--help"]),
        ("train", ["--help"]),
        ("train", ["farn"]),  # unknown command
        ("train", ["recipes"]),
        ("attack", ["--experiment", str(tmp_path / "missing")]),  # no such experiment
        ("attack", ["--experiment", str(experiment), "--attack", "lirra"]),  # typo in an attack name
        ("attack", ["--experiment", str(experiment), "--attack", "lira_online"]),  # an output given as an attack
        ("attack", ["--experiment", str(experiment), "--atack", "lira"]),  # typo in an option
        ("attack", ["--experiment", str(experiment), "--params", '{"lira": {"n_shadow": 3}}']),  # typo in a parameter
        ("attack", ["--experiment", str(experiment), "--config", "recipe:tabular/no_such_recipe"]),
        ("attack", ["--experiment", str(experiment), "--user_reduce", "mode"]),
        # the attacks that train models check their parameters without torch too
        ("attack", ["--experiment", str(experiment), "--attack", "shokri", "--params", '{"shokri": {"classifier": "lr"}}']),
        ("attack", ["--experiment", str(experiment), "--attack", "unlearning", "--params", '{"unlearning": {"sed": 1}}']),
        ("attack", ["--experiment", str(experiment), "--attack", "quantile", "--params", '{"quantile": {"alpha": 2.0}}']),
    ]
    result = probe(calls)
    assert result["codes"] == [0, 0, 2, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    assert result["loaded"] == [], f"imported before the request was checked: {result['loaded']}"
    status = probe([("train", ["study", "--config", "recipe:text/imdb_defences", "--status"])])  # a study of shokri and LSTMs lists its settings
    assert status["codes"] == [0] and not {"torch", "lightning", "timm", "transformers"} & set(status["loaded"]), status


def test_every_built_in_attack_is_registered_by_the_module_the_lazy_table_names():
    for name, module in BUILT_IN_ATTACKS.items():
        cls = ATTACKS[name]
        assert cls.name == name and cls.__module__ == f"mia_lightning.attacks.{module}"
        if isinstance(getattr(cls, "outputs", None), tuple):  # the unlearning attack's outputs depend on its parameters
            assert BUILT_IN_OUTPUTS[name] == cls.outputs, name
    registered = {cls.__module__ for cls in (ATTACKS[name] for name in ATTACKS)}
    modules = {f"mia_lightning.attacks.{path.stem}" for path in (ROOT / "mia_lightning" / "attacks").glob("*.py")
               if "@register_attack" in path.read_text()}
    assert modules <= registered, f"modules that register attacks missing from BUILT_IN_ATTACKS: {modules - registered}"


UNUSED_BY_AN_AUDIT = ("timm", "transformers", "opacus", "sklearn", "pandas", "datasets", "torchvision", "tensorboard", "mlflow")

AUDIT_PROBE = """
import json, sys
from mia_lightning.cli import attack_main
import mia_lightning.audit
entry = sorted(name for name in %r if name in sys.modules)
import lightning  # scoring runs in Trainer.predict: what Lightning itself imports is the audit's floor
lightning_brings = set(sys.modules)
code = attack_main(["--experiment", sys.argv[1], "--attack", "lira", "thresholds", "--bootstrap", "5"])
print(json.dumps({"code": code, "entry": entry, "audit": sorted(name for name in %r if name in sys.modules and name not in lightning_brings)}))
""" % (HEAVY + UNUSED_BY_AN_AUDIT, UNUSED_BY_AN_AUDIT)


def test_an_audit_imports_only_what_it_uses(tmp_path):
    """Importing the audit entry point loads no heavy package; running LiRA and the thresholds adds none beyond Lightning's own."""
    experiment = write_synthetic_experiment(tmp_path / "exp", n_models=6, n_samples=40, seed=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MIA_LIGHTNING_RUNTIME": "0"}
    out = subprocess.run([sys.executable, "-c", AUDIT_PROBE, str(experiment)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "entry": [], "audit": []}


def test_reports_of_a_published_run_load_neither_torch_nor_lightning(tmp_path):
    """``attack.py --report`` reads files: it answered in ~10 s, 8 of them importing torchmetrics for one formatting function."""
    from mia_lightning.audit import run_audit

    experiment = write_synthetic_experiment(tmp_path / "exp", n_models=4, n_samples=20, seed=1)
    run_audit(experiment, ["thresholds"], bootstrap=0)
    result = probe([("attack", ["--experiment", str(experiment), "--report"])])
    assert result["codes"] == [0] and (experiment / "report.html").is_file() and (experiment / "report.md").is_file()
    assert not {"torch", "lightning"} & set(result["loaded"]), f"the report imported {result['loaded']}"


def test_no_built_in_attack_module_imports_torch():
    """Every attack's class loads, and checks its default parameters, without torch; scoring imports what it trains with."""
    code = ("import json, sys\nfrom mia_lightning.attacks import create_attack\nfrom mia_lightning.attacks.base import BUILT_IN_ATTACKS\n"
            "attacks = [create_attack(name) for name in BUILT_IN_ATTACKS]\n"
            f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
