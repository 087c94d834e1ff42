"""Option groups: options several commands take, declared once and handed to a command as one value.

``@grouped(context=RUN, fewshot=FEWSHOT)`` adds the group's options to a command's signature (so Typer
parses and documents them as usual) and passes the command one built value per group: a
``RunContext``, a ``FewShot``, a ``Launcher``. A command thus never repeats an option block, and each
group is turned into the library's value in one place.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

from calbench.cli.common import (
    CacheOpt,
    DataRootOpt,
    DeviceOpt,
    ShotsOpt,
    StrictOpt,
    TrustWeightsOpt,
    ValShotsOpt,
    ViewsOpt,
    WeightsOpt,
    run_context,
)
from calbench.cli.launcher import CpusOpt, GpusOpt, LauncherOpt, ParallelismOpt, PartitionOpt, TimeOpt, make_launcher

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class OptionGroup:
    """Options (parameter name -> (type, Typer option)) and the function that builds their value."""

    options: dict[str, tuple[Any, Any]]
    build: Callable[..., Any]


def grouped(**groups: OptionGroup) -> Callable[[F], F]:
    """Give the decorated command each group's options, and call it with each group's value under its name."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        params = [p for name, p in signature.parameters.items() if name not in groups]
        for group in groups.values():
            params += [
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
                for name, (kind, option) in group.options.items()
            ]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            for name, group in groups.items():
                kwargs[name] = group.build(**{option: kwargs.pop(option) for option in group.options})
            return fn(**kwargs)

        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return wrap


def _fewshot(shots: int, val_shots: Optional[int], views: Optional[int]) -> Any:
    from calbench.session import FewShot

    return FewShot(shots, val_shots, views)


#: where and how runs happen: the library's RunContext (progress bars on a terminal)
RUN = OptionGroup(
    {
        "device": (str, DeviceOpt),
        "cache_dir": (Optional[Path], CacheOpt),
        "weights": (Optional[Path], WeightsOpt),
        "trust_weights": (bool, TrustWeightsOpt),
        "data_root": (Optional[Path], DataRootOpt),
        "strict": (bool, StrictOpt),
    },
    run_context,
)
#: how few-shot data is drawn: the library's FewShot
FEWSHOT = OptionGroup(
    {"shots": (int, ShotsOpt), "val_shots": (Optional[int], ValShotsOpt), "views": (Optional[int], ViewsOpt)},
    _fewshot,
)
#: where jobs run: the library's Launcher, checked
LAUNCHER = OptionGroup(
    {
        "launcher": (str, LauncherOpt),
        "slurm_partition": (Optional[str], PartitionOpt),
        "slurm_gpus": (Optional[int], GpusOpt),
        "slurm_time": (Optional[int], TimeOpt),
        "slurm_cpus": (Optional[int], CpusOpt),
        "array_parallelism": (Optional[int], ParallelismOpt),
    },
    make_launcher,
)
