"""The unlearning attack (Chen et al., "When Machine Unlearning Jeopardizes Privacy", ACM CCS 2021) on exported logits.

The attacker queries an original model and its unlearned version on a target sample and builds a
feature from the two posteriors (``unlearning.features``: direct / sorted difference, L2 distance,
direct / sorted concatenation). An attack classifier (``attacks/classifiers.py``: ``mlp``,
``logistic``, ``random_forest`` or ``decision_tree``, the batched classifier of Shokri's attack with one target and one group) is trained on the shadow chains of ``unlearning.json`` (positives: samples the
step deleted, or added, or kept for the remaining-samples scenario; negatives: samples in no
version) and tested on the target chains. Baselines, as in the paper: the classical attack, the
same classifier on one posterior, of the original model (``classic_original_*``) and of the latest
version (``classic_unlearned_*``; for online learning the updated model).

With several versions (``multi_version``), ``views: [steps]`` scores a sample by the most
suspicious consecutive pair of versions (the attacker sees every intermediate version; the
classifier is trained on the pair of the step that changed the sample), ``endpoints`` by the first
and last version only. The output defences (top-1 label, temperature, rounding) transform every
published posterior, shadow and target alike.

Scores are the classifier's probability of "positive"; each lands in the row of the model whose
keep row holds the positive (``unlearning.contract``), so the shared metrics read the ground truth
from keep.npy; cells the attack does not evaluate are NaN (left out of the metrics). DegCount and
DegRate compare ``unlearning_<feature>_<classifier>`` with ``classic_original_<classifier>``
(``train.py unlearning-report``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import softmax

from mia_lightning.attacks.base import Attack, AttackData, register_attack
from mia_lightning.attacks.classifier_options import CLASSIFIERS, MLPSettings, check_classifier
from mia_lightning.errors import MiaError
from mia_lightning.unlearning.contract import AGGREGATIONS, EVALUATIONS, FILENAME, Chain, Unlearning, load_unlearning, unlearning_problem
from mia_lightning.unlearning.features import DEFENCES, FEATURES, aggregate, defend, pair_features

VIEWS = ("steps", "endpoints")


def output_names(features: list[str], classifiers: list[str], defences: list[str], views: list[str]) -> tuple[str, ...]:
    """Result names: ``unlearning_<feature>_<classifier>[__<defence>][__endpoints]`` and the ``classic_*`` baselines per defence."""
    names = []
    for defence in defences:
        suffix = "" if defence == "none" else f"__{defence}"
        for view in views:
            tail = suffix + ("" if view == "steps" else f"__{view}")
            names += [f"unlearning_{feature}_{classifier}{tail}" for feature in features for classifier in classifiers]
        names += [f"classic_{side}_{classifier}{suffix}" for side in ("original", "unlearned") for classifier in classifiers]
    return tuple(names)


@dataclass(frozen=True)
class Items:
    """Evaluated (chain, step, sample) triples: label (positive?), row (model id holding the positive), target side or shadow."""

    chain: np.ndarray
    step: np.ndarray
    sample: np.ndarray
    label: np.ndarray
    row: np.ndarray
    target: np.ndarray

    def subset(self, mask: np.ndarray) -> "Items":
        return Items(*(getattr(self, name)[mask] for name in ("chain", "step", "sample", "label", "row", "target")))

    def __len__(self) -> int:
        return int(self.sample.size)


def holder(keep: np.ndarray, version: tuple[int, ...], sample: int) -> int:
    """The model of ``version`` whose keep row holds ``sample`` (a SISA shard), or the version's first model."""
    for model in version:
        if keep[model, sample]:
            return model
    return version[0]


def evaluation_items(chains: list[Chain], keep: np.ndarray, evaluate: str) -> Items:
    """The attack's samples: every step's positives of kind ``evaluate`` and its negatives, with their rows."""
    columns: dict[str, list] = {name: [] for name in ("chain", "step", "sample", "label", "row", "target")}
    for c, chain in enumerate(chains):
        for s, step in enumerate(chain.steps):
            positives = getattr(step, evaluate)
            version = chain.versions[s + 1] if evaluate == "added" else chain.versions[0]
            rows = [holder(keep, version, int(x)) for x in positives]
            negative_row = rows[0] if rows else version[0]
            for samples, label, sample_rows in ((positives, True, rows), (step.negatives, False, [negative_row] * step.negatives.size)):
                columns["chain"] += [c] * samples.size
                columns["step"] += [s] * samples.size
                columns["sample"] += samples.tolist()
                columns["label"] += [label] * samples.size
                columns["row"] += sample_rows
                columns["target"] += [chain.role == "target"] * samples.size
    items = Items(*(np.asarray(columns[name], dtype=bool if name in ("label", "target") else np.int64)
                    for name in ("chain", "step", "sample", "label", "row", "target")))
    tested = items.subset(items.target)
    cells = tested.row * keep.shape[1] + tested.sample
    unique, counts = np.unique(cells, return_counts=True)
    if (counts > 1).any():
        row, sample = divmod(int(unique[counts > 1][0]), keep.shape[1])
        raise MiaError(f"{FILENAME}: target sample {sample} is evaluated twice for model {row}; each (model, sample) may be tested once")
    return items


class PublishedPosteriors:
    """Posteriors [C] every version publishes on the samples the attack needs; each model's logits are read once."""

    def __init__(self, data: AttackData, needs: dict[tuple[int, ...], set[int]], aggregation: str) -> None:
        per_model: dict[int, set[int]] = {}
        for version, samples in needs.items():
            for model in version:
                per_model.setdefault(model, set()).update(samples)
        self.by_model: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for model, samples in per_model.items():
            ids = np.asarray(sorted(samples), dtype=np.int64)
            logits = np.asarray(data.logits.model(model)[ids], dtype=np.float64)  # [k, Q, C]
            self.by_model[model] = (ids, softmax(logits, axis=-1).mean(axis=1))
        self.aggregation = aggregation

    def of(self, version: tuple[int, ...], samples: np.ndarray) -> np.ndarray:
        """The published (aggregated, not yet defended) posteriors [N, C] of ``version`` on ``samples``."""
        stacked = []
        for model in version:
            ids, probs = self.by_model[model]
            stacked.append(probs[np.searchsorted(ids, samples)])
        return aggregate(np.stack(stacked), self.aggregation)


@register_attack
class UnlearningAttack(Attack):
    """Chen et al.'s attack on (original, unlearned) posteriors: five feature constructions x four classifiers, plus classic baselines."""

    name = "unlearning"
    label = "unlearning attack"
    requires_logits = True
    min_models = 2
    independent_models = False  # built for unlearning farms: it pairs each model with the one it was derived from

    def __init__(
        self,
        features: list[str] | None = None,
        classifiers: list[str] | None = None,
        defences: list[str] | None = None,
        views: list[str] | None = None,
        temperature: float = 4.0,
        decimals: int = 1,
        method: str | None = None,
        evaluate: str | None = None,
        aggregation: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.features = list(features or FEATURES)
        self.classifiers = list(classifiers or CLASSIFIERS)
        self.defences = list(defences or ["none"])
        self.views = list(views or ["steps"])
        for classifier in self.classifiers:
            check_classifier(classifier, "--params unlearning.classifiers")
        for key, chosen, allowed in (("features", self.features, FEATURES), ("classifiers", self.classifiers, CLASSIFIERS),
                                     ("defences", self.defences, DEFENCES), ("views", self.views, VIEWS)):
            bad = [value for value in chosen if value not in allowed]
            if bad or len(set(chosen)) != len(chosen):
                raise MiaError(f"--params unlearning.{key} {chosen}: each must be one of {', '.join(allowed)}, once")
        if evaluate is not None and evaluate not in EVALUATIONS:
            raise MiaError(f"--params unlearning.evaluate {evaluate!r}: choose one of {', '.join(EVALUATIONS)}")
        if aggregation is not None and aggregation not in AGGREGATIONS:
            raise MiaError(f"--params unlearning.aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
        self.aggregation = aggregation
        if temperature <= 0 or decimals < 0:
            raise MiaError(f"--params unlearning: temperature {temperature} must be > 0 and decimals {decimals} >= 0")
        self.temperature, self.decimals, self.method, self.evaluate, self.seed = temperature, decimals, method, evaluate, seed
        self.outputs = output_names(self.features, self.classifiers, self.defences, self.views)

    @classmethod
    def unmet_requirement(cls, data: AttackData) -> str | None:
        return unlearning_problem(data.experiment) or super().unmet_requirement(data)

    def fit(self, data: AttackData) -> None:
        """Build the shadow and target items, train every classifier on the shadow pairs and score the target items."""
        super().fit(data)
        unlearning: Unlearning = load_unlearning(data.experiment)
        self.unlearning = unlearning
        self.method = unlearning.resolve_method(self.method, "unlearning")
        self.evaluate = self.evaluate or unlearning.evaluate
        self.chains = unlearning.chains_of(self.method)
        self.items = evaluation_items(self.chains, data.keep, self.evaluate)
        for side, mask in (("shadow", ~self.items.target), ("target", self.items.target)):
            if not (self.items.label & mask).any() or not (~self.items.label & mask).any():
                raise MiaError(f"{FILENAME}: the {side} chains of method {self.method} have no {self.evaluate} positives or no negatives to "
                               f"{'train' if side == 'shadow' else 'test'} on; the attack needs both shadow and target chains")
        needs: dict[tuple[int, ...], set[int]] = {}
        for c, chain in enumerate(self.chains):
            samples = set(self.items.sample[self.items.chain == c].tolist())
            for version in chain.versions:
                needs.setdefault(version, set()).update(samples)
        self.aggregation = self.aggregation or unlearning.aggregation
        self.posteriors = PublishedPosteriors(data, needs, self.aggregation)
        self.item_scores: dict[str, np.ndarray] = {}
        shadow, target = self.items.subset(~self.items.target), self.items.subset(self.items.target)
        for defence in self.defences:
            suffix = "" if defence == "none" else f"__{defence}"
            published = self._published(defence)
            for view in self.views:
                tail = suffix + ("" if view == "steps" else f"__{view}")
                train_pairs, test_pairs = self._pairs(shadow, view), self._pairs(target, view)
                owner = test_pairs[3]
                for feature in self.features:
                    x_train = pair_features(published(train_pairs[0], train_pairs[2]), published(train_pairs[1], train_pairs[2]), feature)
                    x_test = pair_features(published(test_pairs[0], test_pairs[2]), published(test_pairs[1], test_pairs[2]), feature)
                    for classifier in self.classifiers:
                        scores = np.full(len(target), -np.inf)
                        np.maximum.at(scores, owner, self._classify(classifier, x_train, shadow.label, x_test))  # an item seen through several pairs keeps its most suspicious one
                        self.item_scores[f"unlearning_{feature}_{classifier}{tail}"] = scores
            for side, pick in (("original", 0), ("unlearned", -1)):
                x_train = published([self.chains[c].versions[pick] for c in shadow.chain], shadow.sample)
                x_test = published([self.chains[c].versions[pick] for c in target.chain], target.sample)
                for classifier in self.classifiers:
                    self.item_scores[f"classic_{side}_{classifier}{suffix}"] = self._classify(classifier, x_train, shadow.label, x_test)
        self.target_items = target

    def _classify(self, classifier: str, x_train: np.ndarray, label: np.ndarray, x_test: np.ndarray) -> np.ndarray:
        """P(positive) [n] of the target rows from ``classifier`` fitted on the shadow rows (one target, one group).

        The MLP trains 100 epochs of batches of 64 rows (hidden 64, Adam 1e-3, weight decay 1e-4).
        """
        from mia_lightning.attacks.classifiers import attack_scores

        mlp = MLPSettings(hidden=64, steps=100 * -(-len(x_train) // 64), batch_size=64, lr=1e-3, weight_decay=1e-4)
        return attack_scores(classifier, x_train, label, x_test[None], seed=self.seed, mlp=mlp)[0]

    def _published(self, defence: str):
        """A function (versions per row, samples) -> published posteriors [N, C] under ``defence``."""

        def published(versions: list[tuple[int, ...]], samples: np.ndarray) -> np.ndarray:
            codes: dict[tuple[int, ...], int] = {}
            code = np.asarray([codes.setdefault(version, len(codes)) for version in versions])
            out = np.empty((samples.size, self.data.logits.shape[-1]))
            for version, k in codes.items():
                rows = np.flatnonzero(code == k)
                out[rows] = defend(self.posteriors.of(version, samples[rows]), defence, self.temperature, self.decimals)
            return out

        return published

    def _pairs(self, items: Items, view: str) -> tuple[list, list, np.ndarray, np.ndarray]:
        """(before versions, after versions, samples, owning item) of the version pairs that score each item.

        Shadow items train on the pair of their own step (``steps``) or the chain's endpoints; target
        items are scored on every consecutive pair of their chain (``steps``) or on the endpoints.
        """
        before, after, samples, owner = [], [], [], []
        for i in range(len(items)):
            chain = self.chains[items.chain[i]]
            if view == "endpoints":
                steps = [(0, len(chain.versions) - 1)]
            elif items.target[i]:
                steps = [(s, s + 1) for s in range(len(chain.steps))]
            else:
                steps = [(int(items.step[i]), int(items.step[i]) + 1)]
            for a, b in steps:
                before.append(chain.versions[a])
                after.append(chain.versions[b])
                samples.append(items.sample[i])
                owner.append(i)
        return before, after, np.asarray(samples, dtype=np.int64), np.asarray(owner, dtype=np.int64)

    def score(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        position = np.full(self.data.n_models, -1)
        position[targets] = np.arange(len(targets))
        where = position[self.target_items.row]
        chosen = where >= 0
        out = {}
        for name in self.outputs:
            scores = np.full((len(targets), self.data.n_samples), np.nan)
            scores[where[chosen], self.target_items.sample[chosen]] = self.item_scores[name][chosen]
            out[name] = scores
        return out

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"features": self.features, "classifiers": self.classifiers, "defences": self.defences, "views": self.views,
                                  "temperature": self.temperature, "decimals": self.decimals, "seed": self.seed}
        if self.data is not None and hasattr(self, "items"):
            params |= {"method": self.method, "evaluate": self.evaluate, "scenario": self.unlearning.scenario, "aggregation": self.aggregation,
                       "n_shadow_items": int((~self.items.target).sum()), "n_target_items": int(self.items.target.sum())}
        return params
