"""`calbench certify`: certified accuracy of a smoothed classifier at radii 0 to 1 (the PromptSmooth tables' form)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from calbench.cli.common import (
    CacheOpt,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    ModelOpt,
    ParamsOpt,
    ValShotsOpt,
    ViewsOpt,
    WeightsOpt,
    app,
    console,
    user_errors,
)


@app.command()
@user_errors
def certify(
    model: str = ModelOpt,
    data: str = DataOpt,
    method: str = typer.Option("promptsmooth", "--method", help="Method whose prompt is the base classifier (any method id)."),
    sigma: float = typer.Option(0.25, "--sigma", help="Gaussian noise std in [0, 1] pixel space."),
    n: int = typer.Option(100, "--n", help="Noise samples per image to estimate the top class's probability."),
    n0: int = typer.Option(10, "--n0", help="Noise samples per image to select the top class."),
    alpha: float = typer.Option(0.001, "--alpha", help="Failure probability of each certificate."),
    subset: int = typer.Option(500, "--subset", help="Test images to certify (a seeded random subset)."),
    seed: int = typer.Option(1, "--seed", help="Few-shot split, training and test-subset seed."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Training images per class (default: the method's paper value, 16 for PromptSmooth, else 8)."),
    val_shots: Optional[int] = ValShotsOpt,
    views: int = ViewsOpt,
    device: str = DeviceOpt,
    out: Path = typer.Option(Path("results"), "--out", help="Folder for certification.csv and per-image results."),
    cache_dir: Optional[Path] = CacheOpt,
    weights: Optional[Path] = WeightsOpt,
    data_root: Optional[Path] = DataRootOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Fit a method on few-shot data, then certify a test subset with randomized smoothing (Cohen et al., 2019)."""
    from calbench.certify import run_certify
    from calbench.experiment import load_params_file
    from calbench.methods import parse_method

    method_params = load_params_file(params).get(parse_method(method)[0], {}) if params else {}
    result = run_certify(
        model=model, data=data, method=method, sigma=sigma, n=n, n0=n0, alpha=alpha, subset=subset, seed=seed, shots=shots,
        val_shots=val_shots, views=views, device=device, out=out, cache_dir=cache_dir, weights=weights, data_root=data_root,
        params=method_params, progress=console.is_terminal,
    )
    console.print(f"{method} · {model} · {data} · σ={sigma:g} · n0={n0}, n={n}, α={alpha:g} · {len(result.labels)} test images · {result.shots} shots · seed {seed}")
    table = Table()
    table.add_column("radius", justify="right")
    table.add_column("certified acc %", justify="right")
    for radius, accuracy in result.accuracy.items():
        table.add_row(f"{radius:g}", f"{100 * accuracy:.1f}")
    console.print(table)
    console.print(f"abstained on {100 * result.abstain_rate:.1f}% of images; wrote {result.path} and {result.items_path} in {result.seconds:.1f} s")
