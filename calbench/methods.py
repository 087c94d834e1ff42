"""The method catalog: every registered method by id, and method parameters from files.

This is the one place that imports every method module (CalibPrompt and the baselines),
so that importing it fills the registries, as ``timm.models`` does for its models. The
contract the methods follow lives in :mod:`calbench.base`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, astuple
from pathlib import Path
from typing import Any, Optional

import calbench.baselines  # noqa: F401  (registers the comparison methods and calibrators)
import calbench.calibprompt  # noqa: F401  (registers CalibPrompt)
from calbench import published
from calbench.base import CALIBRATORS, METHODS, Calibrated, Capabilities, Method
from calbench.calibprompt import PromptMethod
from calbench.errors import CalbenchError

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


def method_signature(method: Method) -> dict[str, object]:
    """Every resolved setting of a built method (defaults included), for a run's config hash.

    Hashing resolved settings, not the user's overrides, means a changed default is a new
    config, and spelling out a default is not.
    """
    if isinstance(method, Calibrated):
        return {"base": method_signature(method.base), "calibrator": type(method.calibrator).__name__}
    plain = (int, float, str, bool, tuple, list, type(None))
    signature: dict[str, object] = {"class": type(method).__name__}
    for key, value in sorted(vars(method).items()):
        if key.startswith("_"):
            continue
        if isinstance(value, plain):
            signature[key] = value
        elif isinstance(getattr(value, "capabilities", None), Capabilities):  # a method inside (promptsmooth-zs)
            signature[key] = method_signature(value)
    caps = method.capabilities
    if caps.fit_features or caps.smoothed or caps.adapts_at_test:  # e.g. noisy copies: views, sigma
        signature["capabilities"] = {
            "fit": {name: astuple(request) for name, request in sorted(caps.fit_features.items())},
            "copies": astuple(caps.test_copies) if caps.test_copies else None,
            "adapts": caps.adapts_at_test,
        }
    if isinstance(method, PromptMethod):
        signature["config"] = asdict(method.config)
        signature["objective"] = {
            name: [t.loss, t.weight, dict(t.kwargs)] for name, t in method.objective.terms.items()
        }
    return signature


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


def params_for(
    method: str,
    method_params: Optional[Mapping[str, Mapping[str, object]]],
    model: Optional[str] = None,
    dataset: Optional[str] = None,
) -> dict[str, object]:
    """The parameters ``method``'s base is built with on (model, dataset) (``coop-ce+ts`` takes
    coop-ce's): the published per-pair and per-model defaults where they differ from the method's
    own, under what ``--params`` gives it."""
    base = parse_method(method)[0]
    return with_pair_defaults(method, model, dataset, (method_params or {}).get(base, {}))


def with_pair_defaults(
    method: str, model: Optional[str], dataset: Optional[str], params: Mapping[str, object]
) -> dict[str, object]:
    """``params`` (one method's, e.g. from --params) over the published defaults of (model, dataset);
    ``dataset`` may be a folder path, whose name is the dataset's name."""
    name = Path(dataset).name if dataset else dataset
    return {**pair_defaults(parse_method(method)[0], model, name, params), **dict(params)}


def pair_defaults(
    method: str, model: Optional[str], dataset: Optional[str], given: Optional[Mapping[str, object]] = None
) -> dict[str, object]:
    """What the published runs set differently on (model, dataset) for base ``method``: a pair's
    CalibPrompt alpha / w_as for the methods that take them, a model's training options (MedCLIP's
    warm-up lr) for the methods that learn a prompt with the ``given`` parameters (promptsmooth-zs
    with init=fewshot does)."""
    own = published.section(method)
    trains = _trains(method, given)
    resolved = published.resolve(method, published_model(model), dataset, trains)
    return {k: s.value for k, s in resolved.items() if k not in own or own[k].value != s.value}


def _trains(method: str, given: Optional[Mapping[str, object]]) -> bool:
    """Whether base ``method`` built with ``given`` trains over the few-shot images (a prompt learner, or
    promptsmooth-zs's inner few-shot prompt with init=fewshot); parameters it does not take are ignored
    here (building it with them reports them)."""
    try:
        return METHODS.get(method).factory(**dict(given or {})).capabilities.epochs > 0
    except (CalbenchError, TypeError, ValueError):
        return METHODS.get(method).factory().capabilities.epochs > 0


def published_model(model: Optional[str]) -> Optional[str]:
    """The model whose published settings ``model`` takes: a variant (``medclip-masked``) its model's."""
    from calbench.models import MODELS

    return MODELS.get(model).weights_name if model is not None and model in MODELS else model


def resolved_settings(
    method: str, model: Optional[str], dataset: Optional[str], given: Mapping[str, object]
) -> dict[str, tuple[object, str]]:
    """Each setting ``method``'s base runs with on (model, dataset) and where it comes from: its own
    defaults, the trainer's for a method that learns a prompt, the pair's published row, ``--params``
    (``given``, as :func:`params_for` returns them, published values included)."""
    base = parse_method(method)[0]
    trains = _trains(base, given)
    table = {
        **(published.section("train") if trains else {}),
        **published.resolve(base, published_model(model), dataset, trains),
    }
    out = {name: (s.value, s.source) for name, s in table.items()}
    for name, value in given.items():
        if name not in table or table[name].value != value:
            out[name] = (value, "--params")
    return out
