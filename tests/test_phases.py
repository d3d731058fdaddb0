"""Long phases show themselves: heartbeat lines in a non-terminal log, nothing for quick phases, and a line per audit scoring phase."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console
from synthetic import write_synthetic_experiment

from mia_lightning import phases
from mia_lightning.cli import attack_main
from mia_lightning.phases import Phase


def log_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False), buffer


def test_a_quick_phase_prints_nothing():
    console, buffer = log_console()
    with Phase("quick", total=3, console=console) as phase:
        phase.advance(3)
    assert buffer.getvalue() == ""


def test_a_slow_phase_prints_heartbeats_with_counts_and_an_eta_then_done(monkeypatch):
    monkeypatch.setattr(phases, "FIRST_LINE_S", 0.05)
    monkeypatch.setattr(phases, "EVERY_S", 0.05)
    console, buffer = log_console()
    with Phase("caching features", total=4, console=console) as phase:
        phase.advance()
        time.sleep(0.3)
    lines = buffer.getvalue().splitlines()
    assert len(lines) >= 3, lines
    assert all(line.startswith("caching features: ") for line in lines)
    assert "elapsed, 1/4, about" in lines[0] and lines[0].endswith("s left")
    assert lines[-1].startswith("caching features: done in ")


def test_a_failed_phase_does_not_claim_it_is_done(monkeypatch):
    monkeypatch.setattr(phases, "FIRST_LINE_S", 0.0)
    console, buffer = log_console()
    with pytest.raises(RuntimeError):
        with Phase("simulating", console=console):
            time.sleep(0.1)
            raise RuntimeError("boom")
    assert "simulating: 0 s elapsed" in buffer.getvalue() and "done in" not in buffer.getvalue()


def test_an_audit_log_shows_each_scoring_phase(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(phases, "FIRST_LINE_S", 0.0)  # every phase counts as slow here
    root = write_synthetic_experiment(tmp_path / "exp", n_models=4, n_samples=20, seed=7)
    assert attack_main(["--experiment", str(root), "--attack", "lira", "thresholds", "--bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    assert "lira: fitting and scoring 4 targets: " in out and "lira: fitting and scoring 4 targets: done in" in out
    assert "thresholds: fitting and scoring 4 targets: done in" in out
