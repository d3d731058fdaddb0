"""Recipe identity per model: every model read together must come from the recipe in plan.json.

The farm records the recipe identity (``plan.json`` ``recipe``: plan, data, model and trainer
settings, pool hash) in each model's ``done.json``. Shards trained on several machines and merged by
copying model folders can mix models trained with other settings; resume, export and the attacks
compare each model's record with the plan and name the model and the differing keys. Models
without a record (older layouts, imported experiments) are not checked.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

from mia_lightning.errors import MiaError
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import load_json

DONE_FILE = "done.json"
RECIPE_KEY = "recipe"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {key: leaf for k, v in value.items() for key, leaf in _flatten(v, f"{prefix}{k}.").items()} or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def with_added_defaults(stored: dict, current: dict, current_from_file: bool = True) -> dict:
    """A copy of a stored plan.json whose recipe also holds the arguments a newer version added at their default.

    A model or data argument that a later version introduced (e.g. the MLP's ``temperature``) is
    absent from recipes planned before it; when the current recipe gives it the class's own default,
    training is unchanged, so the experiment still resumes. Any other value is a real difference.
    The class is resolved with ``resolve_class``: only a Lightning component, and only from this
    project's packages when ``current`` was read from a file (a model's done.json) rather than being
    the user's own recipe. No class is resolved when no argument was added.
    """
    from mia_lightning.contract.components import LIGHTNING_COMPONENTS, TRUSTED_MODULES, current_class_path, resolve_class  # Lightning loads only here

    recipe = stored.get(RECIPE_KEY)
    if not isinstance(recipe, dict) or not isinstance(current.get(RECIPE_KEY), dict):
        return stored
    merged = {**recipe}
    for part in ("model", "data"):
        old, new = recipe.get(part), current[RECIPE_KEY].get(part)
        if not (isinstance(old, dict) and isinstance(new, dict) and isinstance(old.get("init_args"), dict) and isinstance(new.get("init_args"), dict)):
            continue
        missing = set(new["init_args"]) - set(old["init_args"])
        if not missing or current_class_path(str(old.get("class_path"))) != new.get("class_path"):
            continue
        try:
            cls = resolve_class(str(new["class_path"]), LIGHTNING_COMPONENTS, TRUSTED_MODULES if current_from_file else None)
            parameters = inspect.signature(cls).parameters
        except MiaError:  # not importable or not trusted: the recipes are compared as they are
            continue
        added = {key: new["init_args"][key] for key in missing
                 if key in parameters and parameters[key].default is not inspect.Parameter.empty and parameters[key].default == new["init_args"][key]}
        if added:
            merged[part] = {**old, "init_args": {**old["init_args"], **added}}
    return {**stored, RECIPE_KEY: merged}


def differing_keys(stored: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two JSON payloads, as 'key: stored -> current'."""
    old, new = _flatten(stored), _flatten(current)

    def shown(values: dict, key: str) -> str:
        return repr(values[key]) if key in values else "<absent>"

    return [f"{key}: {shown(old, key)} -> {shown(new, key)}" for key in sorted(set(old) | set(new)) if shown(old, key) != shown(new, key)]


def check_model_identities(experiment: ExperimentDir, indices: Iterable[int] | None = None) -> None:
    """Refuse (one line naming the model and the differing keys) a finished model whose recorded recipe differs from plan.json's, or whose done.json is not a record."""
    planned = experiment.plan.get(RECIPE_KEY)
    if not isinstance(planned, dict):
        return
    for index in range(experiment.keep.shape[0]) if indices is None else indices:
        path = experiment.model_dir(index) / DONE_FILE
        if not path.is_file():
            continue
        done = load_json(path)
        if not isinstance(done, dict):
            raise MiaError(f"{path}: not a JSON object, so not a finished model's record; remove this model folder and re-run the farm (it trains the model again)")
        recorded = done.get(RECIPE_KEY)
        if recorded is None:
            continue
        if isinstance(recorded, dict):  # a model trained by a newer version records the arguments it added, at their defaults
            changed = differing_keys(recorded, with_added_defaults({RECIPE_KEY: planned}, {RECIPE_KEY: recorded})[RECIPE_KEY])
        else:
            changed = [f"{RECIPE_KEY}: {recorded!r} is not a recipe record"]
        if changed:
            raise MiaError(
                f"{path}: model {index} was trained with another recipe than {experiment.plan_path} ({'; '.join(changed[:4])}"
                f"{'; ...' if len(changed) > 4 else ''}); remove this model folder and re-run the farm, or keep the experiments apart"
            )
