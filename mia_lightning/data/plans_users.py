"""The user-grouped membership plan: members are users (authors, patients), not single texts.

``plan.kind: user_grouped`` needs a DataModule with ``pool_groups()`` (user id per sample). Users
are split like samples in LiRA's plan (``make_lira_plan`` on users): each audited user is IN for
exactly half of the target models, and a model trains on every text of its IN users and on no text
of its OUT users. ``plan.n_population`` counts USERS here: users no model trains on (RMIA's
population and the known non-members on which thresholds are chosen).

``plan.options``:
- ``n_references`` (default 0): extra models, the last ids, whose keep rows are empty: they train on
  no pool text (the DataModule's public corpus) and serve as the reference models of the
  likelihood-ratio attack (``info.reference_models``);
- ``fine_tune_from_reference`` (default true when there are references): every target starts from the
  first reference model's trained weights (``parents``), as ClinicalBERT started from a general
  model: the reference is then exactly "the model before it saw the private data".

``info`` records ``target_models`` (the default targets of ``attack.py``), ``reference_models``,
the number of users and the population users' ids.
"""

from __future__ import annotations

import numpy as np

from mia_lightning.data.plan import Plan, PlanSpec, make_lira_plan, takes_options
from mia_lightning.errors import MiaError

@takes_options("n_references", "fine_tune_from_reference")
def make_user_grouped_plan(spec: PlanSpec, labels: np.ndarray | None = None, groups: np.ndarray | None = None) -> Plan:
    """keep [M, n] with whole users IN or OUT for each target (half the targets each), plus empty reference rows."""
    if groups is None:
        raise MiaError("--plan.kind user_grouped: the DataModule gives no user ids (pool_groups()); use a data source with users, e.g. mia_lightning.data.mlm.MLMTextDataModule")
    groups = np.asarray(groups)
    if groups.shape != (spec.n_samples,):
        raise MiaError(f"pool_groups(): {groups.shape} user ids for {spec.n_samples} samples; give one user id per sample")
    n_references = int(spec.options.get("n_references", 0))
    n_targets = spec.n_models - n_references
    if n_references < 0 or n_targets < 2:
        raise MiaError(f"--plan.options.n_references {n_references}: leaves {n_targets} target models of --plan.n_models {spec.n_models}; at least 2 targets are needed")
    user_ids, user_of = np.unique(groups, return_inverse=True)
    user_spec = PlanSpec(dataset=spec.dataset, n_samples=user_ids.size, n_models=n_targets, seed=spec.seed, n_population=spec.n_population)
    users = make_lira_plan(user_spec)
    keep = np.zeros((spec.n_models, spec.n_samples), dtype=bool)
    keep[:n_targets] = users.keep[:, user_of]
    population = np.flatnonzero(np.isin(user_of, users.population)).astype(np.int64)
    targets = list(range(n_targets))
    references = list(range(n_targets, spec.n_models))
    fine_tune = bool(spec.options.get("fine_tune_from_reference", bool(references)))
    if fine_tune and not references:
        raise MiaError("--plan.options.fine_tune_from_reference true needs n_references >= 1 (the model the targets start from)")
    info = {
        "membership": "users: a model trains on all or none of a user's samples",
        "n_users": int(user_ids.size),
        "population_users": user_ids[users.population].tolist(),
        "target_models": targets,
        "reference_models": references,
    }
    parents = {target: references[0] for target in targets} if fine_tune else {}
    return Plan(keep, population, info=info, parents=parents)
