"""Single runs behind `calbench train`, `calbench cache` and `calbench evaluate`.

``train`` fits one prompt method on one few-shot split and saves its context (validation
metrics only); ``evaluate`` scores such a saved prompt on a test split, on the dataset it
was trained for or on another with the same classes (a shift test); ``cache`` encodes
features ahead of time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from calbench.base import Calibrated, Method, base_of
from calbench.baselines.posthoc import TemperatureScaling
from calbench.cache import CacheStats
from calbench.calibprompt import PromptMethod
from calbench.data import DATASETS
from calbench.deferral import deferral_metrics, test_only_metrics
from calbench.errors import CalbenchError, check_seed, check_seeds, warn
from calbench.methods import METHODS, list_methods, make_method, parse_method, resolve
from calbench.metrics import evaluate
from calbench.prompts import load_prompt, read_prompt_info, save_prompt
from calbench.session import FewShot, RunContext, Session


def prompt_methods() -> list[str]:
    """Registered methods that learn a prompt `train` can save."""
    return [m for m in list_methods() if METHODS.get(m).learns_prompt]


def train_one(
    method: str,
    model: str,
    data: str,
    seed: int = 1,
    fewshot: FewShot = FewShot(),
    context: RunContext = RunContext(),
    out: Path = Path("prompts"),
    params: Optional[dict[str, Any]] = None,
    online: bool = False,
) -> tuple[Path, dict[str, float]]:
    """Train one prompt method on one few-shot split, save its context; return the path and validation metrics.
    ``online``: the image encoder in the training loop (``--online-encoding``, :mod:`calbench.online_encoding`)."""
    check_seed(seed, "--seed")
    resolved = resolve(method, model, data, params)
    if not resolved.learns_prompt:
        raise CalbenchError(
            f"{parse_method(method)[0]} learns no prompt, so there is nothing to train; pick one of: {', '.join(prompt_methods())}"
        )
    Path(out).mkdir(parents=True, exist_ok=True)  # a file or read-only folder in the way fails before training
    session = Session(model, data, context)
    untrained = resolved.build()
    fit = session.fit_data(seed, fewshot, untrained, score_val=True, online=online)
    trained = untrained.fit(fit)
    prompt = base_of(trained)
    assert isinstance(prompt, PromptMethod) and prompt.learner is not None
    extra: dict[str, Any] = {
        "method": method,
        "params": dict(resolved.params),
        "model": model,
        "dataset": session.dataset.name,
        "seed": seed,
        "shots": fewshot.shots,
        "val_shots": fewshot.val,  # with data, seed and shots: the validation split `evaluate` fits thresholds on
        # a folder by its absolute path and every dataset by its train files' fingerprint, so that `evaluate`
        # finds the validation split from any working folder
        "data": data if data in DATASETS else str(Path(data).expanduser().resolve()),
        "train_fingerprint": session.dataset.fingerprint("train"),
    }
    if isinstance(trained, Calibrated) and isinstance(trained.calibrator, TemperatureScaling):
        extra["temperature"] = trained.calibrator.temperature
    path = Path(out) / f"{method.replace('+', '_')}-{model}-{session.dataset.name}-seed{seed}.safetensors"
    # the shots this prompt was trained on, not the trainer's recommended default
    save_prompt(path, prompt.learner, {**asdict(prompt.config), "shots": fewshot.shots}, extra)
    with torch.no_grad():  # smoothed methods are judged on noisy validation copies, as at test time
        metrics = evaluate(
            trained.predict_proba(fit.val_inputs(trained)).double().cpu().numpy(), fit.val_labels.cpu().numpy()
        )
    return path, metrics


def build_cache(
    model: str, data: str, seeds: Sequence[int], fewshot: FewShot = FewShot(), context: RunContext = RunContext()
) -> tuple[CacheStats, Path]:
    """Encode the test split and each seed's few-shot views ahead of training."""
    check_seeds(seeds, "--seeds")
    session = Session(model, data, context)
    for seed in seeds:
        session.check(seed, fewshot)
    return session.cache.stats, session.cache.root


@dataclass
class Evaluation:
    method: str  # what was scored: the trained method, or its base when its calibrator is not in the file
    trained_on: str  # dataset the prompt was trained on
    session: Session
    metrics: dict[str, float]
    note: str = ""


def restore_method(info: dict[str, Any], session: Session, path: Path) -> tuple[str, Method, str]:
    """The saved method with the prompt from ``path``, and a note on what could not be restored."""
    extra = info["extra"]
    name = str(extra.get("method", "coop-ce"))
    base_name, calibrator = parse_method(name)
    method = make_method(base_name, **dict(extra.get("params", {})))
    if not isinstance(method, PromptMethod):
        raise CalbenchError(f"{path} was trained with {base_name}, which learns no prompt; train a prompt method")
    method.use_prompt(load_prompt(path, session.vlm))
    if calibrator is None:
        return name, method, ""
    if calibrator == "ts" and "temperature" in extra:
        scaling = TemperatureScaling()
        scaling.temperature = _temperature(extra["temperature"], path)
        return name, Calibrated(method, scaling, base_is_fitted=True), ""
    return (
        base_name,
        method,
        f"the +{calibrator} calibrator is not stored in prompt files; scored {base_name} without it",
    )


def _temperature(value: object, path: Path) -> float:
    """A stored temperature: fitted temperatures are positive and finite (fitted as exp(log T)); any other
    value would score silently wrong (T = -1 inverts every confidence, T = 0 or NaN makes them NaN)."""
    try:
        temperature = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        temperature = math.nan
    if not (0.0 < temperature < math.inf):
        raise CalbenchError(
            f"{path} stores temperature {value!r}; a fitted temperature is a positive finite number, so the file "
            "is damaged: train it again with `calbench train`"
        )
    return temperature


def evaluate_prompt(
    prompt: Path, data: str, model: Optional[str] = None, context: RunContext = RunContext()
) -> Evaluation:
    """Score a prompt saved by `calbench train` on ``data``'s test split.

    ``data`` may be the dataset it was trained on or another with the same class names in the
    same order (e.g. the same tissue classes from another hospital): a distribution-shift test.
    """
    info = read_prompt_info(prompt)
    model = model or info["extra"].get("model")
    if not model:
        raise CalbenchError(f"{prompt} does not name its model; pass --model (the model it was trained on)")
    session = Session(str(model), data, context)
    if list(info["classnames"]) != list(session.dataset.classnames):
        raise CalbenchError(
            f"{prompt} was trained for the classes {', '.join(info['classnames'])}; {session.dataset.name} has "
            f"{', '.join(session.dataset.classnames)}; evaluate on a dataset with the same classes in the same order"
        )
    name, method, note = restore_method(info, session, Path(prompt))
    with torch.no_grad():
        probs = method.predict_proba(session.test_features(method)).double().cpu().numpy()
    trained_on = str(info["extra"].get("dataset", "?"))
    deferral = _deferral(info, method, probs, session, context, Path(prompt))
    return Evaluation(name, trained_on, session, {**evaluate(probs, session.test_labels), **deferral}, note)


def _deferral(
    info: dict[str, Any], method: Method, probs: Any, session: Session, context: RunContext, path: Path
) -> dict[str, float]:
    """The deferral measures of a scored prompt, with the threshold and conformal sets fitted on the
    validation split it was trained with (its dataset, seed and shots), as a deployment would fit them
    before meeting another site; test-only measures, with a warning, when that split cannot be rebuilt."""
    extra, labels = info["extra"], session.test_labels
    try:
        source = str(extra.get("data", extra["dataset"]))
        same = extra.get("train_fingerprint") == session.dataset.fingerprint("train")
        home = session if same or source in (session.dataset.name, str(session.dataset.root)) else None
        home = home or Session(session.model, source, context)
        shots = int(extra["shots"])
        fit = home.fit_data(int(extra["seed"]), FewShot(shots, int(extra.get("val_shots", shots))), method, True)
    except (CalbenchError, KeyError, ValueError) as exc:
        warn(
            f"no validation split to fit a threshold or conformal sets on for {path} ({exc}); the threshold and "
            "conformal columns are left out: evaluate where its training data is found, or train it again"
        )
        return test_only_metrics(probs, labels)
    with torch.no_grad():
        val = method.predict_proba(fit.val_inputs(method)).double().cpu().numpy()
    return deferral_metrics(val, fit.val_labels.cpu().numpy(), probs, labels, seed=int(extra["seed"]))
