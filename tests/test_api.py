"""The Python API: records equal results.json, the same one-line errors as the CLI, loggers receive every number."""

from __future__ import annotations

import csv
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
from synthetic import write_synthetic_experiment

import mia_lightning as mia
from mia_lightning.cli import attack_main
from mia_lightning.report.loggers import record_metrics


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> tuple[Path, list]:
    root = write_synthetic_experiment(tmp_path_factory.mktemp("api") / "exp", n_models=8, n_samples=60, effect=2.0, seed=4)
    return root, mia.audit(root, attacks=["lira"], n_targets=4, bootstrap=40, logger="csv")


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_records_are_the_published_results(audited):
    root, records = audited
    assert [r.attack for r in records] == ["lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed", "global_threshold"]
    for record in records:
        results = json.loads((root / "attacks" / record.attack / "results.json").read_text())
        assert record.results == results and record.run_id == results["run"]["id"]
        assert record.auc == results["auc"] and list(record.auc_ci) == results["auc_ci_bootstrap"]
        for level in (0.001, 0.01, 0.1):
            assert record.tpr_at_fpr[level] == results["tpr_at_fpr"][str(level)]
            assert list(record.tpr_ci[level]) == results["tpr_at_fpr_ci_bootstrap"][str(level)]
            assert list(record.tpr_ci_clopper_pearson[level]) == results["tpr_at_fpr_ci"][str(level)]
            assert record.resolved[level] == (level >= results["min_resolvable_fpr"])
        assert record.epsilon_lower_bound == results["empirical_epsilon"]["epsilon_lower_bound"]
        utility = json.loads((root / "attacks" / "utility.json").read_text())
        assert record.utility["test_accuracy"] == utility["test_accuracy"] and record.targets == [0, 1, 2, 3]
    reread = mia.open_experiment(root).records()
    assert [r.results for r in reread] == [r.results for r in records]


def test_dataframe_has_one_row_per_output(audited):
    pytest.importorskip("pandas")
    root, records = audited
    frame = mia.open_experiment(root).dataframe()
    assert list(frame["attack"]) == [r.attack for r in records]
    row = frame.set_index("attack").loc["lira_online"]
    online = records[0].results
    assert row["auc"] == online["auc"] and row["auc_low"] == online["auc_ci_bootstrap"][0]
    assert row["tpr@0.01_high"] == online["tpr_at_fpr_ci_bootstrap"]["0.01"][1] and row["n_targets"] == 4


def test_csv_logger_received_every_metric_and_the_roc(audited):
    root, records = audited
    folder = root / "logs" / "audit" / records[0].run_id
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    logged = {key: float(value) for row in rows for key, value in row.items() if value not in ("", None) and key != "step"}
    expected = {key: value for record in records for key, value in record_metrics(record.results).items()}
    assert logged == pytest.approx(expected) and len(expected) == 5 * 15  # per output: AUC (3), balanced accuracy, resolution, epsilon, 3 x TPR with its bootstrap interval (9)
    assert (folder / "roc.png").read_bytes() == (root / "attacks" / "roc.png").read_bytes()


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_optional_loggers(tmp_path, kind):
    pytest.importorskip(kind)
    root = write_synthetic_experiment(tmp_path / "exp", n_models=6, n_samples=40, seed=2)
    records = mia.audit(root, attacks=["thresholds"], n_targets=2, bootstrap=0, logger=kind)
    if kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(root / "logs" / "audit" / records[0].run_id)).Reload()
        assert events.Scalars("loss/auc")[0].value == pytest.approx(records[0].auc) and events.Tags()["images"] == ["roc"]
    else:
        import mlflow

        client = mlflow.tracking.MlflowClient(tracking_uri=(root / "logs" / "mlruns").resolve().as_uri())
        run = client.search_runs([client.get_experiment_by_name("audit").experiment_id])[0]
        assert run.data.metrics["loss/auc"] == pytest.approx(records[0].auc)
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["roc.png"]


def test_a_missing_logger_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    root = write_synthetic_experiment(tmp_path / "exp", n_models=4, n_samples=20, seed=1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(mia.MiaError, match=r"pip install 'mia-lightning\[tensorboard\]'"):
        mia.audit(root, logger="tensorboard")
    assert attack_main(["--experiment", str(root), "--logger", "tensorboard"]) == 2
    assert "mia-lightning[tensorboard]" in capsys.readouterr().err
    assert not (root / "attacks").exists() and not (root / "logs").exists()


@pytest.mark.parametrize("call, argv", [
    (lambda root: mia.audit(root, attacks=["lirra"]), ["--attack", "lirra"]),
    (lambda root: mia.audit(root, params={"lira": {"n_shadow": 3}}), ["--params", '{"lira": {"n_shadow": 3}}']),
    (lambda root: mia.audit(root, targets=[99]), ["--targets", "99"]),
    (lambda root: mia.audit(root, user_reduce="mode"), ["--user_reduce", "mode"]),
    (lambda root: mia.audit(root / "missing"), None),
    (lambda root: mia.open_experiment(root / "missing"), None),
])
def test_bad_input_gives_the_cli_line_and_writes_nothing(audited, capsys, call, argv):
    root, _ = audited
    before = listing(root)
    with pytest.raises(mia.MiaError) as raised:
        call(root)
    if argv is None:
        argv, root = [], root / "missing"
    assert attack_main(["--experiment", str(root), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"error: {raised.value}"
    assert listing(audited[0]) == before


@pytest.mark.parametrize("options, message", [
    ({"targets": "01"}, "--targets '01': expected a list of model ids (int)"),
    ({"targets": [0, 1.0]}, "--targets 1.0: expected int"),
    ({"n_targets": "3"}, "--n_targets '3': expected int"),
    ({"n_targets": 2.5}, "--n_targets 2.5: expected int"),
    ({"targets": [0], "n_targets": 2}, "--targets and --n_targets 2: give one of them"),
    ({"bootstrap": "5"}, "--bootstrap '5': expected int"),
    ({"fpr_budget": "0.1"}, "--fpr_budget '0.1': expected float"),
    ({"keep_runs": -2}, "--keep_runs -2: must be at least 1 (or 0 to keep every run)"),
    ({"keep_runs": 1.5}, "--keep_runs 1.5: expected int"),
])
def test_options_of_the_wrong_type_are_one_line_before_any_work(audited, options, message):
    """They used to raise bare TypeErrors, silently round (n_targets=2.5 ran 3 targets) or publish the run first (keep_runs=-2)."""
    root, _ = audited
    before = listing(root)
    with pytest.raises(mia.MiaError) as raised:
        mia.audit(root, attacks=["thresholds"], **options)
    assert str(raised.value).startswith(message)
    assert listing(root) == before


@pytest.mark.parametrize("attacks", [[], ()])
def test_no_attack_named_is_a_reason_naming_the_attacks(audited, attacks):
    """audit(attacks=[]) used to fail with 'no requested attack can run: ' and nothing after it."""
    from mia_lightning.audit import run_audit

    root, _ = audited
    before = listing(root)
    for call in (lambda: mia.audit(root, attacks=attacks), lambda: run_audit(root, attacks)):
        with pytest.raises(mia.MiaError) as raised:
            call()
        message = str(raised.value)
        assert message.startswith("--attack: no attack named; name one or more of all, ") and "lira, " in message and "\n" not in message
    assert listing(root) == before


def test_an_audit_from_python_shows_none_of_lightnings_warnings_about_our_use_of_it(tmp_path):
    """attack.py filtered them, the API printed them: attack scoring returns None from predict_step on purpose."""
    root = write_synthetic_experiment(tmp_path / "exp", n_models=4, n_samples=30, seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mia.audit(root, attacks=["lira"], bootstrap=0)
    assert not [w for w in caught if "predict returned None" in str(w.message)]


def test_train_from_a_dict_recipe_and_a_typo_in_one(tmp_path):
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/tabular/digits_quickstart.yaml").read_text())
    recipe["experiment"] = {"name": "dict_farm", "root": str(tmp_path)}
    recipe["plan"]["n_models"], recipe["trainer"]["max_epochs"], recipe["farm"]["group_size"] = 4, 2, 4
    recipe["model"]["init_args"]["hidden"] = [16]
    experiment = mia.train(recipe, "--trainer.enable_progress_bar", "false")
    assert experiment.root == tmp_path / "dict_farm"
    assert json.loads((experiment.root / "plan.json").read_text())["n_models"] == 4
    assert all((experiment.root / "models" / f"{i:04d}" / "done.json").is_file() for i in range(4))
    before = listing(experiment.root)
    recipe["plan"]["n_modles"] = 3
    with pytest.raises(mia.MiaError, match="n_modles"):
        mia.train(recipe)
    assert listing(experiment.root) == before
