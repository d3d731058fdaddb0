"""Building Lightning components named by a class path: the one place where names become classes.

Recipes, checkpoints and stored configs name classes as ``class_path`` + ``init_args`` (LightningCLI
style). A name read from a file is data: it is imported only from trusted packages and used only if
it is a subclass of the expected Lightning base, so a crafted checkpoint naming ``os.system`` or
``subprocess.Popen`` is refused before anything is called.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from mia_lightning.contract.data_sources import experiment_data_args
from mia_lightning.errors import MiaError
from mia_lightning.names import check_named_args, reading_experiment_files

TRUSTED_MODULES: tuple[str, ...] = ("mia_lightning",)
"""Packages whose classes a checkpoint or a stored config may name (``--trust`` adds more)."""


LIGHTNING_COMPONENTS: tuple[type, ...] = (L.LightningModule, L.LightningDataModule, L.Callback)
"""What a recipe may name when no narrower base is given."""


MOVED_MODULES: dict[str, str] = {
    "mia_lightning.privacy.dp_sgd": "mia_lightning.defences.dp_sgd",
}
"""Old module -> new module of every Lightning component this package has moved (fixed; only ever grows).

Experiments store class paths (config.yaml, plan.json's recipe, checkpoints), so a class path
written before a move keeps resolving to the class's new home.
"""


def current_class_path(class_path: str) -> str:
    """``class_path`` with a moved module (``MOVED_MODULES``) replaced by its new location; other paths unchanged."""
    module_name, dot, class_name = str(class_path).rpartition(".")
    return f"{MOVED_MODULES[module_name]}{dot}{class_name}" if module_name in MOVED_MODULES else str(class_path)


def with_current_class_paths(payload: Any) -> Any:
    """A copy of a stored recipe (nested dicts and lists) with every ``class_path`` value brought up to date."""
    if isinstance(payload, dict):
        return {key: current_class_path(value) if key == "class_path" and isinstance(value, str) else with_current_class_paths(value)
                for key, value in payload.items()}
    if isinstance(payload, list):
        return [with_current_class_paths(value) for value in payload]
    return payload


def _names(base: type | tuple[type, ...]) -> str:
    return " or ".join(f"{cls.__module__.split('.')[0]}.{cls.__name__}" for cls in (base if isinstance(base, tuple) else (base,)))


def resolve_class(class_path: str, base: type | tuple[type, ...], trusted: tuple[str, ...] | None = None, where: str = "class_path") -> type:
    """Import ``class_path`` and return it only if it is a subclass of ``base``; nothing is called.

    Names read from files (a checkpoint's tag, an experiment's config.yaml) are data: pass
    ``trusted`` so that only modules inside those packages are imported at all, and the subclass
    check refuses ``os.system``, ``subprocess.Popen``, ``builtins.eval`` or any non-Lightning class
    before anything is instantiated. A path from before a move (``MOVED_MODULES``) resolves to the
    class's new location.
    """
    current = current_class_path(class_path)
    module_name, _, class_name = current.rpartition(".")
    if not module_name or not class_name.isidentifier():
        raise MiaError(f"{where} {class_path!r}: not a dotted class path such as mia_lightning.models.tabular_mlp.TabularMLP")
    if trusted is not None and not any(module_name == root or module_name.startswith(root + ".") for root in trusted):
        raise MiaError(
            f"{where} {class_path!r}: refusing to import a class from outside {', '.join(trusted)}; "
            "if you trust this experiment, pass --trust " + module_name.split(".")[0]
        )
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        moved = f" (its module moved: {current})" if current != str(class_path) else ""
        raise MiaError(f"{where} {class_path!r}{moved}: cannot import it; check the spelling in the config") from None
    if not (isinstance(found, type) and issubclass(found, base)):
        raise MiaError(f"{where} {class_path!r}: is not a {_names(base)} subclass; refusing to build it")
    return found


def construction_failure(class_path: str, err: Exception) -> MiaError:
    """The one line for what the constructor of ``class_path`` raised: a ``MiaError`` as it is, a bad argument (TypeError,
    ValueError) as such, anything else with its type and the first 200 characters of its text."""
    if isinstance(err, MiaError):
        return err
    if isinstance(err, (TypeError, ValueError)):
        return MiaError(f"{class_path}: bad init_args ({err}); fix the config")
    reason = " ".join(str(err).split())[:200]
    return MiaError(f"{class_path}: building it failed ({type(err).__name__}: {reason}); fix its init_args")


@dataclass(frozen=True)
class ComponentSpec:
    """A class to build by import path with keyword arguments (LightningCLI's class_path / init_args).

    ``base`` is the Lightning class it must derive from; ``trusted`` limits imports to those packages
    when the spec was read from a file rather than given by the user, and ``root`` is the experiment
    that file belongs to (the only place local data it names may lie).
    """

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)
    base: type | tuple[type, ...] = LIGHTNING_COMPONENTS
    trusted: tuple[str, ...] | None = None
    root: Path | None = None

    def resolve(self) -> type:
        return resolve_class(self.class_path, self.base, self.trusted)

    def accepts(self, name: str) -> bool:
        """Whether the class's ``__init__`` takes an argument ``name`` (optional protocol arguments such as ``cache_dir``)."""
        return name in inspect.signature(self.resolve().__init__).parameters

    def build(self, **overrides: Any) -> Any:
        """The instance; when the spec was read from a file, its name and data arguments are checked first and hub loads stay offline.

        A constructor that raises becomes one line naming the class (the error's type and text).
        """
        cls = self.resolve()
        args = {**self.init_args, **overrides}
        reading = contextlib.nullcontext()
        if self.trusted is not None:
            check_named_args(cls, args, f"{self.class_path}:")
            args = experiment_data_args(cls, args, self.root, f"{self.class_path}:")
            reading = reading_experiment_files()
        try:
            with reading:
                return cls(**args)
        except MiaError:
            raise
        except Exception as err:  # a constructor may raise anything; the user sees one line, not its traceback
            raise construction_failure(self.class_path, err) from None
