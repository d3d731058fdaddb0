"""Reading columns of text: a UTF-8 CSV by header name, or a Hugging Face dataset (``hf:<name>``).

Shared by the text classification data (``data/text.py``), the masked-LM texts (``data/mlm.py``)
and the score importers, so a malformed file gets the same one-line error everywhere.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from mia_lightning.errors import MiaError
from mia_lightning.hub import hub_offline_for_files


def read_csv_columns(path: Path, columns: dict[str, str] | None = None, min_rows: int = 1) -> dict[str, list[str]]:
    """Columns of a UTF-8 CSV by header name, with one-line errors for a bad file, column or ragged row.

    ``columns`` maps each wanted header name to the recipe option that chose it (``""`` when the loader
    fixes the name), so a missing column's error names the option to change; ``None`` reads every column.
    """
    if not path.is_file():
        raise MiaError(f"{path}: no such CSV file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except (UnicodeDecodeError, csv.Error) as err:
        raise MiaError(f"{path}: not a readable UTF-8 CSV ({err})") from None
    if len(rows) < 1 + min_rows:
        raise MiaError(f"{path}: needs a header row and at least {min_rows} data row{'s' if min_rows > 1 else ''}")
    header = [name.strip() for name in rows[0]]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise MiaError(f"{path}: header names column {repeated[0]!r} more than once; give every column its own name")
    for column, option in (columns or {}).items():
        if column not in header:
            raise MiaError(f"{path}: no column {column!r} in header {header}; {_column_fix(option)}")
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise MiaError(f"{path}:{number}: {len(row)} fields, header has {len(header)}; fix that row (quote fields that contain commas)")
    return {name: [row[i] for row in rows[1:]] for i, name in enumerate(header) if columns is None or name in columns}


def _column_fix(option: str) -> str:
    """What to do about a missing column: set the option that named it, or (a name the loader fixes) use the expected file."""
    return f"set {option} to one of them" if option else "this is not the file this loader expects"


def hf_columns(name: str, columns: dict[str, str], split: str) -> dict[str, list[str]]:
    """Columns of a Hugging Face dataset (``hf:<name>[:<config>]``), downloaded by ``datasets`` (only from its cache when an
    experiment's config.yaml named it); ``columns`` as for ``read_csv_columns``."""
    if importlib.util.find_spec("datasets") is None:
        raise MiaError(f"hf:{name}: the Hugging Face `datasets` package is not installed; pip install 'mia-lightning[hub]' (or datasets)")
    import datasets

    dataset_name, _, config = name.partition(":")
    try:
        with hub_offline_for_files():
            table = datasets.load_dataset(dataset_name, config or None, split=split)
    except Exception as err:  # datasets raises many types for a missing dataset, config or network
        raise MiaError(f"hf:{name}: cannot load split {split!r} ({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise MiaError(f"hf:{name}: no column {missing[0]!r} (columns: {', '.join(table.column_names)}); {_column_fix(columns[missing[0]])}")
    return {column: [str(value) for value in table[column]] for column in columns}
