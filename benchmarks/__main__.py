"""calbench's benchmark suite: calbench's design against the published one and the hardware floor.

    python -m benchmarks            # the full run quoted in benchmarks/README.md (ViT-B/32, ViT-B/16, 12-layer text towers)
    python -m benchmarks --quick    # every row at reduced sizes (2-layer stand-ins, fewer images and epochs)
    python -m benchmarks.search     # not a speed row: does the default `tune` beat the hand-set setting on test?

Every ratio is measured side by side in one process, as the median of ``--repeats`` repetitions
(3 in the full run), on generated 224 px images and models with random weights at their published
sizes (a random weight costs what a trained one does). Targets are the issue's, for this kind of
machine; a GPU run is ``benchmarks/gpu.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks import rows
from benchmarks.common import CLASSES, SIZES, Models, Sizes, workspace, write_dataset

ROWS = ("cache", "run", "cut", "shared", "pass", "grid", "tune", "bf16", "compile")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="every row at reduced sizes (a smoke run, < 3 min)")
    parser.add_argument("--sizes", choices=sorted(SIZES), help="the work each row does (default: full; gpu: gpu.sh's)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, of: {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, help="repetitions per measurement (default: 3 full, 1 quick)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write every row's raw numbers here")
    args = parser.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    return args


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
        cpu += ", AMX-BF16" if "amx_bf16" in flags else ", AVX512-BF16" if "avx512_bf16" in flags else ""
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads ({os.cpu_count()} cores: {cpu}){gpu}"


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def plan(models: Models, sizes: Sizes, data: Path, tmp: Path, wanted: set[str]) -> list[Callable[[], rows.Row]]:
    """The rows to run, in order; later rows read the encoder throughput the first one measured."""
    rate: dict[str, float] = {}

    def cache(kind: str) -> rows.Row:
        row = rows.cache_build(models, kind, data, sizes, tmp)
        rate[kind] = row.values["images"] / row.values["bare_s"]
        return row

    steps: list[tuple[str, Callable[[], rows.Row]]] = [
        ("cache", lambda: cache("b32")),
        ("cache", lambda: cache("bert")),
        ("run", lambda: rows.one_run(models, "b32", data, sizes, tmp, rate.get("b32"))),
        ("run", lambda: rows.one_run(models, "bert", data, sizes, tmp, rate.get("bert"))),
        ("cut", lambda: rows.text_cut(models, "b32", sizes)),
        ("cut", lambda: rows.text_cut(models, "bert", sizes)),
        ("shared", lambda: rows.text_shared(models, "b32", sizes)),
        ("pass", lambda: rows.text_pass(models, "b32", sizes)),
        ("pass", lambda: rows.text_pass(models, "bert", sizes)),
        ("grid", lambda: rows.grid(models, data, sizes, tmp, rate.get("b32"))),
        ("tune", lambda: rows.tuning(models, data, sizes, tmp)),
        ("bf16", lambda: rows.bf16(models, "b32", data, sizes, tmp)),
        ("compile", lambda: rows.compiled(models, "b32", sizes)),
    ]
    return [step for key, step in steps if key in wanted]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from calbench.models import resolve_device

    device = resolve_device(args.device)
    sizes = SIZES[args.sizes or ("quick" if args.quick else "full")]
    sizes = replace(sizes, repeats=args.repeats) if args.repeats else sizes
    wanted = set(args.rows.split(","))
    if args.quick and args.rows == ",".join(ROWS):
        wanted.discard("compile")  # compiling alone takes about a minute on a CPU; run it with --rows compile
    started = time.perf_counter()
    print(f"calbench benchmarks ({sizes.name}), {_machine(device)}, {_load()}", flush=True)
    results: list[rows.Row] = []
    with workspace() as tmp:
        test = -(-sizes.cache_images // len(CLASSES))  # enough test images for the cache-build row
        data = write_dataset(tmp / "kather-like", train_per_class=16, test_per_class=test)
        models = Models(device, sizes.full_models, tmp / "models")
        for step in plan(models, sizes, data, tmp, wanted):
            results.append(step())
            if not sizes.full_models:  # 2-layer stand-ins: the targets are for the published sizes
                results[-1].met = None
            print(f"  {results[-1].name}: {results[-1].ours} vs {results[-1].reference}", flush=True)
    print()
    print(rows.table(results))
    print(
        f"\n{len(results)} rows in {time.perf_counter() - started:.0f} s, median of {sizes.repeats} "
        f"repetition(s); {_load()}; command: python -m benchmarks {' '.join(sys.argv[1:] if argv is None else argv)}"
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
