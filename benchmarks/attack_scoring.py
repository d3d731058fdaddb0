"""Scoring speed of LiRA on a 256-model experiment: leave-one-out sums vs recomputing fits per target.

Both are measured in this run on the same synthetic logits (digits-sized pool: 1,797 samples,
10 classes, 1 query): the shipped attack (sufficient statistics over the pool, one subtraction per
target) and a per-target refit (mean/std over the other N-1 models for every target, vectorised
over samples: what a straightforward implementation does). Prints seconds and the ratio.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.module import score_targets
from mia_lightning.logs import configure_logging


def synthetic(n_models: int, n_samples: int, n_classes: int, n_queries: int, seed: int = 0) -> AttackData:
    rng = np.random.default_rng(seed)
    keep = rng.random((n_models, n_samples)) < 0.5
    labels = rng.integers(0, n_classes, n_samples)
    logits = rng.normal(size=(n_models, n_samples, n_queries, n_classes)).astype(np.float32)
    logits[np.arange(n_models)[:, None], np.arange(n_samples)[None, :], :, labels[None, :]] += 1.0 + keep[..., None]
    return AttackData(keep=keep, labels=labels, logits=logits)


def refit_per_target(data: AttackData, targets: np.ndarray) -> np.ndarray:
    """Online LiRA with the Gaussians refitted from scratch for every target (the baseline)."""
    phi, keep = data.phi, data.keep
    scores = np.empty((len(targets), data.n_samples))
    for row, t in enumerate(targets):
        others = np.arange(data.n_models) != t
        p, k = phi[others], keep[others][..., None]
        stats = []
        for mask in (k, ~k):
            count = mask.sum(0)
            mu = (p * mask).sum(0) / count
            sd = np.sqrt((((p - mu) ** 2) * mask).sum(0) / count)
            stats.append((mu, sd))
        (mu_in, sd_in), (mu_out, sd_out) = stats
        x = phi[t]
        scores[row] = (-0.5 * ((x - mu_in) / sd_in) ** 2 - np.log(sd_in) + 0.5 * ((x - mu_out) / sd_out) ** 2 + np.log(sd_out)).mean(-1)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1797)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--baseline_targets", type=int, default=16, help="targets timed for the per-target refit (extrapolated)")
    args = parser.parse_args()
    configure_logging()
    logging.getLogger("mia_lightning").setLevel(logging.ERROR)  # the synthetic plan is fine; no fallback warnings
    data = synthetic(args.models, args.samples, args.classes, args.queries)
    targets = np.arange(args.models)
    _ = data.phi  # shared by both: the statistic from the logits

    start = time.perf_counter()
    fast = score_targets(create_attack("lira"), data, targets)
    fast_s = time.perf_counter() - start

    sub = targets[: args.baseline_targets]
    start = time.perf_counter()
    slow = refit_per_target(data, sub)
    slow_s = (time.perf_counter() - start) * args.models / len(sub)
    np.testing.assert_allclose(fast["lira_online"][: len(sub)], slow, rtol=1e-6, atol=1e-6)

    print(f"experiment: {args.models} models x {args.samples} samples x {args.queries} queries x {args.classes} classes")
    print(f"LiRA (5 variants), all {args.models} targets, leave-one-out sums : {fast_s:8.2f} s")
    print(f"online LiRA only, per-target refit (extrapolated from {len(sub)})  : {slow_s:8.2f} s")
    print(f"speedup: {slow_s / fast_s:.1f}x")


if __name__ == "__main__":
    main()
