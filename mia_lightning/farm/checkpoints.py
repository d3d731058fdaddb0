"""Model checkpoints in Lightning's format, tagged with the experiment they belong to.

Both engines write the same file, loadable with ``<ModelClass>.load_from_checkpoint``; the
``mia_lightning`` entry records the class and model index so export can rebuild any family and
refuse a foreign checkpoint. A module adds its own state (e.g. a DP accountant) through Lightning's
``on_save_checkpoint`` / ``on_load_checkpoint`` hooks. Loading is safe on untrusted files: tensors
only (``weights_only=True``), and the class named inside must be a LightningModule from a trusted
package (``mia_lightning.contract.components.resolve_class``) before anything is built.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import lightning as L
import torch

from mia_lightning.errors import MiaError, load_failure
from mia_lightning.contract.experiment import FORMAT_VERSION, READABLE_VERSIONS
from mia_lightning.contract.components import TRUSTED_MODULES, ComponentSpec
from mia_lightning.contract.identity import DONE_FILE
from mia_lightning.contract.io import load_json, write_bytes_atomic

TAG = "mia_lightning"
CHECKPOINT_FILE = "model.ckpt"


CHECKPOINT_DIGEST = "checkpoint_sha256"
"""done.json's record of its model.ckpt: a checkpoint copied in from another experiment or model is refused where it is loaded."""


def save_model_checkpoint(module: L.LightningModule, path: Path, index: int, experiment: str) -> str:
    """Write ``module`` as a Lightning checkpoint (state_dict + hyper_parameters) atomically; returns the file's sha256."""
    cls = type(module)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
        TAG: {"class_path": f"{cls.__module__}.{cls.__qualname__}", "index": index, "experiment": experiment, "version": FORMAT_VERSION},
    }
    module.on_save_checkpoint(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def load_model_checkpoint(path: Path, index: int, trusted: tuple[str, ...] = TRUSTED_MODULES) -> L.LightningModule:
    """Load model ``index``'s checkpoint, checking that it is one of ours, for that index, names a trusted LightningModule
    and is the file the farm wrote (the sha256 its done.json records, where it records one)."""
    if not path.is_file():
        raise MiaError(f"{path}: missing checkpoint; re-train this model with `python train.py farm --config <recipe>`")
    content = path.read_bytes()
    try:
        payload = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        reason = load_failure(err)
        fix = ("checkpoints load without running code: if your own model stores such a value among its hyper-parameters, make it a plain "
               "Python value (e.g. float(x)) and re-train"
               if reason.startswith("a weights-only load refuses") else "delete the model folder and re-train it")  # re-training alone would write the same file
        raise MiaError(f"{path}: not a readable PyTorch checkpoint ({reason}); {fix}") from None
    tag = payload.get(TAG) if isinstance(payload, dict) else None
    if not isinstance(tag, dict) or "class_path" not in tag:
        raise MiaError(f"{path}: not a mia-lightning checkpoint (no '{TAG}' entry); export its logits with the framework that trained it")
    if tag.get("version") not in READABLE_VERSIONS or tag.get("index") != index:
        raise MiaError(f"{path}: checkpoint of model {tag.get('index')} (layout version {tag.get('version')}), expected model {index} version {FORMAT_VERSION}")
    hparams, state = payload.get("hyper_parameters"), payload.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise MiaError(f"{path}: checkpoint without hyper_parameters / state_dict dictionaries; delete the model folder and re-train it")
    spec = ComponentSpec(str(tag["class_path"]), hparams, base=L.LightningModule, trusted=trusted)
    try:
        spec.resolve()  # refuses a non-LightningModule or untrusted class before anything is called
    except MiaError as err:
        raise MiaError(f"{path}: {err}") from None
    module = spec.build()
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise MiaError(f"{path}: weights do not fit {tag['class_path']} ({str(err).splitlines()[0]}); the checkpoint is damaged or from other code") from None
    module.on_load_checkpoint(payload)
    _check_recorded_digest(path, content)
    return module.eval()


def _check_recorded_digest(path: Path, content: bytes) -> None:
    """Refuse a loadable checkpoint that is not the one its model's done.json records (copied in from another experiment or model)."""
    done = path.with_name(DONE_FILE)
    record = load_json(done) if path.name == CHECKPOINT_FILE and done.is_file() else None
    recorded = record.get(CHECKPOINT_DIGEST) if isinstance(record, dict) else None
    if not isinstance(recorded, str):  # older farms recorded none; unlearning slices have no done.json
        return
    if hashlib.sha256(content).hexdigest() != recorded:
        raise MiaError(f"{path}: not the checkpoint {done} records (its sha256 differs: a file copied in from another model or experiment?); "
                       f"restore the original, or delete {path.parent} and re-run the farm to re-train the model")
