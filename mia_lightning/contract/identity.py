"""Recipe identity per model: every model read together must come from the recipe in plan.json.

The farm records the recipe identity (``plan.json`` ``recipe``: plan, data, model and trainer
settings, pool hash) in each model's ``done.json``. Shards trained on several machines and merged by
copying model folders can mix models trained with other settings; resume, export and the attacks
compare each model's record with the plan and name the model and the differing keys. Models
without a record (older layouts, imported experiments) are not checked.
"""

from __future__ import annotations

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


def differing_keys(stored: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two JSON payloads, as 'key: stored -> current'."""
    old, new = _flatten(stored), _flatten(current)

    def shown(values: dict, key: str) -> str:
        return repr(values[key]) if key in values else "<absent>"

    return [f"{key}: {shown(old, key)} -> {shown(new, key)}" for key in sorted(set(old) | set(new)) if shown(old, key) != shown(new, key)]


def check_model_identities(experiment: ExperimentDir, indices: Iterable[int] | None = None) -> None:
    """Refuse (one line naming the model and the differing keys) a finished model whose recorded recipe differs from plan.json's."""
    planned = experiment.plan.get(RECIPE_KEY)
    if not isinstance(planned, dict):
        return
    for index in range(experiment.keep.shape[0]) if indices is None else indices:
        path = experiment.model_dir(index) / DONE_FILE
        if not path.is_file():
            continue
        done = load_json(path)
        recorded = done.get(RECIPE_KEY) if isinstance(done, dict) else None
        if recorded is None:
            continue
        changed = differing_keys(recorded, planned) if isinstance(recorded, dict) else [f"{RECIPE_KEY}: {recorded!r} is not a recipe record"]
        if changed:
            raise MiaError(
                f"{path}: model {index} was trained with another recipe than {experiment.plan_path} ({'; '.join(changed[:4])}"
                f"{'; ...' if len(changed) > 4 else ''}); remove this model folder and re-run the farm, or keep the experiments apart"
            )
