"""The report files of an experiment's published run, written together: ``report.md`` and ``report.html``."""

from __future__ import annotations

from pathlib import Path

from mia_lightning.errors import MiaError


def refuse_folders(paths: list[Path]) -> None:
    """Refuse report destinations that are folders, before any file is written: a refused report changes nothing."""
    for path in paths:
        if Path(path).is_dir():
            raise MiaError(f"{path}: is a folder, not a report file; move or remove that folder (or name another file) and re-run")


def write_reports(experiment_dir: Path) -> dict[str, Path]:
    """``report.md`` and ``report.html`` of the published run (``attack.py --report``); returns their paths by format.

    Both are rendered before either is written (each atomically), so a report that fails leaves the previous pair as it was.
    """
    from mia_lightning.contract.confine import confined_all
    from mia_lightning.contract.io import write_bytes_atomic
    from mia_lightning.report.html import html_report
    from mia_lightning.report.markdown import markdown_report

    destinations = {"markdown": Path(experiment_dir) / "report.md", "html": Path(experiment_dir) / "report.html"}
    confined_all(Path(experiment_dir), list(destinations.values()))
    refuse_folders(list(destinations.values()))
    texts = {"markdown": markdown_report(experiment_dir), "html": html_report(experiment_dir)}
    for kind, path in destinations.items():
        write_bytes_atomic(path, texts[kind].encode())
    return destinations
