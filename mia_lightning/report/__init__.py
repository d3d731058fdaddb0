"""Rendering audit records: terminal (rich) tables and plots, the Markdown and HTML reports, Lightning loggers."""
