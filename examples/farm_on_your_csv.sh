#!/usr/bin/env bash
# A farm on your own CSV: numeric columns are used as they are, text columns are one-hot encoded,
# '?', empty and NA fields are missing values (data.missing: error | drop | mean). This script writes
# a small CSV from scikit-learn's breast-cancer data (with a few missing values) to show the steps;
# point data.init_args.source at your file and data.init_args.label_column at its label column.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-checkpoints}
NAME=${NAME:-my_csv}
CSV=${CSV:-$OUT/breast_cancer.csv}
mkdir -p "$(dirname "$CSV")"
"$PY" - "$CSV" <<'PYTHON'
import csv, sys
from sklearn.datasets import load_breast_cancer
bunch = load_breast_cancer()
with open(sys.argv[1], "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow([*bunch.feature_names, "diagnosis"])
    for i, (row, label) in enumerate(zip(bunch.data, bunch.target)):
        cells = [f"{v:.6g}" for v in row]
        if i % 50 == 0:
            cells[0] = "?"  # a few missing values
        writer.writerow([*cells, bunch.target_names[label]])
PYTHON
"$PY" train.py farm --config configs/tabular/csv_farm.yaml \
  --data.init_args.source "$CSV" --data.init_args.label_column diagnosis --data.init_args.missing mean \
  --experiment.root "$OUT" --experiment.name "$NAME" "$@"
"$PY" attack.py --experiment "$OUT/$NAME" --attack lira rmia thresholds --report
