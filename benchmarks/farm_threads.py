"""Torch threads, worker processes and precision of a CPU farm: ``train.py farm`` of one recipe in each variant, side by side.

Each round trains the same small farm (default: 4 models of configs/text/imdb_lstm.yaml) once per
variant, in alternating order; ``--hogs N`` keeps N busy processes running beside it (a shared
machine). Variants: one process with 1 thread, with 2 threads whose idle OpenMP threads sleep (the
project's default, ``runtime.py``: ``OMP_WAIT_POLICY=PASSIVE``) or spin (``OMP_WAIT_POLICY=ACTIVE``),
two one-thread worker processes (``--trainer.devices 2``; what ``devices: auto`` starts on 2
cores), and the same in bfloat16 autocast (``--trainer.precision bf16-mixed``: native on CPUs with
AVX512-BF16 or AMX, emulated and possibly slower elsewhere). Prints each variant's median wall time
and its ratio to the 1-thread farm, and how far model 0's logits are from the 1-thread farm's (the
LSTM's CPU kernel gives the same numbers with 1 or 2 threads; bfloat16 does not).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (torch threads per process, OMP_WAIT_POLICY, worker processes, trainer precision)
    "1 thread": ("1", "PASSIVE", "1", "32-true"),
    "2 threads, asleep when idle": ("2", "PASSIVE", "1", "32-true"),
    "2 threads, spinning": ("2", "ACTIVE", "1", "32-true"),
    "2 workers, 1 thread each": ("1", "PASSIVE", "2", "32-true"),
    "2 workers, 1 thread each, bf16-mixed": ("1", "PASSIVE", "2", "bf16-mixed"),
}


def hog() -> None:
    """Keep one core busy until terminated."""
    while True:
        pass


def experiment_name(variant: str, round_: int) -> str:
    """The experiment folder of one variant's farm in one round (a plain name: no spaces or commas)."""
    return f"{variant.split(',')[0].replace(' ', '_')}_{'_'.join(VARIANTS[variant])}_{round_}"


def farm_seconds(config: str, n_models: int, root: Path, name: str, threads: str, policy: str, workers: str, precision: str) -> float:
    """Wall time of ``train.py farm`` in a child process (imports included) for a fresh experiment ``root/name``."""
    env = dict(os.environ, OMP_WAIT_POLICY=policy)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), "farm", "--config", config, "--plan.n_models", str(n_models),
                    "--experiment.root", str(root), "--experiment.name", name, "--farm.threads", threads, "--trainer.devices", workers, "--trainer.precision", precision],
                   check=True, env=env, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/text/imdb_lstm.yaml")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hogs", type=int, default=0, help="busy processes running beside the farms")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="which variants to run (the 1-thread farm always runs)")
    args = parser.parse_args()
    chosen = {name: VARIANTS[name] for name in VARIANTS if name == "1 thread" or name in args.variants}
    hogs = [multiprocessing.Process(target=hog, daemon=True) for _ in range(args.hogs)]
    for process in hogs:
        process.start()
    times: dict[str, list[float]] = {name: [] for name in chosen}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.rounds):
                order = list(chosen) if round_ % 2 == 0 else list(reversed(chosen))
                for name in order:
                    times[name].append(farm_seconds(args.config, args.models, Path(tmp), experiment_name(name, round_), *VARIANTS[name]))
            logits = {name: np.load(Path(tmp) / experiment_name(name, 0) / "models" / "0000" / "logits.npy") for name in chosen}
    finally:
        for process in hogs:
            process.terminate()
    base = statistics.median(times["1 thread"])
    print(f"train.py farm --config {args.config} --plan.n_models {args.models}; {args.rounds} rounds, {args.hogs} busy processes beside it, "
          f"{os.cpu_count()} CPUs")
    for name, values in times.items():
        median = statistics.median(values)
        difference = float(np.abs(logits[name] - logits["1 thread"]).max())
        print(f"  {name:38s} {median:6.1f} s  ({base / median:.2f}x the 1-thread farm's speed; model 0 logits max |diff| {difference:.1e})")


if __name__ == "__main__":
    main()
