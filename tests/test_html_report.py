"""report.html: one self-contained page whose every number equals the run's files; the verdict reads the intervals."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from synthetic import write_synthetic_experiment

from mia_lightning.audit import run_audit
from mia_lightning.cli import attack_main
from mia_lightning.report.html import verdict

LEVELS = ("0.001", "0.01", "0.1")


class Page(HTMLParser):
    """Tables (id -> rows of cell texts), section ids in order, tags seen and image sources."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.ids: list[str] = []
        self.tags: set[str] = set()
        self.images: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "table":
            self._table = attrs.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).replace("\xa0", " ").strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def pct(value: float) -> str:
    return f"{100 * value:.2f}%"


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, Page, list[dict]]:
    root = write_synthetic_experiment(tmp_path_factory.mktemp("html") / "exp", n_models=8, n_samples=60, n_population=10, effect=2.0, seed=5)
    run_audit(root, ["lira", "rmia"], n_targets=4, bootstrap=30, few_shadow=True)
    assert attack_main(["--experiment", str(root), "--report"]) == 0
    run = json.loads((root / "attacks" / "latest" / "run.json").read_text())
    records = [json.loads((root / "attacks" / name / "results.json").read_text()) for name in run["outputs"]]
    return root, Page((root / "report.html").read_text()), records


def test_self_contained_and_in_order(page):
    root, parsed, _ = page
    text = (root / "report.html").read_text()
    assert "<script" not in text and not re.search(r"(src|href)=\"(https?:)?//", text)  # no script, nothing fetched
    assert {"img", "table"} <= parsed.tags and len(parsed.images) == 2  # ROC and few-shadow curve
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,") and base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    order = ["verdict", "results-table", "roc", "utility-table", "decision-table", "epsilon", "few-shadow-table", "vulnerable-table", "provenance-table"]
    assert [ident for ident in parsed.ids if ident in order] == order  # the verdict first, provenance last


def test_every_number_in_the_results_table_equals_results_json(page):
    _, parsed, records = page
    header, *rows = parsed.tables["results-table"]
    assert header[0] == "attack" and len(rows) == len(records)
    for row, record in zip(rows, records):
        low, high = record["auc_ci_bootstrap"]
        assert row[:3] == [record["attack"], f"{record['auc']:.4f} {{{low:.4f}, {high:.4f}}}", f"{record['balanced_accuracy']:.4f}"]
        for cell, level in zip(row[3:6], LEVELS):
            boot = record["tpr_at_fpr_ci_bootstrap"][level]
            flag = " (!)" if float(level) < record["min_resolvable_fpr"] else ""  # the same flag as the terminal and report.md
            assert cell == f"{pct(record['tpr_at_fpr'][level])} {{{100 * boot[0]:.2f}, {100 * boot[1]:.2f}}}{flag}"  # the bootstrap only
        min_flag = " (!)" if record["min_resolvable_fpr"] > 0.001 else ""
        assert row[7] == f"{record['n_members']} / {record['n_nonmembers']}" and row[8] == f"{100 * record['min_resolvable_fpr']:.3g}%{min_flag}"
        assert row[6].startswith(f"{record['empirical_epsilon']['epsilon_lower_bound']:.3f} (")


def test_utility_and_provenance_equal_the_run_files(page):
    root, parsed, records = page
    utility = json.loads((root / "attacks" / "utility.json").read_text())
    test = [m["test_accuracy"] for m in utility["per_model"]]
    assert parsed.tables["utility-table"][1] == ["test accuracy", f"{pct(utility['test_accuracy'])} (sd {100 * utility['test_accuracy_std']:.2f})",
                                                 pct(min(test)), pct(max(test))]
    assert parsed.tables["utility-table"][3][1] == f"{100 * utility['train_test_gap']:.2f} points"
    f1 = [row[3] for row in parsed.tables["per-class-table"][1:]]
    assert f1 == ["-" if value is None else pct(value) for value in utility["per_class"]["f1"]]
    provenance = dict(parsed.tables["provenance-table"][1:])
    assert provenance["attack run"].startswith(records[0]["run"]["id"]) and records[0]["run"]["version"] in provenance["mia-lightning"]


def test_few_shadow_table_equals_few_shadow_json(page):
    root, parsed, _ = page
    rows = json.loads((root / "attacks" / "few_shadow" / "few_shadow.json").read_text())["rows"]
    header, *table = parsed.tables["few-shadow-table"]
    for line in table:
        for name, cell in zip(header[1:], line[1:]):
            row = next(r for r in rows if r["n_shadows"] == int(line[0]) and r["attack"] == name)
            assert cell == ("-" if row["auc"] is None else f"{row['auc']:.3f} / {pct(row['tpr@0.001'])} / {pct(row['tpr@0.01'])}")


def record(name: str, tprs: dict[str, float], boot: dict[str, list[float]], min_fpr: float = 1e-4) -> dict:
    return {"attack": name, "auc": 0.6, "auc_ci_bootstrap": [0.55, 0.65], "n_members": 100, "n_nonmembers": 100, "targets": [0, 1],
            "tpr_at_fpr": tprs, "tpr_at_fpr_ci": {k: [0.0, 1.0] for k in tprs}, "tpr_at_fpr_ci_bootstrap": boot, "min_resolvable_fpr": min_fpr}


def test_verdict_names_the_lowest_fpr_where_an_interval_clears_chance():
    weak = record("weak", {"0.001": 0.004, "0.01": 0.03, "0.1": 0.2}, {"0.001": [0.0, 0.008], "0.01": [0.012, 0.05], "0.1": [0.15, 0.25]})
    coarse = record("coarse", {"0.001": 0.0, "0.01": 0.05, "0.1": 0.3}, {"0.001": [0.0, 0.0], "0.01": [0.02, 0.08], "0.1": [0.2, 0.4]}, min_fpr=0.005)
    text, leaks = verdict([weak, coarse])
    assert leaks and "<code>coarse</code> finds 5.00% of the members at 1% FPR" in text and "2.00% to 8.00%" in text
    assert "coarse cannot resolve 0.1% FPR" in text  # the resolution caveat
    none = record("none", {"0.001": 0.001, "0.01": 0.01, "0.1": 0.1}, {"0.001": [0.0, 0.003], "0.01": [0.0, 0.02], "0.1": [0.05, 0.15]})
    text, leaks = verdict([none])
    assert not leaks and "No leakage detected" in text and "at 0.1% FPR" in text and "Not evidence of privacy" in text


def test_a_run_without_bootstrap_intervals_gets_no_verdict():
    """With --bootstrap 0 only the Clopper-Pearson interval over pairs remains; it is too narrow to declare leakage."""
    narrow = record("narrow", {"0.001": 0.004, "0.01": 0.03, "0.1": 0.2}, {})
    narrow["tpr_at_fpr_ci"] = {"0.001": [0.003, 0.005], "0.01": [0.025, 0.035], "0.1": [0.19, 0.21]}  # would clear chance everywhere
    text, leaks = verdict([narrow])
    assert leaks is None and "No verdict" in text and "--bootstrap 0" in text and "Leaks" not in text


def test_a_tables_page_and_its_markdown_twin_hold_the_same_tables_and_never_follow_a_link_out(tmp_path):
    from mia_lightning.errors import MiaError
    from mia_lightning.report.html import write_tables_page
    from mia_lightning.report.table import TableRecord

    record = TableRecord("scores per setting", ["setting", "AUC"], [["baseline", "0.762 [0.749, 0.775]"], ["dropout", "0.550 [0.540, 0.559]"]])
    page = write_tables_page(tmp_path / "analysis.html", "Study: s", [record], notes=["a note"])
    twin = (tmp_path / "analysis.md").read_text()
    assert twin.startswith("# Study: s\n") and "a note" in twin and "| dropout | 0.550 [0.540, 0.559] |" in twin and "baseline" in page.read_text()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.md"
    outside.write_text("not yours")
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / "analysis.md").symlink_to(outside)
    with pytest.raises(MiaError, match="a symbolic link leading outside"):
        write_tables_page(folder / "analysis.html", "Study: s", [record])
    assert outside.read_text() == "not yours" and not (folder / "analysis.html").exists()  # refused before either file is written


def test_a_report_destination_that_is_a_folder_is_refused_before_report_md_is_rewritten(tmp_path, capsys):
    """report.html a folder: one line saying so, and report.md (written before it) is not rewritten."""
    root = write_synthetic_experiment(tmp_path / "exp", n_models=6, n_samples=30, seed=4)
    run_audit(root, ["thresholds"], n_targets=3, bootstrap=0)
    (root / "report.md").write_text("an earlier report")
    (root / "report.html").mkdir()
    assert attack_main(["--experiment", str(root), "--report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {root / 'report.html'}: is a folder, not a report file; move or remove that folder" in err
    assert (root / "report.md").read_text() == "an earlier report"


def test_utility_rows_skip_a_model_without_held_out_samples():
    """utility.json writes null for a target with no held-out sample (and its means skip it): the table must too, not crash in min()."""
    from mia_lightning.report.html import utility_rows

    utility = {"test_accuracy": 0.5, "test_accuracy_std": 0.0, "train_accuracy": 1.0, "train_accuracy_std": 0.0, "train_test_gap": 0.5,
               "per_model": [{"test_accuracy": None, "train_accuracy": 1.0}, {"test_accuracy": 0.5, "train_accuracy": 0.9}]}
    assert utility_rows(utility) == [["test accuracy", "50.00% (sd 0.00)", "50.00%", "50.00%"],
                                     ["train accuracy", "100.00% (sd 0.00)", "90.00%", "100.00%"],
                                     ["train - test gap", "50.00 points", "", ""]]
    nothing_held_out = {**utility, "test_accuracy": None, "train_test_gap": None, "per_model": [{"test_accuracy": None, "train_accuracy": 1.0}]}
    assert utility_rows(nothing_held_out)[0][1:] == ["-", "-", "-"] and utility_rows(nothing_held_out)[2][1] == "-"


@pytest.fixture
def reported(page, tmp_path) -> Path:
    """A copy of the module's reported experiment, to damage."""
    root = tmp_path / "exp"
    shutil.copytree(page[0], root, symlinks=True)
    assert (root / "attacks" / "latest").resolve().is_relative_to(root)
    return root


@pytest.mark.parametrize("curve, phrase", [
    ({"rows": [{"attack": 3, "n_shadows": 2}]}, "few_shadow.json: rows[0].attack is 3, expected a string"),
    ({"rows": [{"attack": "lira_online", "n_shadows": 2, "auc": "high"}]}, "few_shadow.json: rows[0].auc is \"high\", expected a number or null"),
    ([1, 2], "few_shadow.json: holds [1, 2], expected an object with a list of rows"),
])
def test_a_damaged_few_shadow_json_is_one_line_in_every_view(reported, capsys, curve, phrase):
    """A hand-edited few_shadow.json was a KeyError traceback in report.md's and report.html's few-shadow tables; the fix re-runs the run with its curve."""
    before = {name: (reported / name).read_bytes() for name in ("report.md", "report.html")}
    (reported / "attacks" / "latest" / "few_shadow" / "few_shadow.json").write_text(json.dumps(curve))
    assert attack_main(["--experiment", str(reported), "--report"]) == 2
    err = capsys.readouterr().err.strip()
    assert phrase in err and "\n" not in err
    assert err.endswith(f"; re-run `python attack.py --experiment {reported.resolve()} --attack lira rmia --n_targets 4 --bootstrap 30 --few_shadow`"), err
    assert before == {name: (reported / name).read_bytes() for name in before}


def test_a_report_that_fails_to_render_leaves_the_previous_pair(reported, capsys, monkeypatch):
    """report.md was written before report.html was rendered: a failing page left a new report.md beside the old report.html."""
    from mia_lightning.errors import MiaError
    from mia_lightning.report import html

    old_markdown = (reported / "report.md").read_text()
    second = run_audit(reported, ["rmia"], n_targets=2, bootstrap=0)

    def fail(*args, **kwargs):
        raise MiaError("report.html: could not render")
    monkeypatch.setattr(html, "render_html", fail)
    assert attack_main(["--experiment", str(reported), "--report"]) == 2
    assert (reported / "report.md").read_text() == old_markdown and second.run_id not in old_markdown
    monkeypatch.undo()
    assert attack_main(["--experiment", str(reported), "--report"]) == 0
    assert second.run_id in (reported / "report.md").read_text() and second.run_id in (reported / "report.html").read_text()
