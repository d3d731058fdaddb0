"""Membership inference attacks: importing this package registers every attack."""

from mia_lightning.attacks.base import ATTACKS, Attack, AttackData, create_attack, register_attack
from mia_lightning.attacks import label_only, lira, mlm, quantile, reference, rmia, shokri, thresholds, ulira, unlearning  # noqa: F401  (register the attacks)

__all__ = ["ATTACKS", "Attack", "AttackData", "create_attack", "register_attack"]
