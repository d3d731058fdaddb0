"""The recipes shipped with the package (``configs/``, installed as ``mia_lightning/recipes/``) and ``recipe:<name>`` references.

``--config recipe:tabular/digits_quickstart`` names ``<recipes>/tabular/digits_quickstart.yaml`` in a
checkout and in an installed wheel alike, so a recipe can be run without the repository.
"""

from __future__ import annotations

from pathlib import Path

from mia_lightning.errors import MiaError

PREFIX = "recipe:"
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
"""A link to the repository's ``configs/`` in a checkout; a real folder in an installed wheel."""


def list_recipes() -> list[str]:
    """Names of the shipped recipes (``<workload>/<recipe>``), sorted."""
    return sorted(path.relative_to(RECIPES_DIR).with_suffix("").as_posix() for path in RECIPES_DIR.rglob("*.yaml"))


def recipe_path(reference: str) -> Path:
    """The file a ``recipe:<name>`` reference names; a one-line error listing the recipes when there is none."""
    name = reference.removeprefix(PREFIX).removesuffix(".yaml")
    path = RECIPES_DIR / f"{name}.yaml"
    if ".." in Path(name).parts or not path.is_file():
        raise MiaError(f"--config {reference}: no such shipped recipe; `mia-lightning recipes` lists them ({', '.join(list_recipes()[:3])}, ...)")
    return path


def recipe_reference(config: str) -> str:
    """``recipe:<name>`` for the path ``expand_recipe_args`` made of it (what the user typed, for messages); any other config as given."""
    path = Path(config)
    return f"{PREFIX}{path.relative_to(RECIPES_DIR).with_suffix('').as_posix()}" if path.is_relative_to(RECIPES_DIR) else config


def config_value(argv: list[str], index: int) -> str | None:
    """The config file ``argv[index]`` names: X of ``--config=X``, or the argument itself after ``--config``; else None."""
    arg = argv[index]
    if arg.startswith("--config="):
        return arg.partition("=")[2]
    return arg if index and argv[index - 1] == "--config" else None


def expand_recipe_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config recipe:<name>`` (or ``--config=recipe:<name>``) replaced by the recipe's path."""
    expanded = []
    for index, arg in enumerate(argv):
        value = config_value(argv, index)
        if value is not None and value.startswith(PREFIX):
            path = str(recipe_path(value))
            arg = f"--config={path}" if arg.startswith("--config=") else path
        expanded.append(arg)
    return expanded


def main(argv: list[str]) -> int:
    """``mia-lightning recipes``: print the shipped recipes, one ``recipe:<name>`` a line."""
    if argv in (["-h"], ["--help"]):
        print("usage: train.py recipes\n\nList the recipes shipped with the package, one `recipe:<name>` a line; "
              "use one as `--config recipe:<name>` (e.g. `train.py farm --config recipe:tabular/digits_quickstart`).")
        return 0
    if argv:
        raise MiaError(f"recipes: takes no arguments, got {' '.join(argv)}")
    for name in list_recipes():
        print(f"{PREFIX}{name}")
    return 0
