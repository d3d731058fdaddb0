"""What the text recipes cost: LSTM epoch time by implementation and under DP-SGD, and Shokri's batched attack training.

Side by side in one run, on a seeded IMDB pool (offline, ``--n_rows`` reviews, each model on half):

1. one training epoch of ``LSTMClassifier`` with ``nn.LSTM``, with opacus' ``DPLSTM`` (no DP), and
   with ``DPLSTM`` under the ``DPSGD`` callback (per-sample gradients, clipping, noise), with ratios;
2. Shokri's attack models for ``--targets`` targets on generated logits: trained at once as one
   batched network (what ``attack.py --attack shokri`` does) vs one training per target.

    OMP_NUM_THREADS=1 python benchmarks/text_lstm.py [--n_rows 5000] [--size 64] [--targets 8]
"""

from __future__ import annotations

import argparse
import time
import warnings

import lightning as L
import numpy as np
import torch

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.module import score_targets
from mia_lightning.data.plan import PlanSpec, make_plan
from mia_lightning.data.text import TextDataModule
from mia_lightning.models.lstm import LSTMClassifier
from mia_lightning.defences.dp_sgd import DPSGD


def epoch_seconds(dm: TextDataModule, size: int, lstm: str, dp: bool) -> float:
    torch.manual_seed(0)
    model = LSTMClassifier(**dm.model_kwargs(), embedding_dim=size, hidden_size=size, lstm=lstm)
    callbacks = [DPSGD(target_epsilon=8.0)] if dp else []
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - start


def shokri_seconds(targets: int, batched: bool) -> float:
    n_models, n = targets + 8, 2000
    keep = make_plan(PlanSpec("bench", n, n_models, seed=0)).keep
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    logits = rng.normal(size=(n_models, n, 1, 2)).astype(np.float32)
    logits[:, np.arange(n), 0, labels] += 1.0 + 2.0 * keep
    data = AttackData(keep=keep, labels=labels, logits=logits)
    start = time.perf_counter()
    if batched:
        score_targets(create_attack("shokri"), data, np.arange(targets))
    else:
        for t in range(targets):
            score_targets(create_attack("shokri"), data, np.array([t]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_rows", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64, help="embedding and hidden size")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--targets", type=int, default=8)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    dm = TextDataModule(source="imdb", n_rows=args.n_rows, vocab_size=3000, max_len=100, truncate="last", batch_size=args.batch_size)
    print(f"threads {torch.get_num_threads()}; IMDB pool {args.n_rows} reviews, {dm.train_indices.size} per model, length 100, size {args.size}")
    times = {name: epoch_seconds(TextDataModule(source="imdb", n_rows=args.n_rows, vocab_size=3000, max_len=100, truncate="last", batch_size=args.batch_size), args.size, lstm, dp)
             for name, lstm, dp in (("nn.LSTM", "torch", False), ("DPLSTM", "opacus", False), ("DPLSTM + DPSGD", "opacus", True))}
    for name, seconds in times.items():
        print(f"  one epoch {name:15s} {seconds:6.2f} s   x{seconds / times['nn.LSTM']:.1f} of nn.LSTM")
    batched, looped = shokri_seconds(args.targets, True), shokri_seconds(args.targets, False)
    print(f"Shokri attack models for {args.targets} targets (2,000 samples, {args.targets + 7} shadows each): batched {batched:.1f} s, "
          f"one training per target {looped:.1f} s, speedup x{looped / batched:.1f}")


if __name__ == "__main__":
    main()
