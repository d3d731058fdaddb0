"""Audit models trained by a plain PyTorch loop (no Lightning), with two queries per sample (identity + noise).

Shows the export format for augmented queries: ``logits.npy`` is [n_samples, n_queries, n_classes];
LiRA and RMIA average over queries as docs/attacks.md defines.

    python examples/export_pytorch_farm.py --out checkpoints/torch_farm --models 16
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn import datasets
from torch import nn


def train_one(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 60) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, int(y.max()) + 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def export_farm(out: Path, n_models: int, seed: int = 0, epochs: int = 60) -> None:
    bunch = datasets.load_digits()
    x = torch.tensor((bunch.data - bunch.data.mean(0)) / (bunch.data.std(0) + 1e-8), dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    rng = np.random.default_rng(seed)
    keep = np.argsort(rng.random((n_models, len(y))), axis=0) < n_models // 2
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 0.1  # the same second query for every model
    out.mkdir(parents=True, exist_ok=False)
    np.save(out / "keep.npy", keep)
    np.save(out / "labels.npy", y.numpy())
    for m in range(n_models):
        model = train_one(x[keep[m]], y[keep[m]], seed + m, epochs)
        with torch.no_grad():
            logits = torch.stack([model(x), model(x + noise)], dim=1)  # [n, Q=2, C]
        folder = out / "models" / f"{m:04d}"
        folder.mkdir(parents=True)
        np.save(folder / "logits.npy", logits.numpy().astype(np.float32))
        print(f"model {m} exported")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("checkpoints/torch_farm"))
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    export_farm(args.out, args.models, epochs=args.epochs)
    root = Path(__file__).resolve().parents[1]
    sys.exit(subprocess.call([sys.executable, str(root / "attack.py"), "--experiment", str(args.out), "--attack", "lira", "rmia"]))


if __name__ == "__main__":
    main()
