"""The farm recipe: a LightningCLI-style YAML (model / data / trainer as class_path + init_args) plus plan and farm options."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from mia_lightning.data.plan import PlanSpec
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.components import ComponentSpec
from mia_lightning.contract.confine import plain_name
from mia_lightning.farm.engine import AUTO, ENGINES, FarmSetup
from mia_lightning.farm.shards import parse_shard


@dataclass
class ExperimentOptions:
    """Where the experiment directory lives: ``<root>/<name>``."""

    name: str = "experiment"
    root: str = "checkpoints"

    def __post_init__(self) -> None:  # one folder under root: "" would farm straight into root, "a/../b" elsewhere
        plain_name(self.name, "--experiment.name")


@dataclass
class PlanOptions:
    """Membership plan: N models, seeded; ``kind`` picks the plan (``data.plan.PLAN_KINDS``) and ``options`` its settings."""

    n_models: int = 64
    seed: int = 0
    n_population: int = 0
    kind: str = "lira_half"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:  # numpy seeds only from non-negative integers
            raise MiaError(f"--plan.seed {self.seed!r}: must be a non-negative integer")


@dataclass
class FarmOptions:
    """How the models are trained: engine (``auto``: the faster one for the family and device), models per vectorised group, shard,
    claim staleness, and torch threads per farm process (None: the family's measured best on the CPU, else torch's default)."""

    engine: str = "auto"
    group_size: int = 64
    shard: str | None = None
    stale_after_s: float = 120.0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise MiaError(f"--farm.threads {self.threads}: must be at least 1 (or null: the family's default)")
        if self.group_size < 1:  # checked with the recipe, before the experiment is prepared or a study records it
            raise MiaError(f"--farm.group_size {self.group_size}: must be at least 1")
        if not self.stale_after_s > 0:  # else every live claim reads as stale and two processes train the same model
            raise MiaError(f"--farm.stale_after_s {self.stale_after_s}: must be positive (seconds without a heartbeat before a claim is taken over)")
        if self.shard:  # a bad shard is refused before the experiment is planned
            parse_shard(self.shard)


@dataclass
class AuditOptions:
    """Attacks that ``train.py farm --audit_after`` runs once every model is done."""

    attacks: tuple[str, ...] = ("lira",)
    n_targets: int | None = None


def farm_parser() -> ArgumentParser:
    """Parser shared by ``train.py farm`` (and its config files); overrides use dotted flags, e.g. ``--trainer.devices 2``."""
    parser = ArgumentParser(prog="train.py farm", description="Train every model of an experiment (resumable, shardable).")
    parser.add_argument("--config", action=ActionConfigFile, help="recipe YAML (see configs/)")
    parser.add_class_arguments(ExperimentOptions, "experiment")
    parser.add_class_arguments(PlanOptions, "plan")
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    parser.add_subclass_arguments(L.LightningModule, "model", required=True)
    parser.add_class_arguments(L.Trainer, "trainer", instantiate=False, skip={"callbacks", "logger", "plugins", "default_root_dir"})
    parser.add_argument("--trainer.callbacks", type=list[dict], default=[], help="Lightning callbacks as class_path/init_args (e.g. EarlyStopping)")
    parser.add_class_arguments(FarmOptions, "farm")
    parser.add_class_arguments(AuditOptions, "audit")
    parser.add_argument("--status", action="store_true", help="report done / running / stale / missing models and exit")
    parser.add_argument("--audit_after", action="store_true", help="run the audit attacks once every model is done")
    return parser


NOT_MODEL_DECIDING = frozenset({
    "accelerator", "strategy", "devices", "num_nodes", "enable_progress_bar", "enable_model_summary", "enable_checkpointing",
    "log_every_n_steps", "profiler", "barebones", "detect_anomaly", "inference_mode", "use_distributed_sampler",
})
"""Trainer arguments that say where and how verbosely a model trains, not what it becomes (left out of the recipe identity)."""

DATA_ARGS_NOT_MODEL_DECIDING = frozenset({"num_workers", "cache_dir", "pin_memory"})


def model_deciding_trainer_args(trainer: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments that change what a model becomes, with precision in Lightning's unified spelling (32 = '32-true', the default)."""
    from lightning.fabric.connector import _convert_precision_to_unified_args

    args = {key: value for key, value in trainer.items() if key not in NOT_MODEL_DECIDING}
    if "precision" in args:
        args["precision"] = _convert_precision_to_unified_args(args["precision"])
        if args["precision"] == "32-true":
            del args["precision"]
    return args


def emulated_bfloat16(trainer: dict[str, Any]) -> str | None:
    """A one-line warning when the farm would train in bfloat16 on a CPU without native bfloat16 arithmetic, else None.

    oneDNN then emulates it: one training step in ``bf16-mixed`` measured 7.5-16x slower than in
    ``32-true`` (``benchmarks/stacking_bound.py --bf16`` on an AMD EPYC without AVX512-BF16), so a
    farm that trains in ``bf16-mixed`` takes hours there (the LM recipes did, before they moved to ``32-true``).
    """
    import torch

    precision = model_deciding_trainer_args({"precision": trainer.get("precision", "32-true")}).get("precision", "32-true")
    accelerator = trainer.get("accelerator") or "auto"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not (on_cpu and precision.startswith("bf16")):
        return None
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private probe: without it, say nothing
        return None
    if native:
        return None
    return (f"trainer.precision {precision} on a CPU without native bfloat16: emulated here, measured 7.5-16x slower per training step "
            f"than 32-true; add --trainer.precision 32-true unless the bfloat16 models themselves are the point")


def _non_default_trainer_args(trainer: Namespace) -> dict[str, Any]:
    defaults = inspect.signature(L.Trainer.__init__).parameters
    return {key: value for key, value in trainer.as_dict().items() if key != "callbacks" and defaults[key].default != value}


def _callback_specs(items: list[dict]) -> tuple[ComponentSpec, ...]:
    """The recipe's ``trainer.callbacks``, each checked to be a ``lightning.Callback`` subclass."""
    specs = []
    for item in items or []:
        if not isinstance(item, dict) or "class_path" not in item:
            raise MiaError(f"trainer.callbacks: {item!r} is not a class_path/init_args entry")
        spec = ComponentSpec(str(item["class_path"]), dict(item.get("init_args") or {}), base=L.Callback)
        spec.resolve()
        specs.append(spec)
    return tuple(specs)


@dataclass(frozen=True)
class Recipe:
    """A resolved farm recipe."""

    experiment: ExperimentDir
    plan: PlanOptions
    setup: FarmSetup
    farm: FarmOptions
    audit: AuditOptions
    dumped: str

    def plan_spec(self, dataset: str, n_samples: int) -> PlanSpec:
        plan = self.plan
        return PlanSpec(dataset=dataset, n_samples=n_samples, n_models=plan.n_models, seed=plan.seed, kind=plan.kind,
                        n_population=plan.n_population, options=dict(plan.options))

    def resolved_config(self, model_kwargs: dict[str, Any], data_kwargs: dict[str, Any] | None = None) -> str:
        """The recipe as YAML with the model arguments the data decided (e.g. n_features of a CSV) and the data arguments
        that name the experiment's copy of local data (``contract.data_sources``), as config.yaml records it."""
        config = yaml.safe_load(self.dumped)
        config["model"].setdefault("init_args", {}).update(model_kwargs)
        config["data"].setdefault("init_args", {}).update(data_kwargs or {})
        return yaml.safe_dump(config, sort_keys=False)

    def identity(self, model_kwargs: dict[str, Any], fingerprint: str) -> dict[str, Any]:
        """Everything that decides what the models become; every process training into the experiment must match it.

        Plan, data and model arguments (with the values the data decided, e.g. n_features), the trainer
        settings that change training (not where it runs), the callbacks, and a content hash of the pool.
        """
        data_args = {k: v for k, v in self.setup.data.init_args.items() if k not in DATA_ARGS_NOT_MODEL_DECIDING}
        return {
            "plan": {"n_models": self.plan.n_models, "seed": self.plan.seed, "n_population": self.plan.n_population,
                     "kind": self.plan.kind, "options": dict(self.plan.options)},
            "data": {"class_path": self.setup.data.class_path, "init_args": data_args},
            "model": {"class_path": self.setup.model.class_path, "init_args": {**self.setup.model.init_args, **model_kwargs}},
            "trainer": model_deciding_trainer_args(self.setup.trainer),
            "callbacks": [{"class_path": c.class_path, "init_args": c.init_args} for c in self.setup.callbacks],
            "pool_fingerprint": fingerprint,
        }


def _component(namespace: Namespace, base: type) -> ComponentSpec:
    init_args = namespace.init_args.as_dict() if isinstance(namespace.init_args, Namespace) else dict(namespace.init_args or {})
    return ComponentSpec(namespace.class_path, init_args, base=base)


def recipe_from_namespace(parser: ArgumentParser, cfg: Namespace) -> Recipe:
    """Build a ``Recipe`` from parsed arguments."""
    farm = FarmOptions(**cfg.farm.as_dict())
    if farm.engine not in ENGINES and farm.engine != AUTO:
        raise MiaError(f"--farm.engine {farm.engine!r}: choose one of {', '.join(sorted([*ENGINES, AUTO]))}")
    experiment = ExperimentOptions(**cfg.experiment.as_dict())
    directory = ExperimentDir(Path(experiment.root) / experiment.name)
    audit = cfg.audit.as_dict()
    return Recipe(
        experiment=directory,
        plan=PlanOptions(**cfg.plan.as_dict()),
        setup=FarmSetup(
            data=_component(cfg.data, L.LightningDataModule),
            model=_component(cfg.model, L.LightningModule),
            trainer=_non_default_trainer_args(cfg.trainer),
            callbacks=_callback_specs(cfg.trainer.callbacks),
            cache_dir=str(directory.cache_dir),
        ),
        farm=farm,
        audit=AuditOptions(attacks=tuple(audit["attacks"]), n_targets=audit["n_targets"]),
        dumped=parser.dump(cfg),
    )
