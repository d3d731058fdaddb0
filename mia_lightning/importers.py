"""``train.py import-scores``: per-sample scores computed elsewhere become an ordinary experiment directory.

No model is trained or loaded: each scoring model becomes ``models/NNNN/signal.npy`` (higher = more
member-like; losses are negated), membership becomes ``keep.npy``, and ``plan.json`` names the
target and reference models (``info.target_models`` / ``info.reference_models``), so ``attack.py
--attack likelihood_ratio loss_baseline`` runs on it like on any farm.

Two formats:

- ``mlm_mia``: the published loss files of Mireshghallah et al. ("Quantifying Privacy Risks of Masked
  Language Models Using Membership Inference Attacks", EMNLP 2022), shipped in
  ``mia_lightning/resources/mlm_mia_loss_values`` (MIT, via privacytrustlab/ml_privacy_meter).
  Model 0 is the target (ClinicalBERT_1a), model 1 the reference (BlueBERT-PubMed). Samples are the
  member file's rows, then the chosen non-member file's rows, then (unless ``--population none``)
  the population file's rows, which land in ``population.npy`` (no model trained on them; RMIA's
  population and the set on which ``mia_lightning.grouping`` fixes thresholds). Target and reference
  rows are paired by line number, as written by the paper's scoring scripts.
- ``table``: a CSV (header with ``target``, ``member``, optional ``reference`` columns and ``user``),
  an ``.npz`` with those arrays, or an ``.npy`` float array [n, 4] of (target, reference, user,
  member). ``member`` is 1 (member), 0 (non-member) or -1 (population: a known non-member kept for
  thresholds); ``user`` becomes ``groups.npy``; ``--scores loss`` negates losses into signals.

Everything is read and checked before anything is written; the directory appears at once (written
beside it, then renamed), so a failed import leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jsonargparse import ArgumentParser

from mia_lightning.data.text_sources import read_csv_columns
from mia_lightning.downloads import file_sha256
from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import FORMAT_VERSION, IMPORTED_KIND, ExperimentDir
from mia_lightning.contract.io import save_json_atomic, save_npy_atomic
from mia_lightning.contract.model_outputs import SIGNAL_FILE, non_finite

PUBLISHED_SCORES = Path(__file__).resolve().parent / "resources" / "mlm_mia_loss_values"
"""The paper's score files shipped with the package (see the README in that folder)."""

MLM_MIA_MODELS: tuple[tuple[str, str], ...] = (("ClinicalBERT_1a", "target"), ("pubmed", "reference"))
"""(file name tag, role) of the published models, in model-id order."""

MLM_MIA_SETS: dict[str, dict[str, str]] = {
    "loss": {"members": "samples_sub_id_long.csv", "out_samples": "out_samples_sub_id_long.csv",
             "i2b2": "i2b2_samples_sub_id_long.csv", "population": "i2b2_samples_sub_id_long_2.csv"},
    "enorm": {"members": "samples_sub_id_short.csv", "i2b2": "i2b2_samples_sub_id_short.csv",
              "population": "i2b2_samples_sub_id_short_2.csv"},
}
"""Input CSV whose scores form each set, per published value kind (``loss_values`` / ``enorm_values``)."""

MEMBER, NONMEMBER, POPULATION = 1, 0, -1


@dataclass
class ImportedScores:
    """What an import writes: signals [M, n, Q] (higher = member), membership, optional population and user ids, plan info."""

    dataset: str
    signals: np.ndarray
    keep: np.ndarray
    population: np.ndarray
    info: dict[str, Any]
    groups: np.ndarray | None = None
    model_names: list[str] = field(default_factory=list)


def read_score_file(path: Path) -> np.ndarray:
    """float64 values of a text file with one number per line (a one-line error names the first bad line)."""
    if not path.is_file():
        raise MiaError(f"{path}: missing score file; point --source at a folder with the published loss_values/ and enorm_values/")
    values = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            values.append(float(line))
        except ValueError:
            raise MiaError(f"{path}:{number}: {line.strip()[:40]!r} is not a number; one float per line expected") from None
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise MiaError(f"{path}: no scores in the file")
    problem = non_finite(array)
    if problem:
        raise MiaError(f"{path}: {problem}; every score must be finite")
    return array


def published_run(source: Path, measure: str, input_csv: str, model: str) -> Path:
    """The ``loss.txt`` of one (input CSV, model) pair in the published layout."""
    folder = source / f"{measure}_values"
    prefix = "get_sentence_loss_file_" + ("enorm_" if measure == "enorm" else "")
    matches = sorted(folder.glob(f"{prefix}{input_csv}_model_{model}_nsamples_*"))
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(m.name for m in matches)
        raise MiaError(f"{folder}: expected one folder {prefix}{input_csv}_model_{model}_nsamples_*, found {found}; check --source")
    return matches[0] / "loss.txt"


def import_mlm_mia(source: Path, nonmembers: str, measure: str = "loss", population: bool = True) -> ImportedScores:
    """The paper's target and reference losses on members, non-members and (optionally) the population set, row-paired."""
    if measure not in MLM_MIA_SETS:
        raise MiaError(f"--measure {measure!r}: choose one of {', '.join(MLM_MIA_SETS)}")
    sets = MLM_MIA_SETS[measure]
    if nonmembers not in sets or nonmembers in ("members", "population"):
        choices = [name for name in sets if name not in ("members", "population")]
        raise MiaError(f"--nonmembers {nonmembers!r}: the published {measure} files have non-member sets {', '.join(choices)}")
    roles = ["members", nonmembers] + (["population"] if population else [])
    files: dict[str, dict[str, str]] = {}
    columns = []
    for model, _ in MLM_MIA_MODELS:
        parts = []
        for role in roles:
            path = published_run(source, measure, sets[role], model)
            parts.append(read_score_file(path))
            files.setdefault(role, {})[model] = f"{path.parent.name}/loss.txt sha256:{file_sha256(path)}"
        columns.append(parts)
    for index, role in enumerate(roles):
        lengths = {model: len(columns[m][index]) for m, (model, _) in enumerate(MLM_MIA_MODELS)}
        if len(set(lengths.values())) != 1:
            paths = [published_run(source, measure, sets[role], model) for model, _ in MLM_MIA_MODELS]
            raise MiaError(
                f"{paths[0]} has {lengths[MLM_MIA_MODELS[0][0]]} scores but {paths[1]} has {lengths[MLM_MIA_MODELS[1][0]]}; "
                "target and reference files of one set must score the same sequences, row by row"
            )
    sizes = [len(part) for part in columns[0]]
    membership = np.concatenate([np.full(size, code) for size, code in zip(sizes, (MEMBER, NONMEMBER, POPULATION))])
    losses = np.stack([np.concatenate(parts) for parts in columns])
    keep = np.zeros(losses.shape, dtype=bool)
    keep[0] = membership == MEMBER
    info = {
        "target_models": [0],
        "reference_models": [1],
        "models": {str(i): f"{model} ({role})" for i, (model, role) in enumerate(MLM_MIA_MODELS)},
        "signal": f"minus the published {measure} value (higher = more member-like)",
        "sets": {role: {"input_csv": sets[role], "first_sample": int(sum(sizes[:i])), "n": size} for i, (role, size) in enumerate(zip(roles, sizes))},
        "files": files,
        "source": "Mireshghallah et al., EMNLP 2022; files via privacytrustlab/ml_privacy_meter f4189e0 (MIT)",
    }
    return ImportedScores(
        dataset=f"mlm_mia:{measure}:{nonmembers}",
        signals=-losses[..., None],
        keep=keep,
        population=np.flatnonzero(membership == POPULATION).astype(np.int64),
        info=info,
        model_names=[model for model, _ in MLM_MIA_MODELS],
    )


TABLE_COLUMNS = ("target", "reference", "user", "member")
"""The columns of a score table (``target`` and ``member`` required); any other is refused."""


def _table_columns(path: Path) -> dict[str, np.ndarray]:
    """Named columns of a score table: CSV header names, .npz array names, or .npy [n, 4] as (target, reference, user, member)."""
    if not path.is_file():
        raise MiaError(f"{path}: no such score table; give a .csv, .npz or .npy file")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise MiaError(f"{path}: unreadable .npy ({err})") from None
        if array.ndim != 2 or array.shape[1] != 4:
            raise MiaError(f"{path}: expected a [n, 4] array of (target score, reference score, user id, membership), got shape {array.shape}")
        return dict(zip(TABLE_COLUMNS, array.T))
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except (ValueError, OSError) as err:
            raise MiaError(f"{path}: unreadable .npz ({err})") from None
    return {name: np.asarray(values, dtype=object) for name, values in read_csv_columns(path, min_rows=2).items()}


def _numbers(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    """float64 values of column ``name``, refused in one line when one is not a finite real number (a complex one would lose its imaginary part)."""
    if np.iscomplexobj(values):
        raise MiaError(f"{path}: column {name!r} holds complex numbers; every score and membership must be a real number")
    try:
        array = np.asarray(values, dtype=np.float64)
    except ValueError:
        bad = next(v for v in values if not _is_number(v))
        raise MiaError(f"{path}: column {name!r} holds {str(bad)[:30]!r}, not a number") from None
    problem = non_finite(array)
    if problem:
        raise MiaError(f"{path}: column {name!r} has {problem}; every score must be finite")
    return array


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def import_table(path: Path, scores: str) -> ImportedScores:
    """Target (and optional reference) scores with membership and optional user ids, from a CSV / .npz / .npy table."""
    if scores not in ("loss", "signal"):
        raise MiaError(f"--scores {scores!r}: say whether the table holds losses (loss: lower = member) or signals (signal: higher = member)")
    columns = _table_columns(path)
    for needed in ("target", "member"):
        if needed not in columns:
            raise MiaError(f"{path}: no {needed!r} column (found {', '.join(columns)}); name the columns target, reference, user, member")
    unknown = [name for name in columns if name not in TABLE_COLUMNS]
    if unknown:  # a misspelt 'reference' or 'user' was ignored: the experiment had no reference model or no users, silently
        raise MiaError(f"{path}: column {unknown[0]!r} is not one of {', '.join(TABLE_COLUMNS)}; rename it (a typo?) or drop it from the table")
    for name, values in columns.items():
        if np.ndim(values) != 1:
            raise MiaError(f"{path}: column {name!r} has shape {np.shape(values)}, expected one value per sample (a 1-D array); save each column as a 1-D array")
    n = len(columns["target"])
    for name, values in columns.items():
        if len(values) != n:
            raise MiaError(f"{path}: column {name!r} has {len(values)} values but 'target' has {n}; all columns must score the same samples")
    member = _numbers(path, "member", columns["member"])
    if not np.isin(member, (MEMBER, NONMEMBER, POPULATION)).all():
        raise MiaError(f"{path}: column 'member' must hold 1 (member), 0 (non-member) or -1 (population), found {sorted(set(member.tolist()) - {1.0, 0.0, -1.0})[:3]}")
    if not (member == MEMBER).any() or not (member == NONMEMBER).any():
        raise MiaError(f"{path}: column 'member' needs both members (1) and non-members (0)")
    names = ["target"] + (["reference"] if "reference" in columns else [])
    sign = -1.0 if scores == "loss" else 1.0
    signals = np.stack([sign * _numbers(path, name, columns[name]) for name in names])[..., None]
    keep = np.zeros(signals.shape[:2], dtype=bool)
    keep[0] = member == MEMBER
    groups = None
    if "user" in columns:
        users = np.asarray(columns["user"])
        if users.dtype.kind == "f" and not np.array_equal(users, np.round(users)):
            raise MiaError(f"{path}: column 'user' holds non-integer ids")
        groups = np.unique(users.astype(str) if users.dtype == object else users, return_inverse=True)[1].astype(np.int64)
    info = {"target_models": [0], "models": {str(i): name for i, name in enumerate(names)},
            "signal": "minus the imported loss" if scores == "loss" else "the imported signal", "source": f"{path.name} sha256:{file_sha256(path)}"}
    if "reference" in columns:
        info["reference_models"] = [1]
    if groups is not None:
        info["user_ids"] = "groups.npy: index into the sorted distinct values of the 'user' column"
    return ImportedScores(f"table:{path.name}", signals, keep, np.flatnonzero(member == POPULATION).astype(np.int64), info, groups, names)


def write_imported(imported: ImportedScores, root: Path) -> ExperimentDir:
    """Write the experiment directory beside ``root`` and rename it into place (refuses an existing non-empty folder)."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise MiaError(f"{root}: already exists; choose another --experiment or delete it")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.import-"))
    try:
        experiment = ExperimentDir(staging)
        n_models, n_samples = imported.keep.shape
        save_npy_atomic(experiment.keep_path, imported.keep)
        save_npy_atomic(experiment.labels_path, np.zeros(n_samples, dtype=np.int64))
        if imported.population.size:
            save_npy_atomic(experiment.population_path, imported.population)
        if imported.groups is not None:
            save_npy_atomic(experiment.groups_path, imported.groups)
        for index in range(n_models):
            folder = experiment.model_dir(index)
            save_npy_atomic(folder / SIGNAL_FILE, imported.signals[index])
            save_json_atomic(folder / "done.json", {"index": index, "imported": imported.model_names[index], "dataset": imported.dataset})
        save_json_atomic(experiment.plan_path, {
            "dataset": imported.dataset, "n_samples": n_samples, "n_models": n_models, "seed": 0, "kind": IMPORTED_KIND,
            "n_population": int(imported.population.size), "options": {}, "version": FORMAT_VERSION, "info": imported.info,
        })
        if root.exists():
            root.rmdir()
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExperimentDir(root)


def main(argv: list[str]) -> int:
    """``train.py import-scores {mlm_mia,table} --experiment DIR ...``: write an experiment directory from score files."""
    from mia_lightning.console import console, parse

    parser = ArgumentParser(prog="train.py import-scores", description="Import per-sample scores computed elsewhere as an experiment directory (no training).")
    parser.add_argument("format", type=str, help="mlm_mia (the published files of Mireshghallah et al. 2022) or table (CSV / .npz / .npy of target, reference, user, member)")
    parser.add_argument("--experiment", type=Path, required=True, help="experiment directory to create (must not exist or be empty)")
    parser.add_argument("--source", type=Path | None, default=None, help="mlm_mia: folder with loss_values/ and enorm_values/ (default: the copy shipped with mia-lightning); table: the file")
    parser.add_argument("--nonmembers", type=str, default="out_samples", help="mlm_mia: out_samples (the paper's figures) or i2b2")
    parser.add_argument("--measure", type=str, default="loss", help="mlm_mia: loss (20 maskings of 15 percent) or enorm (each token masked in turn; non-members i2b2 only)")
    parser.add_argument("--population", type=str, default="i2b2_2", help="mlm_mia: i2b2_2 (the paper's threshold set, into population.npy) or none")
    parser.add_argument("--scores", type=str | None, default=None, help="table: loss (lower = member, negated on import) or signal (higher = member)")
    cfg = parse(parser, argv)
    if cfg.format == "mlm_mia":
        if cfg.population not in ("i2b2_2", "none"):
            raise MiaError(f"--population {cfg.population!r}: choose i2b2_2 or none")
        imported = import_mlm_mia(Path(cfg.source or PUBLISHED_SCORES), cfg.nonmembers, cfg.measure, cfg.population == "i2b2_2")
    elif cfg.format == "table":
        if cfg.source is None or cfg.scores is None:
            raise MiaError("import-scores table: give --source <file> and --scores loss|signal")
        imported = import_table(Path(cfg.source), cfg.scores)
    else:
        raise MiaError(f"import-scores {cfg.format!r}: unknown format; choose mlm_mia or table")
    experiment = write_imported(imported, cfg.experiment)
    n_members, n_samples = int(imported.keep[0].sum()), imported.keep.shape[1]
    console.print(
        f"[bold]import-scores[/] {experiment.root}: {imported.keep.shape[0]} models, {n_members} members, "
        f"{n_samples - n_members - imported.population.size} non-members, {imported.population.size} population samples"
        + (f", {len(np.unique(imported.groups))} users" if imported.groups is not None else "")
    )
    attacks = "likelihood_ratio loss_baseline" if "reference_models" in imported.info else "loss_baseline"
    console.print(f"next: python attack.py --experiment {experiment.root} --attack {attacks}", highlight=False)
    return 0
