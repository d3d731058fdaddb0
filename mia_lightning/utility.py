"""Utility of the audited models, from their exported logits: what the privacy numbers cost.

Every model of an experiment was predicted on the whole pool, and ``keep.npy`` says which samples it
trained on, so each model's held-out set is simply the pool samples it did not train on. For the
audited target models this computes, with torchmetrics on the first query (the un-augmented input):
test accuracy, train accuracy and their gap (the generalisation gap that membership inference feeds
on, Yeom et al., CSF 2018), and per-class precision / recall / F1 with the confusion matrix pooled
over targets. Written as ``utility.json`` (format below) into every attack run that has logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from mia_lightning.runtime import numpy_parallel_map

UTILITY_VERSION = 1


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).double().mean()) if labels.numel() else float("nan")


def _per_class(confusion: np.ndarray) -> dict[str, list[float | None]]:
    """Precision, recall and F1 per class from a confusion matrix (rows true, columns predicted); None where undefined."""
    true_pos = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_pos / predicted, np.nan)
        recall = np.where(actual > 0, true_pos / actual, np.nan)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), np.nan)
    as_list = lambda values: [None if np.isnan(v) else round(float(v), 6) for v in values]  # noqa: E731
    return {"precision": as_list(precision), "recall": as_list(recall), "f1": as_list(f1)}


def model_utility(logits: np.ndarray, labels: np.ndarray, members: np.ndarray) -> dict[str, Any]:
    """Train / test accuracy and the held-out confusion matrix of one model.

    ``logits`` float [n, Q, C] on the whole pool, ``labels`` int [n], ``members`` bool [n] (its training set).
    """
    n_classes = logits.shape[-1]
    predicted = torch.from_numpy(np.asarray(logits[:, 0, :])).argmax(dim=-1)
    target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    held_out = torch.from_numpy(~np.asarray(members, dtype=bool))
    confusion = multiclass_confusion_matrix(predicted[held_out], target[held_out], num_classes=n_classes) if held_out.any() \
        else torch.zeros(n_classes, n_classes, dtype=torch.long)
    return {
        "train_accuracy": _accuracy(predicted[~held_out], target[~held_out]),
        "test_accuracy": _accuracy(predicted[held_out], target[held_out]),
        "n_train": int((~held_out).sum()),
        "n_test": int(held_out.sum()),
        "confusion": confusion.numpy(),
    }


def utility_report(logits_of: Any, labels: np.ndarray, keep: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """``utility.json`` payload for the target models: per-model accuracies, their mean/std, gap, pooled per-class metrics.

    ``logits_of(i)`` returns model i's logits [n, Q, C] (one model per thread in memory at a time).
    """
    per_model = numpy_parallel_map(lambda t: model_utility(logits_of(int(t)), labels, keep[int(t)]), targets)
    test = np.array([m["test_accuracy"] for m in per_model])
    train = np.array([m["train_accuracy"] for m in per_model])
    confusion = np.sum([m["confusion"] for m in per_model], axis=0)
    spread = lambda values: float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else 0.0  # noqa: E731
    return {
        "format_version": UTILITY_VERSION,
        "definition": "held-out = pool samples a model did not train on; first query; metrics pooled over target models",
        "targets": [int(t) for t in targets],
        "test_accuracy": float(np.nanmean(test)),
        "test_accuracy_std": spread(test),
        "train_accuracy": float(np.nanmean(train)),
        "train_accuracy_std": spread(train),
        "train_test_gap": float(np.nanmean(train - test)),
        "per_model": [{"model": int(t), "test_accuracy": m["test_accuracy"], "train_accuracy": m["train_accuracy"],
                       "n_train": m["n_train"], "n_test": m["n_test"]} for t, m in zip(targets, per_model)],
        "per_class": _per_class(confusion),
        "confusion_matrix": confusion.astype(int).tolist(),
    }
