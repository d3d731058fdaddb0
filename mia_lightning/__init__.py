"""mia-lightning: train target/shadow models with Lightning and audit them with membership inference attacks.

The Python API (``docs/api.md``): ``train``, ``audit``, ``open_experiment``, ``Record``, ``to_dataframe``,
``recipes``, ``write_reports`` and ``MiaError``. Importing the package does not import torch.
"""

from mia_lightning.version import __version__

# The stage module mia_lightning.audit is loaded before the API binds the name ``audit`` to the
# function, so ``mia_lightning.audit(...)`` stays the API call (``import mia_lightning.audit`` still
# reaches the module through sys.modules).
import mia_lightning.audit  # noqa: E402,F401
from mia_lightning.api import Experiment, Record, audit, open_experiment, read_run, recipes, to_dataframe, train, write_reports  # noqa: E402
from mia_lightning.errors import MiaError  # noqa: E402

__all__ = ["Experiment", "MiaError", "Record", "__version__", "audit", "open_experiment", "read_run", "recipes", "to_dataframe", "train",
           "write_reports"]
