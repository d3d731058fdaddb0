"""Stage 4: run attacks on an experiment directory as one run (see ``runs.py``) and return its results.json records.

Names and parameters are checked and the experiment is validated before anything is written; each
attack output is scored, measured and written into the staged run one at a time (so memory holds
one output's scores, not all of them), and the run is published only when every step succeeded.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mia_lightning.version import __version__
from mia_lightning.attacks import ATTACKS, AttackData, create_attack
from mia_lightning.attacks.base import unknown_attack_hint
from mia_lightning.attacks.base import check_params
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.identity import check_model_identities
from mia_lightning.contract.io import save_json_atomic, save_npy_atomic
from mia_lightning.contract.runs import FEW_SHADOW_FILE, UTILITY_FILE, StagedRun, prune_runs
from mia_lightning.logs import quiet_lightning, timed
from mia_lightning.metrics import BOOTSTRAP_REPLICATES, RocCurve, check_bootstrap, evaluate_scores



def resolve_targets(n_models: int, targets: Sequence[int] | None, n_targets: int | None, default: Sequence[int] | None = None,
                    n_targets_option: str = "--n_targets") -> np.ndarray:
    """Target model ids: explicit ``targets``, else the first ``n_targets``, else the plan's targets, else every model.

    ``n_targets_option`` names the setting in errors (a farm recipe's ``audit.n_targets``).
    """
    if targets is not None and len(targets):
        ids = np.asarray(targets, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= n_models)]
        if bad.size:
            raise MiaError(f"--targets {bad.tolist()}: out of range, the experiment has models 0..{n_models - 1}")
        if len(set(ids.tolist())) != ids.size:
            raise MiaError("--targets: each target id may appear once")
        return ids
    if n_targets is None and default:
        return np.asarray(default, dtype=np.int64)
    count = n_models if n_targets is None else n_targets
    if not 1 <= count <= n_models:
        raise MiaError(f"{n_targets_option} {count}: must be between 1 and the number of models ({n_models})")
    return np.arange(count, dtype=np.int64)


def integer_option(option: str, value: Any) -> None:
    """Refuse a value that is not an integer (a string, 2.5, a bool) with the option's name: the Python API passes options unparsed."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MiaError(f"--{option} {value!r}: expected int")


def check_request(targets: Any, n_targets: Any, bootstrap: Any, keep_runs: Any) -> None:
    """Refuse, before any work, target, bootstrap and pruning options of the wrong type or range, in the command line's words."""
    if targets is not None:
        if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
            raise MiaError(f"--targets {targets!r}: expected a list of model ids (int)")
        for target in targets:
            integer_option("targets", target)
    for option, value in (("n_targets", n_targets), ("keep_runs", keep_runs)):
        if value is not None:
            integer_option(option, value)
    if targets is not None and len(targets) and n_targets is not None:
        raise MiaError(f"--targets and --n_targets {n_targets}: give one of them (--targets names the target models, --n_targets takes models 0..K-1)")
    integer_option("bootstrap", bootstrap)
    check_bootstrap(bootstrap)
    if keep_runs is not None and keep_runs < 0:
        raise MiaError(f"--keep_runs {keep_runs}: must be at least 1 (or 0 to keep every run)")


def resolve_attacks(attacks: Sequence[str], params: Any, option: str = "--attack") -> tuple[list[str], dict[str, dict]]:
    """Attack families to run (``all`` = every registered one) and their checked parameters; typos are errors naming ``option``."""
    names = sorted(ATTACKS) if list(attacks) == ["all"] else list(dict.fromkeys(attacks))
    if not names:
        raise MiaError(f"{option}: no attack named; name one or more of all, {', '.join(sorted(ATTACKS))}")
    unknown = [name for name in names if name not in ATTACKS]
    if unknown:
        raise MiaError(f"{option} {unknown[0]!r}: {unknown_attack_hint(unknown[0], ('all',))}")
    if not isinstance(params, dict):
        raise MiaError(f"--params: expected a JSON object keyed by attack, e.g. '{{\"lira\": {{\"n_shadows\": 8}}}}', got {params!r}")
    stray = [key for key in params if key not in names]
    if stray:
        raise MiaError(f"--params {stray[0]!r}: not an attack of this run ({', '.join(names)}); check the spelling")
    return names, {name: check_params(name, params.get(name, {})) for name in names}


def result_record(name: str, family: str, params: dict, targets: np.ndarray, scores: np.ndarray, members: np.ndarray, bootstrap: int,
                  groups: np.ndarray | None = None, audited: np.ndarray | None = None) -> tuple[dict, RocCurve]:
    """The results.json payload of one attack output (pairs outside the audit are NaN in ``scores``) and its ROC curve.

    ``n_unscored`` counts the audited pairs (``audited``, default all) the attack left without a score: every
    non-finite value (NaN, or an infinity), since the metrics leave exactly those out.
    With ``groups`` (the experiment's users) the bootstrap resamples users, since a user's samples are correlated.
    """
    missing = ~np.isfinite(scores)
    n_missing = int((missing & audited).sum() if audited is not None else missing.sum())
    metrics, curve = evaluate_scores(scores, members, bootstrap=bootstrap, groups=groups)
    record = {"attack": name, "family": family, "params": params, "targets": targets.tolist(), "n_unscored": n_missing, **metrics}
    return record, curve


@dataclass(frozen=True)
class Decisions:
    """How thresholded decisions are reported: user-level aggregation and the population FPR budget."""

    user_reduce: str = "mean"
    fpr_budget: float = 0.1
    threshold_rule: str = "budget"

    def __post_init__(self) -> None:
        from mia_lightning.grouping import REDUCTIONS, THRESHOLD_RULES

        if self.user_reduce not in REDUCTIONS:
            raise MiaError(f"--user_reduce {self.user_reduce!r}: choose one of {', '.join(REDUCTIONS)}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise MiaError(f"--threshold_rule {self.threshold_rule!r}: choose one of {', '.join(THRESHOLD_RULES)}")
        if isinstance(self.fpr_budget, bool) or not isinstance(self.fpr_budget, (int, float)):
            raise MiaError(f"--fpr_budget {self.fpr_budget!r}: expected float")
        if not 0.0 <= self.fpr_budget < 1.0:
            raise MiaError(f"--fpr_budget {self.fpr_budget}: must be in [0, 1)")


def rerun_options(target_ids: np.ndarray, default_ids: np.ndarray, params: dict[str, dict[str, Any]], bootstrap: int,
                  decisions: Decisions) -> dict[str, Any]:
    """The attack.py options besides ``--experiment`` / ``--attack`` that differ from their defaults in this run, for run.json.

    ``contract.runs.rerun_fix`` writes them into the command a damaged run file asks for, so following
    the fix reproduces the run (its targets, parameters, bootstrap and decisions), not a default one.
    """
    options: dict[str, Any] = {}
    if not np.array_equal(target_ids, default_ids):
        first = np.array_equal(target_ids, np.arange(target_ids.size))
        options |= {"n_targets": target_ids.size} if first else {"targets": target_ids.tolist()}
    chosen = {family: values for family, values in params.items() if values}
    if chosen:
        options["params"] = chosen
    if bootstrap != BOOTSTRAP_REPLICATES:
        options["bootstrap"] = bootstrap
    defaults = vars(Decisions())
    return options | {name: value for name, value in vars(decisions).items() if value != defaults[name]}


def decision_metrics(scores: np.ndarray, audited: np.ndarray, members: np.ndarray, data: AttackData, targets: np.ndarray, bootstrap: int,
                     decisions: Decisions) -> dict:
    """User-level metrics (when ``groups.npy`` exists) and precision/recall at a population-chosen threshold (when a population exists).

    ``scores`` are the run's [T, n] scores and ``audited`` its audited pairs; the population (samples
    or users no model trained on) fixes each target's threshold so that at most ``fpr_budget`` of it is flagged.
    User-level metrics need every user's samples to share their membership (a user-grouped plan);
    otherwise they are skipped with the reason.
    """
    from mia_lightning.grouping import precision_recall_at_fpr, user_level

    def at_budget(scores: np.ndarray, members: np.ndarray, population: np.ndarray) -> dict:
        try:
            return precision_recall_at_fpr(scores, members, population, decisions.fpr_budget, decisions.threshold_rule)
        except MiaError as err:  # e.g. online LiRA cannot score samples no model trained on
            return {"skipped": str(err)}

    extra: dict = {}
    in_population = ~data.audit_mask
    audited_scores = np.where(audited, scores, np.nan)
    if in_population.any():
        extra["precision_recall"] = at_budget(audited_scores, members, scores[:, in_population])
    if data.groups is None:
        return extra
    try:
        user_scores, user_members, users = user_level(audited_scores, members, data.groups, decisions.user_reduce, targets)
    except MiaError as err:
        extra["user_level"] = {"skipped": str(err)}
        return extra
    metrics, _ = evaluate_scores(user_scores, user_members, bootstrap=bootstrap, unit="users")
    level = {"reduce": decisions.user_reduce, "n_users": int(np.isfinite(user_scores).any(axis=0).sum()), **metrics}
    if in_population.any():
        population_scores = user_level(np.where(in_population, scores, np.nan), members, data.groups, decisions.user_reduce, targets)[0]
        population_users = np.isfinite(population_scores).any(axis=0) & ~np.isfinite(user_scores).any(axis=0)
        if population_users.any():
            level["precision_recall"] = at_budget(user_scores, user_members, population_scores[:, population_users])
    extra["user_level"] = level
    return extra


@dataclass
class AuditResult:
    """What one attack run produced: its records (results.json payloads), folder, the attacks it skipped and its run.json."""

    records: list[dict]
    folder: Path
    run_id: str
    skipped: list[dict] = field(default_factory=list)
    run: dict = field(default_factory=dict)


def run_audit(
    experiment_dir: Path,
    attacks: Sequence[str],
    targets: Sequence[int] | None = None,
    n_targets: int | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    bootstrap: int = BOOTSTRAP_REPLICATES,
    few_shadow: bool = False,
    keep_runs: int | None = None,
    decisions: Decisions = Decisions(),
    logger: Any = None,
) -> AuditResult:
    """Score every requested attack and publish the outputs as one run; returns the records.

    With several attacks, one that cannot run on this experiment (e.g. it needs logits, or more
    models) is skipped with its reason; the run fails only when nothing could be scored. ``logger``
    (``csv`` / ``tensorboard`` / ``mlflow`` or a Lightning logger) receives the published run's
    metrics and ROC figure (``report/loggers.py``).
    """
    from mia_lightning.report.loggers import check_logger, check_logger_folder, log_audit, make_logger

    experiment = ExperimentDir(Path(experiment_dir))
    experiment.check_exists()
    check_request(targets, n_targets, bootstrap, keep_runs)
    names, checked = resolve_attacks(attacks, {} if params is None else params)  # [] or "" is a mistake, not 'no parameters'
    check_logger(logger)
    check_logger_folder(logger, experiment.root)
    created = [(family, create_attack(family, **checked[family])) for family in names]  # parameter values are checked here
    quiet_lightning()  # torch / Lightning load from here on, once the request is valid
    from mia_lightning.attacks.module import score_targets
    from mia_lightning.privacy.audit import EpsilonAuditor
    from mia_lightning.report.terminal import ALL_CURVES_FIGURE, headline_outputs, plot_roc
    from mia_lightning.utility import utility_report

    with timed("load and validate outputs"):
        data = AttackData.from_experiment(experiment)
        check_model_identities(experiment)  # models merged in from a farm with another recipe are named, not pooled
    target_ids = resolve_targets(data.n_models, targets, n_targets, experiment.default_targets())
    members = data.keep[target_ids]
    audited = data.audit_pairs(target_ids)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    runnable, skipped = [], []
    for family, attack in created:
        problem = attack.unmet_requirement(data)
        if problem:
            skipped.append({"attack": family, "reason": problem})
        else:
            runnable.append((family, attack))
    if not runnable:
        raise MiaError(f"{experiment.root}: no requested attack can run: " + "; ".join(f"{s['attack']} {s['reason']}" for s in skipped))
    stage = StagedRun(experiment)
    default_ids = resolve_targets(data.n_models, None, None, experiment.default_targets())
    run_meta = {"started": started, "targets": target_ids.tolist(), "attacks": names, "params": checked, "version": __version__,
                "decisions": vars(decisions), "options": rerun_options(target_ids, default_ids, checked, bootstrap, decisions)}
    try:
        records, curves = [], {}
        epsilon = EpsilonAuditor(data, experiment.plan.get("kind"))
        for family, attack in runnable:
            try:
                if not attack.shadow_free:  # its bounds need their own scoring: done first, so both score sets are never held together
                    with timed(f"epsilon {family}"):
                        bounds = epsilon.family_bounds(family, checked[family])
                with timed(f"score {family}"):
                    scored = score_targets(attack, data, target_ids)
                if attack.shadow_free:
                    with timed(f"epsilon {family}"):
                        bounds = epsilon.family_bounds(family, checked[family], scored, target_ids)
            except MiaError as err:
                if len(runnable) == 1:
                    raise
                skipped.append({"attack": family, "reason": str(err)})
                continue
            for name in list(scored):
                scores = scored.pop(name)  # one output's scores in memory at a time
                pair_scores = scores if audited.all() else np.where(audited, scores, np.nan)
                if not np.isfinite(pair_scores).any():  # e.g. online LiRA when no shadow trained on an audited sample
                    skipped.append({"attack": name, "reason": "scored no audited pair (it needs shadows that trained on the audited samples)"})
                    continue
                try:
                    with timed(f"metrics {name}"):
                        record, curve = result_record(name, family, attack.params(), target_ids, pair_scores, members, bootstrap, data.groups, audited)
                except ValueError as err:
                    if len(runnable) == 1:
                        raise MiaError(f"{experiment.root}: attack {name}: {err}; choose targets with both members and non-members") from None
                    skipped.append({"attack": name, "reason": f"{err} (too few models for it)"})
                    continue
                record["empirical_epsilon"] = bounds[name] if bounds is not None else epsilon.run_bound(pair_scores, members)
                record |= decision_metrics(scores, audited, members, data, target_ids, bootstrap, decisions)
                record |= attack.decision_record(name, pair_scores, members, bootstrap, data.groups)
                record["run"] = {"id": stage.run_id, "time": started, **{k: run_meta[k] for k in ("targets", "attacks", "params", "version")}}
                with timed(f"write and plot {name}"):
                    save_npy_atomic(stage.path(name, "scores.npy"), scores)
                    save_json_atomic(stage.path(name, "results.json"), record)
                    plot_roc({name: curve}, stage.path(name, "roc.png"), f"{name} ({experiment.root.name})", {name: record["auc"]})
                records.append(record)
                curves[name] = curve
        if not records:
            raise MiaError(f"{experiment.root}: no attack could score: " + "; ".join(f"{s['attack']}: {s['reason']}" for s in skipped))
        auc = {record["attack"]: record["auc"] for record in records}
        headline = headline_outputs(records)
        plot_roc({name: curves[name] for name in headline}, stage.path("roc.png"), f"membership inference on {experiment.root.name}", auc)
        if len(headline) < len(curves):
            plot_roc(curves, stage.path(ALL_CURVES_FIGURE), f"every output on {experiment.root.name}", auc)
        if data.logits is not None:
            with timed("utility"):
                save_json_atomic(stage.path(UTILITY_FILE), utility_report(data.logits.model, data.labels, data.keep, target_ids))
        if few_shadow:
            from mia_lightning.analysis.few_shadow import write_few_shadow

            write_few_shadow(data, target_ids, stage.path(FEW_SHADOW_FILE), experiment.root.name)
        run_meta |= {"outputs": [record["attack"] for record in records], "skipped": skipped,
                     "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        folder = stage.publish(run_meta)
    except BaseException:
        stage.discard()
        raise
    if keep_runs:
        prune_runs(experiment, keep_runs)
    if logger is not None:
        log_audit(make_logger(logger, experiment.root, stage.run_id), records, folder, {**run_meta, "id": stage.run_id})
    return AuditResult(records, folder, stage.run_id, skipped, {**run_meta, "id": stage.run_id})

