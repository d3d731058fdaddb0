"""The experiment directory: the contract between plan, farm, export and attack stages.

Layout (see README, "Experiment directory"): ``config.yaml``, ``plan.json``, ``keep.npy``,
``labels.npy``, optional ``population.npy`` / ``audit.npy`` / ``groups.npy`` / ``unlearning.json`` /
``cache/``, ``models/NNNN/{model.ckpt,logits.npy|signal.npy,done.json}`` and attack runs under
``attacks/runs/<id>/`` (``attacks/latest`` = the published one). Only ``keep.npy``, ``labels.npy`` and
the per-model ``logits.npy`` (or ``signal.npy``) are required by the attacks, so a directory exported
by any framework can be audited.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from mia_lightning.errors import MiaError
from mia_lightning.contract.io import load_json, load_npy
from mia_lightning.contract.model_outputs import LOGITS_FILE, SIGNAL_FILE, ModelOutputs, check_outputs_file

FORMAT_VERSION = 2
"""Version of the directory layout written into ``plan.json`` (2: recipe identity with trainer and
data hash, attack runs under ``attacks/runs/``, optional ``groups.npy`` / ``audit.npy``)."""

READABLE_VERSIONS: tuple[int, ...] = (1, 2)
"""Layouts the attack and export stages read (version 1 differs only in files they do not use)."""

SHOWN_EXPERIMENTS = 3
"""How many of the experiments inside a folder given as one experiment its error lists."""

IMPORTED_KIND = "imported"
"""plan.json ``kind`` of an experiment written by ``train.py import-scores`` (no plan function of ``PLAN_KINDS`` builds it)."""



def is_model_ids(ids: list, n_models: int) -> bool:
    """Whether ``ids`` are distinct JSON integers in 0..n_models-1 (model ids as plan.json lists them)."""
    return all(type(i) is int and 0 <= i < n_models for i in ids) and len(set(ids)) == len(ids)


def plan_field_error(plan_path: Path, field: str, value: object, expected: str) -> MiaError:
    """The one-line error for a plan.json field holding ``value`` where ``expected`` belongs."""
    return MiaError(f"{plan_path}: {field} {str(value)[:80]}: expected {expected}; re-run the farm or fix the file")


def experiments_inside(folder: Path) -> list[Path]:
    """The experiment folders directly under ``folder`` (each with a plan.json or keep.npy, e.g. ``checkpoints/<name>``), sorted."""
    return sorted({path.parent for name in ("plan.json", "keep.npy") for path in folder.glob(f"*/{name}")})


def model_dirname(index: int) -> str:
    """Zero-padded folder name of model ``index``."""
    return f"{index:04d}"


@dataclass(frozen=True)
class ExperimentDir:
    """Paths inside one experiment directory and checked loaders for its arrays."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def plan_path(self) -> Path:
        return self.root / "plan.json"

    @property
    def keep_path(self) -> Path:
        return self.root / "keep.npy"

    @property
    def labels_path(self) -> Path:
        return self.root / "labels.npy"

    @property
    def population_path(self) -> Path:
        return self.root / "population.npy"

    @property
    def groups_path(self) -> Path:
        return self.root / "groups.npy"

    @property
    def audit_path(self) -> Path:
        return self.root / "audit.npy"

    @property
    def cache_dir(self) -> Path:
        """Inputs shared by all models of the experiment, computed once (e.g. backbone features)."""
        return self.root / "cache"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def attacks_dir(self) -> Path:
        return self.root / "attacks"

    def model_dir(self, index: int) -> Path:
        return self.models_dir / model_dirname(index)

    @property
    def is_study(self) -> bool:
        """Whether the folder is a study's (``train.py study`` writes study.json there and its experiments under settings/)."""
        return (self.root / "study.json").is_file()

    def check_exists(self) -> None:
        """Fail with a clear message when the directory is not an experiment at all."""
        if self.root.is_file():
            raise MiaError(f"{self.root}: a file, not an experiment directory; point --experiment at the folder that holds keep.npy, labels.npy and models/")
        if not self.root.is_dir():
            raise MiaError(f"{self.root}: no such experiment directory; run `python train.py farm --config ...` first")
        if not self.keep_path.is_file() and self.is_study:
            settings = sorted(path.name for path in (self.root / "settings").glob("*") if path.is_dir())
            examples = ", ".join(str(self.root / "settings" / name) for name in settings[:2]) or "none trained yet"
            raise MiaError(
                f"{self.root}: this is a study (study.json), not one experiment; its {len(settings)} experiments are under "
                f"settings/<setting>/ (e.g. {examples}): point --experiment at one of them"
            )
        inside = experiments_inside(self.root) if not self.keep_path.is_file() else []
        if inside:
            examples = ", ".join(path.name for path in inside[:SHOWN_EXPERIMENTS]) + (", ..." if len(inside) > SHOWN_EXPERIMENTS else "")
            raise MiaError(f"{self.root}: not one experiment but a folder of {len(inside)} experiments ({examples}): "
                           f"point --experiment at one of them, e.g. --experiment {inside[0]}")
        if not self.keep_path.is_file():
            raise MiaError(
                f"{self.keep_path}: missing; an experiment directory needs keep.npy, labels.npy and models/*/logits.npy"
            )

    def check_version(self) -> None:
        """Refuse a ``plan.json`` written by another layout version (absent plan.json is fine)."""
        if not self.plan_path.is_file():
            return
        plan = load_json(self.plan_path)
        version = plan.get("version") if isinstance(plan, dict) else None
        if version not in READABLE_VERSIONS:
            raise MiaError(
                f"{self.plan_path}: experiment layout version {version!r}, this mia-lightning reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; re-export it with a matching version or re-run the farm in a new directory"
            )

    @cached_property
    def keep(self) -> np.ndarray:
        """bool [n_models, n_samples] membership matrix."""
        keep = load_npy(self.keep_path, "membership matrix", "re-run `python train.py farm --config <recipe>` (it writes the plan first) or export keep.npy as bool [n_models, n_samples]")
        if keep.ndim != 2 or keep.shape[0] < 1:
            raise MiaError(f"{self.keep_path}: expected a 2-D bool array [n_models, n_samples], got shape {keep.shape}")
        if keep.dtype != np.bool_:
            if not np.issubdtype(keep.dtype, np.integer) or not np.isin(keep, (0, 1)).all():
                raise MiaError(f"{self.keep_path}: expected bool (or 0/1) values, got dtype {keep.dtype}")
            keep = keep.astype(bool)
        return keep

    @cached_property
    def labels(self) -> np.ndarray:
        """int64 [n_samples] class labels of the audit pool."""
        labels = load_npy(self.labels_path, "labels", "export labels.npy as int64 [n_samples]")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise MiaError(f"{self.labels_path}: expected a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
        if labels.shape[0] != self.keep.shape[1]:
            raise MiaError(
                f"{self.labels_path}: {labels.shape[0]} labels but keep.npy has {self.keep.shape[1]} samples; "
                "both must describe the same audit pool"
            )
        if (labels < 0).any():
            raise MiaError(f"{self.labels_path}: negative labels; labels must be class indices 0..C-1")
        if labels.size and int(labels.max()) > np.iinfo(np.int64).max:
            raise MiaError(f"{self.labels_path}: label {int(labels.max())} is beyond the int64 range; labels must be class indices 0..C-1")
        return labels.astype(np.int64)

    @cached_property
    def population(self) -> np.ndarray | None:
        """Optional int64 ids of samples no model trains on (RMIA's population)."""
        if not self.population_path.is_file():
            return None
        ids = load_npy(self.population_path, "population ids", "delete it or save int64 sample ids")
        n = self.keep.shape[1]
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any() or (ids >= n).any():
            raise MiaError(f"{self.population_path}: expected 1-D int ids in [0, {n}), got shape {ids.shape} dtype {ids.dtype}")
        if self.keep[:, ids].any():
            raise MiaError(f"{self.population_path}: some population samples are in a model's training set (keep.npy)")
        return ids.astype(np.int64)

    @cached_property
    def groups(self) -> np.ndarray | None:
        """Optional int64 [n_samples] user (author, patient) id of each sample: user-level metrics group by it."""
        if not self.groups_path.is_file():
            return None
        groups = load_npy(self.groups_path, "user ids", "delete it or save int64 [n_samples] user ids")
        n = self.keep.shape[1]
        if groups.shape != (n,) or not np.issubdtype(groups.dtype, np.integer):
            raise MiaError(f"{self.groups_path}: expected int64 [{n}] user ids, got shape {groups.shape} dtype {groups.dtype}")
        return groups.astype(np.int64)

    @cached_property
    def audit(self) -> np.ndarray | None:
        """Optional bool [n_models, n_samples]: which samples count in the metrics when model m is the target."""
        if not self.audit_path.is_file():
            return None
        audit = load_npy(self.audit_path, "audit matrix", "delete it or save bool [n_models, n_samples]")
        if audit.shape != self.keep.shape or audit.dtype != np.bool_:
            raise MiaError(f"{self.audit_path}: expected bool {self.keep.shape}, got shape {audit.shape} dtype {audit.dtype}")
        return audit

    @cached_property
    def signal_columns(self) -> list[str] | None:
        """Names of ``signal.npy``'s columns when the models export several signal kinds (``plan.json`` ``signals.columns``), else None.

        Without it a signal's columns are repeated queries of one statistic (e.g. maskings) that
        attacks average; with it each column is its own statistic, read by name, and the generic
        signal attacks read the first.
        """
        layout = self.plan.get("signals")
        if layout is None:
            return None
        columns = layout.get("columns") if isinstance(layout, dict) else None
        if not isinstance(columns, list) or not columns or not all(isinstance(c, str) and c for c in columns) or len(set(columns)) != len(columns):
            raise MiaError(f"{self.plan_path}: signals.columns {str(columns)[:80]}: expected a list of distinct column names of signal.npy; fix the file or re-run the farm")
        return columns

    @cached_property
    def plan(self) -> dict:
        """plan.json as a dict ({} for a directory exported by another framework without one), checked by ``check_plan``."""
        if not self.plan_path.is_file():
            return {}
        plan = load_json(self.plan_path)
        if not isinstance(plan, dict):
            raise MiaError(f"{self.plan_path}: expected a JSON object; re-run the farm or delete it")
        self.check_plan(plan)
        return plan

    def check_plan(self, plan: dict) -> None:
        """Refuse, in one line, a plan.json field of the wrong type or one that disagrees with keep.npy: attacks index models by its ids.

        Its ``kind`` is checked by the attacks (``attacks.base.check_plan_kind``): the plan kinds live in a higher layer.

        A hand-edited or mixed-up plan.json would otherwise crash an attack, or silently change what it
        audits (fewer targets than planned; a ``recipe`` that is not an object turns the merged-model identity check off).
        """
        def refuse(field: str, value: object, expected: str) -> MiaError:
            return plan_field_error(self.plan_path, field, value, expected)

        for field in ("info", "recipe"):
            if field in plan and not isinstance(plan[field], dict):
                raise refuse(field, repr(plan[field]), "a JSON object")
        n_models, n_samples = self.keep.shape
        for field, size in (("n_models", n_models), ("n_samples", n_samples)):
            if field in plan and plan[field] != size:
                raise MiaError(
                    f"{self.keep_path}: {n_models} models x {n_samples} samples, but {self.plan_path} plans {field} {plan[field]!r}; "
                    "the files come from different runs: restore them from the farm or re-run it in a new directory"
                )
        ids = f"distinct model ids in 0..{n_models - 1}"
        for field in ("target_models", "reference_models", "shadow_models"):
            listed = plan.get("info", {}).get(field)
            if listed is not None and not (isinstance(listed, list) and is_model_ids(listed, n_models) and (listed or field != "target_models")):
                hint = ", as --targets takes them (or pass --targets)" if field == "target_models" else ""
                raise refuse(f"info.{field}", listed, f"a list of {ids}{hint}")
        parents = plan.get("parents", {})
        if not isinstance(parents, dict) or not all(
            isinstance(child, str) and child.isdigit() and is_model_ids([int(child), parent], n_models) for child, parent in parents.items()
        ):
            raise refuse("parents", parents, f"an object mapping a model id (as a string) to the model it continues from, {ids}")

    def default_targets(self) -> list[int] | None:
        """Target model ids the plan names (e.g. the targets of a disjoint-shadow plan; checked by ``check_plan``), else None (every model)."""
        targets = self.plan.get("info", {}).get("target_models")
        return None if targets is None else list(targets)

    def load_model_outputs(self, kind: str) -> ModelOutputs:
        """Every model's exported outputs, validated (shape, dtype, finite) in one pass and then read per model on demand.

        ``kind='logits'``: float32 [M, n, Q, C]; ``'signal'``: [M, n, Q], a per-sample scalar
        confidence (higher = more member-like, e.g. a negative MLM loss) for model families whose
        outputs are not class logits. Only one model's array is in memory at a time here.
        """
        filename = LOGITS_FILE if kind == "logits" else SIGNAL_FILE
        expected_ndim = 3 if kind == "logits" else 2
        n_models, n_samples = self.keep.shape
        what = f"{kind}"
        fix = (
            f"finish the farm (`python train.py farm --config <recipe>`; `--status` lists unfinished models), re-run "
            f"`python train.py export --experiment {self.root}`, or write it as float32 [n_samples, n_queries{', n_classes' if kind == 'logits' else ''}]"
        )
        paths = [self.model_dir(index) / filename for index in range(n_models)]
        extra = sorted(folder for folder in self.models_dir.glob("*") if folder.name.isdigit() and int(folder.name) >= n_models)
        if extra:
            raise MiaError(
                f"{extra[0]}: a model folder beyond the {n_models} rows of {self.keep_path} (and {self.plan_path.name}); "
                "restore keep.npy and plan.json from the farm, or move the folder out of models/"
            )
        shape = None
        max_label = int(self.labels.max()) if kind == "logits" and self.labels.size else -1
        for path in paths:
            array = load_npy(path, what, fix)
            check_outputs_file(path, array, expected_ndim, n_samples, fix)
            if shape is None:
                shape = array.shape[1:]
            elif array.shape[1:] != shape:
                raise MiaError(f"{path}: shape {array.shape} differs from model 0's {(n_samples, *shape)}; all models must be exported alike")
            if kind == "logits" and max_label >= array.shape[-1]:
                raise MiaError(f"{self.labels_path}: label {max_label} out of range for logits with {array.shape[-1]} classes")
        return ModelOutputs.from_files(paths, (n_samples, *shape), what, fix)

    def output_kind(self) -> str:
        """'logits' when model 0 exported logits, 'signal' when it exported a scalar signal."""
        first = self.model_dir(0)
        if (first / LOGITS_FILE).is_file():
            return "logits"
        if (first / SIGNAL_FILE).is_file():
            return "signal"
        raise MiaError(
            f"{first}: holds neither {LOGITS_FILE} nor {SIGNAL_FILE}; train and export the models first "
            f"(`python train.py farm ...` or `python train.py export --experiment {self.root}`)"
        )
