"""``python -m mia_lightning ...`` is ``python train.py ...`` (used to start farm workers from any directory)."""

import sys

from mia_lightning.runtime import apply_runtime_defaults

apply_runtime_defaults()

from mia_lightning.cli import train_main  # noqa: E402  (after the runtime defaults, before torch loads)

sys.exit(train_main())
