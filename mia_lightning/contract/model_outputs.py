"""Every model's exported outputs, read one model (or a small block of models) at a time.

An audit of 256 models x 50,000 samples x 2 queries x 10 classes has 1 GB of float32 logits; a
float64 copy of all of them, plus softmax temporaries, needed 17 GB. ``ModelOutputs`` never holds
more than the block of models being processed: per-sample statistics are computed block by block,
and ``outputs[model_ids]`` stacks just the models asked for. In-memory arrays (tests, importers)
are wrapped the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mia_lightning.errors import MiaError
from mia_lightning.contract.io import load_npy, save_npy_atomic

LOGITS_FILE = "logits.npy"
SIGNAL_FILE = "signal.npy"


class ModelOutputs:
    """Outputs of M models: logits [M, n, Q, C] or a signal [M, n, Q], indexable by model like an array."""

    def __init__(self, shape: tuple[int, ...], read: Callable[[int], np.ndarray]) -> None:
        self.shape = tuple(int(d) for d in shape)
        self._read = read

    @classmethod
    def in_memory(cls, array: np.ndarray) -> "ModelOutputs":
        """Wrap an array [M, n, Q(, C)] already in memory."""
        array = np.asarray(array)
        return cls(array.shape, lambda index: array[index])

    @classmethod
    def from_files(cls, paths: list[Path], shape: tuple[int, ...], what: str, fix: str) -> "ModelOutputs":
        """Read ``paths[m]`` (one ``.npy`` per model, already validated) whenever model m is needed."""
        return cls((len(paths), *shape), lambda index: load_npy(paths[index], what, fix))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def model(self, index: int) -> np.ndarray:
        """Outputs of one model, [n, Q(, C)]."""
        return self._read(int(index))

    def column(self, index: int) -> "ModelOutputs":
        """Column ``index`` of a signal [M, n, Q] alone, as a signal [M, n, 1] (one named kind of a multi-signal layout)."""
        return ModelOutputs((*self.shape[:2], 1), lambda model: self._read(model)[:, index : index + 1])

    def blocks(self, block_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first model id, stacked outputs [b, ...]) for consecutive blocks of ``block_size`` models."""
        for start in range(0, len(self), block_size):
            yield start, self[start : min(start + block_size, len(self))]

    def __getitem__(self, key: Any) -> np.ndarray:
        """``outputs[i]``, ``outputs[ids]``, ``outputs[a:b]`` or ``outputs[ids, ...more indices]`` (a new array)."""
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            picked = self.model(int(key))
        else:
            ids = np.arange(len(self))[key]
            picked = np.stack([self.model(i) for i in np.atleast_1d(ids)]) if np.size(ids) else np.empty((0, *self.shape[1:]), dtype=np.float32)
        return picked[rest] if rest else picked


def non_finite(array: np.ndarray) -> str | None:
    """'<count> NaN/inf values (first at index ...)', or None when every value is finite."""
    bad = ~np.isfinite(array)
    if not bad.any():
        return None
    return f"{int(bad.sum())} NaN/inf values (first at index {tuple(int(i) for i in np.argwhere(bad)[0])})"


def check_outputs_file(path: Path, array: np.ndarray, expected_ndim: int, n_samples: int, fix: str) -> None:
    """Refuse a model's outputs of the wrong rank, length or dtype, or with NaN/inf values (one line naming the file)."""
    shape_text = f"[{n_samples}, n_queries{', n_classes' if expected_ndim == 3 else ''}]"
    if array.ndim != expected_ndim or array.shape[0] != n_samples:
        raise MiaError(f"{path}: shape {array.shape}, expected {shape_text} to match keep.npy's {n_samples} samples; {fix}")
    if not np.issubdtype(array.dtype, np.floating):
        raise MiaError(f"{path}: dtype {array.dtype}, expected floating point; {fix}")
    if array.shape[1] == 0:
        raise MiaError(f"{path}: shape {array.shape} has no queries; every sample needs at least one output; {fix}")
    if expected_ndim == 3 and array.shape[2] < 2:
        raise MiaError(f"{path}: shape {array.shape} has logits for {array.shape[2]} class; membership needs at least two classes; {fix}")
    problem = non_finite(array)
    if problem:
        raise MiaError(f"{path}: {problem}; the model diverged or the export is broken, retrain or re-export this model")


def checked_outputs(index: int, outputs: np.ndarray) -> np.ndarray:
    """float32 outputs of freshly trained model ``index``: logits [n, Q, C] or signal [n, Q], all finite (a diverged model is refused)."""
    array = np.asarray(outputs, dtype=np.float32)
    if array.ndim not in (2, 3):
        raise MiaError(f"model {index}: predict_step returned outputs of shape {array.shape}; expected logits [n, Q, C] or a signal [n, Q]")
    problem = non_finite(array)
    if problem:
        raise MiaError(
            f"model {index}: {problem} in its exported outputs (the model diverged); lower the learning rate or clip "
            "gradients (--trainer.gradient_clip_val) and re-run the farm"
        )
    return array


def save_model_outputs(folder: Path, outputs: np.ndarray) -> None:
    """Write logits.npy (3-D) or signal.npy (2-D) atomically, removing the other kind if a previous export left it."""
    array = np.asarray(outputs, dtype=np.float32)
    name, other = (LOGITS_FILE, SIGNAL_FILE) if array.ndim == 3 else (SIGNAL_FILE, LOGITS_FILE)
    save_npy_atomic(Path(folder) / name, array)
    (Path(folder) / other).unlink(missing_ok=True)
