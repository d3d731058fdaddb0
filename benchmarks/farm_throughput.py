"""Farm throughput: the sequential Lightning farm vs the vectorised farm, measured side by side in one run.

Case 1, the quickstart recipe (configs/tabular/digits_quickstart.yaml): 64 MLPs on digits; the
sequential farm is timed on --sequential_models models and its per-model rate extrapolated (it
trains one model after another, so its rate does not depend on the count). Case 2: 256 linear heads
(hidden: []) on cached 512-d features, made once from digits by a frozen, seeded random ReLU
feature map and saved as a CSV. Reports models per minute, the ratio, and the vectorised farm's
achieved GFLOP/s (training FLOPs, forward + backward = 3 x 2 x multiply-adds per sample, over its
whole wall time) against a measured float32 matmul peak. Training and prediction are timed; loading
the pool and writing files are not (both farms share them).
Case 4, the LSTM recipe (configs/text/imdb_lstm.yaml): 16 LSTM classifiers on the 5,000-review IMDB
pool (``--lstm_epochs`` overrides its 8 epochs), sequential farm vs the LSTM ensemble
(``models.lstm_ensemble``), GFLOP/s counted as 3 x 2 x the multiply-adds of the input and recurrent
projections of every token plus the head.
Case 5, the FiLM recipe (configs/images/fmnist_film.yaml: ImageNet MobileNetV2 at 96 px, S = 4 shots x
C = 5 classes, B = 20): ``--image_models`` models fine-tuned ``film`` and then ``full`` (``--image_epochs``
overrides the recipe's 30 epochs), sequential farm vs the image ensemble (``models.image_ensemble``),
timed in ``--image_rounds`` alternating rounds (the fastest of each farm counts), GFLOP/s from torch's ``FlopCounterMode`` count of one model's forward pass (``image_training_flops``).
Case 6, the bag-of-words settings of the defences study (configs/text/imdb_defences.yaml on
configs/text/imdb_lstm.yaml): ``--bag_models`` linear bag-of-words classifiers (20,000-review pool,
vocabulary 5,000, 256 tokens, batch 1,024, Adam 0.05) undefended (``bow_baseline``, 10 epochs) and under
DP-SGD at epsilon 8 (``bow_dp_eps8``, 3 epochs of Poisson batches, opacus on the sequential farm), sequential
farm vs the bag ensemble (``models.bag_ensemble``); GFLOP/s counted as the dense model's 3 x 2 x V x C
multiply-adds per sample (the ensemble sums sparse bags, so it does less work than it is credited with).
Case 3 (``--contention``): the quickstart farm as users run it, ``train.py farm`` in a fresh
process, wall time measured side by side with and without a competing CPU load (another process
keeping every core busy with matrix products), and with the runtime defaults of
``mia_lightning/runtime.py`` (passive OpenMP waiting, heap reuse for large temporaries) switched on
and off (``MIA_LIGHTNING_RUNTIME=0``).
Last line: ``speedup: N.Nx`` (vectorised over sequential, case 1).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from mia_lightning.data.images import make_few_shot_plan
from mia_lightning.data.plan import PlanSpec, make_lira_plan
from mia_lightning.data.streams import steps_per_epoch
from mia_lightning.data.tabular import load_tabular
from mia_lightning.contract.components import ComponentSpec
from mia_lightning.farm.engine import FarmSetup, ModelJob, SequentialEngine, model_seed
from mia_lightning.farm.vectorised import VectorisedEngine
from mia_lightning.logs import configure_logging

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak_gflops(device: str, size: int = 2048, repeats: int = 10) -> float:
    """Measured float32 matmul throughput of this device (the roofline the farm is compared with)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def cached_features_csv(folder: Path, width: int = 512) -> str:
    """digits pushed through a frozen seeded random ReLU map to ``width`` features, saved as CSV (label column 'y')."""
    pool = load_tabular("digits")
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(pool.n_features, width, generator=generator) / pool.n_features**0.5
    features = torch.relu(torch.from_numpy(pool.features) @ projection).numpy()
    path = folder / "digits_random_features.csv"
    header = ",".join([f"f{i}" for i in range(width)] + ["y"])
    rows = np.column_stack([features, pool.labels]).astype(np.float32)
    np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt=["%.6g"] * width + ["%d"])
    return str(path)


def jobs_for(n_samples: int, n_models: int, seed: int = 0) -> list[ModelJob]:
    keep = make_lira_plan(PlanSpec("bench", n_samples, n_models, seed)).keep
    return [ModelJob(i, np.flatnonzero(keep[i]), model_seed(seed, i)) for i in range(n_models)]


def timed(engine: SequentialEngine | VectorisedEngine, jobs: list[ModelJob]) -> float:
    start = time.perf_counter()
    results = list(engine.run(jobs))
    assert len(results) == len(jobs)
    return time.perf_counter() - start


def training_flops(setup: FarmSetup, jobs: list[ModelJob], n_features: int, n_classes: int) -> float:
    """Forward + backward FLOPs of training every job (3 x 2 x multiply-adds per sample per step)."""
    widths = [n_features, *setup.model.init_args.get("hidden", [128]), n_classes]
    macs = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    batch = int(setup.data.init_args.get("batch_size", 64))
    epochs = int(setup.trainer.get("max_epochs", 1))
    return sum(6 * macs * min(batch, j.train_indices.size) * epochs * steps_per_epoch(j.train_indices.size, min(batch, j.train_indices.size)) for j in jobs)


def lstm_training_flops(setup: FarmSetup, jobs: list[ModelJob], steps: int) -> float:
    """Forward + backward FLOPs of training every LSTM job: 3 x 2 x multiply-adds per token (input and recurrent projections) and per sample (head)."""
    model, data = setup.model.init_args, setup.data.init_args
    hidden, layers, directions = model["hidden_size"], model.get("num_layers", 1), 2 if model.get("bidirectional") else 1
    macs = 0
    for layer in range(layers):
        width = model["embedding_dim"] if layer == 0 else hidden * directions
        macs += directions * data["max_len"] * (width + hidden) * 4 * hidden
    macs += hidden * directions * 2
    return 6 * macs * data["batch_size"] * steps * len(jobs)


def compare(name: str, setup: FarmSetup, jobs: list[ModelJob], n_sequential: int, group_size: int, peak: float, flops: float, fused: bool = True,
            rounds: int = 1) -> float:
    """Print both farms' models/min, GFLOP/s and their ratio; with ``rounds`` > 1 the farms alternate and each one's fastest round counts (a shared machine's load changes within minutes)."""
    n_models = len(jobs)
    setup.build_datamodule(jobs[0])  # load (and cache) the pool before timing: neither farm pays for parsing it
    sequential_s, vectorised_s = float("inf"), float("inf")
    for _ in range(rounds):
        sequential_s = min(sequential_s, timed(SequentialEngine(setup), jobs[:n_sequential]) / n_sequential * n_models)
        vectorised_s = min(vectorised_s, timed(VectorisedEngine(setup, group_size=group_size), jobs))
    gflops, sequential_gflops = flops / vectorised_s / 1e9, flops / sequential_s / 1e9
    print(f"\n{name}")
    print(f"  sequential Lightning farm : {60 * n_models / sequential_s:8.1f} models/min  ({sequential_s:7.1f} s for {n_models}, extrapolated from {n_sequential} timed), "
          f"{sequential_gflops:.1f} GFLOP/s = {100 * sequential_gflops / peak:.1f}% of peak")
    print(f"  vectorised farm           : {60 * n_models / vectorised_s:8.1f} models/min  ({vectorised_s:7.1f} s for {n_models}, groups of {group_size})")
    print(f"  vectorised achieved       : {gflops:8.1f} GFLOP/s = {100 * gflops / peak:.1f}% of the measured matmul peak")
    if fused:
        fused_setup = FarmSetup(setup.data, ComponentSpec(setup.model.class_path, {**setup.model.init_args, "fused_optimizer": True}), setup.trainer)
        fused_s = timed(VectorisedEngine(fused_setup, group_size=group_size), jobs)
        fused_gflops = flops / fused_s / 1e9
        print(f"  vectorised, fused optimiser: {60 * n_models / fused_s:7.1f} models/min, {fused_gflops:.1f} GFLOP/s = {100 * fused_gflops / peak:.1f}% "
              "(model.init_args.fused_optimizer: true; not bit-identical to the sequential farm)")
    print(f"  ratio                     : {sequential_s / vectorised_s:8.2f}x")
    return sequential_s / vectorised_s


def lstm_case(trainer: dict, args: argparse.Namespace, peak: float) -> None:
    """Case 4: the imdb_lstm recipe's LSTMs, sequential farm vs LSTM ensemble."""
    recipe = yaml.safe_load((ROOT / "configs/text/imdb_lstm.yaml").read_text())
    lstm_trainer = {**trainer, "max_epochs": args.lstm_epochs or recipe["trainer"]["max_epochs"]}
    setup = FarmSetup(ComponentSpec(recipe["data"]["class_path"], recipe["data"]["init_args"]), ComponentSpec(recipe["model"]["class_path"], recipe["model"]["init_args"]), lstm_trainer)
    jobs = jobs_for(recipe["data"]["init_args"]["n_rows"], args.lstm_models, recipe["plan"]["seed"])
    steps = lstm_trainer["max_epochs"] * steps_per_epoch(jobs[0].train_indices.size, recipe["data"]["init_args"]["batch_size"])
    for group in args.lstm_groups:
        compare(f"case 4: {args.lstm_models} LSTMs of configs/text/imdb_lstm.yaml, {lstm_trainer['max_epochs']} epochs, groups of {group}",
                setup, jobs, args.sequential_models, group, peak, lstm_training_flops(setup, jobs, steps), fused=False)


def bag_case(trainer: dict, args: argparse.Namespace, peak: float) -> None:
    """Case 6: the bow_baseline and bow_dp_eps8 settings of the defences study, sequential farm vs bag ensemble."""
    recipe = yaml.safe_load((ROOT / "configs/text/imdb_lstm.yaml").read_text())
    settings = {s["name"]: s["overrides"] for s in yaml.safe_load((ROOT / "configs/text/imdb_defences.yaml").read_text())["study"]["settings"]}
    for name in ("bow_baseline", "bow_dp_eps8"):
        overrides = settings[name]
        data = {**recipe["data"]["init_args"], **{k.rsplit(".", 1)[1]: v for k, v in overrides.items() if k.startswith("data.init_args.")}}
        callbacks = tuple(ComponentSpec(c["class_path"], c["init_args"]) for c in overrides.get("trainer.callbacks", []))
        bag_trainer = {**trainer, "max_epochs": args.bag_epochs or overrides["trainer.max_epochs"]}
        model = overrides["model"]
        setup = FarmSetup(ComponentSpec(recipe["data"]["class_path"], data), ComponentSpec(model["class_path"], model["init_args"]), bag_trainer, callbacks)
        jobs = jobs_for(data["n_rows"], args.bag_models, recipe["plan"]["seed"])
        steps = bag_trainer["max_epochs"] * steps_per_epoch(jobs[0].train_indices.size, data["batch_size"])
        flops = 6 * data["vocab_size"] * 2 * data["batch_size"] * steps * len(jobs)
        compare(f"case 6: {args.bag_models} bag-of-words classifiers of configs/text/imdb_defences.yaml {name}, {bag_trainer['max_epochs']} epochs, "
                f"groups of {args.bag_models}", setup, jobs, args.bag_sequential, args.bag_models, peak, flops, fused=False, rounds=args.bag_rounds)


def image_training_flops(setup: FarmSetup, jobs: list[ModelJob], steps: int) -> float:
    """Training FLOPs of every image job: the forward pass counted by ``FlopCounterMode`` at the recipe's batch, x 3 for full fine-tuning
    (input and weight gradients), x 2 for FiLM (input gradients only: the frozen convolutions need no weight gradient), x steps and models.

    The backward is not counted by ``FlopCounterMode`` itself: it counts a depthwise convolution's backward as a dense one (45 GFLOP
    for a MobileNetV2 step at batch 20, 96 px, whose forward is 2.2 GFLOP).
    """
    from torch.utils.flop_counter import FlopCounterMode

    datamodule = setup.build_datamodule(jobs[0])
    model = setup.build_model(datamodule, jobs[0].seed).train()
    x, _ = next(iter(datamodule.train_dataloader()))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    passes = {"full": 3, "film": 2, "head": 1}[model.hparams.finetune]
    return counter.get_total_flops() * passes * steps * len(jobs)


def image_case(trainer: dict, args: argparse.Namespace, peak: float) -> None:
    """Case 5: the fmnist_film recipe fine-tuned film and full, sequential farm vs image ensemble."""
    recipe = yaml.safe_load((ROOT / "configs/images/fmnist_film.yaml").read_text())
    image_trainer = {**trainer, "max_epochs": args.image_epochs or recipe["trainer"]["max_epochs"]}
    data = ComponentSpec(recipe["data"]["class_path"], recipe["data"]["init_args"])
    labels = FarmSetup(data, ComponentSpec(recipe["model"]["class_path"], recipe["model"]["init_args"]), image_trainer).build_datamodule().pool_labels()
    keep = make_few_shot_plan(PlanSpec("bench", labels.size, args.image_models, recipe["plan"]["seed"]), labels).keep
    jobs = [ModelJob(i, np.flatnonzero(keep[i]), model_seed(recipe["plan"]["seed"], i)) for i in range(args.image_models)]
    batch = min(recipe["data"]["init_args"]["batch_size"], jobs[0].train_indices.size)
    steps = image_trainer["max_epochs"] * steps_per_epoch(jobs[0].train_indices.size, batch)
    for finetune in ("film", "full"):
        setup = FarmSetup(data, ComponentSpec(recipe["model"]["class_path"], {**recipe["model"]["init_args"], "finetune": finetune}), image_trainer)
        for group in args.image_groups:
            compare(f"case 5: {args.image_models} MobileNetV2 {finetune} fine-tunings of configs/images/fmnist_film.yaml, "
                    f"{image_trainer['max_epochs']} epochs of {batch} images, groups of {group}",
                    setup, jobs, args.image_sequential, group, peak, image_training_flops(setup, jobs, steps), fused=False, rounds=args.image_rounds)


def _burn(stop: "multiprocessing.synchronize.Event") -> None:
    """A competing job: matrix products on every core until told to stop."""
    torch.set_num_threads(os.cpu_count() or 1)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def timed_farm(root: Path, runtime: bool, contention: bool, models: int) -> float:
    """Wall seconds of ``train.py farm`` on the quickstart recipe in a fresh process (plan, train, export, write)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_WAIT_POLICY"))}
    env["MIA_LIGHTNING_RUNTIME"] = "1" if runtime else "0"
    name = f"farm_{'runtime' if runtime else 'plain'}_{'busy' if contention else 'idle'}"
    command = [sys.executable, str(ROOT / "train.py"), "farm", "--config", str(ROOT / "configs/tabular/digits_quickstart.yaml"),
               "--experiment.root", str(root), "--experiment.name", name, "--plan.n_models", str(models), "--trainer.enable_progress_bar", "false"]
    context = multiprocessing.get_context("spawn")  # never fork after torch's OpenMP is up
    stop = context.Event()
    burner = context.Process(target=_burn, args=(stop,), daemon=True) if contention else None
    if burner:
        burner.start()
        time.sleep(1.0)
    try:
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        return time.perf_counter() - start
    finally:
        if burner:
            stop.set()
            burner.join()


def contention_case(models: int) -> None:
    """Case 3: train.py farm with and without a competing load, runtime defaults on and off."""
    print(f"\ncase 3: `train.py farm` on the quickstart recipe ({models} models), fresh process, wall time including start-up")
    with tempfile.TemporaryDirectory() as folder:
        results = {(runtime, busy): timed_farm(Path(folder), runtime, busy, models) for busy in (False, True) for runtime in (True, False)}
    for busy in (False, True):
        on, off = results[(True, busy)], results[(False, busy)]
        print(f"  {'with a competing load' if busy else 'idle machine         '}: runtime defaults {on:6.1f} s, without {off:6.1f} s  (ratio {off / on:4.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--heads", type=int, default=256)
    parser.add_argument("--sequential_models", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's max_epochs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--families", nargs="+", choices=("mlp", "lstm", "image", "bag"), default=["mlp", "lstm", "image", "bag"],
                        help="which cases to run (mlp: cases 1-3, lstm: case 4, image: case 5, bag: case 6)")
    parser.add_argument("--lstm_models", type=int, default=16)
    parser.add_argument("--lstm_epochs", type=int, default=None, help="override the LSTM recipe's 8 epochs")
    parser.add_argument("--lstm_groups", type=int, nargs="+", default=[16], help="farm.group_size values to time the LSTM ensemble with")
    parser.add_argument("--image_models", type=int, default=8)
    parser.add_argument("--image_epochs", type=int, default=None, help="override the FiLM recipe's 30 epochs")
    parser.add_argument("--image_sequential", type=int, default=2, help="image models the sequential farm is timed on (extrapolated)")
    parser.add_argument("--image_groups", type=int, nargs="+", default=[8], help="farm.group_size values to time the image ensemble with")
    parser.add_argument("--image_rounds", type=int, default=3, help="alternating timing rounds of the image farms; the fastest of each counts")
    parser.add_argument("--bag_models", type=int, default=16)
    parser.add_argument("--bag_epochs", type=int, default=None, help="override the bow settings' epochs (10 undefended, 3 under DP-SGD)")
    parser.add_argument("--bag_sequential", type=int, default=2, help="bag models the sequential farm is timed on (extrapolated)")
    parser.add_argument("--bag_rounds", type=int, default=2, help="alternating timing rounds of the bag farms; the fastest of each counts")
    parser.add_argument("--contention", action="store_true", help="also case 3: train.py farm with and without a competing CPU load")
    args = parser.parse_args()
    configure_logging()
    torch.manual_seed(0)

    recipe = yaml.safe_load((ROOT / "configs/tabular/digits_quickstart.yaml").read_text())
    trainer = {**recipe["trainer"], "accelerator": "gpu" if args.device == "cuda" else "cpu", "devices": 1, "precision": args.precision, "enable_progress_bar": False}
    if args.epochs:
        trainer["max_epochs"] = args.epochs
    peak = matmul_peak_gflops(args.device)
    print(f"device: {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} threads'}), precision {args.precision}")
    print(f"measured float32 matmul peak: {peak:.1f} GFLOP/s")

    mlp = FarmSetup(ComponentSpec(recipe["data"]["class_path"], recipe["data"]["init_args"]), ComponentSpec(recipe["model"]["class_path"], recipe["model"]["init_args"]), trainer)
    if "lstm" in args.families:
        lstm_case(trainer, args, peak)
    if "image" in args.families:
        image_case(trainer, args, peak)
    if "bag" in args.families:
        bag_case(trainer, args, peak)
    if "mlp" not in args.families:
        return
    jobs = jobs_for(1797, args.models)
    speedup = compare(f"case 1: {args.models} MLPs {recipe['model']['init_args']['hidden']} on digits, {trainer['max_epochs']} epochs (quickstart recipe)",
                      mlp, jobs, args.sequential_models, args.models, peak, training_flops(mlp, jobs, 64, 10))
    with tempfile.TemporaryDirectory() as folder:
        features = cached_features_csv(Path(folder))
        heads = FarmSetup(
            ComponentSpec("mia_lightning.data.tabular.TabularDataModule", {"source": features, "label_column": "y", "batch_size": 64}),
            ComponentSpec("mia_lightning.models.tabular_mlp.TabularMLP", {**recipe["model"]["init_args"], "hidden": []}),
            trainer,
        )
        head_jobs = jobs_for(1797, args.heads)
        compare(f"case 2: {args.heads} linear heads on cached 512-d features of digits, {trainer['max_epochs']} epochs",
                heads, head_jobs, args.sequential_models, args.heads, peak, training_flops(heads, head_jobs, 512, 10))
    if args.contention:
        contention_case(args.models)
    print(f"\nspeedup: {speedup:.1f}x")


if __name__ == "__main__":
    main()
