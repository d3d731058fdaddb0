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
    """``report.md`` and ``report.html`` of the published run (``attack.py --report``); returns their paths by format."""
    from mia_lightning.contract.confine import confined_all
    from mia_lightning.report.html import write_html_report
    from mia_lightning.report.markdown import write_markdown_report

    destinations = [Path(experiment_dir) / "report.md", Path(experiment_dir) / "report.html"]
    confined_all(Path(experiment_dir), destinations)  # both refused before either is written
    refuse_folders(destinations)
    return {"markdown": write_markdown_report(experiment_dir), "html": write_html_report(experiment_dir)}
