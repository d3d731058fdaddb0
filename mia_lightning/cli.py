"""Command lines: ``train.py`` (fit / farm / export) and ``attack.py``; user errors exit 2 with one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from jsonargparse import ArgumentParser
from rich.console import Console

from mia_lightning.errors import MiaError
from mia_lightning.logs import configure_logging

console = Console()
if not console.is_terminal:
    console.width = max(console.width, 200)  # keep the results table readable in logs and pipes


def parse(parser: ArgumentParser, argv: list[str]):
    """Parse ``argv``; a bad option or config becomes one ``MiaError`` line instead of the usage dump."""
    import argparse

    parser.exit_on_error = False
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as err:
        detail = " ".join(str(err).split())
        raise MiaError(f"{parser.prog}: {detail} (see `{parser.prog} --help`)") from None


def guarded(main: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """Turn ``MiaError`` into ``error: <message>`` on stderr and exit code 2 (no traceback)."""

    def wrapper(argv: list[str] | None = None) -> int:
        configure_logging()
        try:
            return main(list(sys.argv[1:] if argv is None else argv))
        except MiaError as err:
            Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            return 2
        except KeyboardInterrupt:
            Console(stderr=True).print("[yellow]interrupted[/]: finished models are kept; re-run the same command to resume")
            return 130

    return wrapper


def _farm(argv: list[str]) -> int:
    import os

    from mia_lightning.farm.config import farm_parser, recipe_from_namespace
    from mia_lightning.farm.shards import resolve_shard
    from mia_lightning.farm.workers import device_count, launch_device_workers, uses_gpu

    parser = farm_parser()
    cfg = parse(parser, argv)
    recipe = recipe_from_namespace(parser, cfg)
    if cfg.status:
        from mia_lightning.farm.status import farm_status, print_status

        print_status(farm_status(recipe.experiment, recipe.plan.n_models, recipe.farm.stale_after_s), console)
        return 0
    accelerator = str(recipe.setup.trainer.get("accelerator", "auto"))
    if "LOCAL_RANK" in os.environ and uses_gpu(accelerator):  # torchrun / srun: one rank per local GPU
        recipe.setup.trainer["devices"] = [int(os.environ["LOCAL_RANK"])]
    n_workers, gpu_ids = device_count(recipe.setup.trainer.get("devices", 1), accelerator)
    if n_workers > 1 and not os.environ.get("MIA_FARM_WORKER"):
        from mia_lightning.farm.runner import prepare_experiment

        prepare_experiment(recipe)
        use_gpu = uses_gpu(accelerator)
        console.print(f"[bold]farm[/]: {n_workers} workers, one per {'GPU' if use_gpu else 'CPU worker'}")
        code = launch_device_workers(argv, n_workers, resolve_shard(recipe.farm.shard), gpu_ids, use_gpu)
        if code:
            return code
    else:
        from mia_lightning.farm.runner import run_farm

        run_farm(recipe, console)
    if cfg.audit_after and not os.environ.get("MIA_FARM_WORKER"):
        from mia_lightning.farm.runner import is_done

        missing = [i for i in range(recipe.plan.n_models) if not is_done(recipe.experiment, i)]
        if missing:
            console.print(f"audit skipped: {len(missing)} models are not done yet (other shards); run attack.py once they are")
            return 0
        return _run_attacks(recipe.experiment.root, list(recipe.audit.attacks), None, recipe.audit.n_targets, {})
    return 0


def _export(argv: list[str]) -> int:
    from mia_lightning.experiment import ExperimentDir
    from mia_lightning.farm.export import export_experiment

    parser = ArgumentParser(prog="train.py export", description="Re-export every model's logits from its checkpoint.")
    parser.add_argument("--experiment", type=Path, required=True, help="experiment directory")
    cfg = parse(parser, argv)
    export_experiment(ExperimentDir(cfg.experiment), console)
    return 0


def _fit_cli(argv: list[str]) -> int:
    """Plain LightningCLI (fit / validate / test / predict) for one model; data decides n_features / n_classes."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    class MiaLightningCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data", "model.init_args.n_features", compute_fn=lambda dm: dm.model_kwargs()["n_features"], apply_on="instantiate")
            parser.link_arguments("data", "model.init_args.n_classes", compute_fn=lambda dm: dm.model_kwargs()["n_classes"], apply_on="instantiate")

    MiaLightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )
    return 0


TRAIN_USAGE = """usage: train.py {farm,export,fit,validate,test,predict} ...

  farm      train every model of an experiment: plan, train (resumable, shardable), export logits
            python train.py farm --config configs/tabular/digits_quickstart.yaml [--status] [--farm.shard i/n]
  export    re-export every model's logits from its checkpoint
            python train.py export --experiment checkpoints/<name>
  fit, validate, test, predict
            one model with the plain LightningCLI
            python train.py fit --config configs/tabular/mlp_fit.yaml

`python train.py <command> --help` lists a command's options."""


@guarded
def train_main(argv: list[str]) -> int:
    """``train.py farm|export|fit|validate|test|predict ...``."""
    commands = {"farm": _farm, "export": _export}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        console.print(TRAIN_USAGE, highlight=False)
        return 0 if argv else 2
    return _fit_cli(argv)


def _run_attacks(experiment: Path, attacks: list[str], targets: list[int] | None, n_targets: int | None, params: dict) -> int:
    from mia_lightning.attacks import ATTACKS
    from mia_lightning.audit import run_audit
    from mia_lightning.report import print_results

    names = sorted(ATTACKS) if attacks == ["all"] else attacks
    records = run_audit(experiment, names, targets=targets, n_targets=n_targets, params=params)
    print_results(records, f"membership inference audit of {experiment} ({len(records[0]['targets'])} targets)", console)
    console.print(f"results: {experiment / 'attacks'}/<attack>/results.json, ROC: {experiment / 'attacks' / 'roc.png'}")
    return 0


def _run_few_shadow(experiment: Path, targets: list[int] | None, n_targets: int | None) -> None:
    from rich.table import Table

    from mia_lightning.analysis.few_shadow import run_few_shadow

    rows = run_few_shadow(experiment, targets=targets, n_targets=n_targets)
    table = Table(title=f"few-shadow regime on {experiment}: TPR@0.1%FPR (%) / TPR@1%FPR (%) / AUC", title_justify="left")
    names = list(dict.fromkeys(row["attack"] for row in rows))
    table.add_column("shadows", justify="right", style="bold")
    for name in names:
        table.add_column(name.replace("_", " "), justify="right")
    for count in sorted({row["n_shadows"] for row in rows}):
        cells = {row["attack"]: row for row in rows if row["n_shadows"] == count}
        table.add_row(str(count), *(
            "-" if cells[n]["auc"] is None else f"{100 * cells[n]['tpr@0.001']:.2f}/{100 * cells[n]['tpr@0.01']:.2f}/{cells[n]['auc']:.3f}"
            for n in names
        ))
    console.print(table)
    console.print(f"few-shadow curve: {experiment / 'attacks' / 'few_shadow'}/few_shadow.png")


@guarded
def attack_main(argv: list[str]) -> int:
    """``attack.py --experiment DIR --attack lira [--targets 0 1 2] [--few_shadow] [--report]``."""
    from jsonargparse import ActionConfigFile

    from mia_lightning.attacks import ATTACKS

    parser = ArgumentParser(prog="attack.py", description="Run membership inference attacks on an experiment directory.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--experiment", type=Path, required=True, help="experiment directory (keep.npy, labels.npy, models/*/logits.npy)")
    parser.add_argument("--attack", type=str, nargs="+", default=None, help=f"one or more of: {', '.join(sorted(ATTACKS))}, or all (default: lira)")
    parser.add_argument("--targets", type=int, nargs="+", default=None, help="target model ids (leave-one-out)")
    parser.add_argument("--n_targets", type=int | None, default=None, help="use models 0..K-1 as targets (default: all)")
    parser.add_argument("--params", type=dict, default={}, help='per-attack parameters, e.g. \'{"lira": {"n_shadows": 8}}\'')
    parser.add_argument("--few_shadow", action="store_true", help="LiRA and RMIA with 1, 2, 4, ..., 64 shadow models: table and plot")
    parser.add_argument("--report", action="store_true", help="write <experiment>/report.md from the attack results")
    cfg = parse(parser, argv)
    attacks = cfg.attack or ([] if cfg.few_shadow or cfg.report else ["lira"])
    if attacks:
        _run_attacks(cfg.experiment, list(attacks), cfg.targets, cfg.n_targets, cfg.params)
    if cfg.few_shadow:
        _run_few_shadow(cfg.experiment, cfg.targets, cfg.n_targets)
    if cfg.report:
        from mia_lightning.report_markdown import write_markdown_report

        console.print(f"report: {write_markdown_report(cfg.experiment)}")
    return 0
