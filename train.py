"""Train models: ``python train.py farm --config configs/<recipe>.yaml`` (a farm) or ``python train.py fit ...`` (one model)."""

import sys

from mia_lightning.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
