"""Unlearning retrains: the sequential Lightning farm vs the vectorised farm on the scratch recipe, side by side in one run.

The models of configs/unlearning/scratch_single.yaml (UCI Adult offline, one original of 2,000
samples and its retrains without one sample each: 1,999 samples give the same step count, so the
vectorised engine trains them as one group). The sequential farm is timed on ``--sequential_models``
models and its per-model rate extrapolated; the vectorised farm trains ``--models`` models. Both
include training and prediction on the whole pool; loading the pool is outside the timings.
Last line: ``speedup: N.Nx``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import yaml

from mia_lightning.contract.components import ComponentSpec
from mia_lightning.data.plan import PlanSpec
from mia_lightning.farm.engine import FarmSetup, ModelJob, SequentialEngine, model_seed
from mia_lightning.farm.vectorised import VectorisedEngine
from mia_lightning.logs import configure_logging
from mia_lightning.unlearning.plans import make_unlearning_plan

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/unlearning/scratch_single.yaml"


def timed(engine: SequentialEngine | VectorisedEngine, jobs: list[ModelJob]) -> float:
    """Seconds to train and predict ``jobs``."""
    start = time.perf_counter()
    assert len(list(engine.run(jobs))) == len(jobs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=140, help="retrains trained by the vectorised farm (one group)")
    parser.add_argument("--sequential_models", type=int, default=4, help="retrains timed on the sequential farm (rate extrapolated)")
    args = parser.parse_args()
    configure_logging()
    recipe = yaml.safe_load(RECIPE.read_text())
    setup = FarmSetup(ComponentSpec(recipe["data"]["class_path"], recipe["data"]["init_args"]),
                      ComponentSpec(recipe["model"]["class_path"], recipe["model"]["init_args"]), recipe["trainer"])
    n_samples = len(setup.build_datamodule().pool_labels())
    options = {**recipe["plan"]["options"], "originals": 1, "updates": args.models}
    plan = make_unlearning_plan(PlanSpec("adult", n_samples, 2 * (1 + args.models), 0, kind="unlearning", options=options))
    retrains = range(2, 2 + args.models)  # models 0 and 1 are the shadow and target originals, then the shadow original's retrains
    jobs = [ModelJob(i, np.flatnonzero(plan.keep[i]), model_seed(0, i)) for i in retrains]
    sizes = {job.train_indices.size for job in jobs}
    sequential_s = timed(SequentialEngine(setup), jobs[: args.sequential_models]) * len(jobs) / args.sequential_models
    vectorised_s = timed(VectorisedEngine(setup, group_size=len(jobs)), jobs)
    epochs, hidden = recipe["trainer"]["max_epochs"], recipe["model"]["init_args"]["hidden"]
    print(f"{len(jobs)} Adult retrains (training sets of {sorted(sizes)} samples), MLP {hidden}, {epochs} epochs")
    print(f"  sequential Lightning farm : {60 * len(jobs) / sequential_s:8.1f} models/min  ({sequential_s:7.1f} s, extrapolated from {args.sequential_models} timed)")
    print(f"  vectorised farm           : {60 * len(jobs) / vectorised_s:8.1f} models/min  ({vectorised_s:7.1f} s, one group)")
    print(f"speedup: {sequential_s / vectorised_s:.1f}x")


if __name__ == "__main__":
    main()
