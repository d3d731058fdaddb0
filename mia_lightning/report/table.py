"""The one record format every report table is built from: a title, a header and rows of text cells.

Analyses compute and format their numbers into ``TableRecord``s; the renderers in this package turn
the same records into a rich terminal table (``terminal.rich_table``) or Markdown
(``markdown.markdown_table``), so a new renderer serves every analysis at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TableRecord:
    """One table: ``rows`` of text cells under ``header``; columns named in ``left`` are left-justified (others right)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    left: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        widths = {len(row) for row in self.rows}
        if widths - {len(self.header)}:
            raise ValueError(f"table {self.title!r}: rows of {sorted(widths)} cells under a header of {len(self.header)}")
