"""U-LiRA (Hayes et al., "Inexact Unlearning Needs More Careful Evaluations to Avoid a False Sense of Privacy", IEEE SaTML 2025).

A per-example likelihood-ratio test on an unlearned model: was candidate x trained on and then
forgotten, or never trained on? For each candidate the test fits one Gaussian to the logit-scaled
confidence phi (LiRA's statistic, ``AttackData.phi``) of the shadow models that trained on x and
then unlearned it, and one to that of the shadow models whose training never included x (for them
x was never there to forget), each unlearned with the same method; the target's unlearned model is
scored by log N(phi; mu_forgot, sd_forgot) - log N(phi; mu_never, sd_never) (per-sample std; the
pooled std where a sample has fewer than 2 shadows on a side). Exact unlearning makes the two
distributions identical, so its AUC is 0.5 up to sampling noise; an inexact method that leaves a
trace of x (or over-forgets it) scores above it.

The shadows of a target are the other originals of a ``plan.kind: unlearning_ulira`` farm, whose
originals come in complementary pairs (every candidate is in exactly one original of a pair): a
target's pair is left out, so each candidate has as many "forgot" as "never saw" shadows. (Leaving
out the target alone would give the side the target belongs to one shadow fewer; the narrower fit
of the smaller side biases a no-signal test below 0.5.)

Rows are the original models (``keep[original]`` marks the candidates it trained on, i.e. forgot),
so the shared metrics read the truth from keep.npy. Outputs:

- ``ulira_exact`` / ``ulira_inexact``: U-LiRA on the exactly (scratch) and inexactly unlearned models;
- ``lira_before``: the same test on the originals (online LiRA: how much the candidates leaked before unlearning);
- ``loss_exact`` / ``loss_inexact``: the population loss attack (Yeom et al., CSF 2018) on the unlearned
  models, forgotten vs never-seen candidates: open-unlearning's privleak compares the two AUCs;
- ``retained_exact`` / ``retained_inexact`` / ``retained_before``: the same likelihood-ratio test on
  the base samples (members: the ones the original keeps; non-members: those it never trained on),
  on the unlearned models and on the originals: how unlearning changed the leakage of what remains.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mia_lightning.attacks.base import Attack, AttackData, register_attack
from mia_lightning.attacks.lira import gaussian_logpdf, per_sample_std
from mia_lightning.attacks.shadows import deviations_from_sums
from mia_lightning.errors import MiaError
from mia_lightning.unlearning.contract import FILENAME, load_unlearning, unlearning_problem

GROUPS = ("exact", "inexact", "before")


def complementary_partners(members: np.ndarray, where: str) -> np.ndarray:
    """int64 [M]: for each original (rows of bool [M, c] candidate membership) the original holding exactly the other candidates."""
    partner = np.full(members.shape[0], -1, dtype=np.int64)
    for o in range(members.shape[0]):
        matches = np.flatnonzero((members == ~members[o]).all(axis=1))
        if matches.size == 0:
            raise MiaError(f"{where}: original {o} has no complementary original (one that trained on exactly the other candidates); "
                           "U-LiRA needs the paired originals of plan.kind unlearning_ulira")
        partner[o] = matches[0]
    return partner


class PairedMoments:
    """Per-sample count, mean and variance of phi over "in" (or "out") shadows, leaving out a target and its partner."""

    def __init__(self, values: np.ndarray, member: np.ndarray) -> None:
        self.values, self.member = values, member.astype(np.float64)
        self.shift = values.mean(axis=0)
        centred = values - self.shift
        self.count = self.member.sum(axis=0)
        self.sum1 = np.einsum("mn,mnq->nq", self.member, centred)
        self.sum2 = np.einsum("mn,mnq->nq", self.member, centred**2)

    def leave_out(self, left: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(count [T, n], mean [T, n, Q], var [T, n, Q], pooled var [T, Q]) without the models ``left`` int [T, k]."""
        w = self.member[left]  # [T, k, n]
        d = self.values[left] - self.shift  # [T, k, n, Q]
        count = self.count - w.sum(axis=1)
        s1 = self.sum1 - np.einsum("tkn,tknq->tnq", w, d)
        s2 = self.sum2 - np.einsum("tkn,tknq->tnq", w, d**2)
        mean, var, squared_dev = deviations_from_sums(count, s1, s2)
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = squared_dev.sum(axis=1) / count.sum(axis=1)[:, None]
        return count, mean + self.shift, var, pooled


@register_attack
class ULiRA(Attack):
    """U-LiRA on exact and inexact unlearning of the same originals, the loss attack behind privleak, and retained-sample leakage."""

    name = "ulira"
    label = "U-LiRA"
    outputs = ("ulira_exact", "ulira_inexact", "lira_before", "loss_exact", "loss_inexact", "retained_exact", "retained_inexact", "retained_before")
    requires_logits = True
    min_models = 18
    independent_models = False  # built for unlearning farms: it pairs each model with the one it was derived from

    @classmethod
    def unmet_requirement(cls, data: AttackData) -> str | None:
        return unlearning_problem(data.experiment, "ulira") or super().unmet_requirement(data)

    def fit(self, data: AttackData) -> None:
        """Pair every original with its exact and inexact unlearned model and its complementary original; sum the shadow statistics once."""
        super().fit(data)
        unlearning = load_unlearning(data.experiment)
        self.inexact_method = next(m for m in unlearning.methods if m != "scratch")
        unlearned = {method: {chain.original[0]: chain.versions[-1][0] for chain in unlearning.chains_of(method)} for method in unlearning.methods}
        self.originals = np.asarray(sorted(unlearned["scratch"]), dtype=np.int64)
        if sorted(unlearned[self.inexact_method]) != self.originals.tolist():
            raise MiaError(f"{FILENAME}: the exact and inexact chains must unlearn the same originals")
        self.models = {"before": self.originals, "exact": np.asarray([unlearned["scratch"][o] for o in self.originals]),
                       "inexact": np.asarray([unlearned[self.inexact_method][o] for o in self.originals])}
        self.candidates = np.zeros(data.n_samples, dtype=bool)
        for chain in unlearning.chains:
            self.candidates[chain.steps[0].deleted] = True
            self.candidates[chain.steps[0].negatives] = True
        member = data.keep[self.originals]
        self.partner = complementary_partners(member[:, self.candidates], str(data.experiment.root / FILENAME))
        phi = data.phi
        self.moments = {group: (PairedMoments(phi[ids], member), PairedMoments(phi[ids], ~member)) for group, ids in self.models.items()}
        self.position = np.full(data.n_models, -1)
        self.position[self.originals] = np.arange(self.originals.size)

    def _likelihood_ratio(self, group: str, positions: np.ndarray) -> np.ndarray:
        """Score [T, n] of the group's models at ``positions``, their shadows the group's models of the other pairs."""
        left = np.stack([positions, self.partner[positions]], axis=1)
        inside, outside = self.moments[group]
        n_in, mu_in, var_in, pooled_in = inside.leave_out(left)
        n_out, mu_out, var_out, pooled_out = outside.leave_out(left)
        sd_in, fallback_in = per_sample_std(n_in, var_in, pooled_in)
        sd_out, fallback_out = per_sample_std(n_out, var_out, pooled_out)
        self.flag_samples(fallback_in | fallback_out, f"fewer than 2 shadows on one side ({group} models): per-sample std replaced by the pooled std")
        self.flag_samples((n_in == 0) | (n_out == 0), f"no shadow on one side ({group} models): no score, left out of the metrics")
        phi = self.data.phi[self.models[group][positions]]
        with np.errstate(invalid="ignore"):
            ratio = gaussian_logpdf(phi, mu_in, sd_in) - gaussian_logpdf(phi, mu_out, sd_out)
        return np.where(((n_in > 0) & (n_out > 0))[..., None], ratio, np.nan).mean(axis=-1)

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        positions = self.position[targets]
        if (positions < 0).any():
            raise MiaError(f"ulira: target {int(targets[positions < 0][0])} is not an original model; the targets are the originals "
                           f"{self.originals[:5].tolist()}{' ...' if self.originals.size > 5 else ''} (the plan's default)")
        candidates, base = self.candidates[None, :], ~self.candidates[None, :]
        out = {}
        for group in GROUPS:
            ratio = self._likelihood_ratio(group, positions)
            out["lira_before" if group == "before" else f"ulira_{group}"] = np.where(candidates, ratio, np.nan)
            out[f"retained_{group}"] = np.where(base, ratio, np.nan)
        for group in ("exact", "inexact"):
            out[f"loss_{group}"] = np.where(candidates, -self.data.loss[self.models[group][positions]], np.nan)
        return out

    def params(self) -> dict[str, Any]:
        if self.data is None or not hasattr(self, "originals"):
            return {}
        return {"exact_method": "scratch", "inexact_method": self.inexact_method, "n_originals": int(self.originals.size),
                "n_candidates": int(self.candidates.sum()), "exact_models": self.models["exact"].tolist(), "inexact_models": self.models["inexact"].tolist()}
