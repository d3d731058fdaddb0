"""The attack classifiers' options (``CLASSIFIERS``) and the ``mlp`` option's settings, without torch.

The attacks that train classifiers (Shokri et al.'s, the unlearning attack) check their parameters
with these, so a bad option is answered before torch and Lightning load (``classifiers.py`` trains them).
"""

from __future__ import annotations

from dataclasses import dataclass

from mia_lightning.errors import MiaError

CLASSIFIERS = ("mlp", "logistic", "random_forest", "decision_tree")
DECISION_TREE_LEAVES = 10
"""Leaves of the ``decision_tree`` option, as in Chen et al.'s reference code."""
RENAMED = {"lr": "logistic", "rf": "random_forest"}
"""Option names of earlier versions of the unlearning attack; refused with the new name."""


def check_classifier(name: str, where: str) -> str:
    """``name`` if it is an option of ``CLASSIFIERS``; else one line naming the option to use (``where`` names the setting)."""
    if name in CLASSIFIERS:
        return name
    if name in RENAMED:
        raise MiaError(f"{where}={name!r}: renamed; use {RENAMED[name]!r} (classifiers: {', '.join(CLASSIFIERS)})")
    raise MiaError(f"{where}={name!r}: choose one of {', '.join(CLASSIFIERS)}")


@dataclass(frozen=True)
class MLPSettings:
    """Size and training of the ``mlp`` option: ``steps`` Adam steps on random batches of ``batch_size`` rows."""

    hidden: int = 32
    steps: int = 500
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.0
