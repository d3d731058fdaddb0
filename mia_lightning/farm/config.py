"""The farm recipe: a LightningCLI-style YAML (model / data / trainer as class_path + init_args) plus plan and farm options."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from mia_lightning.data.plan import PlanSpec
from mia_lightning.errors import MiaError
from mia_lightning.experiment import ExperimentDir
from mia_lightning.farm.engine import ComponentSpec, FarmSetup

ENGINES = ("vectorised", "sequential")


@dataclass
class ExperimentOptions:
    """Where the experiment directory lives: ``<root>/<name>``."""

    name: str = "experiment"
    root: str = "checkpoints"


@dataclass
class PlanOptions:
    """Membership plan: N models on random halves of the pool, seeded; optional reserved population."""

    n_models: int = 64
    seed: int = 0
    n_population: int = 0


@dataclass
class FarmOptions:
    """How the models are trained: engine, models per vectorised group, shard, claim staleness."""

    engine: str = "vectorised"
    group_size: int = 64
    shard: str | None = None
    stale_after_s: float = 120.0


@dataclass
class AuditOptions:
    """Attacks ``make demo`` / ``train.py farm --audit`` runs after the farm."""

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
    parser.add_class_arguments(FarmOptions, "farm")
    parser.add_class_arguments(AuditOptions, "audit")
    parser.add_argument("--status", action="store_true", help="report done / running / stale / missing models and exit")
    parser.add_argument("--audit_after", action="store_true", help="run the audit attacks once every model is done")
    return parser


def _non_default_trainer_args(trainer: Namespace) -> dict[str, Any]:
    defaults = inspect.signature(L.Trainer.__init__).parameters
    return {key: value for key, value in trainer.as_dict().items() if defaults[key].default != value}


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
        return PlanSpec(dataset=dataset, n_samples=n_samples, n_models=self.plan.n_models, seed=self.plan.seed, n_population=self.plan.n_population)

    def identity(self) -> dict[str, Any]:
        """The parts of the recipe that decide the models (must match to resume an experiment)."""
        return {"plan": vars(self.plan), "data": self.setup.data.__dict__, "model": self.setup.model.__dict__}


def _component(namespace: Namespace) -> ComponentSpec:
    init_args = namespace.init_args.as_dict() if isinstance(namespace.init_args, Namespace) else dict(namespace.init_args or {})
    return ComponentSpec(namespace.class_path, init_args)


def recipe_from_namespace(parser: ArgumentParser, cfg: Namespace) -> Recipe:
    """Build a ``Recipe`` from parsed arguments."""
    farm = FarmOptions(**cfg.farm.as_dict())
    if farm.engine not in ENGINES:
        raise MiaError(f"--farm.engine {farm.engine!r}: choose one of {', '.join(ENGINES)}")
    experiment = ExperimentOptions(**cfg.experiment.as_dict())
    audit = cfg.audit.as_dict()
    return Recipe(
        experiment=ExperimentDir(Path(experiment.root) / experiment.name),
        plan=PlanOptions(**cfg.plan.as_dict()),
        setup=FarmSetup(data=_component(cfg.data), model=_component(cfg.model), trainer=_non_default_trainer_args(cfg.trainer)),
        farm=farm,
        audit=AuditOptions(attacks=tuple(audit["attacks"]), n_targets=audit["n_targets"]),
        dumped=parser.dump(cfg),
    )
