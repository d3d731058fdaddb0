"""Attacks declare what a farm must satisfy: on farms whose models derive from each other they are skipped, and no epsilon is claimed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.audit import run_audit
from mia_lightning.contract.experiment import FORMAT_VERSION, ExperimentDir
from mia_lightning.data.plan import DEPENDENT_KINDS, model_dependence
from mia_lightning.errors import MiaError
from mia_lightning.privacy.audit import EpsilonAuditor
from mia_lightning.report.terminal import epsilon_refusal_lines
from synthetic import write_synthetic_experiment


def _experiment(tmp_path, plan: dict):
    root = write_synthetic_experiment(tmp_path / "exp", n_models=8, n_samples=80)
    (root / "plan.json").write_text(json.dumps({"version": FORMAT_VERSION, **plan}))
    return root


def test_model_dependence_names_parents_and_dependent_kinds():
    assert model_dependence({}) is None
    assert model_dependence({"kind": "lira_half", "parents": {}}) is None
    assert "2 of its models continue training" in model_dependence({"kind": "lira_half", "parents": {"6": 0, "7": 1}})
    public_start = {"kind": "user_grouped", "parents": {"0": 4, "1": 4}, "info": {"reference_models": [4]}}
    assert model_dependence(public_start) is None  # fine-tuning a model pretrained on public data is not a dependence
    for kind in DEPENDENT_KINDS:
        assert model_dependence({"kind": kind}).startswith(f"plan kind {kind!r} derives models from each other")


def test_shadow_attacks_and_thresholds_are_skipped_on_a_farm_with_parents(tmp_path):
    root = _experiment(tmp_path, {"kind": "lira_half", "parents": {"4": 0, "5": 1, "6": 2, "7": 3}})
    data = AttackData.from_experiment(ExperimentDir(root))
    for name in ("lira", "rmia", "reference", "thresholds", "shokri"):
        reason = create_attack(name).unmet_requirement(data)
        assert reason.startswith("assumes independent training runs, but 4 of its models continue training"), name
    assert "independent" not in (create_attack("unlearning").unmet_requirement(data) or "")
    with pytest.raises(MiaError, match="no requested attack can run: lira assumes independent training runs"):
        run_audit(root, ["lira", "thresholds"], bootstrap=0)
    assert not (root / "attacks").exists()


def test_the_same_outputs_run_when_the_models_are_independent(tmp_path):
    root = _experiment(tmp_path, {"kind": "lira_half", "parents": {}})
    result = run_audit(root, ["lira", "thresholds"], bootstrap=0)
    assert {r["attack"] for r in result.records} >= {"lira_online", "loss"}
    assert not result.skipped


def test_epsilon_refuses_dependent_trials_with_one_line(tmp_path):
    root = _experiment(tmp_path, {"kind": "unlearning"})
    data = AttackData.from_experiment(ExperimentDir(root))
    auditor = EpsilonAuditor(data, "unlearning")
    bounds = auditor.family_bounds("thresholds", {})
    assert set(bounds) == set(create_attack("thresholds").outputs)
    for bound in bounds.values():
        assert bound["epsilon_lower_bound"] is None
        assert bound["reason"].startswith("no bound, the models are not independent trials: plan kind 'unlearning' derives models")
    # a bernoulli plan with parents gets no one-run bound either
    assert not EpsilonAuditor(AttackData.from_experiment(ExperimentDir(_experiment(tmp_path / "b", {"kind": "bernoulli", "parents": {"7": 0}}))), "bernoulli").one_run
    records = [{"attack": name, "empirical_epsilon": bound} for name, bound in bounds.items()]
    lines = epsilon_refusal_lines(records)
    assert len(lines) == 1 and lines[0].startswith("no epsilon bound for loss, confidence, entropy, modified_entropy: no bound, the models")
    assert "\n" not in lines[0]


def test_online_outputs_are_skipped_on_a_disjoint_shadow_farm(tmp_path):
    """Shadows never train on the target half, so LiRA / RMIA online have no IN fit: skipped with the reason, offline rows stay."""
    from mia_lightning.data.plan import PlanSpec, make_plan

    spec = PlanSpec("x", 240, 7, seed=0, kind="disjoint_shadows", options={"n_targets": 1})
    plan = make_plan(spec)
    root = tmp_path / "disjoint"
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, spec.n_samples)
    logits = rng.normal(0.0, 1.0, (spec.n_models, spec.n_samples, 1, 4))
    logits[:, np.arange(spec.n_samples), 0, labels] += 1.0 + 2.0 * plan.keep
    for m in range(spec.n_models):
        (root / "models" / f"{m:04d}").mkdir(parents=True)
        np.save(root / "models" / f"{m:04d}" / "logits.npy", logits[m].astype(np.float32))
    np.save(root / "keep.npy", plan.keep)
    np.save(root / "labels.npy", labels)
    np.save(root / "audit.npy", plan.audit)
    (root / "plan.json").write_text(json.dumps({**spec.to_json(), "info": plan.info, "parents": {}}))
    result = run_audit(root, ["lira", "rmia", "thresholds"], bootstrap=0)
    written = {r["attack"] for r in result.records}
    assert {"lira_offline", "rmia_offline", "loss"} <= written
    assert not written & {"lira_online", "lira_online_fixed", "rmia_online"}
    skipped = {s["attack"] for s in result.skipped}
    assert {"lira_online", "lira_online_fixed", "rmia_online"} <= skipped


def test_headline_roc_keeps_the_best_of_each_family_and_the_baselines_and_merges_coinciding_curves():
    from mia_lightning.metrics import evaluate_scores
    from mia_lightning.report.terminal import coinciding_groups, headline_outputs

    def record(name, family, tpr, auc):
        return {"attack": name, "family": family, "tpr_at_fpr": {"0.01": tpr}, "auc": auc}

    records = [record("lira_online", "lira", 0.10, 0.70), record("lira_offline", "lira", 0.12, 0.66), record("global_threshold", "lira", 0.02, 0.60),
               record("loss", "thresholds", 0.02, 0.60), record("entropy", "thresholds", 0.03, 0.58), record("rmia_online", "rmia", 0.09, 0.69)]
    assert headline_outputs(records) == ["lira_offline", "global_threshold", "loss", "entropy", "rmia_online"]
    rng = np.random.default_rng(0)
    members = rng.random((2, 50)) < 0.5
    loss = members + rng.normal(0.0, 1.0, members.shape)
    curves = {name: evaluate_scores(values, members)[1] for name, values in
              (("loss", loss), ("confidence", np.exp(loss)), ("other", rng.normal(0.0, 1.0, members.shape)))}
    grid = np.logspace(-2, 0, 50)
    assert coinciding_groups(curves, grid) == [["loss", "confidence"], ["other"]]  # a monotone map draws the same ROC


def test_a_recipe_planned_before_an_argument_existed_still_resumes_at_its_default():
    """The MLP's temperature (added later, default 1.0) is absent from older plan.json recipes; only a non-default value differs."""
    from mia_lightning.contract.identity import RECIPE_KEY, differing_keys, with_added_defaults

    model = "mia_lightning.models.tabular_mlp.TabularMLP"
    old = {RECIPE_KEY: {"model": {"class_path": model, "init_args": {"hidden": [64]}}}}
    same = {RECIPE_KEY: {"model": {"class_path": model, "init_args": {"hidden": [64], "temperature": 1.0}}}}
    hotter = {RECIPE_KEY: {"model": {"class_path": model, "init_args": {"hidden": [64], "temperature": 4.0}}}}
    assert differing_keys(with_added_defaults(old, same), same) == []
    assert differing_keys(with_added_defaults(old, hotter), hotter) == ["recipe.model.init_args.temperature: <absent> -> 4.0"]
    assert differing_keys(old, same) != []  # without the rule the old experiment would be refused


def test_a_done_json_naming_a_class_outside_the_project_is_not_resolved_for_the_added_defaults_rule():
    """done.json is data: its class path is resolved only inside this project's packages, so the recipes stay different."""
    from mia_lightning.contract.identity import RECIPE_KEY, differing_keys, with_added_defaults

    outside = "lightning.pytorch.callbacks.EarlyStopping"  # a real Lightning class with a default patience=3
    planned = {RECIPE_KEY: {"model": {"class_path": outside, "init_args": {"monitor": "val_loss"}}}}
    recorded = {RECIPE_KEY: {"model": {"class_path": outside, "init_args": {"monitor": "val_loss", "patience": 3}}}}
    assert differing_keys(with_added_defaults(planned, recorded), recorded) == ["recipe.model.init_args.patience: <absent> -> 3"]
    assert differing_keys(with_added_defaults(planned, recorded, current_from_file=False), recorded) == []  # the user's own recipe


# ------------------------------------------------------------------------------------------ bad farm input: one line, nothing written

QUICKSTART = "configs/tabular/digits_quickstart.yaml"


def _farm_args(root, name: str, *extra: str) -> list[str]:
    """A tiny quickstart farm (4 one-epoch models) under ``root/name``."""
    return ["farm", "--config", QUICKSTART, "--plan.n_models", "4", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
            "--experiment.root", str(root), "--experiment.name", name, *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra,phrase", [
    (["--trainer.max_epochs", "-1"], "--trainer.max_epochs -1: without trainer.max_steps the models never stop"),
    (["--farm.shard", "3/2"], "shard 3/2: need 0 <= i < n"),
    (["--farm.shard", "x"], "--farm.shard 'x': expected i/n"),
    (["--farm.shard", "0/0"], "shard 0/0: need 0 <= i < n"),
    (["--plan.seed", "-1"], "--plan.seed -1: must be a non-negative integer"),
    (["--data.init_args.batch_size", "0"], "--data.init_args.batch_size 0: must be a positive integer"),
    (["--data.init_args.batch_size", "-5", "--farm.engine", "sequential"], "--data.init_args.batch_size -5: must be a positive integer"),
    (["--plan.kind", "bernoulli", "--plan.options", '{"p_typo": 0.3}'], "--plan.options.p_typo: unknown option of plan kind bernoulli; it takes no options"),
    (["--plan.options", '{"p": 0.3}'], "--plan.options.p: unknown option of plan kind lira_half"),
    (["--audit.attacks", "[lirra]", "--audit_after"], "audit.attacks 'lirra': unknown attack"),
    (["--audit.n_targets", "0", "--audit_after"], "audit.n_targets 0: must be between 1 and the number of models"),
])
def test_bad_farm_input_is_one_line_before_anything_is_written(tmp_path, capsys, extra, phrase):
    from mia_lightning.cli import train_main

    assert train_main(_farm_args(tmp_path, "bad", *extra)) == 2
    assert phrase in _one_line_error(capsys)
    assert not (tmp_path / "bad").exists()


def test_a_farm_refused_for_max_epochs_minus_one_runs_once_corrected(tmp_path, capsys):
    from mia_lightning.cli import train_main

    assert train_main(_farm_args(tmp_path, "exp", "--trainer.max_epochs", "-1")) == 2
    assert train_main(_farm_args(tmp_path, "exp")) == 0
    assert json.loads((tmp_path / "exp/plan.json").read_text())["recipe"]["trainer"]["max_epochs"] == 1


def test_the_farm_names_its_experiment_in_two_parts(tmp_path, capsys):
    from mia_lightning.cli import train_main

    assert train_main(["farm", "--config", QUICKSTART, "--experiment", str(tmp_path / "exp")]) == 2
    assert "use --experiment.root DIR --experiment.name NAME" in _one_line_error(capsys)


@pytest.mark.parametrize("claim", ["[1]", '{"host": "h", "pid": "abc"}'], ids=["not-an-object", "pid-not-an-integer"])
def test_a_claim_that_is_not_a_json_object_is_stale(tmp_path, claim):
    from mia_lightning.farm.locks import CLAIM_FILE, claim_state, try_claim

    (tmp_path / CLAIM_FILE).write_text(claim)
    assert claim_state(tmp_path, 120.0) == "stale"
    assert try_claim(tmp_path, 120.0)  # taken over like an unreadable claim


@pytest.fixture(scope="module")
def finished_farm(tmp_path_factory):
    """A finished tiny farm to copy and damage."""
    from mia_lightning.cli import train_main

    root = tmp_path_factory.mktemp("farm")
    assert train_main(_farm_args(root, "done")) == 0
    return root / "done"


def _damage_plan_version(experiment):
    plan = json.loads((experiment / "plan.json").read_text())
    (experiment / "plan.json").write_text(json.dumps({**plan, "version": FORMAT_VERSION - 1}))


@pytest.mark.parametrize("damage,extra,phrase", [
    (lambda e: (e / "models/0001/done.json").write_text("{"), [], "models/0001/done.json: not valid JSON"),
    (lambda e: (e / "models/0001/done.json").write_text("[1]"), [], "models/0001/done.json: not a JSON object"),
    (_damage_plan_version, [], f"planned by layout version {FORMAT_VERSION - 1}"),
    (lambda e: None, ["--model.init_args.lr", "0.01"], "planned with a different recipe (recipe.model.init_args.lr: 0.001 -> 0.01)"),
])
def test_status_refuses_what_the_farm_refuses(finished_farm, tmp_path, capsys, damage, extra, phrase):
    import shutil

    from mia_lightning.cli import train_main

    experiment = tmp_path / "exp"
    shutil.copytree(finished_farm, experiment)
    damage(experiment)
    assert train_main(_farm_args(tmp_path, "exp", *extra)) == 2
    assert phrase in _one_line_error(capsys)
    assert train_main(_farm_args(tmp_path, "exp", "--status", *extra)) == 2
    assert phrase in _one_line_error(capsys)


def test_status_and_resume_take_a_claim_that_is_not_an_object_as_stale(finished_farm, tmp_path, capsys):
    import shutil

    from mia_lightning.cli import train_main

    experiment = tmp_path / "exp"
    shutil.copytree(finished_farm, experiment)
    (experiment / "models/0003/done.json").unlink()
    (experiment / "models/0003/claim.json").write_text("[1]")
    assert train_main(_farm_args(tmp_path, "exp", "--status")) == 0
    assert "stale" in capsys.readouterr().out
    assert train_main(_farm_args(tmp_path, "exp")) == 0
    assert (experiment / "models/0003/done.json").is_file()
