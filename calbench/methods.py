"""The method catalog: every registered method by id, and method parameters from files.

This is the one place that imports every method module (CalibPrompt and the baselines),
so that importing it fills the registries, as ``timm.models`` does for its models. The
contract the methods follow lives in :mod:`calbench.base`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import calbench.baselines  # noqa: F401  (registers the comparison methods and calibrators)
import calbench.calibprompt  # noqa: F401  (registers CalibPrompt)
from calbench import published
from calbench.base import CALIBRATORS, METHODS, Calibrated, Method
from calbench.errors import CalbenchError
from calbench.models import published_model
from calbench.published import Setting

#: what `compare` runs without --methods: the paper's main table
DEFAULT_METHODS = ["zero-shot", "zero-shot+ts", "coop-ce", "coop-ce+ts", "coop-ls", "coop-mbls", "calibprompt"]


def list_methods() -> list[str]:
    """Registered base methods; any of them takes a post-hoc calibrator as ``<method>+<calibrator>``."""
    return METHODS.names()


def list_calibrators() -> list[str]:
    return CALIBRATORS.names()


def all_methods() -> list[str]:
    """The standard set, then every other registered method (what `compare --all` runs)."""
    return DEFAULT_METHODS + [m for m in list_methods() if m not in DEFAULT_METHODS]


def parse_method(name: str) -> tuple[str, Optional[str]]:
    """Split ``base+cal`` into its parts, checking both against their registries.

    Base ids may contain '+' themselves (the ablation ``ls+smac``), so a registered
    base id wins, and otherwise the text after the last '+' names the calibrator.
    """
    if name in METHODS:
        return name, None
    base, plus, calibrator = name.rpartition("+")
    if not plus:
        METHODS.get(name)  # raises with the list of valid ids
    METHODS.get(base)
    CALIBRATORS.get(calibrator)
    return base, calibrator


def make_method(name: str, **params: Any) -> Method:
    """Build a method by id (no work is done); ``base+cal`` wraps base in post-hoc calibrator ``cal``."""
    base_name, calibrator = parse_method(name)
    method = METHODS.get(base_name).factory(**params)
    return method if calibrator is None else Calibrated(method, CALIBRATORS.get(calibrator)())


def read_params_file(path: Path) -> dict[str, dict[str, object]]:
    """Method parameters from JSON: {"method": m, "params": {...}} (as `tune` writes) or {method: {...}}.

    Each parameter is one number, text, true/false or null; a list of numbers only where the
    method declares it (``MethodSpec.list_params``, e.g. PromptSmooth's train_sigmas).
    """
    path = Path(path)
    if path.is_dir():
        raise CalbenchError(f"parameter file {path} is a folder; pass a JSON file such as best_params.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalbenchError(f"parameter file {path} does not exist") from None
    except UnicodeDecodeError:
        raise CalbenchError(f"parameter file {path} is not UTF-8 text; save it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise CalbenchError(f"parameter file {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "method" in data and "params" in data:
        data = {str(data["method"]): data["params"]}
    elif not isinstance(data, dict):
        raise CalbenchError(f'{path}: expected {{"method": ..., "params": {{...}}}} or {{method: {{param: value}}}}')
    for name, params in data.items():
        _check_shape(path, str(name), params)
    return {str(k): dict(v) for k, v in data.items()}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_shape(path: Path, method: str, params: object) -> None:
    """One method's entry must be an object of scalars (lists of numbers where the method declares them)."""
    if not isinstance(params, dict):
        raise CalbenchError(
            f'{path}: {method} must map to an object of parameters like {{"alpha": 0.1}}, got {json.dumps(params)}'
        )
    lists = METHODS.get(method).list_params if method in METHODS else ()
    for key, value in params.items():
        if isinstance(value, list) and key in lists:
            if not value or not all(_is_number(v) for v in value):
                raise CalbenchError(f"{path}: {method} {key} must be a list of numbers, got {json.dumps(value)}")
        elif isinstance(value, (list, dict)):
            raise CalbenchError(
                f"{path}: {method} {key} must be one number, text or true/false"
                f"{' (or a list of numbers)' if key in lists else ''}, got {json.dumps(value)}"
            )


def check_method_params(method_params: Mapping[str, Mapping[str, object]]) -> None:
    """Parameters must name registered base methods and build: a typo must not be ignored silently."""
    for name, params in method_params.items():
        if name not in METHODS:
            raise CalbenchError(
                f"--params names {name!r}, which is not a base method; use one of: {', '.join(list_methods())}"
            )
        make_method(name, **params)


def dataset_name(dataset: Optional[str]) -> Optional[str]:
    """The name a dataset's published settings are looked up by: a folder path's last part
    (``/data/pannuke`` is PanNuke), as every command names the dataset it runs."""
    return Path(dataset).name if dataset else dataset


@dataclass(frozen=True)
class ResolvedMethod:
    """A method's every setting on one (model, dataset), each with its source, resolved once and passed
    down whole: ``compare``, ``tune``, ``train``, ``certify`` and ``evaluate`` build, hash and report
    from this value, and nothing else re-derives a setting.

    ``settings`` are the base method's (``coop-ce+ts`` runs coop-ce's): the trainer's defaults for a prompt
    learner, the method's own, the model's published training overrides, the pair's published row, and
    the user's ``--params`` on top. ``params`` is what the factory is given: the settings that differ
    from the method's own defaults, so a method is built exactly as the published pair runs it.
    """

    name: str
    model: Optional[str]
    dataset: Optional[str]
    settings: Mapping[str, Setting]
    params: Mapping[str, Any]
    overrides: Mapping[str, Any]  # the user's (``--params``), as given

    def with_overrides(self, **values: Any) -> ResolvedMethod:
        """The same method on the same pair with ``values`` over the user's overrides."""
        return resolve(self.name, self.model, self.dataset, {**self.overrides, **values})

    @property
    def base(self) -> str:
        return parse_method(self.name)[0]

    @property
    def calibrator(self) -> Optional[str]:
        return parse_method(self.name)[1]

    @property
    def values(self) -> dict[str, Any]:
        return {name: setting.value for name, setting in self.settings.items()}

    @property
    def sources(self) -> dict[str, str]:
        return {name: setting.source for name, setting in self.settings.items()}

    @property
    def learns_prompt(self) -> bool:
        return METHODS.get(self.base).learns_prompt

    def build(self) -> Method:
        """The method, not fitted (no work is done)."""
        return make_method(self.name, **self.params)

    def build_base(self) -> Method:
        """The method without its post-hoc calibrator (``coop-ce`` of ``coop-ce+ts``), not fitted: what
        ``compare`` fits once and shares between a base and its calibrated variants."""
        return make_method(self.base, **self.params)

    def signature(self) -> dict[str, Any]:
        """What changes the method's numbers: its id and every resolved value. Hashing resolved values, not the
        user's overrides, makes a changed default a new config, and spelling out a default not."""
        return {"method": self.name, "settings": {name: _plain(value) for name, value in sorted(self.values.items())}}

    def config_hash(self, context: Optional[Mapping[str, Any]] = None) -> str:
        """Ten hex digits of :meth:`signature` and ``context`` (what else changes a run: data, model, shots)."""
        payload = {**(context or {}), **self.signature()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _plain(value: Any) -> Any:
    """A setting as JSON holds it: tuples as lists, mappings with sorted keys (PromptSmooth's phrases)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def resolve(
    method: str,
    model: Optional[str] = None,
    dataset: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> ResolvedMethod:
    """``method``'s settings on (model, dataset) under ``overrides`` (one method's ``--params``), with
    sources; ``dataset`` may be a folder path, looked up by its name. The one resolver of every command."""
    base = parse_method(method)[0]
    spec = METHODS.get(base)
    name = dataset_name(dataset)
    given = dict(overrides or {})
    own = spec.defaults(given)
    trains = spec.trainer({**{k: s.value for k, s in own.items()}, **given}) is not None
    table = {**own, **published.resolve(base, published_model(model), name, trains)}
    settings = dict(table)
    for key, value in given.items():
        if key not in table or table[key].value != value:
            settings[key] = Setting(value, "--params")
    published_diff = {k: s.value for k, s in table.items() if k not in own or own[k].value != s.value}
    return ResolvedMethod(method, model, name, settings, {**published_diff, **given}, given)


def overrides_for(method: str, method_params: Optional[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """``method``'s entry of a ``--params`` file: its base's (``coop-ce+ts`` takes coop-ce's)."""
    return dict((method_params or {}).get(parse_method(method)[0], {}))


def resolve_grid(
    methods: Sequence[str],
    model: Optional[str],
    dataset: Optional[str],
    method_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> dict[str, ResolvedMethod]:
    """Each of ``methods`` resolved on (model, dataset), ``--params`` given per base method."""
    return {m: resolve(m, model, dataset, overrides_for(m, method_params)) for m in methods}
