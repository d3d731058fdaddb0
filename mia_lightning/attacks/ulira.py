"""U-LiRA (Hayes et al., "Inexact Unlearning Needs More Careful Evaluations to Avoid a False Sense of Privacy", IEEE SaTML 2025).

A per-example likelihood-ratio test on an unlearned model: was candidate x trained on and then
forgotten, or never trained on? Every model that never trained on x is, for x, a model retrained
from scratch without x, so for each candidate the test fits one Gaussian to the logit-scaled
confidence phi (LiRA's statistic, ``attacks.base``) of the shadow unlearned models that forgot x
and one to that of the shadow unlearned models whose training never included x, and scores the
target's unlearned model by log N(phi; mu_forgot, sd) - log N(phi; mu_never, sd), leave-one-out
over the originals of a ``plan.kind: unlearning_ulira`` farm (every candidate was seen, and then
forgotten, by exactly half of them). Exact unlearning makes the two distributions identical, so
its AUC is 0.5 up to sampling noise; an inexact method that leaves a trace scores above it.

Rows are the original models (``keep[original]`` marks the candidates it trained on, i.e. forgot),
so the shared metrics read the truth from keep.npy. Outputs:

- ``ulira_exact`` / ``ulira_inexact``: U-LiRA on the exactly (scratch) and inexactly unlearned models;
- ``lira_before``: the same test on the originals (online LiRA: how much the candidates leaked before unlearning);
- ``loss_exact`` / ``loss_inexact``: the population loss attack (Yeom et al., CSF 2018) on the unlearned
  models, forgotten vs never-seen candidates: open-unlearning's privleak compares the two AUCs;
- ``retained_exact`` / ``retained_inexact`` / ``retained_before``: online LiRA on the base samples the
  originals keep (members) vs those they never trained on, on the unlearned models and on the
  originals: how unlearning changed the leakage of the samples that remain.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mia_lightning.attacks.base import Attack, AttackData, register_attack
from mia_lightning.attacks.lira import gaussian_logpdf, per_sample_std
from mia_lightning.attacks.shadows import ShadowMoments
from mia_lightning.errors import MiaError
from mia_lightning.io import load_json
from mia_lightning.unlearning.contract import FILENAME, has_unlearning, load_unlearning

GROUPS = ("exact", "inexact", "before")


@register_attack
class ULiRA(Attack):
    """U-LiRA on exact and inexact unlearning of the same originals, the loss attack behind privleak, and retained-sample leakage."""

    name = "ulira"
    label = "U-LiRA"
    outputs = ("ulira_exact", "ulira_inexact", "lira_before", "loss_exact", "loss_inexact", "retained_exact", "retained_inexact", "retained_before")
    requires_logits = True
    min_models = 12

    @classmethod
    def unmet_requirement(cls, data: AttackData) -> str | None:
        if not has_unlearning(data.experiment) or load_json(data.experiment.root / FILENAME).get("design") != "ulira":
            return f"needs the {FILENAME} of a plan.kind unlearning_ulira farm (originals unlearned exactly and inexactly)"
        return super().unmet_requirement(data)

    def fit(self, data: AttackData) -> None:
        """Pair every original with its exact and inexact unlearned model and sum the shadow statistics once."""
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
        self.moments = {group: (ShadowMoments(data.phi[ids], member), ShadowMoments(data.phi[ids], ~member)) for group, ids in self.models.items()}
        self.position = np.full(data.n_models, -1)
        self.position[self.originals] = np.arange(self.originals.size)

    def _likelihood_ratio(self, group: str, positions: np.ndarray) -> np.ndarray:
        """Online LiRA score [T, n] of the group's models at ``positions``, its shadows the group's other models."""
        inside, outside = self.moments[group]
        n_in, mu_in, var_in, pooled_in = inside.leave_out(positions)
        n_out, mu_out, var_out, pooled_out = outside.leave_out(positions)
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
