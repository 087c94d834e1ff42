"""calbench: calibration-aware prompt learning (CalibPrompt) and its baselines for medical VLMs.

The names a researcher needs, loaded on first use so that ``import calbench`` stays cheap
(re-rendering a report never imports torch)::

    import calbench

    session = calbench.Session("tiny", "synthetic")  # model + dataset + feature cache
    fit = session.fit_data(seed=1)  # few-shot train views and validation images
    method = calbench.make_method("calibprompt").fit(fit)
    print(calbench.evaluate(method.predict_proba(session.test_features(method)), session.test_labels))

``calbench.metrics`` and ``calbench.losses`` hold the metrics and losses as pure functions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS = {
    "Session": "calbench.session",
    "RunContext": "calbench.session",
    "FewShot": "calbench.session",
    "FitData": "calbench.base",
    "Capabilities": "calbench.base",
    "make_method": "calbench.methods",
    "list_methods": "calbench.methods",
    "list_calibrators": "calbench.methods",
    "evaluate": "calbench.metrics",
    "load_vlm": "calbench.models",
    "list_models": "calbench.models",
    "load_dataset": "calbench.data",
    "list_datasets": "calbench.data",
    "run_compare": "calbench.compare",
    "Grid": "calbench.compare",
}
_MODULES = ("metrics", "losses")

__all__ = [
    "Capabilities",
    "FewShot",
    "FitData",
    "Grid",
    "RunContext",
    "Session",
    "__version__",
    "evaluate",
    "list_calibrators",
    "list_datasets",
    "list_methods",
    "list_models",
    "load_dataset",
    "load_vlm",
    "losses",
    "make_method",
    "metrics",
    "run_compare",
]

if TYPE_CHECKING:
    from calbench import losses, metrics
    from calbench.base import Capabilities, FitData
    from calbench.compare import Grid, run_compare
    from calbench.data import list_datasets, load_dataset
    from calbench.methods import list_calibrators, list_methods, make_method
    from calbench.metrics import evaluate
    from calbench.models import list_models, load_vlm
    from calbench.session import FewShot, RunContext, Session


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"calbench.{name}")
    else:
        raise AttributeError(f"module 'calbench' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
