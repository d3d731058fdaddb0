"""``python -m mia_lightning ...`` is ``python train.py ...`` (used to start farm workers from any directory)."""

import sys

from mia_lightning.cli import train_main

sys.exit(train_main())
