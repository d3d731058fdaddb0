"""Train models: ``python train.py farm --config configs/<recipe>.yaml`` (a farm), ``study``, ``export``, or ``fit ...`` (one model)."""

import sys

if __name__ == "__main__":
    from mia_lightning.runtime import apply_runtime_defaults

    apply_runtime_defaults()
    from mia_lightning.cli import train_main

    sys.exit(train_main())
