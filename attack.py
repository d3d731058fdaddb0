"""Audit an experiment: ``python attack.py --experiment checkpoints/<name> --attack lira``."""

import sys

from mia_lightning.cli import attack_main

if __name__ == "__main__":
    sys.exit(attack_main())
