"""`calbench certify`: certified accuracy of a smoothed classifier at radii 0 to 1 (the PromptSmooth tables' form)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from calbench.cli.common import (
    DataOpt,
    ModelOpt,
    ParamsOpt,
    ValShotsOpt,
    ViewsOpt,
    app,
    console,
    read_params,
    user_errors,
)
from calbench.cli.options import RUN, grouped
from calbench.published import default

MethodOpt = typer.Option("promptsmooth", "--method", help="Method whose prompt is the base classifier (any method id).")
SigmaOpt = typer.Option(default("certify", "sigma"), "--sigma", help="Gaussian noise std in [0, 1] pixel space.")
NOpt = typer.Option(
    default("certify", "n"),
    "--n",
    help="Noise samples per image to estimate the top class's probability (default: the published 10000). "
    "A smaller n is quicker but caps the radius: even with all n votes for the top class the lower bound is "
    "alpha^(1/n), so no radius exceeds sigma * Phi^-1(alpha^(1/n)); at sigma 0.25 and alpha 0.001 that is "
    "0.375 for n=100, 0.616 for n=1000 and 0.800 for n=10000, and below n=10 nothing is certified.",
)
N0Opt = typer.Option(
    default("certify", "n0"), "--n0", help="Noise samples per image to select the top class (published: 100)."
)
AlphaOpt = typer.Option(default("certify", "alpha"), "--alpha", help="Failure probability of each certificate.")
SubsetOpt = typer.Option(
    default("certify", "subset"), "--subset", help="Test images to certify (a seeded random subset)."
)
SeedOpt = typer.Option(1, "--seed", help="Few-shot split, training and test-subset seed.")
ShotsOpt = typer.Option(
    None,
    "--shots",
    help="Training images per class (default: the method's paper value, 16 for PromptSmooth, else 8).",
)
OutOpt = typer.Option(Path("results"), "--out", help="Folder for certification.csv and per-image results.")


@app.command()
@user_errors
@grouped(context=RUN)
def certify(
    model: str = ModelOpt,
    data: str = DataOpt,
    method: str = MethodOpt,
    sigma: float = SigmaOpt,
    n: int = NOpt,
    n0: int = N0Opt,
    alpha: float = AlphaOpt,
    subset: int = SubsetOpt,
    seed: int = SeedOpt,
    shots: Optional[int] = ShotsOpt,
    val_shots: Optional[int] = ValShotsOpt,
    views: Optional[int] = ViewsOpt,
    out: Path = OutOpt,
    params: Optional[Path] = ParamsOpt,
    *,
    context: Any,
) -> None:
    """Fit a method on few-shot data, then certify a test subset with randomized smoothing (Cohen et al., 2019)."""
    from calbench.certify import max_certifiable_radius, run_certify
    from calbench.methods import overrides_for
    from calbench.session import FewShot

    result = run_certify(
        model,
        data,
        method,
        sigma,
        n,
        n0,
        alpha,
        subset,
        seed,
        shots,
        fewshot=FewShot(val_shots=val_shots, views=views),
        context=context,
        out=out,
        params=overrides_for(method, read_params(params)),
    )
    console.print(
        f"{method} · {model} · {data} · σ={sigma:g} · n0={n0}, n={n}, α={alpha:g} · {len(result.labels)} test images · {result.shots} shots · seed {seed}"
    )
    table = Table()
    table.add_column("radius", justify="right")
    table.add_column("certified acc %", justify="right")
    for radius, accuracy in result.accuracy.items():
        table.add_row(f"{radius:g}", f"{100 * accuracy:.1f}")
    console.print(table)
    console.print(
        f"abstained on {100 * result.abstain_rate:.1f}% of images; wrote {result.path} and {result.items_path} in {result.seconds:.1f} s"
    )
    console.print(f"n={n} caps the certified radius at {max_certifiable_radius(sigma, n, alpha):.3f}")
