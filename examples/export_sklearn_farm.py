"""Audit models trained outside mia-lightning: a scikit-learn farm exported into the experiment layout.

Trains N logistic-regression / MLP classifiers with scikit-learn on random halves of a dataset,
writes the three files an audit needs (``keep.npy``, ``labels.npy``, ``models/NNNN/logits.npy``),
then runs ``attack.py`` on it. Any framework can do the same: the attack stage reads nothing else.

    python examples/export_sklearn_farm.py --out checkpoints/sklearn_farm --models 32
    python attack.py --experiment checkpoints/sklearn_farm --attack all
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn import datasets
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def balanced_halves(n_models: int, n_samples: int, seed: int) -> np.ndarray:
    """keep [M, n]: every sample in exactly half of the models (the LiRA plan)."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n_models, n_samples)), axis=0) < n_models // 2


def export_farm(out: Path, n_models: int, seed: int = 0, max_iter: int = 300) -> None:
    bunch = datasets.load_digits()
    x, y = bunch.data, bunch.target
    keep = balanced_halves(n_models, len(y), seed)
    out.mkdir(parents=True, exist_ok=False)
    np.save(out / "keep.npy", keep)
    np.save(out / "labels.npy", y.astype(np.int64))
    for m in range(n_models):
        model = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(128,), max_iter=max_iter, random_state=seed + m))
        model.fit(x[keep[m]], y[keep[m]])
        # logits: log-probabilities are logits up to a per-sample constant, which softmax ignores
        logits = np.log(np.clip(model.predict_proba(x), 1e-12, 1.0)).astype(np.float32)
        folder = out / "models" / f"{m:04d}"
        folder.mkdir(parents=True)
        np.save(folder / "logits.npy", logits[:, None, :])  # [n_samples, n_queries=1, n_classes]
        print(f"model {m}: train accuracy {model.score(x[keep[m]], y[keep[m]]):.3f}, held-out {model.score(x[~keep[m]], y[~keep[m]]):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("checkpoints/sklearn_farm"))
    parser.add_argument("--models", type=int, default=32)
    parser.add_argument("--max_iter", type=int, default=300, help="training iterations of each MLP")
    parser.add_argument("--attack", nargs="+", default=["lira", "rmia", "thresholds"])
    args = parser.parse_args()
    export_farm(args.out, args.models, max_iter=args.max_iter)
    root = Path(__file__).resolve().parents[1]
    sys.exit(subprocess.call([sys.executable, str(root / "attack.py"), "--experiment", str(args.out), "--attack", *args.attack]))


if __name__ == "__main__":
    main()
