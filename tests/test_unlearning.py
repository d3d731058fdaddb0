"""Unlearning workload without training: DegCount/DegRate, pair features, defences, privleak, plans and the unlearning.json contract."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import roc_auc_score

from mia_lightning.data.plan import PlanSpec
from mia_lightning.errors import MiaError
from mia_lightning.unlearning.contract import parse_unlearning
from mia_lightning.unlearning.features import FEATURES, aggregate, defend, pair_features
from mia_lightning.unlearning.contract import Chain, Unlearning
from mia_lightning.unlearning.metrics import by_unit, degradation, privleak, target_units, unit_metrics
from mia_lightning.unlearning.plans import make_ulira_plan, make_unlearning_plan


def test_degcount_and_degrate_hand_computed() -> None:
    # confidence in the true status: ours (0.9, 0.4, 1-0.2, 1-0.7), classic (0.6, 0.5, 1-0.3, 1-0.7); the NaN pair is not scored
    ours = np.array([0.9, 0.4, 0.2, 0.7, np.nan])
    classic = np.array([0.6, 0.5, 0.3, 0.7, 0.5])
    member = np.array([True, True, False, False, True])
    count, rate = degradation(ours, classic, member)
    assert count == pytest.approx(2 / 4)  # gains +0.3, -0.1, +0.1, 0.0: a tie is not an improvement
    assert rate == pytest.approx((0.3 - 0.1 + 0.1 + 0.0) / 4)


def test_degradation_refuses_scores_that_are_not_probabilities() -> None:
    with pytest.raises(MiaError, match="probabilities"):
        degradation(np.array([1.5, 0.2]), np.array([0.5, 0.5]), np.array([True, False]))


def test_privleak_hand_computed() -> None:
    assert privleak(0.8, 0.6) == pytest.approx(((1 - 0.8) - (1 - 0.6)) / (1 - 0.6))
    assert privleak(0.6, 0.6) == 0.0


def _straightforward_unit_bootstrap(scores: np.ndarray, members: np.ndarray, replicates: int, seed: int, level: float) -> tuple[list, list]:
    """AUC and TPR@level intervals of [U, n] scores by brute force: per replicate Poisson weights u[unit] v[sample]
    (drawn in the shared bootstrap's order), the weighted Mann-Whitney AUC over every (member, non-member) pair
    and the largest weighted TPR over thresholds whose weighted FPR <= level; point +- 1.96 sd, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    unit, sample = np.nonzero(np.isfinite(scores))
    s, m = scores[unit, sample], members[unit, sample]

    def auc_and_tpr(w: np.ndarray) -> tuple[float, float]:
        wp, wn = w * m, w * ~m
        greater = (s[:, None] > s[None, :]) + 0.5 * (s[:, None] == s[None, :])
        auc = float(wp @ greater @ wn / (wp.sum() * wn.sum()))
        tpr = max(wp[s >= thr].sum() / wp.sum() for thr in np.append(s, np.inf) if wn[s >= thr].sum() / wn.sum() <= level)
        return auc, float(tpr)

    point = auc_and_tpr(np.ones(s.size))
    draws = []
    for _ in range(replicates):
        u, v = rng.poisson(1.0, scores.shape[0]), rng.poisson(1.0, scores.shape[1])
        w = (u[unit] * v[sample]).astype(np.float64)
        if (w * m).sum() > 0 and (w * ~m).sum() > 0:
            draws.append(auc_and_tpr(w))
    spread = 1.959964 * np.std(np.asarray(draws), axis=0, ddof=1)
    return [[max(0.0, p - d), min(1.0, p + d)] for p, d in zip(point, spread)]


def test_unit_intervals_equal_a_straightforward_bootstrap_over_target_originals_and_samples() -> None:
    # two target originals (models 0 and 1) with their unlearned versions (2-3 and 4), a shadow chain (5 -> 6)
    chains = [Chain("scratch", "target", ((0,), (2,)), ()), Chain("scratch", "target", ((0,), (3,)), ()),
              Chain("scratch", "target", ((1,), (4,)), ()), Chain("scratch", "shadow", ((5,), (6,)), ())]
    units = target_units(Unlearning("scenarios", "online", "added", ("scratch",), "mean", tuple(chains), {}))
    assert units == {0: 0, 2: 0, 3: 0, 1: 1, 4: 1}
    rng = np.random.default_rng(3)
    rows = [2, 3, 4, 7]  # the rows of an "added" evaluation: updated models; model 7 is in no target chain (its own unit)
    members = rng.random((4, 30)) < 0.5
    scores = np.where(rng.random((4, 30)) < 0.3, np.round(rng.normal(members * 0.8, 1.0), 1), np.nan)  # ties count half
    scores[1, np.isfinite(scores[0])] = np.nan  # rows 2 and 3 share original 0: each sample scored once per original
    grouped, truth = by_unit(scores, members, rows, units)
    assert grouped.shape == (3, 30) and np.array_equal(np.isfinite(grouped[0]), np.isfinite(scores[0]) | np.isfinite(scores[1]))
    measured = unit_metrics(scores, members, rows, units, replicates=200, seed=5)
    finite = np.isfinite(scores)
    assert measured["auc"] == pytest.approx(roc_auc_score(members[finite], scores[finite])) and measured["n_units"] == 3
    tested = np.isfinite(grouped).any(axis=0)  # the bootstrap draws sample weights for tested samples only
    auc_ci, tpr_ci = _straightforward_unit_bootstrap(grouped[:, tested], truth[:, tested], 200, 5, 0.1)
    np.testing.assert_allclose(measured["auc_ci_bootstrap"], auc_ci, atol=1e-9)
    np.testing.assert_allclose(measured["tpr_at_fpr_ci_bootstrap"]["0.1"], tpr_ci, atol=1e-9)
    scores[1, np.flatnonzero(finite[0])[0]] = 0.0  # a sample scored twice for original 0
    with pytest.raises(MiaError, match="scored twice for the target original of model 3"):
        by_unit(scores, members, rows, units)


def _loop_features(original: np.ndarray, unlearned: np.ndarray, kind: str) -> np.ndarray:
    rows = []
    for po, pu in zip(original, unlearned):
        order = sorted(range(len(po)), key=lambda c: -po[c])  # both ordered by the original posterior, descending
        so, su = [po[c] for c in order], [pu[c] for c in order]
        if kind == "direct_diff":
            rows.append([a - b for a, b in zip(po, pu)])
        elif kind == "sorted_diff":
            rows.append([a - b for a, b in zip(so, su)])
        elif kind == "l2_distance":
            rows.append([sum((a - b) ** 2 for a, b in zip(po, pu)) ** 0.5])
        elif kind == "direct_concat":
            rows.append(list(po) + list(pu))
        else:
            rows.append(so + su)
    return np.asarray(rows)


@pytest.mark.parametrize("kind", FEATURES)
def test_pair_features_match_a_straightforward_implementation(kind: str) -> None:
    rng = np.random.default_rng(1)
    original, unlearned = softmax(rng.normal(size=(7, 4)), axis=1), softmax(rng.normal(size=(7, 4)), axis=1)
    np.testing.assert_allclose(pair_features(original, unlearned, kind), _loop_features(original, unlearned, kind), rtol=0, atol=1e-12)


def test_defences_and_aggregation_hand_computed() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.25, 0.5, 0.25]])
    np.testing.assert_array_equal(defend(p, "label_only"), [[1, 0, 0], [0, 1, 0]])
    tempered = p ** 0.5 / (p ** 0.5).sum(axis=1, keepdims=True)  # T = 2: p^(1/T), renormalised
    np.testing.assert_allclose(defend(p, "temperature", temperature=2.0), tempered, atol=1e-12)
    np.testing.assert_allclose(defend(p, "rounding", decimals=1), [[0.7, 0.2, 0.1], [0.2, 0.5, 0.2]])
    shards = np.array([[[0.6, 0.4]], [[0.3, 0.7]], [[0.9, 0.1]]])  # 3 shard models, 1 sample
    np.testing.assert_allclose(aggregate(shards, "mean"), [[0.6, 0.4]])
    np.testing.assert_allclose(aggregate(shards, "vote"), [[2 / 3, 1 / 3]])


def _spec(n_models: int, n_samples: int = 400, **options) -> PlanSpec:
    return PlanSpec("toy", n_samples, n_models, 0, kind="unlearning", options=options)


@pytest.mark.parametrize("scenario, k, n_models", [("single", 1, 2 * 2 * 4), ("group", 3, 2 * 2 * 4), ("multi_version", 1, 2 * 2 * 4),
                                                   ("online", 2, 2 * 2 * 4), ("remaining", 1, 2 * 2 * 4)])
def test_scenario_plans_delete_add_and_keep_what_unlearning_json_says(scenario: str, k: int, n_models: int) -> None:
    plan = make_unlearning_plan(_spec(n_models, scenario=scenario, k=k, originals=2, updates=3, train_size=60))
    unlearning = parse_unlearning(plan.files["unlearning.json"], plan.keep)
    assert len(unlearning.chains) == (4 if scenario == "multi_version" else 12)
    for chain in unlearning.chains:
        rows = [plan.keep[version[0]] for version in chain.versions]
        for step, before, after in zip(chain.steps, rows, rows[1:]):
            changed = np.flatnonzero(before != after)
            np.testing.assert_array_equal(changed, np.sort(np.concatenate([step.deleted, step.added])))
            assert (step.added.size if scenario == "online" else step.deleted.size) == k
            assert before[step.remaining].all() and after[step.remaining].all()
            assert not np.logical_or.reduce(rows)[step.negatives].any()
    assert plan.info["unlearning"]["per_update"] == k


def test_sisa_plan_retrains_only_the_affected_shard_from_the_affected_slice() -> None:
    plan = make_unlearning_plan(_spec(2 * 2 * (3 + 4), method="sisa", scenario="multi_version", shards=3, slices=4, originals=2, updates=4, train_size=60))
    unlearning = parse_unlearning(plan.files["unlearning.json"], plan.keep)
    training = unlearning.training
    for chain in unlearning.chains:
        for step, before, after in zip(chain.steps, chain.versions, chain.versions[1:]):
            retrained = [(old, new) for old, new in zip(before, after) if old != new]
            assert len(retrained) == 1  # one deleted sample: only its shard changes
            old, new = retrained[0]
            assert plan.parents[new] == old
            old_slices = [np.asarray(s) for s in training[old]["slices"]]
            affected = next(i for i, s in enumerate(old_slices) if np.isin(step.deleted, s).any())
            assert training[new]["resume_after"] == affected  # slices before the affected one are reused from the checkpoint
            for i, (was, now) in enumerate(zip(old_slices, training[new]["slices"])):
                np.testing.assert_array_equal(now, was[~np.isin(was, step.deleted)] if i == affected else was)


def test_ulira_plan_pairs_are_complementary_and_each_candidate_is_forgotten_by_half() -> None:
    plan = make_ulira_plan(PlanSpec("toy", 300, 18, 0, kind="unlearning_ulira", options={"candidates": 40, "inexact": "gradient_ascent"}))
    originals = plan.info["target_models"]
    candidates = np.zeros(300, dtype=bool)
    unlearning = parse_unlearning(plan.files["unlearning.json"], plan.keep)
    for chain in unlearning.chains:
        candidates[chain.steps[0].deleted] = True
    assert candidates.sum() == 40
    seen = plan.keep[originals][:, candidates]
    np.testing.assert_array_equal(seen[0::2], ~seen[1::2])
    assert (seen.sum(axis=0) == 3).all()
    exact, inexact = plan.info["unlearning"]["exact_models"], plan.info["unlearning"]["inexact_models"]
    np.testing.assert_array_equal(plan.keep[exact], plan.keep[originals] & ~candidates)
    assert all(unlearning.training[m]["method"] == "gradient_ascent" and plan.parents[m] == o for m, o in zip(inexact, originals))


@pytest.mark.parametrize("options, phrase", [
    ({"method": "sisa", "shards": 500, "train_size": 60}, "--plan.options.shards 500: more shards than training samples"),
    ({"scenario": "nope"}, "--plan.options.scenario 'nope'"),
    ({"updates": 40, "train_size": 60}, "--plan.options.updates 40"),
    ({"colour": 1}, "--plan.options.colour: unknown option"),
])
def test_bad_plan_options_are_one_line_errors(options: dict, phrase: str) -> None:
    with pytest.raises(MiaError, match=phrase.replace("(", r"\(")) as err:
        make_unlearning_plan(_spec(44, originals=2, **options))
    assert "\n" not in str(err.value)


def test_contract_refuses_deleting_a_sample_outside_the_training_set_and_missing_models() -> None:
    plan = make_unlearning_plan(_spec(16, originals=2, updates=3, train_size=60))
    payload = plan.files["unlearning.json"]
    outside = int(np.flatnonzero(~plan.keep[payload["chains"][0]["versions"][0][0]])[0])
    payload["chains"][0]["steps"][0]["deleted"] = [outside]
    with pytest.raises(MiaError, match=f"deletes sample {outside} which is not in the training set"):
        parse_unlearning(payload, plan.keep)
    payload = make_unlearning_plan(_spec(16, originals=2, updates=3, train_size=60)).files["unlearning.json"]
    payload["chains"][1]["versions"][1] = [99]
    with pytest.raises(MiaError, match="names model 99, but the experiment has models 0..15"):
        parse_unlearning(payload, plan.keep)


def test_adult_raw_files_become_a_pool_with_missing_rows_dropped_or_imputed(tmp_path, monkeypatch) -> None:
    from mia_lightning.unlearning.adult import AdultDataModule

    monkeypatch.setenv("MIA_LIGHTNING_CACHE", str(tmp_path / "cache"))
    row = "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, {country}, {label}"
    (tmp_path / "adult.data").write_text("\n".join([row.format(country="United-States", label="<=50K"), row.format(country="?", label=">50K"),
                                                    row.format(country="Cuba", label=">50K"), ""]))
    (tmp_path / "adult.test").write_text("|1x3 Cross validator\n" + row.format(country="Cuba", label="<=50K.") + "\n")
    dropped = AdultDataModule(source=str(tmp_path / "adult.data"), split="all")
    np.testing.assert_array_equal(dropped.pool_labels(), [0, 1, 0])  # the '?' row dropped; the test file's '<=50K.' is '<=50K'
    assert AdultDataModule(source=str(tmp_path / "adult.data"), split="train", missing="mean").pool_labels().size == 3
    with pytest.raises(MiaError, match="no .*adult.test"):
        (tmp_path / "adult.test").unlink()
        AdultDataModule(source=str(tmp_path / "adult.data"), split="test")


@pytest.fixture
def audited(tmp_path):
    """A synthetic experiment with one published thresholds run: (run folder, its loss record, keep)."""
    from synthetic import write_synthetic_experiment

    from mia_lightning.audit import run_audit

    root = write_synthetic_experiment(tmp_path / "exp", n_models=6, n_samples=30, seed=4)
    result = run_audit(root, ["thresholds"], n_targets=3, bootstrap=0)
    record = next(r for r in result.records if r["attack"] == "loss")
    return result.folder, record, np.load(root / "keep.npy").astype(bool)


@pytest.mark.parametrize("scores, fragment", [
    (np.zeros((2, 30)), "float64 array of shape (2, 30), expected floats of shape (3, 30)"),
    (np.full((3, 30), "x"), "<U1 array of shape (3, 30), expected floats of shape (3, 30)"),
])
def test_unlearning_report_refuses_scores_of_the_wrong_shape_or_type(audited, scores, fragment) -> None:
    """A damaged scores.npy under the run: a one-line error naming it, not an IndexError or TypeError inside the metrics."""
    from mia_lightning.unlearning.report import _metrics

    folder, record, keep = audited
    np.save(folder / "loss" / "scores.npy", scores)
    with pytest.raises(MiaError, match=re.escape(f"{folder / 'loss' / 'scores.npy'}: {fragment}")):
        _metrics(folder, record, keep, {}, "re-run")


def test_unlearning_report_with_a_folder_as_markdown_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    """--markdown naming a folder is refused before any experiment's report files are written."""
    from mia_lightning.unlearning import report

    root = tmp_path / "exp"
    root.mkdir()
    summary = {"experiment": str(root), "scenario": "s", "method": "m", "evaluate": "e", "utility": None, "unlearning_attack": [], "ulira": None}
    monkeypatch.setattr(report, "summarise", lambda path: summary)
    with pytest.raises(MiaError, match=re.escape(f"{tmp_path}: is a folder, not a report file")):
        report.main(["--experiment", str(root), "--markdown", str(tmp_path)])
    assert list(root.iterdir()) == []
