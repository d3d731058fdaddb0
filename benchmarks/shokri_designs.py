"""Shokri's two attack designs (per class, shared): classifiers fitted one after the other vs side by side.

``Shokri.score`` trains the per-class and the shared batched MLP with ``concurrent_attack_scores``
(one thread per core, one torch thread per fit). This script times both ways on the same synthetic
attack rows, in alternating rounds, for a few (targets, classes) shapes: the quickstart's scoring
(64 targets, 10 classes), an epsilon trial of it (32 targets), and an IMDB LSTM audit (16 and 8
targets, 2 classes). It checks that both ways give bit-identical scores and prints seconds and ratios.

    python benchmarks/shokri_designs.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mia_lightning.attacks.classifiers import MLPSettings, attack_scores, concurrent_attack_scores
from mia_lightning.attacks.shokri import attack_features
from mia_lightning.logs import configure_logging

SHAPES = ((64, 10, 1797), (32, 10, 1797), (16, 2, 5000), (8, 2, 5000))
"""(targets, classes, samples per model) of the cases timed; the shadows are the targets' leave-one-out pool."""


def requests_for(n_targets: int, n_classes: int, n_samples: int, seed: int = 0) -> list[dict]:
    """The two designs' ``attack_scores`` arguments for synthetic posteriors of ``n_targets`` leave-one-out shadows."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_samples)
    member = rng.random((n_targets, n_samples)) < 0.5
    logits = rng.normal(size=(n_targets, n_samples, n_classes))
    logits[:, np.arange(n_samples), labels] += 1.0 + member
    posteriors = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    shadow, sample = np.nonzero(np.ones_like(member))
    rows = posteriors[shadow, sample]
    weight = (shadow[None, :] != np.arange(n_targets)[:, None]).astype(np.float32)  # each target leaves out its own model
    designs = ((False, labels[sample], labels, n_classes), (True, np.zeros_like(sample), np.zeros_like(labels), 1))
    return [dict(kind="mlp", features=attack_features(rows, labels[sample], None, False, sort), member=member[shadow, sample],
                 target_features=attack_features(posteriors, labels, None, False, sort), weight=weight, group=group,
                 target_group=target_group, n_groups=n_groups, seed=0, mlp=MLPSettings())
            for sort, group, target_group, n_groups in designs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the fastest of each way counts")
    args = parser.parse_args()
    configure_logging()
    print(f"{'targets':>7} {'classes':>7} {'rows':>8} | {'in turn':>8} {'side by side':>12} | ratio")
    for n_targets, n_classes, n_samples in SHAPES:
        requests = requests_for(n_targets, n_classes, n_samples)
        in_turn, side_by_side = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            one_by_one = [attack_scores(**request) for request in requests]
            in_turn.append(time.perf_counter() - start)
            start = time.perf_counter()
            together = concurrent_attack_scores(requests)
            side_by_side.append(time.perf_counter() - start)
            assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(one_by_one, together)), "scores differ"
        rows = requests[0]["member"].size
        print(f"{n_targets:>7} {n_classes:>7} {rows:>8} | {min(in_turn):>7.2f}s {min(side_by_side):>11.2f}s | {min(in_turn) / min(side_by_side):.2f}x")


if __name__ == "__main__":
    main()
