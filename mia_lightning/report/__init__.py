"""Rendering audit records: terminal (rich) tables and plots, the Markdown report."""
