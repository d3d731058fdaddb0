"""``<experiment>/report.html``: the audit of ONE attack run (the latest) as a single self-contained page.

Plots are inline (base64 PNG), styles inline, no script and no network, so the file can be mailed,
attached to a model release review or opened offline. Order: the verdict (strongest output, its
TPR at the lowest FPR the scores resolve, with the two-way bootstrap interval and the resolution
caveat), the results table, the log-log ROC of every output, utility, user-level and decision tables
where the run has them, the empirical epsilon and what it can certify, the few-shadow curve, the most
vulnerable samples, and the provenance (run id, recipe identity, package version). Every number is
read from the run's files (results.json, utility.json, few_shadow.json, run.json), formatted by the
same helpers as the console table, so the page and results.json agree.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from pathlib import Path

from mia_lightning.version import __version__
from mia_lightning.contract.confine import confined_all
from mia_lightning.contract.experiment import ExperimentDir
from mia_lightning.contract.io import write_bytes_atomic
from mia_lightning.errors import MiaError
from mia_lightning.metrics import FPR_LEVELS
from mia_lightning.report.cells import FEW_SHADOW_KEY, auc_cell, few_shadow_table, interval_key, percent, results_header, results_row, tpr_cell, unresolved, utility_line
from mia_lightning.report.terminal import DECISION_COLUMNS, decision_rows, skipped_lines, user_level_records
from mia_lightning.report.markdown import VULNERABLE_COLUMNS, epsilon_paragraphs, load_records, markdown_table, vulnerable_samples
from mia_lightning.report.files import refuse_folders
from mia_lightning.report.table import TableRecord
from mia_lightning.contract.runs import FEW_SHADOW_FILE, latest_run, rerun_fix, run_few_shadow, run_utility

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.verdict { border-left: 6px solid #b3261e; background: #fdf3f2; padding: 0.8em 1.1em; margin: 1.2em 0; }
.verdict.clear { border-color: #2e7d32; background: #f1f8f1; }
.verdict.undecided { border-color: #8a6d00; background: #fbf7e9; }
.verdict p { margin: 0.35em 0; } .big { font-size: 1.15em; font-weight: 600; }
.wide { overflow-x: auto; } table { border-collapse: collapse; font-size: 0.82em; margin: 0.6em 0; } th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.55em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flag td { background: #fff6d6; } .note { color: #555; font-size: 0.88em; } img { max-width: 100%; border: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text))


def _table(header: list[str], rows: list[list[str]], flagged: list[bool] | None = None, numeric_from: int = 1, table_id: str = "") -> str:
    """An HTML table; cells from column ``numeric_from`` on are right-aligned numbers; ``flagged`` rows are highlighted."""
    head = "".join(f"<th>{_esc(name)}</th>" for name in header)
    body = []
    for index, row in enumerate(rows):
        cells = "".join(f"<td class=\"num\">{_esc(cell).replace(', ', ',&nbsp;').replace(' / ', '&nbsp;/&nbsp;')}</td>" if i >= numeric_from else f"<td>{_esc(cell)}</td>"
                        for i, cell in enumerate(row))  # a number's interval never breaks; value, [CP] and {bootstrap} may
        flag = " class=\"flag\"" if flagged and flagged[index] else ""
        body.append(f"<tr{flag}>{cells}</tr>")
    ident = f" id=\"{table_id}\"" if table_id else ""
    return f"<div class=\"wide\"><table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def _image(path: Path, alt: str) -> str:
    """The PNG at ``path`` inline as a data URI (empty when the run has none).

    The figure is read from a directory someone else may have written: a link leading out of its
    folder (``roc.png -> ~/.ssh/id_rsa``) or a file that is not a PNG would copy another file into the
    report, so either is refused with one line.
    """
    if not path.is_file():
        return ""
    resolved, folder = path.resolve(), path.parent.resolve()
    if folder not in resolved.parents:
        raise MiaError(f"{path}: a link leading to {resolved}, outside {folder}; refusing to embed it in a report "
                       "(delete the link and re-run the command that writes the figure)")
    content = path.read_bytes()
    if not content.startswith(b"\x89PNG\r\n\x1a\n"):
        raise MiaError(f"{path}: not a PNG image; refusing to embed it in a report (delete it and re-run the command that writes the figure)")
    data = base64.b64encode(content).decode("ascii")
    return f"<p><img alt=\"{_esc(alt)}\" src=\"data:image/png;base64,{data}\"></p>"


RESULT_COLUMNS = results_header()


def result_rows(records: list[dict]) -> list[list[str]]:
    """The results table: one row per attack output (the cells of every view, ``report.cells``)."""
    return [results_row(record) for record in records]


def verdict(records: list[dict]) -> tuple[str, bool | None]:
    """(HTML paragraphs, leaks): how much the strongest output finds, at the lowest FPR where leakage is shown; leaks None without intervals.

    A (output, FPR level) pair counts only where the output's scores resolve the level and the run
    has its two-way bootstrap interval. Leakage is shown at a level when the interval's lower 95%
    bound exceeds the FPR, i.e. the attack beats guessing. The verdict names the lowest such level
    and the output with the largest lower bound there; without one, the output with the largest
    lower bound at the lowest resolved level, as "no leakage detected". A run without bootstrap
    intervals (``--bootstrap 0``) gets no verdict: the Clopper-Pearson interval over pairs it keeps
    is too narrow when pairs share a model, so it could declare leakage that is not there.
    """
    def bounds(record: dict, level: float) -> list[float] | None:
        return (record.get("tpr_at_fpr_ci_bootstrap") or {}).get(str(level))

    resolved = [(record, level) for level in FPR_LEVELS for record in records if not unresolved(record, level)]
    if not resolved:
        return "<p class=\"big\">No output's scores resolve an FPR of 10% or less: ties decide every reported level.</p>", False
    pairs = [(record, level) for record, level in resolved if bounds(record, level)]
    if not pairs:
        return ("<p class=\"big\">No verdict: this run has no interval over the sampled units (it ran with <code>--bootstrap 0</code>).</p>"
                "<p>The Clopper-Pearson intervals in the table count (target, sample) pairs as independent, which they are not when "
                "pairs share a model, so they are too narrow to decide. Re-run <code>attack.py</code> without <code>--bootstrap 0</code> "
                "(100 replicates by default) for a verdict.</p>"), None
    shown = [(record, level) for record, level in pairs if bounds(record, level)[0] > level]
    pool = shown or [pair for pair in pairs if pair[1] == min(level for _, level in pairs)]
    best, level = max(pool, key=lambda pair: (-pair[1], bounds(*pair)[0], pair[0]["tpr_at_fpr"][str(pair[1])]))
    low, high = bounds(best, level)
    leaks = bool(shown)
    paragraphs = [
        f"<p class=\"big\">{'Leaks' if leaks else 'No leakage detected'}: <code>{_esc(best['attack'])}</code> finds "
        f"{percent(best['tpr_at_fpr'][str(level)])} of the members at {100 * level:g}% FPR (two-way bootstrap 95%: {percent(low)} to {percent(high)}; "
        f"guessing finds {100 * level:g}%).</p>",
        f"<p>Its AUC is {_esc(auc_cell(best))} (AUC {{two-way bootstrap 95%}}), over {best['n_members']} member and {best['n_nonmembers']} "
        f"non-member (target, sample) pairs of {len(best['targets'])} target models.</p>",
    ]
    if not leaks:
        paragraphs.append("<p>Not evidence of privacy: a stronger attack, more shadow models or more targets can find leakage this audit did not.</p>")
    blind = [record["attack"] for record in records if unresolved(record, FPR_LEVELS[0])]
    if blind:
        paragraphs.append(f"<p>Resolution: {_esc(', '.join(blind))} cannot resolve {100 * FPR_LEVELS[0]:g}% FPR (ties; highlighted "
                          "rows): their TPR there is 0 by construction, not evidence of safety.</p>")
    return "".join(paragraphs), leaks


def _few_shadow(run_folder: Path, fix: str) -> str:
    rows = run_few_shadow(run_folder, fix)
    if rows is None:
        return ""
    header, table = few_shadow_table(rows)
    return (f"<h2 id=\"few-shadow\">Few-shadow curve</h2><p>{_esc(FEW_SHADOW_KEY)}.</p>" + _table(header, table, table_id="few-shadow-table")
            + _image((run_folder / FEW_SHADOW_FILE).with_name("few_shadow.png"), "attack success against the number of shadow models"))


PER_CLASS_LIMIT = 20
"""Per-class utility rows are shown up to this many classes (the confusion matrix stays in utility.json)."""


def utility_rows(utility: dict) -> list[list[str]]:
    """Test and train accuracy over the target models: mean (sd), min, max; and the mean train-test gap."""
    rows = []
    for name, key in (("test accuracy", "test_accuracy"), ("train accuracy", "train_accuracy")):
        values = [m[key] for m in utility["per_model"] if m[key] is not None]  # null: a model without held-out (or training) samples
        sd = utility.get(key + "_std")
        rows.append([name, f"{percent(utility[key])}{'' if sd is None or utility[key] is None else f' (sd {100 * sd:.2f})'}",
                     percent(min(values, default=None)), percent(max(values, default=None))])
    gap = utility.get("train_test_gap")
    return rows + [["train - test gap", "-" if gap is None else f"{100 * gap:.2f} points", "", ""]]


def _utility(run_folder: Path, fix: str) -> str:
    utility = run_utility(run_folder, fix)
    if utility is None:
        return ""
    parts = [f"<h2 id=\"utility\">Utility</h2><p>{_esc(utility_line(utility))}. Held-out = pool samples a model did not train on; "
             "per-model values in utility.json.</p>",
             _table(["over the target models", "mean", "min", "max"], utility_rows(utility), table_id="utility-table")]
    per_class = utility["per_class"]
    if len(per_class["precision"]) <= PER_CLASS_LIMIT:
        rows = [[str(c), percent(p), percent(r), percent(f)] for c, (p, r, f) in enumerate(zip(per_class["precision"], per_class["recall"], per_class["f1"]))]
        parts.append(_table(["class", "precision", "recall", "F1"], rows, table_id="per-class-table"))
    return "".join(parts)


def _users_and_decisions(records: list[dict]) -> str:
    parts = []
    users = user_level_records(records)
    if users:
        rows = [[r["attack"], str(r["n_users"]), auc_cell(r), *(tpr_cell(r, level) for level in FPR_LEVELS)] for r in users]
        parts.append(f"<h2 id=\"users\">User level</h2><p>A user's score is the {_esc(users[0]['reduce'])} of their samples' scores; metrics count users.</p>"
                     + _table(["attack", "users", "AUC {bootstrap}", *RESULT_COLUMNS[3:3 + len(FPR_LEVELS)]], rows, table_id="user-table")
                     + f"<p class=\"note\">{_esc(interval_key(users))}</p>")
    rows = decision_rows(records)
    if rows:
        parts.append("<h2 id=\"decisions\">Decisions at a population threshold</h2><p>The threshold flags at most the FPR budget of known non-members.</p>"
                     + _table(list(DECISION_COLUMNS), rows, numeric_from=2, table_id="decision-table"))
    return "".join(parts)


def _epsilon(records: list[dict]) -> str:
    paragraphs = "".join(f"<p>{_esc(text)}</p>" for text in epsilon_paragraphs(records))
    caps = [(r["attack"], r["empirical_epsilon"]["max_possible"]) for r in records if (r.get("empirical_epsilon") or {}).get("max_possible") is not None]
    if caps:
        attack, cap = max(caps, key=lambda item: item[1])
        paragraphs += (f"<p>What it can certify: with this many independent trials no attack could certify more than {cap:.3f} "
                       f"(even a perfect attack; {_esc(attack)}), so a small bound here is not evidence of privacy.</p>")
    return f"<h2 id=\"epsilon\">Empirical epsilon</h2>{paragraphs}"


def recipe_identity(experiment: ExperimentDir) -> str:
    """First 12 hex digits of the SHA-256 of plan.json's recipe identity (what decides the models), or '-' without one."""
    recipe = experiment.plan.get("recipe")
    if not recipe:
        return "-"
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _provenance(experiment: ExperimentDir, run: dict) -> str:
    recipe = experiment.plan.get("recipe") or {}
    rows = [
        ["experiment", str(experiment.root)],
        ["attack run", f"{run['id']} (started {run.get('started')}, finished {run.get('finished')})"],
        ["attacks / targets", f"{', '.join(run.get('attacks', []))} / {len(run.get('targets', []))} target models"],
        ["recipe identity", f"{recipe_identity(experiment)} (sha256 of plan.json's recipe)"],
        ["model", (recipe.get("model") or {}).get("class_path", "-")],
        ["data", f"{(recipe.get('data') or {}).get('class_path', '-')} (pool fingerprint {recipe.get('pool_fingerprint', '-')})"],
        ["plan", f"{experiment.plan.get('kind', '-')}, {experiment.keep.shape[0]} models x {experiment.keep.shape[1]} samples"],
        ["mia-lightning", f"{run.get('version')} wrote the run; {__version__} wrote this page"],
    ]
    return "<h2 id=\"provenance\">Provenance</h2>" + _table(["", ""], rows, numeric_from=99, table_id="provenance-table")


def render_html(experiment: ExperimentDir, run_folder: Path, run: dict, records: list[dict], top: int = 20) -> str:
    """The whole page for one run."""
    fix = rerun_fix(run_folder, run)
    verdict_html, leaks = verdict(records)
    verdict_class = {True: "verdict", False: "verdict clear", None: "verdict undecided"}[leaks]
    flagged = [unresolved(record, FPR_LEVELS[0]) for record in records]
    source, vulnerable = vulnerable_samples(records, experiment, run_folder, top, fix)
    skipped = "".join(f"<p class=\"note\">Skipped (not applicable): {_esc(line)}</p>" for line in skipped_lines(run.get("skipped") or []))
    sections = [
        f"<h1>Membership inference audit: {_esc(experiment.root.name)}</h1>",
        f"<p class=\"note\">Attack run <code>{_esc(run['id'])}</code> of <code>{_esc(experiment.root)}</code>; "
        f"{len(records[0]['targets'])} target models, scored leave-one-out.</p>",
        f"<div class=\"{verdict_class}\" id=\"verdict\">{verdict_html}</div>",
        "<h2 id=\"results\">Results</h2>",
        _table(RESULT_COLUMNS, result_rows(records), flagged, table_id="results-table"),
        f"<p class=\"note\">{_esc(interval_key(records))}; highlighted rows cannot resolve {100 * FPR_LEVELS[0]:g}% FPR.</p>" + skipped,
        "<h2 id=\"roc\">ROC curves (log-log)</h2>",
        _image(run_folder / "roc.png", "ROC curves of the best output of each attack family and the baselines, log-log"),
        "<p class=\"note\">The best output of each attack family and the baselines; every output: <code>roc_all.png</code> in the run folder.</p>"
        if (run_folder / "roc_all.png").is_file() else "",
        _utility(run_folder, fix),
        _users_and_decisions(records),
        _epsilon(records),
        _few_shadow(run_folder, fix),
    ]
    if vulnerable:
        sections.append(f"<h2 id=\"vulnerable\">Most vulnerable samples</h2><p>Top {len(vulnerable)} by the mean {_esc(source)} score over the "
                        "target models that trained on the sample (targets in brackets), beside the mean over those that did not.</p>"
                        + _table(VULNERABLE_COLUMNS, vulnerable, table_id="vulnerable-table"))
    sections.append(_provenance(experiment, run))
    return _page(f"MIA audit: {experiment.root.name}", sections)


ANALYSIS_PAGE = "analysis.html"
"""A study's analysis as a page, beside its analysis.json."""


def _page(title: str, sections: list[str]) -> str:
    """A whole self-contained page: inline style, no script."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(section for section in sections if section) + "\n</body></html>\n")


def record_table(record: TableRecord) -> str:
    """A ``TableRecord`` (the analyses' and unlearning report's tables) as an HTML table under its title."""
    numeric_from = next((i for i, name in enumerate(record.header) if name not in record.left), len(record.header))
    return f"<h2>{_esc(record.title)}</h2>" + _table(record.header, record.rows, numeric_from=max(1, numeric_from))


def write_tables_page(path: Path, title: str, records: list[TableRecord], images: list[tuple[Path, str]] = (), notes: list[str] = ()) -> Path:
    """A self-contained page of ``TableRecord``s and inline figures (a study's analysis, the unlearning report), written atomically.

    The same style and cell marks as report.html, so a study or unlearning table reads like the audit it summarises;
    the same tables go to a Markdown twin beside it (``path`` with ``.md``: to paste into a paper or a README).
    Neither file may be a link leading out of their folder (checked before either is written).
    """
    twin = path.with_suffix(".md")
    confined_all(path.parent, [path, twin])
    refuse_folders([path, twin])
    sections = [f"<h1>{_esc(title)}</h1>", *(f"<p class=\"note\">{_esc(note)}</p>" for note in notes),
                *(record_table(record) for record in records), *(_image(image, alt) for image, alt in images),
                f"<p class=\"note\">{_esc(interval_key())}. Written by mia-lightning {_esc(__version__)}.</p>"]
    write_bytes_atomic(path, _page(title, sections).encode())
    markdown = [f"# {title}", "", *(f"{note}\n" for note in notes), *(markdown_table(record) for record in records), f"{interval_key()}.", ""]
    write_bytes_atomic(twin, "\n".join(markdown).encode())
    return path


def html_report(experiment_dir: Path, top: int = 20) -> str:
    """The page ``<experiment>/report.html``, rendered from the latest attack run (``report.files.write_reports`` writes it)."""
    experiment = ExperimentDir(Path(experiment_dir))
    experiment.check_exists()
    run_folder, run = latest_run(experiment)
    return render_html(experiment, run_folder, run, load_records(run_folder, run), top)
