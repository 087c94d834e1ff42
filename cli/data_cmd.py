"""`calbench datasets` (list, check) and `calbench data prepare <name>` (official downloads -> layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from calbench.cli.common import CacheOpt, DataRootOpt, StrictOpt, ValShotsOpt, app, console, user_errors
from calbench.cli.options import OptionGroup, grouped
from calbench.data import DatasetSpec
from calbench.data.prepare import OFFICIAL
from calbench.errors import check_seed

datasets_app = typer.Typer(invoke_without_command=True, help="List the registered datasets, or check a dataset folder.")
app.add_typer(datasets_app, name="datasets")
data_app = typer.Typer(no_args_is_help=True, help="Prepare datasets from their official downloads.")
app.add_typer(data_app, name="data")
prepare_app = typer.Typer(
    no_args_is_help=True,
    help="Build calbench's folder layout from an official download (zip, tar or extracted folder).",
)
data_app.add_typer(prepare_app, name="prepare")

OutOpt = typer.Option(None, "--out", help="Output folder (default: <data root>/<name>, where --data NAME finds it).")


@datasets_app.callback()
@user_errors
def datasets(ctx: typer.Context, data_root: Optional[Path] = DataRootOpt) -> None:
    """List every registered dataset: modality, classes, where it is looked for, and whether it is present.

    Any other folder in calbench's layout works with --data PATH.
    """
    if ctx.invoked_subcommand is not None:
        return
    from calbench.data import DATASETS, classes_of
    from calbench.errors import CalbenchError

    table = Table(title="datasets")
    for column in ("name", "modality", "classes", "looks in", "present"):
        table.add_column(column, overflow="fold")
    names = list(DATASETS)
    hints: list[str] = []
    for name in names:
        spec = DATASETS.get(name)
        if spec.variant_of:
            continue
        try:
            classes = ", ".join(classes_of(name))
        except CalbenchError as exc:
            classes = str(exc)
        variants = [DATASETS.get(n) for n in names if DATASETS.get(n).variant_of == name]
        label = name + (f" [{'|'.join(v.name[len(name) :] for v in variants)}]" if variants else "")
        present, hint = _presence(spec, data_root, variants)
        table.add_row(label, spec.modality, classes, _where(spec, data_root), present)
        if hint:
            hints.append(hint)
    console.print(table)
    for hint in hints:
        console.print(f"- {hint}", highlight=False, soft_wrap=True)


@datasets_app.command("check")
@user_errors
def check(
    path: str = typer.Argument(..., help="A dataset folder in calbench's layout, or a registered name."),
    strict: bool = StrictOpt,
    shots: Optional[int] = typer.Option(
        None, "--shots", help="Also check there are enough training images for this many shots."
    ),
    val_shots: Optional[int] = ValShotsOpt,
    cache_dir: Optional[Path] = CacheOpt,
    data_root: Optional[Path] = DataRootOpt,
) -> None:
    """Validate a dataset without training: layout, class names, every image decodes, enough images for --shots."""
    from calbench.cache import default_cache_dir
    from calbench.data import check_dataset

    report = check_dataset(
        path, cache_dir or default_cache_dir(), data_root, strict=strict, shots=shots, val_shots=val_shots
    )
    table = Table(title=f"{report.dataset.name} · {report.dataset.root}")
    for column in ("class", "train", "test"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name in report.dataset.classnames:
        table.add_row(name, str(report.counts["train"][name]), str(report.counts["test"][name]))
    console.print(table)
    skipped = sum(len(v) for v in report.skipped.values())
    console.print(
        f"ok: {report.dataset.n_classes} classes, prompt template {report.dataset.template!r}"
        + (f", {skipped} unreadable image(s) skipped" if skipped else "")
    )


def _where(spec: DatasetSpec, data_root: Optional[Path]) -> str:
    return str(spec.folder(data_root)) if spec.folder is not None else "the cache folder (generated on first use)"


def _presence(spec: DatasetSpec, data_root: Optional[Path], variants: list[DatasetSpec]) -> tuple[str, str]:
    """('yes: train N, test M' from a listing, or 'yes'/'no'), and how to get it when absent."""
    from calbench.data import present_counts

    counts = present_counts(spec.folder(data_root)) if spec.folder is not None else {}
    ok, hint = spec.available(data_root)
    text = (
        "yes: " + ", ".join(f"{split} {n}" for split, n in counts.items())
        if counts
        else ("yes (built on first use)" if ok else "no")
    )
    also = [v.name for v in variants if v.available(data_root)[0]]
    return text + (f"; also {', '.join(also)}" if also else ""), hint


def _report(result: object) -> None:
    from calbench.data.prepare import PrepareReport, summary

    assert isinstance(result, PrepareReport)
    if result.reused:
        console.print(f"{result.out} is already prepared from these downloads; nothing to do")
    console.print(summary(result))
    if result.skipped:
        console.print(f"{len(result.skipped)} unreadable image(s) skipped (named in the warnings above)")
    if not result.reused:
        console.print(f"wrote {result.out}")


def _help(name: str) -> str:
    entry = OFFICIAL[name]
    return f"{entry.description}. Download: {entry.source} — licence: {entry.licence}. Example: {entry.prepare_hint}"


def _target(out: Optional[Path], data_root: Optional[Path], strict: bool) -> dict[str, Any]:
    """Where a prepared dataset goes and what an unreadable image does: keywords every prepare function takes."""
    return {"out": out, "data_root": data_root, "strict": strict, "log": console.log}


#: the options every `data prepare` command takes, declared once
TARGET = OptionGroup(
    {"out": (Optional[Path], OutOpt), "data_root": (Optional[Path], DataRootOpt), "strict": (bool, StrictOpt)},
    _target,
)


def _split(target: dict[str, Any], seed: int, test_fraction: float) -> dict[str, Any]:
    """The keywords of a dataset whose official download has no test split: calbench draws it, seeded."""
    check_seed(seed, "--seed")  # before any archive is read
    return {**target, "seed": seed, "test_fraction": test_fraction}


@prepare_app.command("kather", help=_help("kather"))
@user_errors
@grouped(target=TARGET)
def prepare_kather(
    train: Path = typer.Option(
        ..., "--train", help="NCT-CRC-HE-100K.zip (or NCT-CRC-HE-100K-NONORM.zip), or the extracted folder."
    ),
    test: Path = typer.Option(..., "--test", help="CRC-VAL-HE-7K.zip, or the extracted folder."),
    *,
    target: Any,
) -> None:
    from calbench.data.prepare import prepare_kather as run

    _report(run(train, test, **target))


@prepare_app.command("pannuke", help=_help("pannuke"))
@user_errors
@grouped(target=TARGET)
def prepare_pannuke(
    train: list[Path] = typer.Option(
        ..., "--train", help="A PanNuke fold (fold_1.zip or its folder); repeat for several."
    ),
    test: list[Path] = typer.Option(..., "--test", help="The held-out fold (fold_3.zip); repeatable."),
    *,
    target: Any,
) -> None:
    from calbench.data.prepare import prepare_pannuke as run

    _report(run(train, test, **target))


@prepare_app.command("digestpath", help=_help("digestpath"))
@user_errors
@grouped(target=TARGET)
def prepare_digestpath(
    pos: Path = typer.Option(
        ..., "--pos", help="tissue-train-pos-v1 (zip or folder): malignant images with *_mask.jpg."
    ),
    neg: Path = typer.Option(..., "--neg", help="tissue-train-neg (zip or folder): benign images."),
    test_fraction: float = typer.Option(
        0.3, "--test-fraction", help="Share of source images per class held out for test."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/test split and the patch choice."),
    max_patches: int = typer.Option(20, "--max-patches", help="At most this many 224 px patches per source image."),
    *,
    target: Any,
) -> None:
    from calbench.data.prepare import prepare_digestpath as run

    _report(run(pos, neg, max_patches=max_patches, **_split(target, seed, test_fraction)))


@prepare_app.command("covid", help=_help("covid"))
@user_errors
@grouped(target=TARGET)
def prepare_covid(
    archive: Path = typer.Option(..., "--archive", help="The Kaggle download (archive.zip) or its extracted folder."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of images per class held out for test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/test split."),
    *,
    target: Any,
) -> None:
    from calbench.data.prepare import prepare_covid as run

    _report(run(archive, **_split(target, seed, test_fraction)))


@prepare_app.command("rsna18", help=_help("rsna18"))
@user_errors
@grouped(target=TARGET)
def prepare_rsna18(
    images: Path = typer.Option(
        ..., "--images", help="stage_2_train_images (folder or zip of .dcm; .png/.jpg conversions also work)."
    ),
    labels: Path = typer.Option(..., "--labels", help="stage_2_detailed_class_info.csv."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of patients per class held out for test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/test split."),
    *,
    target: Any,
) -> None:
    from calbench.data.prepare import prepare_rsna18 as run

    _report(run(images, labels, **_split(target, seed, test_fraction)))
