"""`calbench report --format latex|csv`: the paper-style table as LaTeX and the tidy long table,
with the numbers report.md shows (hand-computed here) and LaTeX that compiles."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess

import pytest
from cli_checks import runner
from typer.testing import CliRunner

from calbench import atomic
from calbench.cli.app import app
from calbench.errors import CalbenchError
from calbench.metrics import METRICS
from calbench.report import write_results_report
from calbench.report.blocks import Heading, Image, Table, Text, render_html, render_markdown
from calbench.report.tables import latex_escape, write_table
from calbench.results import RESULT_COLUMNS, ResultsStore

#: set by .ci/run after it installed a LaTeX engine: there the compile test fails instead of skipping
REQUIRED = "CALBENCH_REQUIRE_LATEX"
#: a name with every character LaTeX treats specially, and one outside ASCII
ODD = "a\\b&c%d$e#f_g{h}i~j^k<l>m é"
#: method -> ECE on seeds 1, 2, 3 (accuracy is 0.80 + seed / 100 for every method)
ECES = {"coop-ce": (0.10, 0.12, 0.14), "calibprompt": (0.05, 0.04, 0.03), ODD: (0.20, 0.20, 0.20)}
PAIRS = (("plip", "kather"), ("tiny", "syn_th#"))
PM = r"\ensuremath{\pm}"


def _results(folder):
    store = ResultsStore(folder)
    for model, dataset in PAIRS:
        for method, eces in ECES.items():
            for seed, ece in zip((1, 2, 3), eces):
                row = {c: 0.5 for c in RESULT_COLUMNS}
                row.update(model=model, dataset=dataset, method=method, seed=seed, ece=ece, accuracy=0.8 + seed / 100)
                store.put({**row, "status": "ok", "error": "", "config": "c", "dataset_id": "x"})
    # a failed seed counts in neither mean nor n
    failed = {c: float("nan") for c in RESULT_COLUMNS}
    failed.update(model="plip", dataset="kather", method="coop-ce", seed=4, status="failed", error="NaN loss")
    store.put({**failed, "config": "c", "dataset_id": "x"})
    return folder


def test_latex_escape_typesets_every_special_character_as_itself():
    assert latex_escape(ODD) == (
        r"a\textbackslash{}b\&c\%d\$e\#f\_g\{h\}i\textasciitilde{}j\textasciicircum{}k\textless{}l\textgreater{}m é"
    )
    assert (
        latex_escape("ECE 4.00 ± 1.00\nplip · kather")
        == r"ECE 4.00 \ensuremath{\pm} 1.00 plip \ensuremath{\cdot} kather"
    )


def _md_cells(md: str) -> dict[str, list[str]]:
    """method -> the main table's cells, as "ECE m ± s / Acc m ± s" with bold marked by **."""
    section = md.split("## Results (best ECE per column in bold)", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    return {line.split(" | ")[0][2:]: line.strip(" |").split(" | ")[1:] for line in lines}


def test_latex_table_has_the_numbers_and_bold_of_report_md(tmp_path):
    folder = _results(tmp_path)
    md, _ = write_results_report(folder)
    tex = write_table(folder, "latex").read_text()
    md_cells = _md_cells(md.read_text())
    md_escaped_odd = next(k for k in md_cells if k.startswith("a"))
    for method in ECES:
        line = next(x for x in tex.splitlines() if x.startswith(latex_escape(method) + " & "))
        cells = [c.strip() for c in line.removesuffix(r" \\").split(" & ")[1:]]
        mine = md_cells[md_escaped_odd if method == ODD else method]
        assert len(cells) == 2 * len(mine) == 4
        for j, md_cell in enumerate(mine):
            ece, acc = cells[2 * j], cells[2 * j + 1]
            bold = ece.startswith(r"\textbf{")
            assert bold == md_cell.startswith("**"), (method, j)
            ece = ece.removeprefix(r"\textbf{").removesuffix("}")
            assert f"ECE {ece} / Acc {acc}".replace(PM, "±") == md_cell.strip("*")
    # by hand: coop-ce ECE 10, 12, 14 -> 12.00 ± 2.00 (sample std); calibprompt 5, 4, 3 -> 4.00 ± 1.00, the best
    assert r"coop-ce & 12.00 \ensuremath{\pm} 2.00 & 82.00 \ensuremath{\pm} 1.00 & 12.00" in tex
    assert r"calibprompt & \textbf{4.00 \ensuremath{\pm} 1.00} & 82.00 \ensuremath{\pm} 1.00 & \textbf{4.00" in tex
    # the published CalibPrompt README numbers of PLIP · Kather, marked; none for the demo pair
    assert r"coop-ce (published)$^\dagger$ & 5.92 & -- & -- & -- \\" in tex
    assert r"calibprompt (published)$^\dagger$ & 3.11 & -- & -- & -- \\" in tex
    assert r"\multicolumn{2}{c}{tiny \ensuremath{\cdot} syn\_th\#}" in tex
    assert [x for x in tex.splitlines() if not x.startswith("%")][0] == r"\begin{tabular}{lcccc}"
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 1 and tex.rstrip().endswith(r"\end{tabular}")


def test_no_published_row_where_no_pair_matches(tmp_path):
    store = ResultsStore(tmp_path)
    row = {c: 0.5 for c in RESULT_COLUMNS}
    store.put({**row, "model": "tiny", "dataset": "synthetic", "method": "coop-ce", "seed": 1, "status": "ok"})
    tex = write_table(tmp_path, "latex").read_text()
    assert "published" not in tex and r"\dagger" not in tex
    assert r"coop-ce & \textbf{50.00} & 50.00 \\" in tex  # one seed: no std; the only method is the best


def test_latex_compiles_in_a_minimal_document(tmp_path):
    engine = shutil.which("pdflatex")
    if engine is None:
        if os.environ.get(REQUIRED):
            pytest.fail(f"{REQUIRED} is set but there is no pdflatex")
        pytest.skip("no pdflatex here (Debian: texlive-latex-base texlive-latex-recommended); the structural test runs")
    write_table(_results(tmp_path), "latex")
    (tmp_path / "paper.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\tracinglostchars=3\n"  # a character with no glyph is an error
        "\\begin{document}\n\\begin{table}\\input{report.tex}\\end{table}\n\\end{document}\n"
    )
    env = {**os.environ, "TEXMFVAR": str(tmp_path / "texmf-var")}
    done = subprocess.run(
        [engine, "-interaction=nonstopmode", "-halt-on-error", "paper.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "paper.pdf").stat().st_size > 0


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_is_the_tidy_long_table_of_every_metric(tmp_path):
    rows = _csv(write_table(_results(tmp_path), "csv"))
    assert list(rows[0]) == ["model", "dataset", "method", "metric", "mean", "std", "n"]
    got = {(r["model"], r["dataset"], r["method"], r["metric"]): r for r in rows}
    ece = got[("plip", "kather", "coop-ce", "ece")]
    assert float(ece["mean"]) == pytest.approx(0.12, abs=1e-12) and float(ece["std"]) == pytest.approx(0.02, abs=1e-12)
    assert ece["n"] == "3"  # the failed seed 4 is not counted
    acc = got[("tiny", "syn_th#", ODD, "accuracy")]
    assert float(acc["mean"]) == pytest.approx(0.82, abs=1e-12) and float(acc["std"]) == pytest.approx(0.01, abs=1e-12)
    assert len({key[:3] for key in got}) == len(PAIRS) * len(ECES)
    assert {key[3] for key in got} >= {"accuracy", "ece", "mce", "nll", "brier", "smooth_ece", "aurc"}


@pytest.mark.filterwarnings("error")
def test_csv_gives_an_infinite_threshold_as_inf_without_a_warning(tmp_path):
    store = ResultsStore(tmp_path)
    for seed, threshold in ((1, float("inf")), (2, 0.5)):
        row = {c: 0.5 for c in RESULT_COLUMNS}
        row.update(model="m", dataset="d", method="zero-shot", seed=seed, status="ok", sel_threshold=threshold)
        store.put(row)
    rows = {r["metric"]: r for r in _csv(write_table(tmp_path, "csv"))}
    assert (rows["sel_threshold"]["mean"], rows["sel_threshold"]["std"], rows["sel_threshold"]["n"]) == ("inf", "", "2")
    assert (rows["ece"]["mean"], rows["ece"]["std"]) == ("0.5", "0.0")


def test_cli_writes_the_tables_beside_report_md_and_refuses_an_unknown_format(tmp_path):
    folder = _results(tmp_path)
    done = CliRunner().invoke(app, ["report", str(folder), "--format", "latex", "--format", "csv"])
    assert done.exit_code == 0, done.output
    for name in ("report.md", "report.html", "report.tex", "report.csv"):
        assert (folder / name).is_file() and name in done.output
    wrong = CliRunner().invoke(app, ["report", str(folder), "--format", "pdf"])
    assert wrong.exit_code == 2 and "error: unknown report format 'pdf'; choose from md, latex, csv" in wrong.output
    assert len(wrong.output.strip().splitlines()) == 1


def test_a_folder_without_results_is_one_line(tmp_path):
    with pytest.raises(CalbenchError, match=re.escape("results.csv is missing or empty")):
        write_table(tmp_path, "latex")


# ---------------------------------------------------------------- report.md escapes names and errors

HOSTILE_METHOD = "<img src=x onerror=alert(1)>|*x*_[a](b)\\\n# not a heading"


HOSTILE_ERROR = "boom <script>alert(1)</script>\nsecond line | `code` & more"


def test_markdown_blocks_escape_html_pipes_newlines_backslashes_and_links(tmp_path):
    image = tmp_path / "reliability" / "a b(1)[x]<y>.png"
    blocks = [
        Heading("run of " + HOSTILE_METHOD),
        Text(HOSTILE_ERROR),
        Table(["method", "status"], [[HOSTILE_METHOD, HOSTILE_ERROR]], bold={(0, 0)}),
        Image(image, "caption ](javascript:x) <b>"),
    ]
    md = render_markdown(blocks, tmp_path)
    escaped_method = "&lt;img src=x onerror=alert(1)&gt;\\|\\*x\\*\\_\\[a\\](b)\\\\ # not a heading"
    escaped_error = "boom &lt;script&gt;alert(1)&lt;/script&gt; second line \\| \\`code\\` &amp; more"
    assert md.splitlines() == [
        f"## run of {escaped_method}",
        "",
        escaped_error,
        "",
        "| method | status |",
        "|---|---|",
        f"| **{escaped_method}** | {escaped_error} |",
        "",
        "![caption \\](javascript:x) &lt;b&gt;](reliability/a%20b%281%29%5Bx%5D%3Cy%3E.png)",
    ]
    page = render_html(blocks[:3], "t")
    assert "<img src=x" not in page and "<script>" not in page and "&lt;script&gt;" in page


def test_report_md_of_a_hostile_results_file_shows_it_as_text(tmp_path):
    rows = []
    for method, status, error in (("zero-shot", "ok", ""), (HOSTILE_METHOD, "failed", HOSTILE_ERROR)):
        row = {"model": "tiny", "dataset": "synthetic", "method": method, "seed": 1, "config": "c", "status": status}
        row.update({k: 0.5 for k in METRICS}, ece_ci_low=0.4, ece_ci_high=0.6, error=error)
        rows.append(row)
    atomic.write_csv_atomic(rows, tmp_path / "results.csv", RESULT_COLUMNS)
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report.md").read_text()
    assert "<img" not in md and "<script>" not in md and not any(line.startswith("# not") for line in md.splitlines())
    (run,) = [line for line in md.splitlines() if "failed: boom" in line]
    assert run.startswith("| tiny | synthetic | &lt;img src=x onerror=alert(1)&gt;\\|\\*x\\*")
    assert run.endswith("| failed: boom &lt;script&gt;alert(1)&lt;/script&gt; second line \\| \\`code\\` &amp; more |")
    assert len(re.findall(r"(?<!\\)\|", run)) == 9  # 8 columns: the escaped pipes do not split cells
