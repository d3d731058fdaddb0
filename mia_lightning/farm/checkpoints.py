"""Model checkpoints in Lightning's format, tagged with the experiment they belong to.

Both engines write the same file, loadable with ``<ModelClass>.load_from_checkpoint``; the
``mia_lightning`` entry records the class and model index so export can rebuild any family and
refuse a foreign checkpoint.
"""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import torch

from mia_lightning.errors import MiaError
from mia_lightning.experiment import FORMAT_VERSION
from mia_lightning.farm.engine import ComponentSpec
from mia_lightning.io import write_bytes_atomic

TAG = "mia_lightning"


def save_model_checkpoint(module: L.LightningModule, path: Path, index: int, experiment: str) -> None:
    """Write ``module`` as a Lightning checkpoint (state_dict + hyper_parameters) atomically."""
    cls = type(module)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
        TAG: {"class_path": f"{cls.__module__}.{cls.__qualname__}", "index": index, "experiment": experiment, "version": FORMAT_VERSION},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_model_checkpoint(path: Path, index: int) -> L.LightningModule:
    """Load model ``index``'s checkpoint, checking that it is one of ours and for that index."""
    if not path.is_file():
        raise MiaError(f"{path}: missing checkpoint; re-train this model with `python train.py farm --config <recipe>`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise MiaError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}); delete the model folder and re-train it") from None
    tag = payload.get(TAG) if isinstance(payload, dict) else None
    if not isinstance(tag, dict) or "class_path" not in tag:
        raise MiaError(f"{path}: not a mia-lightning checkpoint (no '{TAG}' entry); export its logits with the framework that trained it")
    if tag.get("version") != FORMAT_VERSION or tag.get("index") != index:
        raise MiaError(f"{path}: checkpoint of model {tag.get('index')} (layout version {tag.get('version')}), expected model {index} version {FORMAT_VERSION}")
    module = ComponentSpec(tag["class_path"], payload["hyper_parameters"]).build()
    module.load_state_dict(payload["state_dict"])
    return module.eval()
