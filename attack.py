"""Audit an experiment: ``python attack.py --experiment checkpoints/<name> --attack lira``."""

import sys

if __name__ == "__main__":
    from mia_lightning.runtime import apply_runtime_defaults

    apply_runtime_defaults()
    from mia_lightning.cli import attack_main

    sys.exit(attack_main())
