"""Audit at scale: ``attack.py`` on a synthetic experiment of M models x n samples x Q queries x C classes.

Builds the experiment once (sizes as flags; default 256 x 50,000 x 2 x 10, 1 GB of float32 logits),
then measures side by side in this run:
- the floor: ``numpy.load`` of every model's logits plus one ``np.sort`` of the M x n pooled scores
  per attack output (the least any audit must do);
- the import floor: a child process that only imports the attack LightningModule (Python, torch, Lightning);
- ``attack.py --attack <attacks>`` as a subprocess: wall time and peak RSS (``ru_maxrss`` of the child),
  plus its per-stage timing lines (``MIA_LIGHTNING_TIMING=1``).
Prints the ratios wall / floor, (wall - imports) / floor and peak RSS / logits size. The benchmark runs
under the allocator settings ``attack.py`` itself uses (``runtime.apply_runtime_defaults``), so both
sides of a ratio load the logits the same way.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mia_lightning.runtime import apply_runtime_defaults

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"lira": 5, "rmia": 2, "thresholds": 4, "reference": 1}


def build_experiment(root: Path, n_models: int, n_samples: int, n_queries: int, n_classes: int, seed: int = 0) -> int:
    """Write keep.npy, labels.npy and models/NNNN/logits.npy (members get a sample-dependent boost); returns logits bytes."""
    rng = np.random.default_rng(seed)
    keep = np.argsort(rng.random((n_models, n_samples)), axis=0) < n_models // 2
    labels = rng.integers(0, n_classes, n_samples)
    difficulty = rng.normal(1.0, 1.0, n_samples)
    vulnerability = rng.exponential(1.0, n_samples)
    root.mkdir(parents=True)
    np.save(root / "keep.npy", keep)
    np.save(root / "labels.npy", labels)
    total = 0
    for m in range(n_models):
        logits = rng.normal(0.0, 1.0, (n_samples, n_queries, n_classes)).astype(np.float32)
        boost = difficulty + vulnerability * keep[m] + rng.normal(0.0, 0.5, n_samples)
        logits[np.arange(n_samples), :, labels] += boost[:, None].astype(np.float32)
        folder = root / "models" / f"{m:04d}"
        folder.mkdir(parents=True)
        np.save(folder / "logits.npy", logits)
        total += logits.nbytes
    return total


def floor_seconds(root: Path, n_models: int, n_outputs: int) -> tuple[float, float, float]:
    """(load s, sort s, total): numpy.load of all logits, then one np.sort of M x n pooled scores per output."""
    start = time.perf_counter()
    arrays = [np.load(root / "models" / f"{m:04d}" / "logits.npy") for m in range(n_models)]
    load_s = time.perf_counter() - start
    pooled = np.random.default_rng(1).normal(size=n_models * arrays[0].shape[0])
    del arrays
    start = time.perf_counter()
    for _ in range(n_outputs):
        np.sort(pooled)
    sort_s = time.perf_counter() - start
    return load_s, sort_s, load_s + sort_s


def import_seconds() -> float:
    """Wall time of a child process that imports only what scoring needs (the attack LightningModule and its imports)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mia_lightning.attacks.module"], check=True, cwd=ROOT)
    return time.perf_counter() - start


def run_audit(root: Path, attacks: list[str], extra: list[str]) -> tuple[float, float, str]:
    """(wall s, peak RSS GB, output) of ``attack.py`` in a child process."""
    env = dict(os.environ, MIA_LIGHTNING_TIMING="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "attack.py"), "--experiment", str(root), "--attack", *attacks, *extra],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"attack.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kb / 1024**2, proc.stdout + proc.stderr


def main() -> None:
    apply_runtime_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=256)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--attacks", nargs="+", default=["lira"])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more attack.py arguments (e.g. --bootstrap 0)")
    parser.add_argument("--keep", type=Path, default=None, help="build (or reuse) the experiment here instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp) / "scale"
        if (root / "keep.npy").is_file():
            size = sum(p.stat().st_size for p in root.glob("models/*/logits.npy"))
        else:
            start = time.perf_counter()
            size = build_experiment(root, args.models, args.samples, args.queries, args.classes)
            print(f"built {args.models} x {args.samples} x {args.queries} x {args.classes} ({size / 1e9:.2f} GB of logits) in {time.perf_counter() - start:.1f} s")
        n_outputs = sum(OUTPUTS.get(a, 1) for a in (OUTPUTS if args.attacks == ["all"] else args.attacks))
        load_s, sort_s, floor = floor_seconds(root, args.models, n_outputs)
        imports = import_seconds()
        wall, peak_gb, output = run_audit(root, args.attacks, args.extra)
        stages = [line for line in output.splitlines() if line.startswith("timing")]
        print(f"experiment : {args.models} models x {args.samples} samples x {args.queries} queries x {args.classes} classes, logits {size / 1e9:.2f} GB")
        print(f"floor      : numpy.load {load_s:.2f} s + {n_outputs} x np.sort of {args.models * args.samples:,} scores {sort_s:.2f} s = {floor:.2f} s")
        print(f"attack.py --attack {' '.join(args.attacks)} {' '.join(args.extra)}: wall {wall:.1f} s, peak RSS {peak_gb:.2f} GB")
        print(f"imports    : python -c 'import mia_lightning.attacks.module' {imports:.2f} s")
        print(f"ratios     : wall / floor {wall / floor:.1f}x, (wall - imports) / floor {(wall - imports) / floor:.1f}x, "
              f"peak RSS / logits {peak_gb * 1024**3 / size:.2f}x")
        for line in stages:
            print("  " + line)


if __name__ == "__main__":
    main()
