"""Shokri's two attack designs (per class, shared): classifiers fitted one after the other vs side by side.

``Shokri.score`` trains the per-class and the shared batched MLP with ``concurrent_attack_scores``
(one thread per core, one torch thread per fit). This script times both ways on the requests
``Shokri.design_requests`` builds for a synthetic leave-one-out farm, in alternating rounds, for a
few (targets, classes) shapes: the quickstart's scoring (64 targets, 10 classes), an epsilon trial
of it (32 targets), and an IMDB LSTM audit (16 and 8 targets, 2 classes). It checks that both ways give bit-identical scores and prints seconds and ratios.

    python benchmarks/shokri_designs.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.classifiers import attack_scores, concurrent_attack_scores
from mia_lightning.logs import configure_logging

SHAPES = ((64, 10, 1797), (32, 10, 1797), (16, 2, 5000), (8, 2, 5000))
"""(targets, classes, samples) of the cases timed: a leave-one-out farm of that many models, every model a target."""


def requests_for(n_models: int, n_classes: int, n_samples: int, seed: int = 0) -> list[dict]:
    """The two designs' ``attack_scores`` arguments, as ``Shokri.score`` builds them, on a synthetic farm of ``n_models``."""
    rng = np.random.default_rng(seed)
    keep = rng.random((n_models, n_samples)) < 0.5
    labels = rng.integers(0, n_classes, n_samples)
    logits = rng.normal(size=(n_models, n_samples, 1, n_classes)).astype(np.float32)
    logits[np.arange(n_models)[:, None], np.arange(n_samples)[None, :], :, labels[None, :]] += 1.0 + keep[..., None]
    attack = create_attack("shokri")
    attack.fit(AttackData(keep=keep, labels=labels, logits=logits))
    return list(attack.design_requests(np.arange(n_models)).values())


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
