"""The Python API in a notebook-style script: train a small farm from a shipped recipe, audit it, read the results.

    python examples/python_api.py --out /tmp/api_demo --models 8 --epochs 5

Each step is one call; the same functions back `train.py` / `attack.py` (docs/api.md).
"""

from __future__ import annotations

import argparse

import mia_lightning as mia


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="checkpoints", help="folder the experiment is written under")
    parser.add_argument("--models", type=int, default=16, help="models in the farm (each a target, leave-one-out)")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    # 1. Train: a shipped recipe (mia.recipes() lists them), resized by command-line style overrides.
    experiment = mia.train("recipe:tabular/digits_quickstart", "--experiment.root", args.out, "--experiment.name", "api_demo",
                           "--plan.n_models", str(args.models), "--trainer.max_epochs", str(args.epochs), "--farm.group_size", str(args.models))

    # 2. Audit: one published run; a Record per attack output (AUC and TPR@FPR with intervals, resolution, epsilon, utility).
    records = mia.audit(experiment, attacks=["lira", "thresholds"], n_targets=min(8, args.models), logger="csv")
    best = max(records, key=lambda record: record.tpr_at_fpr[0.01])
    low, high = best.tpr_ci[0.01]
    print(f"{best.attack}: TPR@1%FPR {100 * best.tpr_at_fpr[0.01]:.2f}% (95% two-way bootstrap {100 * low:.2f}-{100 * high:.2f}%), "
          f"AUC {best.auc:.3f} {best.auc_ci}, test accuracy {100 * best.utility['test_accuracy']:.1f}%")

    # 3. Read it back later (another session, another machine): the published run, as records or a DataFrame.
    again = mia.open_experiment(experiment.root)
    assert [record.auc for record in again.records()] == [record.auc for record in records]
    try:
        print(again.dataframe()[["attack", "auc", "auc_low", "auc_high", "tpr@0.001", "tpr@0.001_resolved"]].to_string(index=False))
    except mia.MiaError as err:  # pandas is optional
        print(err)

    # 4. Reports: report.md and the self-contained report.html.
    for kind, path in again.report().items():
        print(f"{kind} report: {path}")

    # 5. Bad input raises MiaError with the command line's one-line message, and writes nothing.
    try:
        mia.audit(experiment, attacks=["lirra"])
    except mia.MiaError as err:
        print(f"refused: {err}")


if __name__ == "__main__":
    main()
