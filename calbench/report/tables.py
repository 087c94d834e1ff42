"""Tables a researcher takes out of a results folder: the paper-style table as LaTeX (report.tex,
ready for ``\\input{}``) and every metric as a tidy long table (report.csv) for their own plots.

Both render the same :class:`~calbench.report.summary.Summary` as report.md, so the numbers
and the bold best ECE are the ones report.md shows. The LaTeX is written here rather than by
pandas' ``Styler.to_latex``: the table is one fixed shape (a two-row header over model · dataset,
a marked block of published rows, a note row), the cells are pre-formatted ``mean ± std``
strings that Styler's highlighters cannot rank, and pandas plus jinja2 would be two large
dependencies for forty lines of rendering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from calbench import published
from calbench.atomic import write_csv_atomic, write_text_atomic
from calbench.deferral import DEFERRAL_COLUMNS
from calbench.errors import CalbenchError
from calbench.metrics import METRICS, mean_std
from calbench.models import published_model
from calbench.report.summary import Pair, Summary, pct
from calbench.results import logged_rows

#: LaTeX's special characters in text mode and what typesets each as itself
_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "·": r"\ensuremath{\cdot}",
    "±": r"\ensuremath{\pm}",
}
#: what `calbench report --format` writes beside report.md
FORMATS = {"latex": "report.tex", "csv": "report.csv"}
#: the tidy table's columns: one row per (model, dataset, method, metric)
TIDY_COLUMNS = ["model", "dataset", "method", "metric", "mean", "std", "n"]
PUBLISHED_MARK = r"$^\dagger$"


def latex_escape(text: str) -> str:
    """Plain text as LaTeX text: every character typeset as written (names come from users and folders)."""
    return "".join(_LATEX.get(c, c) for c in " ".join(str(text).splitlines()))


def _cells(res: Summary, method: str) -> list[str]:
    """One method's row: ECE and accuracy per pair, as report.md shows them; the best ECE in bold."""
    out = []
    for pair in res.pairs:
        stats = res.cell.get((*pair, method))
        if stats is None:
            out += ["failed", "failed"]
            continue
        ece = latex_escape(pct(*stats["ece"]) + res.mark(pair, method))
        out += [rf"\textbf{{{ece}}}" if res.best_ece(pair) == method else ece, latex_escape(pct(*stats["accuracy"]))]
    return out


def _published_rows(res: Summary) -> list[list[str]]:
    """The published ECE of each method the pairs' published rows list, marked; "--" where none matches."""
    found = {pair: published.pair(str(published_model(pair[0])), res.names[pair[1]]) for pair in res.pairs}
    methods = list(dict.fromkeys(m for row in found.values() if row is not None for m in row.published_ece))
    rows = []
    for method in methods:
        cells = []
        for pair in res.pairs:
            row = found[pair]
            ece = None if row is None else row.published_ece.get(method)
            cells += ["--" if ece is None else f"{ece:.2f}", "--"]
        rows.append([latex_escape(f"{method} (published)") + PUBLISHED_MARK, *cells])
    return rows


def _line(cells: list[str]) -> str:
    return " & ".join(cells) + r" \\"


def latex_table(res: Summary) -> str:
    """The paper-style table as a booktabs ``tabular``: rows methods, columns model · dataset (ECE, Acc)."""
    pairs: list[Pair] = res.pairs
    width = 1 + 2 * len(pairs)
    published_rows = _published_rows(res)
    lines = [
        "% calbench report: test-split ECE and accuracy (%), mean and std over seeds "
        + ", ".join(map(str, res.seeds()))
        + "; best ECE per column in bold.",
        r"% Needs \usepackage{booktabs}; \input{} it inside a table environment.",
        r"\begin{tabular}{l" + "cc" * len(pairs) + "}",
        r"\toprule",
        _line(["", *(rf"\multicolumn{{2}}{{c}}{{{latex_escape(f'{m} · {d}')}}}" for m, d in pairs)]),
        " ".join(rf"\cmidrule(lr){{{2 + 2 * j}-{3 + 2 * j}}}" for j in range(len(pairs))),
        _line(["method", *(["ECE (\\%)", "Acc (\\%)"] * len(pairs))]),
        r"\midrule",
        *(_line([latex_escape(method), *_cells(res, method)]) for method in res.methods),
    ]
    if published_rows:
        lines += [r"\midrule", *(_line(row) for row in published_rows)]
    lines.append(r"\bottomrule")
    if published_rows:
        note = PUBLISHED_MARK + " published ECE (CalibPrompt's README: seed 1, the test split used as validation)."
        lines.append(_line([rf"\multicolumn{{{width}}}{{l}}{{\footnotesize {note}}}"]))
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


def tidy_rows(res: Summary) -> list[dict[str, object]]:
    """Every metric of every shown cell: mean and sample std over the scored seeds, and n, as fractions
    (as in results.csv); a metric with no value (a column older files lack) has no row, one seed or an
    infinite value no std."""
    rows: list[dict[str, object]] = []
    for (model, dataset, method), runs in res.scored.items():
        for metric in (*METRICS, *DEFERRAL_COLUMNS):
            values = [v for r in runs if not math.isnan(v := float(r.get(metric, math.nan)))]
            if not values:
                continue
            if all(map(math.isfinite, values)):
                mean, std = mean_std(values)
            else:  # an infinite selective threshold (no confidence meets the target): no spread to give
                mean, std = sum(values) / len(values), None
            cell = {"model": model, "dataset": dataset, "method": method, "metric": metric}
            rows.append({**cell, "mean": mean, "std": "" if std is None else std, "n": len(values)})
    return rows


def table_formats(names: Sequence[str]) -> list[str]:
    """The table formats asked for (``md`` and ``html``: the report itself, always written), checked."""
    wanted = [n.strip().lower() for n in names if n.strip().lower() not in ("md", "html")]
    unknown = [n for n in wanted if n not in FORMATS]
    if unknown:
        raise CalbenchError(f"unknown report format {unknown[0]!r}; choose from md, {', '.join(FORMATS)}")
    return list(dict.fromkeys(wanted))


def write_table(results_dir: Path, fmt: str) -> Path:
    """Write report.tex (``latex``) or report.csv (``csv``) beside report.md; return its path."""
    if fmt not in FORMATS:
        raise CalbenchError(f"unknown table format {fmt!r}; choose from {', '.join(FORMATS)}")
    logged = logged_rows(Path(results_dir))
    if not logged:
        raise CalbenchError(
            f"{Path(results_dir) / 'results.csv'} is missing or empty; run `calbench compare --out {results_dir}` first"
        )
    res = Summary(logged)
    path = Path(results_dir) / FORMATS[fmt]
    if fmt == "latex":
        write_text_atomic(path, latex_table(res))
    else:
        write_csv_atomic(tidy_rows(res), path, TIDY_COLUMNS)
    return path
