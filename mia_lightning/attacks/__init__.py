"""Membership inference attacks: importing this package registers every attack."""

from mia_lightning.attacks.base import ATTACKS, Attack, AttackData, create_attack, register_attack
from mia_lightning.attacks import lira  # noqa: F401  (registers "lira")

__all__ = ["ATTACKS", "Attack", "AttackData", "create_attack", "register_attack"]
