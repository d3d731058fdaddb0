"""Attack classifiers trained on shadow rows, batched over T targets x G groups: one implementation for every attack.

A classifier learns "member" (or "deleted") from feature rows of shadow models. Shokri et al.'s
attack trains one per (target, class) at once: each target t weighs out its own left-out shadow's
rows (``weight[t]``) and each row belongs to one group (its class, or 0 for a shared model). The
unlearning attack of Chen et al. is the case T = 1, G = 1. Options (one vocabulary):

- ``mlp``: two hidden ReLU layers, Adam, binary cross-entropy; the T x G networks are one batched
  LightningModule trained by one Lightning Trainer;
- ``logistic``: scikit-learn logistic regression on standardised features, one per (target, group);
- ``random_forest``: scikit-learn random forest (100 trees, at least 5 rows per leaf), one per (target, group);
- ``decision_tree``: a scikit-learn decision tree grown best-first to at most 10 leaves (``max_leaf_nodes=10``,
  Gini, no depth limit; ``random_state`` the attack's seed), one per (target, group): the default attack
  model of Chen et al.'s reference code (MinChen00/UnlearningLeaks, ``models.DT``, ``--attack_model DT``).

Every option scores a row with the probability of the positive class (float64), so one threshold
convention serves the ROC metrics and the confidence-based DegCount / DegRate. A (target, group)
whose training rows are all positive or all negative gets NaN: no classifier can be fitted there.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from mia_lightning.attacks.classifier_options import DECISION_TREE_LEAVES, MLPSettings, check_classifier
from mia_lightning.interrupts import call_trainer
from mia_lightning.runtime import numpy_parallel_map, torch_threads


class BatchedAttackMLP(L.LightningModule):
    """T x G independent MLPs in one module: features [B, F] -> membership logits [T, B].

    Row b goes through the MLP of its group ``group[b]``; each target's loss weights rows by
    ``weight[t, b]`` (0 for rows that target must not train on), so target t's classifier sees
    exactly its own rows. Manual optimisation: the same Adam step per batch as Lightning's automatic
    optimisation, without its closure machinery, which costs a small fit more than its kernels
    (1.15x faster at 8 targets x 2 classes, identical weights).
    """

    def __init__(self, n_targets: int, n_groups: int, n_features: int, hidden: int = 64, lr: float = 1e-3, weight_decay: float = 0.0,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        shape = (n_targets, n_groups)
        generator = torch.Generator().manual_seed(seed)  # its own stream (the draws of torch.manual_seed(seed)): fits may run concurrently

        def uniform(*size: int, fan_in: int) -> nn.Parameter:  # nn.Linear's default initialisation, one draw per MLP
            return nn.Parameter((torch.rand(*shape, *size, generator=generator) * 2 - 1) / fan_in**0.5)

        self.w1, self.b1 = uniform(n_features, hidden, fan_in=n_features), uniform(hidden, fan_in=n_features)
        self.w2, self.b2 = uniform(hidden, hidden, fan_in=hidden), uniform(hidden, fan_in=hidden)
        self.w3, self.b3 = uniform(hidden, fan_in=hidden), uniform(fan_in=hidden)
        self.automatic_optimization = False

    def forward(self, features: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Membership logits [T, B]: the rows of each group go through that group's T MLPs (one batched matmul per layer)."""
        logits = features.new_empty(self.w1.shape[0], features.shape[0])
        for g in torch.unique(group).tolist():
            at = torch.nonzero(group == g).squeeze(1)
            h = torch.relu(torch.einsum("bf,tfh->tbh", features[at], self.w1[:, g]) + self.b1[:, g, None])
            h = torch.relu(torch.bmm(h, self.w2[:, g]) + self.b2[:, g, None])
            logits[:, at] = torch.einsum("tbh,th->tb", h, self.w3[:, g]) + self.b3[:, g, None]
        return logits

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        features, group, member, weight = batch
        logits = self(features, group)
        losses = F.binary_cross_entropy_with_logits(logits, member.expand_as(logits), reduction="none")
        weight = weight.T  # [T, B]
        loss = ((losses * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)).sum()
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class StopWhenSet(L.Callback):
    """End the fit after the current step once ``event`` is set (a fit in a thread whose caller was interrupted)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.event.is_set():
            trainer.should_stop = True


def _mlp_scores(features: np.ndarray, member: np.ndarray, weight: np.ndarray, group: np.ndarray, target_features: np.ndarray,
                target_group: np.ndarray, n_groups: int, seed: int, settings: MLPSettings, stop: threading.Event | None = None) -> np.ndarray:
    """Train the T x G batched MLP with Lightning; P(member) [T, n] of the targets' rows (``stop`` set: the fit ends after its current step).

    One torch thread: each step is a few dozen small kernels, and a second thread made the fit 1.4x
    slower (2.5 s vs 3.5 s for 16 targets x 2 classes, 500 steps; the same scores); independent fits
    use the other cores instead (``concurrent_attack_scores``).
    """
    with torch_threads(1), torch.inference_mode(False), torch.enable_grad():  # attacks may score inside Trainer.predict
        module = BatchedAttackMLP(weight.shape[0], n_groups, features.shape[1], settings.hidden, settings.lr, settings.weight_decay, seed)
        dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(group), torch.from_numpy(member), torch.from_numpy(weight.T.copy()))
        batches = BatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)), settings.batch_size, drop_last=False)
        loader = DataLoader(dataset, sampler=batches, batch_size=None)  # one tensor index per batch, no per-row collation
        trainer = L.Trainer(max_steps=settings.steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[StopWhenSet(stop)] if stop else None)
        call_trainer(trainer.fit, module, loader)
        module.eval()
        scores = np.empty(target_features.shape[:2])
        with torch.no_grad():
            groups = torch.from_numpy(target_group)
            for t in range(target_features.shape[0]):
                scores[t] = torch.sigmoid(module(torch.from_numpy(target_features[t]), groups)[t].double()).numpy()
    return scores


def _sklearn_model(kind: str, seed: int):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    if kind == "decision_tree":
        return DecisionTreeClassifier(max_leaf_nodes=DECISION_TREE_LEAVES, random_state=seed)
    return RandomForestClassifier(n_estimators=100, min_samples_leaf=5, random_state=seed, n_jobs=1)


def attack_scores(kind: str, features: np.ndarray, member: np.ndarray, target_features: np.ndarray, *, weight: np.ndarray | None = None,
                  group: np.ndarray | None = None, target_group: np.ndarray | None = None, n_groups: int = 1, seed: int = 0,
                  mlp: MLPSettings = MLPSettings(), stop: threading.Event | None = None) -> np.ndarray:
    """Fit classifier ``kind`` per (target, group) on shadow rows and score the targets' rows: P(positive) float64 [T, n].

    ``features`` [R, F] and ``member`` [R] (bool or 0/1) are the shadow rows; ``weight`` [T, R] says
    which rows target t may train on (default: one target, all rows); ``group`` [R] and
    ``target_group`` [n] (ints below ``n_groups``, default all 0) pick the classifier of each row;
    ``target_features`` [T, n, F] are the rows to score. NaN where a (target, group) has no positive
    or no negative training row. ``stop``: once set, an ``mlp`` fit ends after its current step (its scores are then
    meaningless: for a caller that was interrupted).
    """
    check_classifier(kind, "attack classifier")
    member = np.asarray(member, dtype=np.float32)
    weight = np.ones((1, member.size), dtype=np.float32) if weight is None else np.asarray(weight, dtype=np.float32)
    group = np.zeros(member.size, dtype=np.int64) if group is None else np.asarray(group, dtype=np.int64)
    target_group = np.zeros(target_features.shape[1], dtype=np.int64) if target_group is None else np.asarray(target_group, dtype=np.int64)
    seen = weight > 0  # [T, R]
    in_group = group[None, :] == np.arange(n_groups)[:, None]  # [G, R]
    positives = (seen.astype(np.int64) * member) @ in_group.T  # [T, G]
    counts = seen.astype(np.int64) @ in_group.T
    fittable = (positives > 0) & (positives < counts)  # [T, G]: both classes present
    if kind == "mlp":
        scores = _mlp_scores(np.ascontiguousarray(features, dtype=np.float32), member, weight, group,
                             np.ascontiguousarray(target_features, dtype=np.float32), target_group, n_groups, seed, mlp, stop)
    else:
        scores = np.full(target_features.shape[:2], np.nan)
        for t, g in zip(*np.nonzero(fittable)):
            score_at = target_group == g
            if score_at.any():
                train = seen[t] & (group == g)
                model = _sklearn_model(kind, seed).fit(features[train], member[train])
                scores[t, score_at] = model.predict_proba(target_features[t, score_at])[:, 1]
    return np.where(fittable[:, target_group], scores, np.nan)


def concurrent_attack_scores(requests: Sequence[dict[str, Any]]) -> list[np.ndarray]:
    """``attack_scores(**request)`` for independent fits, one thread per core, each fit on one torch thread.

    The batched MLP's kernels release the GIL, so two fits on two cores overlap: 1.4-1.8x faster than one
    after the other at 64 targets x 10 classes, 1.19x at 8 targets x 2 classes, where Python holds the
    GIL for much of a step (``benchmarks/shokri_designs.py``). Every fit draws from its own seeded
    streams, so the scores are those of the fits run one at a time. On Ctrl-C the running fits end after
    their current step instead of training on.
    """
    stop = threading.Event()
    with torch_threads(1):  # set once around the threads: one fit restoring the count must not hand the other more threads
        return numpy_parallel_map(lambda request: attack_scores(**request, stop=stop), requests, stop=stop)
