"""The one way this project calls Hugging Face ``from_pretrained``: never custom code, never a prompt.

A model folder whose ``config.json`` or ``tokenizer_config.json`` carries an ``auto_map`` (or that
ships Python files) asks transformers to import code from the folder; with ``trust_remote_code``
unset, transformers asks "run the custom code? [y/N]" on a terminal and runs it on "y". Here every
call passes ``trust_remote_code=False`` (transformers then refuses instead of asking), a local folder
with remote-code markers is refused with one line before transformers sees it, and names that came
from an experiment's files load offline (``local_files_only``) from the user's own cache; so do
``hf:`` datasets and timm's pretrained weights named by those files (``hub_offline_for_files``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator

from mia_lightning.errors import MiaError
from mia_lightning.names import names_from_files

MARKER_FILES: tuple[str, ...] = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json", "generation_config.json")
MARKER_KEYS: tuple[str, ...] = ("auto_map", "custom_pipelines")


def remote_code_marker(folder: Path) -> str | None:
    """'<file>: <key>' of the first remote-code marker in a model folder, or None."""
    for name in MARKER_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # transformers reports an unreadable config itself
        found = [key for key in MARKER_KEYS if isinstance(payload, dict) and key in payload]
        if found:
            return f"{path}: {found[0]}"
    code = sorted(folder.glob("*.py"))
    return f"{code[0]}: Python code" if code else None


def from_pretrained(auto_class: Any, location: str, where: str, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(location, trust_remote_code=False, ...)`` after refusing a folder with custom code."""
    folder = Path(location).expanduser()
    if folder.is_dir():
        marker = remote_code_marker(folder)
        if marker:
            raise MiaError(f"{where} {location!r}: the folder asks to run its own code ({marker}); refusing it (remove the custom code or use a standard model)")
    return auto_class.from_pretrained(location, trust_remote_code=False, local_files_only=names_from_files(), **kwargs)


@contextlib.contextmanager
def hub_offline_for_files() -> Iterator[None]:
    """While building a component named by an experiment's files, hub downloads (``datasets``, timm weights) read only the user's cache.

    ``datasets``' own ``DownloadConfig(local_files_only=True)`` still asks the hub, so the block switches the
    offline flags that ``HF_HUB_OFFLINE=1`` sets at import (huggingface_hub's, and datasets' when it is
    installed) and restores them after.
    """
    if not names_from_files():
        yield
        return
    import huggingface_hub.constants as hub_constants

    flags = [(hub_constants, hub_constants.HF_HUB_OFFLINE)]
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        flags.append((datasets.config, datasets.config.HF_HUB_OFFLINE))
    for module, _ in flags:
        module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module, value in flags:
            module.HF_HUB_OFFLINE = value
