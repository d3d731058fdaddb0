"""An attack run is one unit: published whole or not at all, the report built from one run, earlier runs kept."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from synthetic import write_synthetic_experiment

from mia_lightning.audit import run_audit
from mia_lightning.cli import attack_main
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.report.markdown import markdown_report
from mia_lightning.contract.runs import latest_run


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    return write_synthetic_experiment(tmp_path / "exp", n_models=8, n_samples=40, seed=3)


def published(root: Path) -> dict[str, bytes]:
    """Every file reachable through attacks/ (links followed), by path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "attacks").glob("**/*")) if p.is_file()}


def test_a_narrower_run_replaces_the_whole_set_and_the_old_run_stays_retrievable(experiment):
    first = run_audit(experiment, ["lira", "rmia", "thresholds"], bootstrap=0)
    second = run_audit(experiment, ["lira"], targets=[0, 1, 2], bootstrap=0)
    attacks = experiment / "attacks"
    outputs = sorted(p.name for p in attacks.iterdir() if (p / "results.json").is_file())
    assert outputs == sorted(["lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed", "global_threshold"])
    assert not (attacks / "rmia_online").exists()  # no stale result from the earlier run is visible
    for name in outputs:
        record = json.loads((attacks / name / "results.json").read_text())
        assert record["targets"] == [0, 1, 2] and record["run"]["id"] == second.run_id
    assert sorted(json.loads((attacks / "run.json").read_text())["outputs"]) == outputs
    older = attacks / "runs" / first.run_id
    assert json.loads((older / "rmia_online" / "results.json").read_text())["run"]["id"] == first.run_id
    text = markdown_report(experiment)
    assert second.run_id in text and "rmia" not in text and "3 target models" in text


def test_results_record_the_run(experiment):
    result = run_audit(experiment, ["lira", "thresholds"], params={"lira": {"n_shadows": 5}}, bootstrap=0)
    record = json.loads((experiment / "attacks/lira_online/results.json").read_text())
    run = record["run"]
    assert run["id"] == result.run_id and run["attacks"] == ["lira", "thresholds"]
    assert run["params"]["lira"] == {"n_shadows": 5} and run["version"] and run["time"]
    folder, meta = latest_run(ExperimentDir(experiment))
    assert meta["id"] == result.run_id and folder.name == result.run_id and "loss" in meta["outputs"]
    assert result.run == meta  # the result carries the run.json it published


def test_a_failing_run_leaves_the_published_run_untouched(experiment, monkeypatch):
    run_audit(experiment, ["lira"], bootstrap=0)
    before = published(experiment)
    from mia_lightning.report import terminal

    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk vanished while plotting")

    monkeypatch.setattr(terminal, "plot_roc", broken_plot)  # run_audit imports it when it runs
    with pytest.raises(RuntimeError):
        run_audit(experiment, ["lira", "rmia"], bootstrap=0)
    assert published(experiment) == before
    assert not [p for p in (experiment / "attacks/runs").iterdir() if p.name.startswith(".")]  # the staging folder is gone


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make ``folder`` unwritable even for root (chattr +i), else by permissions; skip where neither works."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("root can write anywhere and chattr +i is not available here")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_read_only_attacks_folder_is_one_line_and_keeps_everything(experiment, capsys):
    run_audit(experiment, ["lira"], bootstrap=0)
    before = published(experiment)
    capsys.readouterr()
    with read_only(experiment / "attacks/runs"):
        assert attack_main(["--experiment", str(experiment), "--attack", "rmia"]) == 2
    err = capsys.readouterr().err
    assert "attacks/runs" in err and err.count("error:") == 1 and "Traceback" not in err, err
    assert published(experiment) == before


def test_read_only_experiment_folder_refuses_a_new_farm(tmp_path, capsys):
    from mia_lightning.cli import train_main

    root = tmp_path / "readonly"
    root.mkdir()
    recipe = Path(__file__).resolve().parents[1] / "configs/tabular/digits_sequential.yaml"
    with read_only(root):
        code = train_main(["farm", "--config", str(recipe), "--experiment.root", str(root), "--plan.n_models", "2",
                           "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    assert code == 2 and "not writable" in capsys.readouterr().err
    assert not list(root.iterdir())


def test_keep_runs_prunes_the_oldest_but_never_the_latest(experiment):
    ids = [run_audit(experiment, ["thresholds"], bootstrap=0, keep_runs=2).run_id for _ in range(3)]
    remaining = sorted(p.name for p in (experiment / "attacks/runs").iterdir())
    assert remaining == sorted(ids[1:])
    assert (experiment / "attacks/latest").resolve().name == ids[-1]


def test_results_written_by_layout_version_1_move_to_a_legacy_run(experiment):
    legacy = experiment / "attacks" / "lira_online"
    legacy.mkdir(parents=True)
    (legacy / "results.json").write_text("{}")
    run_audit(experiment, ["thresholds"], bootstrap=0)
    assert (experiment / "attacks/runs/legacy-v1/lira_online/results.json").read_text() == "{}"
    assert not (experiment / "attacks/lira_online").exists()
    assert np.load(experiment / "attacks/loss/scores.npy").shape == (8, 40)


def test_outputs_that_score_no_audited_pair_are_skipped_not_fatal(tmp_path):
    # Shadows (models 1-7) never train on the target's half, the only pairs audited: online LiRA has no
    # IN shadows anywhere and scores nothing; the offline outputs still run and the run is published.
    root = write_synthetic_experiment(tmp_path / "exp", n_models=8, n_samples=80, seed=2)
    keep = np.zeros((8, 80), dtype=bool)
    rng = np.random.default_rng(0)
    keep[0, rng.permutation(40)[:20]] = True
    keep[1:, 40:] = rng.random((7, 40)) < 0.5
    audit = np.zeros((8, 80), dtype=bool)
    audit[0, :40] = True
    np.save(root / "keep.npy", keep)
    np.save(root / "audit.npy", audit)
    result = run_audit(root, ["lira"], targets=[0], bootstrap=0)
    assert {r["attack"] for r in result.records} >= {"lira_offline", "lira_offline_fixed"}
    skipped = {s["attack"] for s in result.skipped}
    assert {"lira_online", "lira_online_fixed"} <= skipped
    assert not (root / "attacks" / "lira_online").exists()


def test_n_unscored_counts_only_audited_pairs_left_without_a_score(tmp_path):
    """Population samples are never audited: an attack that scores every audited pair reports 0, not the population's pairs."""
    root = write_synthetic_experiment(tmp_path / "exp", n_models=5, n_samples=40, n_population=8, seed=3)
    run_audit(root, ["thresholds"], targets=[0, 1], bootstrap=0)
    results = json.loads((root / "attacks/loss/results.json").read_text())
    assert results["n_unscored"] == 0 and results["n_members"] + results["n_nonmembers"] == 2 * 32


def test_n_unscored_counts_infinite_scores_the_metrics_leave_out():
    """The metrics rank finite scores only: an audited pair scored +inf or -inf is left out of them, so it is unscored (it used to vanish from both counts)."""
    from mia_lightning.audit import result_record

    scores = np.array([[0.9, np.inf, 0.1, np.nan], [-np.inf, 0.7, 0.2, 0.4]])
    members = np.array([[True, True, False, False], [True, False, False, True]])
    record, _ = result_record("x", "x", {}, np.arange(2), scores, members, bootstrap=0)
    assert record["n_unscored"] == 3
    assert record["n_members"] + record["n_nonmembers"] + record["n_unscored"] == scores.size


def test_a_damaged_results_file_of_a_study_setting_asks_for_the_study_not_attack_py(tmp_path):
    """attack.py would publish a new run the setting's setting.json does not record; the study's fix audits the setting again."""
    from mia_lightning.analysis.power_law import attack_scores
    from mia_lightning.contract.runs import read_run_file, run_results, setting_fix
    from mia_lightning.errors import MiaError

    root = write_synthetic_experiment(tmp_path / "exp", n_models=4, n_samples=30, seed=3)
    run_audit(root, ["thresholds"], targets=[0, 1], bootstrap=0)
    folder, _ = latest_run(ExperimentDir(root))
    (folder / "loss" / "results.json").write_text("{")
    with pytest.raises(MiaError, match=r"re-run `python attack.py --experiment .* --attack thresholds --n_targets 2 --bootstrap 0`$"):
        run_results(folder, read_run_file(folder))
    with pytest.raises(MiaError, match=f"not valid JSON .*; {re.escape(setting_fix(ExperimentDir(root)))}$"):
        attack_scores(ExperimentDir(root), folder, "loss")


DAMAGED_RUN_FILES = {
    "a results.json field": ("loss/results.json", {"auc": "high"}, 'auc is "high", expected a number'),
    "a results.json nested field": ("loss/results.json", {"user_level": {"auc": 0.5, "tpr_at_fpr": {"0.01": 0.5}, "n_users": -1}}, "user_level.n_users is -1"),
    "a run.json field": ("run.json", {"skipped": [1]}, "skipped is [1], expected a list of objects"),
    "a run.json that is not an object": ("run.json", [1], "holds [1], expected an object"),
    "a utility.json field": ("utility.json", {"per_class": {"precision": "x"}}, 'per_class.precision is "x", expected a list of numbers'),
}


def damage_run_file(folder: Path, file: str, edit: dict | list) -> None:
    """Replace fields of one JSON file of run ``folder`` (or the whole file, given a list)."""
    path = folder / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit} if isinstance(edit, dict) else edit))


@pytest.mark.parametrize("file, edit, fragment", DAMAGED_RUN_FILES.values(), ids=DAMAGED_RUN_FILES)
def test_a_damaged_field_of_a_study_settings_run_names_the_setting_to_audit_again(tmp_path, file, edit, fragment):
    """The study reads the run its setting.json records: a damaged field asks for that marker's deletion, once, never for attack.py (it ended 're-run attack.py on the experiment')."""
    from mia_lightning.errors import MiaError
    from mia_lightning.study import SETTING_FILE, Setting, _row

    root = write_synthetic_experiment(tmp_path / "exp", n_models=4, n_samples=30, seed=3)
    result = run_audit(root, ["thresholds"], targets=[0, 1], bootstrap=0)
    marker = root / SETTING_FILE
    marker.write_text(json.dumps({"setting": "s", "overrides": {}, "run": result.run_id}))
    damage_run_file(result.folder, file, edit)
    with pytest.raises(MiaError) as refused:
        _row(Setting("s", {}), ExperimentDir(root))
    message = str(refused.value)
    assert fragment in message and message.endswith(f"; delete {marker} and re-run the study (it audits the setting again)"), message
    assert "attack.py" not in message and message.count("re-run") == 1


@pytest.mark.parametrize("case", ["a results.json field", "a run.json field"])
def test_a_damaged_field_read_by_a_power_law_study_asks_for_the_study_not_attack_py(tmp_path, case):
    """The same field names the run's attack.py command when read as a run, the study's fix when a study's analysis reads it (both ended 're-run attack.py on the experiment')."""
    from mia_lightning.analysis.power_law import attack_scores
    from mia_lightning.contract.runs import read_run_file, run_results, setting_fix
    from mia_lightning.errors import MiaError

    root = write_synthetic_experiment(tmp_path / "exp", n_models=4, n_samples=30, seed=3)
    folder = run_audit(root, ["thresholds"], targets=[0, 1], bootstrap=0).folder
    file, edit, fragment = DAMAGED_RUN_FILES[case]
    damage_run_file(folder, file, edit)
    command = f"python attack.py --experiment {root.resolve()} --attack thresholds --n_targets 2 --bootstrap 0"
    with pytest.raises(MiaError, match=rf"{re.escape(fragment)}.*; re-run `{re.escape(command)}`$"):
        run_results(folder, read_run_file(folder))
    with pytest.raises(MiaError, match=rf"{re.escape(fragment)}.*; {re.escape(setting_fix(ExperimentDir(root)))}$"):
        attack_scores(ExperimentDir(root), folder, "loss")


def test_the_fix_for_a_damaged_results_file_reproduces_the_run(experiment, capsys):
    """The command a damaged file asks for repeats the run's non-default options: following it publishes the same numbers, not a default run's."""
    from mia_lightning.contract.runs import read_run_file, run_results
    from mia_lightning.errors import MiaError

    options = ["--targets", "5", "2", "--params", '{"lira": {"n_shadows": 3}}', "--bootstrap", "7", "--user_reduce", "max", "--fpr_budget", "0.25"]
    assert attack_main(["--experiment", str(experiment), "--attack", "lira", "thresholds", *options]) == 0
    folder, run = latest_run(ExperimentDir(experiment))
    before = run_results(folder, run)
    (folder / "loss" / "results.json").write_text("{")
    with pytest.raises(MiaError) as refused:
        run_results(folder, read_run_file(folder))
    command = str(refused.value).rsplit("re-run `", 1)[1].rstrip("`")
    assert command == (f"python attack.py --experiment {experiment.resolve()} --attack lira thresholds --targets 5 2 "
                       """--params '{"lira": {"n_shadows": 3}}' --bootstrap 7 --user_reduce max --fpr_budget 0.25""")
    assert attack_main(shlex.split(command)[2:]) == 0
    folder, run = latest_run(ExperimentDir(experiment))
    after = run_results(folder, run)
    assert list(after) == list(before)
    for name, record in before.items():
        for field in ("targets", "params", "auc", "auc_ci_bootstrap", "tpr_at_fpr", "precision_recall"):
            assert after[name].get(field) == record.get(field), (name, field)


def test_a_default_run_asks_for_the_plain_command_and_a_crafted_options_block_adds_nothing(experiment):
    """Default options add no words; options run.json may not hold (another --experiment) or values that fail their checks are left out, the rest quoted."""
    from mia_lightning.contract.runs import rerun_fix

    folder = run_audit(experiment, ["thresholds"]).folder
    run = json.loads((folder / "run.json").read_text())
    plain = f"re-run `python attack.py --experiment {experiment.resolve()} --attack thresholds`"
    assert run["options"] == {} and rerun_fix(folder, run) == plain
    crafted = {"experiment": "/elsewhere", "targets": ["1; rm -rf ~"], "bootstrap": -1, "user_reduce": "$(id)", "fpr_budget": 0.5,
               "params": {"lira": {"mu": "'; echo hi"}}}
    fix = rerun_fix(folder, {**run, "options": crafted})
    assert fix == plain[:-1] + """ --fpr_budget 0.5 --params '{"lira": {"mu": "'"'"'; echo hi"}}'`"""
    assert shlex.split(fix.split("`")[1])[-1] == '{"lira": {"mu": "\'; echo hi"}}'


def test_every_option_a_run_records_is_one_the_fix_repeats():
    """audit.rerun_options writes the options, contract.runs.RERUN_OPTIONS lets them through: a decision option added to
    Decisions but not to RERUN_OPTIONS would be recorded and silently left out of the command."""
    import numpy as np

    from mia_lightning.audit import Decisions, rerun_options
    from mia_lightning.contract.runs import RERUN_OPTIONS

    recorded = rerun_options(np.array([2, 0]), np.arange(4), {"lira": {"n_shadows": 2}}, 0, Decisions("max", 0.2, "paper"))
    recorded_first = rerun_options(np.arange(2), np.arange(4), {}, 100, Decisions())
    assert {*recorded, *recorded_first} == set(RERUN_OPTIONS)
    assert all(RERUN_OPTIONS[name][0](value) for options in (recorded, recorded_first) for name, value in options.items())
