"""Search spaces: what `tune` searches for each method, and the hand-set settings it starts from.

A space maps parameter names to :class:`Param` ranges or choices; ``--space FILE`` narrows
or extends it. The first trials of a study are the published setting for each searched pair
(the method's defaults where the papers have none), so a search never ends worse on
validation than the hand-set values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import optuna

from calbench import published
from calbench.base import TRAIN_OPTIONS
from calbench.errors import CalbenchError
from calbench.methods import METHODS, dataset_name, make_method, resolve


def pair_key(pair: Sequence[str]) -> str:
    return f"{pair[0]}/{pair[1]}"


@dataclass(frozen=True)
class Param:
    """One searched hyper-parameter: a float or int range (optionally log-scaled) or a list of choices.

    ``default`` is the method's own default (from the one table), enqueued as the first trial.
    """

    kind: str  # "float", "int" or "categorical"
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    default: Any = None

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return value is not None and self.low <= value <= self.high

    def to_json(self) -> dict[str, Any]:
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self).items()
            if v is not None and v is not False and v != ()
        }


def log_range(low: float, high: float) -> Param:
    return Param("float", low, high, log=True)


def one_of(*choices: Any) -> Param:
    return Param("categorical", choices=tuple(choices))


#: Search spaces per method: calbench's ranges (our own choice: about a decade either side of the
#: published values). A parameter's ``default`` is filled from the one table (:func:`base_space`),
#: so the first trial is the untuned method.
SPACES: dict[str, dict[str, Param]] = {
    "calibprompt": {
        "alpha": log_range(0.005, 0.3),  # shared by label smoothing and SMAC
        "w_as": log_range(1e-3, 3.0),
        "w_smac": log_range(0.1, 10.0),
        "n_ctx": one_of(4, 8, 16, 32),
        "lr": log_range(5e-4, 1e-2),
    },
    "coop-ls": {"alpha": log_range(0.005, 0.3)},
    "coop-mbls": {"margin": Param("float", 1.0, 20.0), "alpha": log_range(0.01, 1.0)},
    "coop-focal": {"gamma": Param("float", 0.5, 5.0)},
    "promptsmooth": {
        "n_ctx": one_of(2, 5, 8, 16),
        "train_sigmas": one_of("0.25", "0.25,0.5", "0.25,0.5,1.0"),
    },
}
#: parameters searched as text because Optuna's choices must be scalars
DECODERS: dict[str, Callable[[Any], Any]] = {"train_sigmas": lambda text: [float(s) for s in str(text).split(",")]}


def table_default(method: str, name: str) -> Any:
    """``method``'s default of ``name`` as the search space spells it: its own from the one table, else
    the trainer's (None when neither has it). A list of numbers is searched as text ("0.25,0.5")."""
    own = published.section(method)
    entry = own.get(name) or (published.section("train").get(name) if name in TRAIN_OPTIONS else None)
    if entry is None:
        return None
    value = entry.value
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else value


def _parse_one(name: str, spec: Any, old: Optional[Param], source: str) -> Param:
    """One entry of a --space file: {choices: [...]} or {low, high[, log, type, default]} over ``old``."""
    if not isinstance(spec, Mapping):
        raise CalbenchError(
            f"{source}: {name} must map to {{low, high[, log]}} or {{choices: [...]}} or null, got {spec!r}"
        )
    unknown = set(spec) - {"type", "low", "high", "log", "choices", "default"}
    if unknown:
        raise CalbenchError(
            f"{source}: {name} has unknown key(s) {', '.join(sorted(unknown))}; use low, high, log, choices, type, default"
        )
    if "choices" in spec:
        choices = tuple(spec["choices"])
        if not choices:
            raise CalbenchError(f"{source}: {name} has an empty list of choices")
        default = spec.get("default", old.default if old is not None and old.default in choices else None)
        return Param("categorical", choices=choices, default=default)
    base = old if old is not None and old.kind != "categorical" else None
    low, high = spec.get("low", base.low if base else None), spec.get("high", base.high if base else None)
    if low is None or high is None:
        raise CalbenchError(f"{source}: {name} needs low and high (or choices)")
    kind = spec.get(
        "type", base.kind if base else ("int" if isinstance(low, int) and isinstance(high, int) else "float")
    )
    if kind not in ("float", "int"):
        raise CalbenchError(f"{source}: {name} has type {kind!r}; use float or int (or give choices)")
    log = bool(spec.get("log", base.log if base else False))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise CalbenchError(f"{source}: {name} needs finite numbers for low and high, got {low!r}..{high!r}")
    if not low < high or (log and low <= 0):
        raise CalbenchError(
            f"{source}: {name} needs 0 < low < high on a log scale and low < high otherwise, got {low}..{high}"
        )
    return Param(kind, low, high, log, default=spec.get("default", base.default if base else None))


def parse_space(method: str, text: Mapping[str, Any], source: str = "--space") -> dict[str, Param]:
    """The method's space narrowed or extended by a mapping {param: {low, high, log, choices, default} | null}."""
    space = dict(base_space(method))
    for name, spec in text.items():
        if spec is None:  # drop: the parameter stays at the method's default
            space.pop(name, None)
        else:
            space[name] = _parse_one(name, spec, space.get(name), source)
    if not space:
        raise CalbenchError(f"{source} leaves nothing to search")
    return space


def read_space_file(method: str, path: Path) -> dict[str, Param]:
    """``--space FILE``: YAML or JSON with the form :func:`parse_space` reads."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}  # YAML is a superset of JSON
    except FileNotFoundError:
        raise CalbenchError(f"--space file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise CalbenchError(f"--space file {path} is neither YAML nor JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise CalbenchError(f"--space file {path} must map parameter names to ranges")
    return parse_space(method, data, str(path))


def base_space(method: str) -> dict[str, Param]:
    """The method's table entry, checked against the method registry."""
    if "+" in method:
        raise CalbenchError(f"tune searches a base method, not {method!r}; post-hoc calibrators have nothing to tune")
    if method not in SPACES:
        METHODS.get(method)  # an unknown name lists the registered ones
        raise CalbenchError(
            f"no search space for {method!r}; tunable: {', '.join(m for m in SPACES if m in METHODS)}, or pass --space FILE"
        )
    METHODS.get(method)  # in the table but not registered (yet): same one-line error
    return {name: replace(p, default=table_default(method, name)) for name, p in SPACES[method].items()}


def method_params(params: Mapping[str, Any], epochs: Optional[int]) -> dict[str, Any]:
    """Trial parameters as ``make_method`` takes them (decoded), plus an --epochs override."""
    out = {name: DECODERS[name](value) if name in DECODERS else value for name, value in params.items()}
    if epochs is not None and "epochs" not in out:
        out["epochs"] = epochs
    return out


def reference_params(method: str, pair: tuple[str, str], space: Mapping[str, Param]) -> tuple[str, dict[str, Any]]:
    """The hand-set setting a search must beat: the defaults, with what the published runs set on
    ``pair`` ("paper": a pair's CalibPrompt alpha / w_as, a model's training options) where they did."""
    defaults = {name: p.default for name, p in space.items() if p.default is not None}
    if not pair[0]:
        return "default", defaults
    paper = {k: v for k, v in resolve(method, *pair).params.items() if k in space or k in defaults}
    row = published.pair(pair[0], dataset_name(pair[1]))
    published_here = bool(paper) or (row is not None and method in row.methods)
    return ("paper", {**defaults, **paper}) if published_here else ("default", defaults)


def first_trials(
    method: str, pairs: Sequence[tuple[str, str]], space: Mapping[str, Param]
) -> list[tuple[str, dict[str, Any]]]:
    """(label, setting) enqueued before sampling: each pair's paper setting (or the defaults), without
    repeats and without values the (narrowed) space excludes; the defaults come last where a paper setting exists."""
    chosen: list[tuple[str, dict[str, Any]]] = []
    for pair in [*pairs, ("", "")]:
        label, params = reference_params(method, pair, space)
        kept = {k: v for k, v in params.items() if k in space and space[k].contains(v)}
        if kept and kept not in [p for _, p in chosen]:
            chosen.append((f"{label} {pair_key(pair)}" if label == "paper" else label, kept))
    return chosen


def check_space(method: str, space: Mapping[str, Param], epochs: Optional[int]) -> None:
    """Build the method at both ends of every range and at every choice, so that a space reaching
    outside a parameter's declared range fails here, before a study (which keeps its space) exists."""
    for name, param in space.items():
        ends = param.choices if param.kind == "categorical" else (param.low, param.high)
        for value in ends:
            try:
                make_method(method, **method_params({name: value}, epochs))
            except CalbenchError as exc:
                raise CalbenchError(f"the search space reaches {name}={value!r}: {exc}") from None
