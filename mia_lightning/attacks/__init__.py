"""Membership inference attacks: ``ATTACKS`` names every attack; an attack's module is imported when its class is first used."""

from mia_lightning.attacks.base import ATTACKS, Attack, AttackData, create_attack, register_attack

__all__ = ["ATTACKS", "Attack", "AttackData", "create_attack", "register_attack"]
