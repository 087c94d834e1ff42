"""The search report: report.md with PNG plots beside it, and report.html with the same plots embedded.

Plots are Optuna's matplotlib visualisations (history, importances, parallel coordinates,
contour, Pareto front); a plot that cannot be drawn (e.g. importances from one trial) is
named in the report with the reason instead.
"""
from __future__ import annotations

import base64
import html
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402

from calbench.atomic import write_text_atomic
from calbench.tune import SURPLUS, SearchResult, counts_toward_total, is_feasible, pair_key, reference_params  # noqa: E402

TEST_COLUMNS = [("accuracy", "Acc %", 100.0), ("ece", "ECE %", 100.0), ("adaptive_ece", "AdaECE %", 100.0), ("nll", "NLL", 1.0), ("brier", "Brier", 1.0)]


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def _figure(drawn: Any) -> Any:
    axes = drawn.flat[0] if isinstance(drawn, np.ndarray) else drawn
    return axes.get_figure()


def _plots(result: SearchResult, folder: Path) -> list[tuple[str, Path | str]]:
    """(title, PNG path) per plot, or (title, why it is missing)."""
    study, config = result.study, result.config
    single = config.objective != "pareto"
    complete = [t for t in result.trials if t.state == TrialState.COMPLETE]
    params = list(config.space)
    wanted: list[tuple[str, str, Callable[[], Any]]] = []
    if single:
        wanted.append(("Optimisation history", "history", lambda: ovm.plot_optimization_history(study)))
    else:
        wanted.append(("Optimisation history (ECE)", "history", lambda: ovm.plot_optimization_history(study, target=lambda t: t.values[0], target_name="val ECE")))
        wanted.append(("Pareto front (validation ECE vs accuracy)", "pareto", lambda: ovm.plot_pareto_front(study, target_names=["val ECE", "val accuracy"])))
    target = None if single else (lambda t: t.values[0])
    wanted.append(("Parameter importances", "importances", lambda: ovm.plot_param_importances(study, target=target)))
    wanted.append(("Parallel coordinates", "parallel", lambda: ovm.plot_parallel_coordinate(study, params=params, target=target)))
    if {"alpha", "w_as"} <= set(params):
        wanted.append(("alpha × w_AS contour", "contour", lambda: ovm.plot_contour(study, params=["alpha", "w_as"], target=target)))
    out: list[tuple[str, Path | str]] = []
    for title, stem, draw in wanted:
        if len(complete) < 2:
            out.append((title, f"needs at least 2 completed trials, has {len(complete)}"))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figure = _figure(draw())
            path = folder / f"{stem}.png"
            _save(figure, path)
            out.append((title, path))
        except Exception as exc:  # a plot the data cannot support stays out, with its reason
            plt.close("all")
            out.append((title, f"not drawn: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"))
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _mean_std(values: Sequence[float], scale: float) -> str:
    array = np.asarray(values, dtype=float) * scale
    return f"{array[0]:.2f}" if len(array) == 1 else f"{array.mean():.2f} ± {array.std(ddof=1):.2f}"


def trial_counts(trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    """How the study's trials ended, with the reasons for pruned and failed ones."""
    states = Counter(t.state.name.lower() for t in trials)
    surplus = sum(1 for t in trials if t.user_attrs.get(SURPLUS))
    killed = [t for t in trials if t.state == TrialState.FAIL and not counts_toward_total(t) and not t.user_attrs.get(SURPLUS)]
    reasons = Counter(t.user_attrs["fail_reason"].split(":")[0] for t in trials if t.state == TrialState.FAIL and "fail_reason" in t.user_attrs)
    if killed:
        reasons[f"worker died or was interrupted (re-queued: {sum(1 for t in trials if 'failed_trial' in t.system_attrs)})"] += len(killed)
    if surplus:
        reasons["surplus: started by a second worker when no trial was missing (never trained)"] += surplus
    pruned = Counter(t.user_attrs.get("pruned_at", "").split(" (")[0].split(" of ")[0] for t in trials if t.state == TrialState.PRUNED)
    return {"states": dict(states), "fail_reasons": dict(reasons), "pruned_at": dict(pruned)}


def render_markdown(result: SearchResult, best: Mapping[str, Any], test_rows: Sequence[Mapping[str, Any]], plots: Sequence[tuple[str, Path | str]], image_ref: Callable[[Path], str]) -> str:
    """The report as Markdown; ``image_ref`` turns a PNG path into what the image tag points to."""
    c = result.config
    trials = result.trials
    counts = trial_counts(trials)
    seconds = [t.user_attrs["seconds"] for t in trials if "seconds" in t.user_attrs]
    lines = [
        f"# Hyper-parameter search: {c.method} · {c.modality + ' (modality)' if c.modality else pair_key(c.pairs[0])}",
        "",
        f"Study `{result.study.study_name}` · objective **{c.objective}** on the validation split "
        f"(accuracy at most {c.acc_tolerance:g} point(s) below CoOp-CE) · {c.shots} shots, "
        f"{c.val_shots or c.shots} validation shots per class · split seeds {', '.join(map(str, c.split_seeds))} · "
        f"{c.train_epochs} epochs · pruner {c.pruner if c.objective != 'pareto' else 'none (multi-objective)'}.",
        f"Pairs: {', '.join(pair_key(p) for p in c.pairs)}. The test split was not loaded during the search.",
        "",
        "## Trials",
        "",
        ", ".join(f"{n} {state}" for state, n in sorted(counts["states"].items())) + f" ({len(trials)} in all)"
        + (f"; {np.mean(seconds):.2f} s per completed trial on average" if seconds else "") + ".",
    ]
    if counts["pruned_at"]:
        lines.append("Pruned at: " + ", ".join(f"{where} ({n})" for where, n in sorted(counts["pruned_at"].items())) + ".")
    if counts["fail_reasons"]:
        lines.append("Failed: " + "; ".join(f"{why} ({n})" for why, n in sorted(counts["fail_reasons"].items())) + ".")
    val = best.get("val", {})
    lines += ["", "## Best setting", "", f"Trial {best['trial']}" + ("" if best.get("feasible", True) else " (no trial met the accuracy constraint: smallest violation)") + ":", ""]
    lines += _table(["parameter", "value"], [(k, v) for k, v in best["params"].items()])
    lines += ["", "Validation (mean over pairs and split seeds):", ""]
    starts = [t for t in trials if "enqueued" in t.user_attrs and t.state == TrialState.COMPLETE]
    rows = [(f"tuned (trial {best['trial']})", 100 * val.get("accuracy", float("nan")), 100 * val.get("ece", float("nan")), val.get("nll", float("nan")), "yes" if best.get("feasible", True) else "no")]
    for t in starts:
        v = t.user_attrs["val"]
        rows.append((f"{t.user_attrs['enqueued']} (trial {t.number})", 100 * v["accuracy"], 100 * v["ece"], v["nll"], "yes" if is_feasible(t) else "no"))
    reference = best.get("reference_accuracy", {})
    if reference:
        rows.append(("coop-ce (reference)", 100 * float(np.mean(list(reference.values()))), "", "", ""))
    lines += _table(["setting", "val Acc %", "val ECE %", "val NLL", "meets accuracy constraint"], rows)
    if best.get("pareto_front"):
        lines += ["", "## Pareto front (validation)", ""]
        lines += _table(["trial", "val ECE %", "val Acc %", *c.space], [(f["trial"], 100 * f["ece"], 100 * f["accuracy"], *[f["params"].get(k, "") for k in c.space]) for f in best["pareto_front"]])
    if len(c.pairs) > 1:
        metric = "ece" if c.objective == "pareto" else c.objective
        lines += ["", "## Shared setting against each pair's own optimum", "", f"Validation {metric} per pair: the shared best, and the best trial of this search for that pair alone.", ""]
        pair_rows = []
        for key, info in best["per_pair"].items():
            shared, own = info["shared_val"][metric], info["val"][metric]
            pair_rows.append((key, shared, f"{own:.4g} (trial {info['trial']})", shared - own))
        lines += _table(["pair", f"shared {metric}", f"per-pair best {metric}", "gap"], pair_rows)
    if test_rows:
        lines += ["", "## Test split (evaluated once, after the search)", ""]
        methods = list(dict.fromkeys((str(r["model"]), str(r["dataset"]), str(r["method"])) for r in test_rows))
        table = []
        for model, dataset, method in methods:
            mine = [r for r in test_rows if (str(r["model"]), str(r["dataset"]), str(r["method"])) == (model, dataset, method)]
            table.append((f"{model}/{dataset}", method, len(mine), *[_mean_std([float(r[k]) for r in mine], s) for k, _, s in TEST_COLUMNS]))
        lines += _table(["pair", "method", "seeds", *[h for _, h, _ in TEST_COLUMNS]], table)
        label = reference_params(c.method, c.pairs[0], c.space)[0]
        lines += ["", f"`{c.method}:tuned` is the best setting above; `{c.method}:{label}` the hand-set one; mean ± std over seeds."]
    lines += ["", "## Plots", ""]
    for title, where in plots:
        lines += [f"### {title}", "", f"![{title}]({image_ref(where)})" if isinstance(where, Path) else f"_{where}_", ""]
    return "\n".join(lines) + "\n"


def _markdown_to_html(markdown: str, title: str) -> str:
    """Just enough Markdown (headings, tables, images, paragraphs, bold/code) for this report."""
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
        return re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"<i>\1</i>", text)

    body: list[str] = []
    rows: list[str] = []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            tag = "th" if not rows else "td"
            rows.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if rows:
            body.append("<table>" + "".join(rows) + "</table>")
            rows = []
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line)
        if image:
            body.append(f'<p><img alt="{html.escape(image.group(1))}" src="{image.group(2)}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    style = "body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def write_report(result: SearchResult, best: Mapping[str, Any], test_rows: Sequence[Mapping[str, Any]], out: Path) -> list[Path]:
    """Write ``out/report.md`` (plots in ``out/plots/``) and a self-contained ``out/report.html``."""
    out = Path(out)
    plots = _plots(result, out / "plots")
    markdown = render_markdown(result, best, test_rows, plots, lambda p: p.relative_to(out).as_posix())
    embedded = render_markdown(result, best, test_rows, plots, lambda p: "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode())
    write_text_atomic(out / "report.md", markdown)
    write_text_atomic(out / "report.html", _markdown_to_html(embedded, f"tune {result.study.study_name}"))
    return [out / "report.md", out / "report.html"]
