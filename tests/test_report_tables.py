"""One table record, two renderers: the terminal and Markdown show the same cells in the same order."""

import pytest
from rich.console import Console

from mia_lightning.report.markdown import markdown_table
from mia_lightning.report.table import TableRecord
from mia_lightning.report.terminal import rich_table


def test_markdown_and_terminal_render_the_same_record():
    record = TableRecord("leakage", ["setting", "AUC"], [["baseline", "0.652"], ["dp", "0.501"]], left=("setting",))
    assert markdown_table(record) == "**leakage**\n\n| setting | AUC |\n|---|---|\n| baseline | 0.652 |\n| dp | 0.501 |\n"
    table = rich_table(record)
    assert [c.header for c in table.columns] == ["setting", "AUC"] and [c.justify for c in table.columns] == ["left", "right"]
    console = Console(width=80, record=True)
    console.print(table)
    text = console.export_text()
    assert text.index("baseline") < text.index("0.652") < text.index("dp") < text.index("0.501")


def test_a_row_that_does_not_fit_the_header_is_refused():
    with pytest.raises(ValueError, match="rows of \\[1\\] cells under a header of 2"):
        TableRecord("t", ["a", "b"], [["only one"]])
