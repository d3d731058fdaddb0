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
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from mia_lightning.contract.confine import confined, within
from mia_lightning.errors import MiaError
from mia_lightning.names import is_hub_name

DATA_FOLDER = "data"
"""The experiment's copy of the local data its recipe named (one sub-folder per data argument)."""

DATA_DIRS_VARIABLE = "MIA_LIGHTNING_DATA_DIRS"
"""Environment variable listing folders of your own data that any experiment may name in place (never copied)."""

REMOTE_PREFIXES: tuple[str, ...] = ("hf:", "torchvision:")
"""Data named by a dataset hub rather than a path."""

HF_BUILDERS: frozenset[str] = frozenset({"arrow", "audiofolder", "cache", "csv", "generator", "imagefolder", "json", "pandas", "parquet",
                                         "spark", "sql", "text", "videofolder", "webdataset", "xml"})
"""``datasets``' packaged builders (besides those the installed version lists): ``load_dataset("csv")`` reads the working directory's files."""

_TORCHVISION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def data_args(cls: type) -> dict[str, tuple[str, ...]]:
    """The data-naming arguments a DataModule class declares (argument -> built-in words); empty for other classes."""
    return dict(getattr(cls, "DATA_ARGS", {}))


def is_local(value: Any, words: tuple[str, ...]) -> bool:
    """Whether a data argument's value names a local file or folder (not a built-in word, a hub dataset or nothing)."""
    return isinstance(value, str) and value not in words and not value.startswith(REMOTE_PREFIXES)


def _exists(path: Path) -> bool:
    """Whether ``path`` exists (False for a name too long or malformed to look up: no loader can open it either)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _hf_builders() -> frozenset[str]:
    """Names ``datasets.load_dataset`` takes for a packaged builder (csv, json, text, imagefolder, ...), not a hub dataset."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:  # datasets missing (hf: then fails with its own line) or reorganised: the fixed list still holds
        return HF_BUILDERS
    return HF_BUILDERS | {str(name).lower() for name in _PACKAGED_DATASETS_MODULES}


def _check_remote_name(value: str, where: str) -> None:
    """A hub-named dataset read from a file must name a dataset, never local files by another spelling.

    ``hf:<name>`` must be hub-shaped, not a local folder, and not a packaged builder of ``datasets``
    (``hf:csv`` / ``hf:json`` / ``hf:text`` read every such file under the working directory);
    ``torchvision:<Dataset>`` must be a class name. A value that is also an existing path relative to the
    working directory is refused too (a DataModule that takes no hub names opens it as a file:
    ``torchvision:/../../home/you/x.csv``).
    """
    prefix, _, rest = value.partition(":")
    name = rest.partition(":")[0]
    if prefix == "hf" and (not is_hub_name(name) or name.lower() in _hf_builders() or _exists(Path(name).expanduser())):
        raise MiaError(f"{where} {value!r}: an experiment's files may name a Hugging Face dataset (hf:org/name), not a local folder or "
                       "datasets' file builders (csv, json, text, ...: they read the working directory); "
                       "put local data inside the experiment (the farm copies a recipe's local data into data/)")
    if prefix == "torchvision" and not _TORCHVISION_NAME.fullmatch(rest):
        raise MiaError(f"{where} {value!r}: torchvision:<Dataset> names a torchvision dataset class (e.g. torchvision:CIFAR10), nothing else")
    if _exists(Path(value)):
        raise MiaError(f"{where} {value!r}: also names a local path in the working directory {Path.cwd()}; an experiment's files may name "
                       "local data only as data/<argument>/<file> inside the experiment")


def experiment_data_args(cls: type, init_args: dict[str, Any], root: Path | None, where: str) -> dict[str, Any]:
    """``init_args`` read from an experiment's files, with every local data path checked to lie inside ``root`` and made absolute.

    Relative paths are relative to the experiment (config.yaml's ``data/source/x.csv``). A path that
    leaves it, directly or through a link, is refused with one line; with no ``root`` every local path is.
    """
    checked = dict(init_args)
    for name in getattr(cls, "CACHE_ARGS", ()):
        if checked.get(name) is not None and in_trusted_data_folder(checked[name]) is None:
            raise MiaError(
                f"{where} {name} {checked[name]!r}: an experiment's files may not name a dataset cache folder outside ${DATA_DIRS_VARIABLE} "
                f"(a torchvision dataset there may be read with pickle); add your dataset folder to ${DATA_DIRS_VARIABLE}, "
                f"or delete {name} from config.yaml and keep the dataset in the default cache ($MIA_LIGHTNING_CACHE/torchvision)"
            )
    for name, words in data_args(cls).items():
        value = checked.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise MiaError(f"{where} {name} {value!r}: must be a dataset name or a path")
        if value.startswith(REMOTE_PREFIXES):
            _check_remote_name(value, f"{where} {name}")
        if not is_local(value, words):
            continue
        trusted = in_trusted_data_folder(value)
        if trusted is not None:
            checked[name] = str(trusted)
            continue
        problem = "a local path" if root is None else _outside(value, root, getattr(cls, "DATA_COMPANIONS", {}).get(name, ()))
        if problem:
            raise MiaError(
                f"{where} {name} {value!r}: {problem}; an experiment's files may name only data inside it or in ${DATA_DIRS_VARIABLE} "
                f"(copy the data into {Path(root or '<experiment>') / DATA_FOLDER / name}/ and name it {DATA_FOLDER}/{name}/<file> in config.yaml)"
            )
        checked[name] = str(root / value)
    return checked


def trusted_data_folders() -> tuple[Path, ...]:
    """The folders of ``$MIA_LIGHTNING_DATA_DIRS`` (``os.pathsep``-separated, resolved): your own datasets, which any experiment may name."""
    return tuple(Path(part).expanduser().resolve() for part in os.environ.get(DATA_DIRS_VARIABLE, "").split(os.pathsep) if part.strip())


def in_trusted_data_folder(value: Any) -> Path | None:
    """The resolved absolute path of ``value`` when it lies inside a trusted data folder (``trusted_data_folders``), else None.

    Only absolute (or ``~``) paths qualify: a relative one would depend on the working directory.
    """
    folders = trusted_data_folders()
    if not folders or not isinstance(value, str) or not value.strip():
        return None
    try:
        path = Path(value).expanduser()
        resolved = path.resolve() if path.is_absolute() else None
    except (OSError, RuntimeError, ValueError):
        return None
    return resolved if resolved is not None and any(within(resolved, folder) for folder in folders) else None


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves strictly under ``root`` (the experiment folder itself is not data)."""
    resolved, top = path.resolve(), root.resolve()
    return resolved != top and within(resolved, top)


def _outside(value: str, root: Path, companions: tuple[str, ...] = ()) -> str | None:
    """Why the local data ``value`` (relative to the experiment ``root``) is not inside it, or None when it is.

    A folder is read file by file (an image folder), so a link inside it leading out (``cats/1.png -> ~/private.png``)
    counts too, as does a companion file read beside ``value`` (Adult's ``adult.test``). A path that cannot be
    resolved (a link loop, a NUL byte) is refused as well.
    """
    try:
        return _why_outside(value, root, companions)
    except (OSError, RuntimeError, ValueError) as err:  # RuntimeError: Python < 3.13's link loop
        return f"not a readable path ({' '.join(str(err).split())[:120]})"


def _why_outside(value: str, root: Path, companions: tuple[str, ...]) -> str | None:
    path = root / value
    if not value.startswith("~") and path.resolve() == root.resolve():
        return f"the experiment folder {root} itself, not data inside it"
    if value.startswith("~") or not _inside(path, root):
        return f"outside the experiment {root}"
    for companion in (path.with_name(name) for name in companions):
        if companion.is_symlink() and not _inside(companion, root):
            return f"beside {companion}, a link outside the experiment {root}"
    # Loaders follow linked folders (a class folder ``birds -> ../../elsewhere``), so the walk does too: a link to a folder
    # inside the experiment that holds links leading out is found, and each real folder is listed once (no loop).
    folders, seen = [path] if path.is_dir() else [], set()
    while folders:
        folder = folders.pop()
        real = folder.resolve()
        if real in seen:
            continue
        seen.add(real)
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink() and not _inside(entry, root):
                return f"holding {entry}, a link outside the experiment {root}"
            if entry.is_dir():
                folders.append(entry)
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
    Adult's ``adult.test`` next to ``adult.data``); a folder is copied whole. Data inside a trusted data
    folder (``$MIA_LIGHTNING_DATA_DIRS``: a large image set on another disk) is not copied; config.yaml
    names it by its absolute path.
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
        trusted = in_trusted_data_folder(str(source.absolute()))
        if trusted is not None:
            copied[name] = str(trusted)
            continue
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
    staging = folder.with_name(f".{folder.name}-{uuid.uuid4().hex[:12]}")
    staging.mkdir()  # with the user's umask (mkdtemp's 0700 would hide a shared experiment's data from its readers)
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
