"""Many prompt learners, one text-tower pass: the prompt methods of a grid, or parallel trials, fitted together.

Runs on one model and dataset (each method's seeds in `compare`, trials in `tune --batch-trials`)
learn their own context vectors through the same frozen text tower. Trained together
(:func:`calbench.train.train_together`), each step runs the tower once over all their prompts
(R runs x C classes) instead of R times over C, which keeps a GPU busy and saves a little on a
CPU; each run keeps its own loss, gradient, schedule, batch order and seed, so its result equals
its own fit up to float rounding. Runs whose prompts differ in length (another ``n_ctx`` or
initial phrase) go in separate passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor

from calbench.base import FitData, Method
from calbench.calibprompt import PromptMethod
from calbench.prompts import PromptLearner, share_text_pass, text_features_together
from calbench.train import TrainRun, train_together

if TYPE_CHECKING:
    from calbench.session import FewShot, Session

#: at most this many prompts (runs x classes) in one text-tower pass, by device type (calbench's choice): the
#: activations a pass keeps for its backward take ~11 MiB per whole 27-token prompt of a ViT-B CLIP text tower in
#: fp32 (a BERT-base tower ~1.7x that), and ~5.5 MiB with each run's start shared and no token past an EOT
#: (measured: 698 MiB peak RSS growth for a step of 14 runs x 9 Kather prompts), so 128 prompts hold 0.7-1.4 GiB
#: on a CPU, which gains little from larger passes (``python -m benchmarks``, text-pass row); a GPU's memory
#: holds 512 (~6 GiB at most) easily
MAX_PROMPTS = {"cpu": 128, "cuda": 512}


def max_prompts(device: torch.device) -> int:
    """The largest shared text pass on ``device``: :data:`MAX_PROMPTS` for its type (CPU's for others)."""
    return MAX_PROMPTS.get(device.type, MAX_PROMPTS["cpu"])


def text_groups(runs: Sequence[TrainRun], limit: int) -> list[list[int]]:
    """Indices of ``runs`` in groups that can share a text pass (same model and prompt length), each
    holding at most ``limit`` prompts (and at least one run), in the order given."""
    kinds: list[list[int]] = []
    for index, run in enumerate(runs):
        kind = next((k for k in kinds if share_text_pass(runs[k[0]].learner, run.learner)), None)
        if kind is None:
            kinds.append([index])
        else:
            kind.append(index)
    groups: list[list[int]] = []
    for kind in kinds:
        group: list[int] = []
        for index in kind:
            prompts = len(runs[index].learner.classnames)
            if group and sum(len(runs[i].learner.classnames) for i in group) + prompts > limit:
                groups.append(group)
                group = []
            group.append(index)
        groups.append(group)
    return groups


@dataclass
class FitOutcome:
    """One method's fit: the fitted method, or the error its fit (or its data) raised."""

    method: Optional[Method] = None
    error: Optional[Exception] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def fitted(self) -> Method:
        """The fitted method, or its fit's error raised."""
        if self.error is not None:
            raise self.error
        assert self.method is not None
        return self.method


def fit_together(methods: Sequence[Method], data: Sequence[FitData], limit: Optional[int] = None) -> list[FitOutcome]:
    """Fit each method on its data, the prompt methods whose runs can share text passes together; each
    outcome holds the fitted method or the error its fit raised (a diverged loss, a pruned trial's
    ``on_epoch``). Other methods are fitted alone, and so is a group whose shared pass itself fails
    (out of memory, say). ``limit``: prompts per pass (default: :func:`max_prompts` of the model's device);
    0: every method is fitted alone."""
    outcomes: dict[int, FitOutcome] = {}
    runs: list[TrainRun] = []
    prepared: list[int] = []
    for index, (method, fit) in enumerate(zip(methods, data)):
        if limit == 0 or not isinstance(method, PromptMethod):
            outcomes[index] = _finish(method, fit, None)
            continue
        try:
            runs.append(method.training_run(fit))
            prepared.append(index)
        except Exception as exc:  # noqa: BLE001 - this method's failure, reported as its own fit would
            outcomes[index] = FitOutcome(error=exc)
    if limit is None and runs:
        limit = max_prompts(runs[0].learner.vlm.device)
    for group in text_groups(runs, limit or 1):
        chosen = [prepared[i] for i in group]
        try:
            results = train_together([runs[i] for i in group])
        except Exception:  # noqa: BLE001 - the shared pass failed: each run alone says what is wrong with it
            results = None
        texts = _trained_features([runs[i].learner for i in group]) if results else [None] * len(chosen)
        for index, result, text in zip(chosen, results or [None] * len(chosen), texts):
            outcomes[index] = _finish(methods[index], data[index], result, text)
    return [outcomes[index] for index in range(len(methods))]


def _trained_features(learners: Sequence[PromptLearner]) -> list[Optional[Tensor]]:
    """The trained prompts' class features from one shared pass, as training computed them; None for each
    when that pass fails (out of memory, say): each method then computes its own."""
    try:
        with torch.no_grad():
            return list(text_features_together(learners))
    except Exception:  # noqa: BLE001 - a fallback, not an error: the features are computed again per run
        return [None] * len(learners)


def _finish(
    method: Method,
    fit: FitData,
    result: Union[list[dict[str, float]], Exception, None],
    text: Optional[Tensor] = None,
) -> FitOutcome:
    """The method fitted from its run's ``result`` (and trained features ``text``), or alone when there is
    no result; or the error of its fit."""
    try:
        if result is None:
            return FitOutcome(method.fit(fit))
        assert isinstance(method, PromptMethod)
        return FitOutcome(method.trained(result, text))
    except Exception as exc:  # noqa: BLE001 - the run's own error, returned as its outcome
        return FitOutcome(error=exc)


def fit_grid(
    session: Session,
    methods: Mapping[int, Mapping[str, Method]],
    fewshot: FewShot,
    limit: Optional[int] = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[int, dict[str, FitOutcome]]:
    """Fit every method of every seed ({seed: {name: built method}}) on its few-shot data: the one fitting
    scheduler of a grid. A prompt learner's seeds share text-tower passes (:func:`by_method`; ``limit``:
    prompts per pass, default :func:`max_prompts` of the model's device; 0: each alone); the others, and
    a method run on one seed, are fitted alone. A method whose data or fit fails gets that error as its
    outcome; a full or read-only disk under the cache stops the grid (it is the machine's, not the method's)."""
    keys: list[tuple[int, str]] = []
    data: list[FitData] = []
    outcomes: dict[int, dict[str, FitOutcome]] = {seed: {} for seed in methods}
    for seed, named in methods.items():
        for name, method in named.items():
            try:
                data.append(session.fit_data(seed, fewshot, method))
                keys.append((seed, name))
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - this method's data: its row says why
                outcomes[seed][name] = FitOutcome(error=exc)
    runs = [methods[seed][name] for seed, name in keys]
    groups = by_method(keys)
    # a method's runs share passes when two or more of them learn a prompt (and passes are allowed)
    shared = [limit != 0 and sum(isinstance(runs[i], PromptMethod) for i in group) >= 2 for group in groups]
    if any(shared):
        log(f"{session.model} · {session.dataset.name}: each method's {len(methods)} seeds share text-tower passes")
    for group, shares in zip(groups, shared):
        fits = fit_together([runs[i] for i in group], [data[i] for i in group], limit if shares else 0)
        for i, outcome in zip(group, fits):
            if isinstance(outcome.error, OSError):
                raise outcome.error
            outcomes[keys[i][0]][keys[i][1]] = outcome
    return outcomes


def by_method(keys: Sequence[tuple[int, str]]) -> list[list[int]]:
    """Indices of the (seed, method) runs of a grid in one group per method: a run shares its passes with
    its own method's other seeds only, never with other methods. The rounding of a shared pass depends
    on its shape (how the CPU's threads split its reductions), so a run trained beside whatever methods
    ``--methods`` lists would get numbers that depend on that list; grouped by method, they do not."""
    groups: dict[str, list[int]] = {}
    for index, (_, base) in enumerate(keys):
        groups.setdefault(base, []).append(index)
    return list(groups.values())
