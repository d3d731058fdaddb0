"""Local data named by an experiment: copied in by the farm, and read back only from inside the experiment.

A DataModule declares the arguments that name a dataset (``DATA_ARGS``: argument -> the built-in
dataset words it accepts, such as ``digits`` or ``clinosim``). Besides those words a value is
``hf:<hub name>[:<config>]``, ``torchvision:<Dataset>``, or a local file or folder. Local data given
in the user's own recipe is copied into ``<experiment>/data/<argument>/`` when the farm plans the
experiment, and config.yaml names the copy, so an experiment carries the data its later stages
(export, quantile and blind-baseline attacks, the power-law analysis) read again. When a stored
config.yaml is built, a local path must lie inside the experiment (links followed): a crafted
``source: /home/you/private.csv`` or ``data/x.csv -> ~/.ssh/id_rsa`` is refused with one line
(docs/trust.md, rule 6).
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mia_lightning.contract.confine import confined
from mia_lightning.errors import MiaError
from mia_lightning.names import is_hub_name

DATA_FOLDER = "data"
"""The experiment's copy of the local data its recipe named (one sub-folder per data argument)."""

REMOTE_PREFIXES: tuple[str, ...] = ("hf:", "torchvision:")
"""Data named by a dataset hub rather than a path."""


def data_args(cls: type) -> dict[str, tuple[str, ...]]:
    """The data-naming arguments a DataModule class declares (argument -> built-in words); empty for other classes."""
    return dict(getattr(cls, "DATA_ARGS", {}))


def is_local(value: Any, words: tuple[str, ...]) -> bool:
    """Whether a data argument's value names a local file or folder (not a built-in word, a hub dataset or nothing)."""
    return isinstance(value, str) and value not in words and not value.startswith(REMOTE_PREFIXES)


def _check_hub_dataset(value: str, where: str) -> None:
    """``hf:<name>[:<config>]`` read from a file must name a hub dataset, not a local folder (datasets would read it)."""
    if not value.startswith("hf:"):
        return
    name = value[3:].partition(":")[0]
    if not is_hub_name(name) or Path(name).expanduser().exists():
        raise MiaError(f"{where} {value!r}: an experiment's files may name a Hugging Face dataset (hf:org/name), not a local folder; "
                       "put local data inside the experiment (the farm copies a recipe's local data into data/)")


def experiment_data_args(cls: type, init_args: dict[str, Any], root: Path | None, where: str) -> dict[str, Any]:
    """``init_args`` read from an experiment's files, with every local data path checked to lie inside ``root`` and made absolute.

    Relative paths are relative to the experiment (config.yaml's ``data/source/x.csv``). A path that
    leaves it, directly or through a link, is refused with one line; with no ``root`` every local path is.
    """
    checked = dict(init_args)
    for name in getattr(cls, "CACHE_ARGS", ()):
        if checked.get(name) is not None:
            raise MiaError(
                f"{where} {name} {checked[name]!r}: an experiment's files may not name a dataset cache folder (a torchvision dataset there may be "
                f"read with pickle); delete {name} from config.yaml and keep the dataset in the default cache ($MIA_LIGHTNING_CACHE/torchvision)"
            )
    for name, words in data_args(cls).items():
        value = checked.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise MiaError(f"{where} {name} {value!r}: must be a dataset name or a path")
        _check_hub_dataset(value, f"{where} {name}")
        if not is_local(value, words):
            continue
        problem = "a local path" if root is None else _outside(value, root, getattr(cls, "DATA_COMPANIONS", {}).get(name, ()))
        if problem:
            raise MiaError(
                f"{where} {name} {value!r}: {problem}; an experiment's files may name only data inside it "
                f"(copy the data into {Path(root or '<experiment>') / DATA_FOLDER / name}/ and name it {DATA_FOLDER}/{name}/<file> in config.yaml)"
            )
        checked[name] = str(root / value)
    return checked


def _inside(path: Path, root: Path) -> bool:
    resolved, top = path.resolve(), root.resolve()
    return resolved != top and top in resolved.parents


def _outside(value: str, root: Path, companions: tuple[str, ...] = ()) -> str | None:
    """Why the local data ``value`` (relative to the experiment ``root``) is not inside it, or None when it is.

    A folder is read file by file (an image folder), so a link inside it leading out (``cats/1.png -> ~/private.png``)
    counts too, as does a companion file read beside ``value`` (Adult's ``adult.test``).
    """
    path = root / value
    if value.startswith("~") or not _inside(path, root):
        return f"outside the experiment {root}"
    for companion in (path.with_name(name) for name in companions):
        if companion.is_symlink() and not _inside(companion, root):
            return f"beside {companion}, a link outside the experiment {root}"
    if path.is_dir():
        for folder, names, files in os.walk(path):
            for entry in (Path(folder) / item for item in (*names, *files)):
                if entry.is_symlink() and not _inside(entry, root):
                    return f"holding {entry}, a link outside the experiment {root}"
    return None


def _link_or_copy(source: str, target: str) -> None:
    """A hard link when source and target share a file system (no second copy of a large image folder), else a copy (a CSV is always copied)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def copy_local_data(cls: type, init_args: dict[str, Any], root: Path) -> dict[str, Any]:
    """Copy every local file or folder the recipe's data arguments name into ``root/data/<argument>/`` and return the arguments naming the copies.

    A file is copied with the companion files its class reads beside it (``DATA_COMPANIONS``, e.g.
    Adult's ``adult.test`` next to ``adult.data``); a folder is copied whole.
    """
    copied = dict(init_args)
    companions = getattr(cls, "DATA_COMPANIONS", {})
    for name, words in data_args(cls).items():
        value = copied.get(name)
        if not is_local(value, words):
            continue
        source = Path(value).expanduser()
        if not source.exists():
            continue  # the DataModule already said what is missing when the farm built it
        files = [source, *(source.with_name(extra) for extra in companions.get(name, ()) if extra != source.name)]
        _publish_copy([file for file in files if file.exists()], confined(root, root / DATA_FOLDER / name))
        copied[name] = f"{DATA_FOLDER}/{name}/{source.name}"
    return copied


def _publish_copy(sources: list[Path], folder: Path) -> None:
    """Copy ``sources`` into a staging folder beside ``folder`` and rename it into place, so shards planning at once never see half a copy.

    A ``folder`` already holding the same files (another shard's copy) is kept; a different one (left by a
    farm interrupted before its plan was written, from other data) is replaced.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for source in sources:
            if source.is_dir():
                shutil.copytree(source, staging / source.name, copy_function=_link_or_copy)
            else:
                shutil.copy2(source, staging / source.name)
        if folder.exists():
            if _same_files(staging, folder):
                return
            retired = folder.with_name(f".{folder.name}-old-{staging.name}")
            with contextlib.suppress(FileNotFoundError):  # another shard retired it first
                os.rename(folder, retired)
                shutil.rmtree(retired)
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():  # not another shard's copy published meanwhile
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _same_files(first: Path, second: Path) -> bool:
    """Whether two folders hold the same relative file names with the same bytes."""
    def listing(folder: Path) -> list[Path]:
        return sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file())

    names = listing(first)
    return names == listing(second) and all(filecmp.cmp(first / name, second / name, shallow=False) for name in names)
