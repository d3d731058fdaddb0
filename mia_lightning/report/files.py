"""The report files of an experiment's published run, written together: ``report.md`` and ``report.html``."""

from __future__ import annotations

from pathlib import Path


def write_reports(experiment_dir: Path) -> dict[str, Path]:
    """``report.md`` and ``report.html`` of the published run (``attack.py --report``); returns their paths by format."""
    from mia_lightning.contract.confine import confined_all
    from mia_lightning.report.html import write_html_report
    from mia_lightning.report.markdown import write_markdown_report

    confined_all(Path(experiment_dir), [Path(experiment_dir) / "report.md", Path(experiment_dir) / "report.html"])  # both refused before either is written
    return {"markdown": write_markdown_report(experiment_dir), "html": write_html_report(experiment_dir)}
