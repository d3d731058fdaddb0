"""train.py study: one ordinary experiment per setting, resumable, and the analysis over the audited settings."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mia_lightning import study
from mia_lightning.cli import train_main
from mia_lightning.errors import MiaError
from mia_lightning.study import StudyOptions, expand_settings

ROOT = Path(__file__).resolve().parents[1]
FIRST = "weight_decay-0.0_max_epochs-1"
"""The first setting of ``write_study``'s grid."""


def write_study(tmp_path: Path, **changes) -> Path:
    recipe = tmp_path / "base.yaml"
    base = yaml.safe_load((ROOT / "configs/tabular/digits_sequential.yaml").read_text())
    base["plan"]["n_models"] = 4
    base["trainer"] |= {"max_epochs": 1, "enable_progress_bar": False}
    base["model"]["init_args"]["hidden"] = [8]
    recipe.write_text(yaml.safe_dump(base))
    spec = {"name": "sweep", "root": str(tmp_path / "out"), "recipe": str(recipe), "grid": {"model.init_args.weight_decay": [0.0, 0.1],
            "trainer.max_epochs": [1, 2]}, "attacks": ["thresholds"], "analysis": "rows"} | changes
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": spec}))
    return path


@pytest.fixture
def recorded(monkeypatch):
    """A stand-in analysis that records the rows it gets."""
    seen: list = []

    def analyse(study_dir: Path, rows: list[dict], **params) -> dict:
        seen.append(rows)
        return {"settings": [row["setting"] for row in rows], "auc": [row["results"]["loss"]["auc"] for row in rows]}

    monkeypatch.setitem(study.ANALYSES, "rows", "tests_study_analysis:analyse")
    module = type(study)("tests_study_analysis")
    module.analyse = analyse
    monkeypatch.setitem(__import__("sys").modules, "tests_study_analysis", module)
    return seen


def test_grid_study_trains_audits_and_analyses_each_setting(tmp_path, recorded):
    path = write_study(tmp_path)
    assert train_main(["study", "--config", str(path)]) == 0
    out = tmp_path / "out/sweep"
    names = ["weight_decay-0.0_max_epochs-1", "weight_decay-0.0_max_epochs-2", "weight_decay-0.1_max_epochs-1", "weight_decay-0.1_max_epochs-2"]
    assert json.loads((out / "analysis.json").read_text())["settings"] == names
    config = yaml.safe_load((out / "settings" / names[3] / "config.yaml").read_text())
    assert config["model"]["init_args"]["weight_decay"] == 0.1 and config["trainer"]["max_epochs"] == 2
    assert recorded[0][0]["overrides"] == {"model.init_args.weight_decay": 0.0, "trainer.max_epochs": 1}
    # resume: nothing is trained or audited again
    runs = {name: json.loads((out / "settings" / name / "setting.json").read_text())["run"] for name in names}
    assert train_main(["study", "--config", str(path)]) == 0
    assert runs == {name: json.loads((out / "settings" / name / "setting.json").read_text())["run"] for name in names}


def test_a_setting_whose_attack_run_was_deleted_is_audited_again(tmp_path, recorded, capsys):
    path = write_study(tmp_path, grid={"trainer.max_epochs": [1, 2]})
    assert train_main(["study", "--config", str(path)]) == 0
    settings = tmp_path / "out/sweep/settings"
    kept = json.loads((settings / "max_epochs-1/setting.json").read_text())["run"]
    shutil.rmtree(settings / "max_epochs-2" / "attacks")
    assert train_main(["study", "--config", str(path), "--status"]) == 0
    out = capsys.readouterr().out
    n_models = json.loads((settings / "max_epochs-2/plan.json").read_text())["n_models"]
    assert re.search(rf"max_epochs-1 │ audited │ +{n_models} / {n_models}", out) and re.search(rf"max_epochs-2 │ planned │ +{n_models} / {n_models}", out), out
    (settings / "max_epochs-2/models/0001/done.json").unlink()  # a model the farm must train again
    assert train_main(["study", "--config", str(path), "--status"]) == 0
    assert re.search(rf"max_epochs-2 │ planned │ +{n_models - 1} / {n_models}", capsys.readouterr().out)
    assert train_main(["study", "--config", str(path)]) == 0  # was: "no published attack run; run attack.py" (with its default attacks, not the study's)
    assert (settings / "max_epochs-2/attacks/latest/loss/results.json").is_file() and recorded[-1][1]["setting"] == "max_epochs-2"
    assert json.loads((settings / "max_epochs-1/setting.json").read_text())["run"] == kept


def test_the_analysis_reads_the_run_the_study_recorded_not_a_later_hand_run(tmp_path, recorded, capsys):
    """attack.py run by hand on a setting publishes a newer attacks/latest; the study's rows and analysis keep reading the run setting.json records."""
    from mia_lightning.cli import attack_main

    path = write_study(tmp_path, grid={"trainer.max_epochs": [1]})
    assert train_main(["study", "--config", str(path)]) == 0
    setting = tmp_path / "out/sweep/settings/max_epochs-1"
    run = json.loads((setting / "setting.json").read_text())["run"]
    analysis = (tmp_path / "out/sweep/analysis.json").read_text()
    assert attack_main(["--experiment", str(setting), "--attack", "thresholds", "--targets", "1", "--bootstrap", "0"]) == 0
    assert (setting / "attacks/latest").resolve().name != run
    assert train_main(["study", "--config", str(path)]) == 0
    assert (tmp_path / "out/sweep/analysis.json").read_text() == analysis
    assert recorded[-1][0]["run_folder"] == setting / "attacks/runs" / run and recorded[-1][0]["results"]["loss"]["targets"] == [0, 1, 2, 3]
    marker = setting / "setting.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "run": "../../../../../elsewhere"}))
    capsys.readouterr()
    assert train_main(["study", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{marker}: run '../../../../../elsewhere': must be a plain folder name" in err and f"delete {marker} and re-run the study" in err


def test_a_changed_study_is_refused(tmp_path, recorded, capsys):
    assert train_main(["study", "--config", str(write_study(tmp_path, grid={"trainer.max_epochs": [1]}))]) == 0
    capsys.readouterr()
    assert train_main(["study", "--config", str(write_study(tmp_path, grid={"trainer.max_epochs": [3]}))]) == 2
    assert "started with other settings" in capsys.readouterr().err


def test_a_list_of_grids_is_the_union_of_their_products():
    options = StudyOptions(recipe="r.yaml", grid=[{"a.b": [1, 2], "c.d": ["x"]}, {"a.b": [3], "e.f": [0.5, 1]}])
    assert [(s.name, s.overrides) for s in expand_settings(options)] == [
        ("b-1_d-x", {"a.b": 1, "c.d": "x"}), ("b-2_d-x", {"a.b": 2, "c.d": "x"}),
        ("b-3_f-0.5", {"a.b": 3, "e.f": 0.5}), ("b-3_f-1", {"a.b": 3, "e.f": 1})]
    with pytest.raises(MiaError, match="'b-1' repeats"):
        expand_settings(StudyOptions(recipe="r.yaml", grid=[{"a.b": [1]}, {"a.b": [1]}]))
    with pytest.raises(MiaError, match="'experiment.root' cannot be overridden"):
        expand_settings(StudyOptions(recipe="r.yaml", grid=[{"a.b": [1]}], overrides={"experiment.root": "/elsewhere"}))
    with pytest.raises(MiaError, match="'experiment.name' cannot be overridden"):
        expand_settings(StudyOptions(recipe="r.yaml", settings=[{"name": "a", "overrides": {"experiment.name": "../b"}}]))
    with pytest.raises(MiaError, match=r"study.grid\[1\].a.b: expected a non-empty list"):
        expand_settings(StudyOptions(recipe="r.yaml", grid=[{"a.b": [1]}, {"a.b": []}]))


@pytest.mark.parametrize("changes,phrase", [
    ({"analysis": "nonsense"}, "study.analysis 'nonsense': unknown"),
    ({"grid": {}, "settings": []}, "needs a grid or a list of settings"),
    ({"settings": [{"name": "a"}, {"name": "a"}], "grid": {}}, "'a' repeats"),
    ({"settings": [{"name": "a", "overrides": [1, 2]}], "grid": {}}, "study.settings 'a': overrides must be a mapping"),
    ({"recipe": "missing.yaml"}, "no such farm recipe"),
    ({"analysis": None, "analysis_params": {"bootstrap": 200}}, "study.analysis_params ['bootstrap']: given without study.analysis; name the analysis (defences, power_law"),
    ({"name": "../elsewhere"}, "study.name '../elsewhere': must be a plain folder name"),
    ({"name": ""}, "study.name '': must be a plain folder name"),
    # typos the farm or the audit would find only after study.json is written (which would lock the study to them)
    ({"overrides": {"model.init_args.nonexistent": 3}}, "study setting 'weight_decay-0.0_max_epochs-1': train.py farm: "),
    ({"grid": {"farm.engine": ["vectorized"]}}, "study setting 'engine-vectorized': --farm.engine 'vectorized': choose one of"),
    ({"attacks": ["lirra"]}, "unknown attack 'lirra'; did you mean lira"),
    ({"attacks": []}, "study.attacks: empty; name the attacks that audit every setting"),
    ({"params": {"lira": {"n_shadows": 4}}}, "--params 'lira': not an attack of this run (thresholds)"),
    ({"attacks": ["lira"], "params": {"lira": {"n_shadows": 8}}}, "study setting 'weight_decay-0.0_max_epochs-1': study.params.lira.n_shadows=8: must be between 1 and 3"),
    ({"n_targets": 9}, "--n_targets 9: must be between 1 and the number of models (4)"),
    ({"grid": {"trainer.max_epochs": [1, -1]}}, "study setting 'max_epochs--1': --trainer.max_epochs -1: without trainer.max_steps"),
    ({"overrides": {"plan.seed": -1}}, "study setting 'weight_decay-0.0_max_epochs-1': --plan.seed -1: must be a non-negative integer"),
    ({"overrides": {"data.init_args.batch_size": 0}}, "--data.init_args.batch_size 0: must be a positive integer"),
    ({"overrides": {"farm.shard": "3/2"}}, "shard 3/2: need 0 <= i < n"),
    ({"overrides": {"plan.options": {"p_typo": 0.3}}}, "study setting 'weight_decay-0.0_max_epochs-1': --plan.options.p_typo: unknown option of plan kind lira_half; it takes no options"),
    ({"overrides": {"plan.kind": "halves"}}, "--plan.kind 'halves': unknown plan kind"),
    ({"grid": {}, "settings": [{"name": "dp", "overrides": {"trainer.callbacks": [{"class_path": "mia_lightning.defences.dp_sgd.DPSGD", "init_args": {"target_epsilon": -1.0}}]}}]},
     "study setting 'dp': DPSGD target_epsilon -1.0: must be positive and finite"),
    # analysis parameters that name no setting or output, or wrong types: refused before the sweep trains, not after it
    ({"analysis": "defences", "analysis_params": {"baseline": "nope", "attack": "loss", "outputs": ["loss"]}}, "study.analysis_params.baseline 'nope': no such setting; settings are weight_decay-0.0_max_epochs-1, "),
    ({"analysis": "defences", "analysis_params": {"baseline": FIRST, "attack": "loss", "outputs": ["loss"], "levels": [0.01, 0.05]}},
     "study.analysis_params.levels 0.05: the audit reports TPR at FPR 0.001, 0.01, 0.1 only"),
    ({"analysis": "defences", "analysis_params": {"baseline": FIRST, "outputs": ["loss"]}}, "attack 'lira_online': not one of analysis_params.outputs (loss)"),
    ({"analysis": "defences", "analysis_params": {"baseline": FIRST}}, "attack 'lira_online': the study's attacks write no such output (loss, confidence, entropy, modified_entropy)"),
    ({"analysis": "defences", "analysis_params": {"baseline": FIRST, "levels": ["abc", 0.01]}}, "study.analysis_params.levels=['abc', 0.01]: expected list[float] | None"),
    ({"analysis": "defences", "analysis_params": {"baseline": FIRST, "outputs": "loss"}}, "study.analysis_params.outputs='loss': expected list[str] | None"),
    ({"analysis": "power_law", "analysis_params": {"attack": "loss", "roc_setting": "nope"}}, "study.analysis_params.roc_setting 'nope': not a setting of the study"),
    ({"analysis": "power_law", "analysis_params": {"attack": "loss", "per_sample_settings": [FIRST, "nope"]}}, "per_sample_settings 'nope': not a setting"),
    ({"analysis": "power_law", "analysis_params": {"attack": "loss", "dp_bounds": [[1.0]]}}, "study.analysis_params.dp_bounds [1.0]: each bound is [epsilon > 0, 0 <= delta < 1]"),
    ({"analysis": "power_law", "analysis_params": {"attack": "loss", "sample_fpr": 0.0}}, "study.analysis_params.sample_fpr 0.0: must lie strictly between 0 and 1"),
    ({"analysis": "power_law", "analysis_params": {"attack": "loss", "bootstrap": 0}}, "study.analysis_params.bootstrap 0: needs at least 1"),
    ({"analysis": "power_law", "analysis_params": {"bootstrap": "many"}}, "study.analysis_params.bootstrap='many': expected int"),
    ({"analysis": "defences", "analysis_params": {"bootstrap": 200}}, "study.analysis_params.bootstrap: not a parameter of the defences analysis; it takes baseline,"),
])
def test_bad_studies_are_one_line(tmp_path, recorded, capsys, changes, phrase):
    assert train_main(["study", "--config", str(write_study(tmp_path, **changes))]) == 2
    assert phrase in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_study_refused_for_a_never_stopping_setting_runs_once_corrected(tmp_path, recorded, capsys):
    """max_epochs -1 is refused before study.json or any plan is written, so the corrected study is not locked to it."""
    one = {"grid": {}, "settings": [{"name": "only", "overrides": {}}]}
    assert train_main(["study", "--config", str(write_study(tmp_path, overrides={"trainer.max_epochs": -1}, **one))]) == 2
    assert "--trainer.max_epochs -1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    assert train_main(["study", "--config", str(write_study(tmp_path, overrides={"trainer.max_epochs": 1}, analysis=None, **one))]) == 0
    assert (tmp_path / "out/sweep/settings/only/setting.json").is_file()
    out = " ".join(capsys.readouterr().out.split())  # a study without an analysis ended without a word
    assert "study sweep: 1 settings audited" in out and "no study.analysis, so no analysis.json" in out
    assert not (tmp_path / "out/sweep/analysis.json").exists()


def test_a_study_refused_once_its_first_model_is_built_runs_once_corrected(tmp_path, recorded, capsys):
    """A negative learning rate is found only when the farm builds the model, after study.json was written; the corrected
    study was then refused ('started with other settings') although no setting had been planned, and the error named no setting."""
    one = {"grid": {}, "settings": [{"name": "only", "overrides": {}}]}
    assert train_main(["study", "--config", str(write_study(tmp_path, overrides={"model.init_args.lr": -1.0}, **one))]) == 2
    err = capsys.readouterr().err
    assert "error: study setting 'only': " in err and "Invalid learning rate: -1.0" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out/sweep/settings/only/plan.json").exists()
    assert train_main(["study", "--config", str(write_study(tmp_path, overrides={"model.init_args.lr": 0.01}, **one))]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out/sweep/study.json").read_text())["overrides"] == {"model.init_args.lr": 0.01}
    assert (tmp_path / "out/sweep/settings/only/setting.json").is_file()
    capsys.readouterr()
    assert train_main(["study", "--config", str(write_study(tmp_path, overrides={"model.init_args.lr": 0.02}, **one))]) == 2  # a planned setting still locks it
    assert "started with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("file", ["out", "out/sweep"])
def test_a_study_root_or_folder_that_is_a_file_is_one_line(tmp_path, recorded, capsys, file):
    path = write_study(tmp_path)
    (tmp_path / file).parent.mkdir(exist_ok=True)
    (tmp_path / file).write_text("mine")
    assert train_main(["study", "--config", str(path)]) == 2
    assert f"{tmp_path / file}: a file, not a folder; choose another study.root or study.name" in capsys.readouterr().err
    assert (tmp_path / file).read_text() == "mine"


SHIPPED_STUDIES = sorted(path.relative_to(ROOT / "configs").with_suffix("").as_posix() for path in (ROOT / "configs").rglob("*.yaml")
                         if "study" in (yaml.safe_load(path.read_text()) or {}))


@pytest.mark.parametrize("name", SHIPPED_STUDIES)
def test_shipped_studies_resolve_their_recipe_outside_a_checkout(name, tmp_path, monkeypatch, capsys):
    """study.recipe was a checkout-relative path (configs/...), so `mia-lightning train study --config recipe:<name>` failed anywhere else."""
    monkeypatch.chdir(tmp_path)
    assert train_main(["study", "--config", f"recipe:{name}", "--study.root", str(tmp_path), "--status"]) == 0, capsys.readouterr().err
    spec = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["study"]
    options = StudyOptions(**{**spec, "root": str(tmp_path)})
    study.check_setting_recipes(options, tmp_path / options.name, expand_settings(options))  # every setting's farm recipe parses
    assert not any(tmp_path.iterdir())


def test_a_study_and_an_experiment_never_share_a_folder(tmp_path, recorded, capsys):
    """The farm trained an experiment into a study's folder (plan.json, models/ beside study.json), and a study wrote study.json into an experiment."""
    path = write_study(tmp_path, grid={"trainer.max_epochs": [1]})
    assert train_main(["study", "--config", str(path)]) == 0
    farm = ["farm", "--config", str(tmp_path / "base.yaml"), "--experiment.root", str(tmp_path / "out"), "--experiment.name", "sweep"]
    capsys.readouterr()
    assert train_main(farm) == 2
    assert f"{tmp_path / 'out/sweep'}: a study's folder (study.json), not an experiment" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out/sweep").iterdir()) == ["analysis.json", "settings", "study.json"]
    assert train_main(["study", "--config", str(write_study(tmp_path, name="sweep_2", root=str(tmp_path / "out/sweep/settings"), grid={"trainer.max_epochs": [1]})),
                       "--study.name", "max_epochs-1"]) == 2
    assert "max_epochs-1: an experiment's folder (plan.json), not a study" in capsys.readouterr().err
    assert not (tmp_path / "out/sweep/settings/max_epochs-1/study.json").exists()


def test_the_outputs_a_study_writes_are_unknown_when_an_attack_names_them_at_run_time():
    """The analysis checks its attack output against these; the unlearning attack's outputs depend on its parameters."""
    assert study.study_outputs(StudyOptions(attacks=["thresholds", "rmia"])) == ["loss", "confidence", "entropy", "modified_entropy", "rmia_online", "rmia_offline"]
    assert study.study_outputs(StudyOptions(attacks=["thresholds", "unlearning"])) is None


def test_a_base_recipe_edited_mid_study_is_refused(tmp_path, recorded, capsys):
    """The remaining settings trained with the edited recipe and the analysis mixed them with the finished ones; study.json now records the recipe's content."""
    path = write_study(tmp_path, grid={"trainer.max_epochs": [1]})
    assert train_main(["study", "--config", str(path)]) == 0
    base = tmp_path / "base.yaml"
    base.write_text("# a comment and another layout do not count\n" + yaml.safe_dump(yaml.safe_load(base.read_text()), default_flow_style=True))
    assert train_main(["study", "--config", str(path)]) == 0
    stored = json.loads((tmp_path / "out/sweep/study.json").read_text())
    base.write_text(base.read_text().replace("hidden: [8]", "hidden: [16]"))
    capsys.readouterr()
    assert train_main(["study", "--config", str(path)]) == 2
    assert f"the base recipe {base} changed since this study started (its settings would mix recipes); restore it" in capsys.readouterr().err
    del stored["recipe_sha256"]  # a study started before the digest was recorded still resumes
    (tmp_path / "out/sweep/study.json").write_text(json.dumps(stored))
    assert train_main(["study", "--config", str(path)]) == 0


def test_a_study_started_with_a_recipe_path_resumes_with_its_recipe_reference(tmp_path, recorded, monkeypatch):
    """The shipped studies now say recipe:<name> where they said configs/<name>.yaml; a study started with the path resumes."""
    monkeypatch.chdir(ROOT)
    tiny = {"plan.n_models": 4, "trainer.max_epochs": 1, "model.init_args.hidden": [8], "trainer.enable_progress_bar": False}
    assert train_main(["study", "--config", str(write_study(tmp_path, recipe="configs/tabular/digits_sequential.yaml", overrides=tiny, grid={"model.init_args.weight_decay": [0.0]}))]) == 0
    run = json.loads((tmp_path / "out/sweep/settings/weight_decay-0.0/setting.json").read_text())["run"]
    assert train_main(["study", "--config", str(write_study(tmp_path, recipe="recipe:tabular/digits_sequential", overrides=tiny, grid={"model.init_args.weight_decay": [0.0]}))]) == 0
    assert json.loads((tmp_path / "out/sweep/settings/weight_decay-0.0/setting.json").read_text())["run"] == run
