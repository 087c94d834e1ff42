"""`tune`: Optuna search of a method's hyper-parameters on the validation split only.

CalibPrompt's own limitation (Basu et al., BMVC 2025) is that its gains depend on loss
weights chosen by hand per model and dataset. Here a study searches them on the few-shot
train/validation splits (:class:`~calbench.methods.FitData`; the test split is never
loaded), under an accuracy constraint against CoOp-CE, with pruning at epoch checkpoints.
Studies live in any Optuna storage, so a re-run resumes and several processes or machines
share one study. Only the chosen setting is then scored on the test split, once, by
:func:`calbench.experiment.run_compare`.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from optuna.trial import FrozenTrial, TrialState

from calbench.atomic import write_text_atomic
from calbench.errors import CalbenchError
from calbench.experiment import RESULT_COLUMNS, fewshot_features, open_run, run_compare, write_csv_atomic
from calbench.methods import METHODS, VAL_AS_TEST, FitData, PromptMethod, feature_requests, make_method
from calbench.metrics import accuracy, ece, nll
from calbench.train import TrainConfig, TrainingDiverged, logits_for
from calbench.tune_storage import default_storage, open_storage

# --------------------------------------------------------------------------- search spaces


@dataclass(frozen=True)
class Param:
    """One searched hyper-parameter: a float or int range (optionally log-scaled) or a list of choices.

    ``default`` is the method's own default, enqueued as the first trial.
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
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None and v is not False and v != ()}


def log_range(low: float, high: float, default: float) -> Param:
    return Param("float", low, high, log=True, default=default)


def one_of(*choices: Any, default: Any) -> Param:
    return Param("categorical", choices=tuple(choices), default=default)


#: Search spaces per method (the issue's table). Defaults repeat the methods' own defaults
#: (tests check they build the same method), so the first trial is the untuned method.
SPACES: dict[str, dict[str, Param]] = {
    "calibprompt": {
        "alpha": log_range(0.005, 0.3, 0.05),  # shared by label smoothing and SMAC
        "w_as": log_range(1e-3, 3.0, 0.01),
        "w_smac": log_range(0.1, 10.0, 1.0),
        "n_ctx": one_of(4, 8, 16, 32, default=TrainConfig.n_ctx),
        "lr": log_range(5e-4, 1e-2, TrainConfig.lr),
    },
    "coop-ls": {"alpha": log_range(0.005, 0.3, 0.05)},
    "coop-mbls": {"margin": Param("float", 1.0, 20.0, default=10.0), "alpha": log_range(0.01, 1.0, 0.1)},
    "coop-focal": {"gamma": Param("float", 0.5, 5.0, default=3.0)},
    "promptsmooth": {"n_ctx": one_of(2, 5, 8, 16, default=5), "train_sigmas": one_of("0.25", "0.25,0.5", "0.25,0.5,1.0", default="0.25,0.5,1.0")},
}
#: parameters searched as text because Optuna's choices must be scalars
DECODERS: dict[str, Callable[[Any], Any]] = {"train_sigmas": lambda text: [float(s) for s in str(text).split(",")]}

#: CalibPrompt's hand-set values per (model, dataset) (Basu et al., BMVC 2025; 8 shots, n_ctx 16,
#: w_SMAC 1, alpha shared by LS and SMAC). Enqueued as a first trial wherever the pair is searched.
PAPER_SETTINGS: dict[tuple[str, str], dict[str, float]] = {
    ("medclip", "covid"): {"alpha": 0.2, "w_as": 1.0},
    ("medclip", "rsna18"): {"alpha": 0.2, "w_as": 1.0},
    ("biomedclip", "covid"): {"alpha": 0.1, "w_as": 3.0},
    ("biomedclip", "rsna18"): {"alpha": 0.1, "w_as": 3.0},
    ("plip", "kather"): {"alpha": 0.05, "w_as": 0.01},
    ("plip", "pannuke"): {"alpha": 0.2, "w_as": 0.1},
    ("plip", "digestpath"): {"alpha": 0.03, "w_as": 0.001},
    ("quiltnet", "kather"): {"alpha": 0.01, "w_as": 1.0},
    ("quiltnet", "pannuke"): {"alpha": 0.1, "w_as": 0.001},
    ("quiltnet", "digestpath"): {"alpha": 0.05, "w_as": 0.001},
}
PAPER_COMMON = {"w_smac": 1.0, "n_ctx": 16}


def parse_space(method: str, text: Mapping[str, Any], source: str = "--space") -> dict[str, Param]:
    """The method's space narrowed or extended by a mapping {param: {low, high, log, choices, default} | null}."""
    space = dict(base_space(method))
    for name, spec in text.items():
        if spec is None:  # drop: the parameter stays at the method's default
            space.pop(name, None)
            continue
        if not isinstance(spec, Mapping):
            raise CalbenchError(f"{source}: {name} must map to {{low, high[, log]}} or {{choices: [...]}} or null, got {spec!r}")
        unknown = set(spec) - {"type", "low", "high", "log", "choices", "default"}
        if unknown:
            raise CalbenchError(f"{source}: {name} has unknown key(s) {', '.join(sorted(unknown))}; use low, high, log, choices, type, default")
        old = space.get(name)
        if "choices" in spec:
            choices = tuple(spec["choices"])
            if not choices:
                raise CalbenchError(f"{source}: {name} has an empty list of choices")
            default = spec.get("default", old.default if old is not None and old.default in choices else None)
            space[name] = Param("categorical", choices=choices, default=default)
            continue
        base = old if old is not None and old.kind != "categorical" else None
        low, high = spec.get("low", base.low if base else None), spec.get("high", base.high if base else None)
        if low is None or high is None:
            raise CalbenchError(f"{source}: {name} needs low and high (or choices)")
        kind = spec.get("type", base.kind if base else ("int" if isinstance(low, int) and isinstance(high, int) else "float"))
        if kind not in ("float", "int"):
            raise CalbenchError(f"{source}: {name} has type {kind!r}; use float or int (or give choices)")
        if not low < high or (spec.get("log", base.log if base else False) and low <= 0):
            raise CalbenchError(f"{source}: {name} needs 0 < low < high on a log scale and low < high otherwise, got {low}..{high}")
        space[name] = Param(kind, low, high, bool(spec.get("log", base.log if base else False)), default=spec.get("default", base.default if base else None))
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
        raise CalbenchError(f"no search space for {method!r}; tunable: {', '.join(m for m in SPACES if m in METHODS)}, or pass --space FILE")
    METHODS.get(method)  # in the table but not registered (yet): same one-line error
    return SPACES[method]


def method_params(params: Mapping[str, Any], epochs: Optional[int]) -> dict[str, Any]:
    """Trial parameters as ``make_method`` takes them (decoded), plus an --epochs override."""
    out = {name: DECODERS[name](value) if name in DECODERS else value for name, value in params.items()}
    if epochs is not None and "epochs" not in out:
        out["epochs"] = epochs
    return out


def reference_params(method: str, pair: tuple[str, str], space: Mapping[str, Param]) -> tuple[str, dict[str, Any]]:
    """The hand-set setting a search must beat: the paper's for CalibPrompt where it has one, else the defaults."""
    defaults = {name: p.default for name, p in space.items() if p.default is not None}
    if method == "calibprompt" and pair in PAPER_SETTINGS:
        return "paper", {**defaults, **{k: v for k, v in {**PAPER_COMMON, **PAPER_SETTINGS[pair]}.items() if k in space or k in defaults}}
    return "default", defaults


def first_trials(method: str, pairs: Sequence[tuple[str, str]], space: Mapping[str, Param]) -> list[tuple[str, dict[str, Any]]]:
    """(label, setting) enqueued before sampling: each pair's paper setting (or the defaults), without
    repeats and without values the (narrowed) space excludes; the defaults come last where a paper setting exists."""
    chosen: list[tuple[str, dict[str, Any]]] = []
    for pair in [*pairs, ("", "")]:
        label, params = reference_params(method, pair, space)
        kept = {k: v for k, v in params.items() if k in space and space[k].contains(v)}
        if kept and kept not in [p for _, p in chosen]:
            chosen.append((f"{label} {pair_key(pair)}" if label == "paper" else label, kept))
    return chosen


# --------------------------------------------------------------------------- what a study records


@dataclass
class TuneConfig:
    """Everything that defines a study; stored in it so that every worker searches the same thing."""

    method: str = "calibprompt"
    pairs: list[tuple[str, str]] = field(default_factory=lambda: [("tiny", "synthetic")])
    modality: Optional[str] = None
    objective: str = "ece"  # "ece", "nll" or "pareto"
    acc_tolerance: float = 1.0  # accuracy points below CoOp-CE's
    shots: int = 8
    val_shots: Optional[int] = None
    views: int = 10
    split_seeds: list[int] = field(default_factory=lambda: [1])
    epochs: Optional[int] = None  # None: the method's (the paper's 50)
    pruner: str = "median"
    space: dict[str, Param] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise CalbenchError(f"--objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.pruner not in PRUNERS:
            raise CalbenchError(f"--pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}")
        if not self.split_seeds:
            raise CalbenchError("--split-seeds needs at least one seed")
        if self.shots < 1 or (self.val_shots is not None and self.val_shots < 1):
            raise CalbenchError("--shots and --val-shots must be at least 1")
        if self.epochs is not None and self.epochs < 1:
            raise CalbenchError(f"--epochs must be at least 1, got {self.epochs}")
        self.space = self.space or dict(base_space(self.method))

    @property
    def train_epochs(self) -> int:
        return self.epochs or TrainConfig.epochs

    def fingerprint(self) -> dict[str, Any]:
        """What must match between workers of one study (not pruner or storage details)."""
        keep = ("method", "modality", "objective", "acc_tolerance", "shots", "val_shots", "views", "split_seeds", "epochs")
        return {
            **{k: getattr(self, k) for k in keep},
            "pairs": [list(p) for p in self.pairs],
            "space": {name: p.to_json() for name, p in sorted(self.space.items())},
        }


OBJECTIVES = {"ece": ["minimize"], "nll": ["minimize"], "pareto": ["minimize", "maximize"]}
#: (epochs per run, steps per trial) -> pruner; a step is an epoch, counted on over a trial's (pair, split seed) runs.
#: The first half of training is never judged: early-epoch ECE says little about the end (warm-up at lr 1e-5).
PRUNERS: dict[str, Callable[[int, int], optuna.pruners.BasePruner]] = {
    "median": lambda epochs, steps: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 2)),
    "hyperband": lambda epochs, steps: optuna.pruners.HyperbandPruner(min_resource=max(1, epochs // 2), max_resource=steps, reduction_factor=3),
    "none": lambda epochs, steps: optuna.pruners.NopPruner(),
}
SURPLUS = "calbench:surplus"
#: the constraint's name: CoOp-CE's validation accuracy - tolerance - the trial's (feasible when <= 0)
ACCURACY = "accuracy_below_coop_ce"


def pair_key(pair: Sequence[str]) -> str:
    return f"{pair[0]}/{pair[1]}"


def counts_toward_total(trial: FrozenTrial) -> bool:
    """A trial that ran (or runs, or waits to run) for the study's total; killed and surplus ones do not."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and "fail_reason" in trial.user_attrs


def violation(trial: FrozenTrial) -> float:
    """How far validation accuracy falls below CoOp-CE's minus the tolerance (<= 0: feasible)."""
    return max(trial.constraints.values(), default=0.0)


def is_feasible(trial: FrozenTrial) -> bool:
    return violation(trial) <= 0.0


def select_best(trials: Sequence[FrozenTrial], objective: str) -> Optional[FrozenTrial]:
    """Lowest validation objective among trials meeting the accuracy constraint (pareto: lowest ECE
    there, which is the front's low-ECE end); if none meets it, the smallest violation."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return None
    feasible = [t for t in done if is_feasible(t)]
    if not feasible:
        return min(done, key=lambda t: (violation(t), t.values[0], t.number))
    return min(feasible, key=lambda t: (t.values[0], t.number))


# --------------------------------------------------------------------------- one worker


class _Surplus(Exception):
    """Two workers started the last missing trial at once; the later one steps back untrained."""


def _val_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    p, y = probs.double().cpu().numpy(), labels.cpu().numpy()
    return {"ece": ece(p, y), "accuracy": accuracy(p, y), "nll": nll(p, y)}


class Worker:
    """One process's share of a study: models, few-shot features and CoOp-CE's validation accuracy,
    loaded once and reused by every trial this process runs."""

    def __init__(self, config: TuneConfig, n_trials: int, device: str, cache_dir: Optional[Path], weights: Optional[Path], data_root: Optional[Path], progress: bool) -> None:
        self.config = config
        self.n_trials = n_trials
        self.runs: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        for model, data in config.pairs:
            self.runs[(model, data)] = open_run(model, data, device, cache_dir, weights if len(config.pairs) == 1 else None, data_root, progress)
        self._fits: dict[tuple[Any, ...], FitData] = {}
        self.reference: dict[str, float] = {}
        self.host = f"{socket.gethostname()}:{os.getpid()}"

    def fit_data(self, pair: tuple[str, str], seed: int, requests: Optional[Mapping[str, Any]] = None) -> FitData:
        """Few-shot train + validation features: the only data a trial sees."""
        key = (pair, seed, tuple(sorted((requests or {}).items())))
        if key not in self._fits:
            vlm, dataset, cache = self.runs[pair]
            c = self.config
            self._fits[key] = fewshot_features(vlm, dataset, cache, c.shots, seed, c.val_shots, c.views, dict(requests) if requests else None).fit
        return self._fits[key]

    def load_reference(self, study: optuna.Study) -> dict[str, float]:
        """CoOp-CE's validation accuracy per pair (mean over split seeds); computed once per study."""
        stored = study.user_attrs.get("reference_accuracy", {})
        if all(pair_key(p) in stored for p in self.config.pairs):
            self.reference = {k: float(v) for k, v in stored.items()}
            return self.reference
        epochs = method_params({}, self.config.epochs)
        for pair in self.config.pairs:
            accs = []
            for seed in self.config.split_seeds:
                fit = self.fit_data(pair, seed)
                coop = make_method("coop-ce", **epochs).fit(fit)
                with torch.no_grad():
                    accs.append(_val_metrics(coop.predict_proba(fit.val_features), fit.val_labels)["accuracy"])
            self.reference[pair_key(pair)] = float(np.mean(accs))
        study.set_user_attr("reference_accuracy", self.reference)
        return self.reference

    def _is_surplus(self, trial: optuna.Trial) -> bool:
        """A freshly sampled trial numbered beyond the total; queued ones (defaults, retries) were counted already."""
        trials = trial.study.get_trials(deepcopy=False)
        own = next(t for t in trials if t.number == trial.number).system_attrs
        if "fixed_params" in own or "failed_trial" in own:
            return False
        return sum(t.number < trial.number and counts_toward_total(t) for t in trials) >= self.n_trials

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        c = self.config
        trial.set_user_attr("worker", self.host)
        if self._is_surplus(trial):
            trial.set_user_attr(SURPLUS, True)
            raise _Surplus(f"trial {trial.number} is beyond the {self.n_trials} requested")
        started = time.perf_counter()
        params = {name: p.suggest(trial, name) for name, p in c.space.items()}
        per_pair: dict[str, dict[str, float]] = {}
        runs = [(pair, seed) for pair in c.pairs for seed in c.split_seeds]
        metric = "ece" if c.objective == "pareto" else c.objective
        prunable = c.objective != "pareto"
        for index, (pair, seed) in enumerate(runs):
            method = make_method(c.method, **method_params(params, c.epochs))
            fit = self.fit_data(pair, seed, feature_requests(method, validate=True))
            step0 = index * c.train_epochs
            if prunable and isinstance(method, PromptMethod):
                method.on_epoch = self._checkpoint(trial, method, fit, pair, metric, step0)
            try:
                method.fit(fit)
            except TrainingDiverged as exc:
                trial.set_user_attr("fail_reason", f"diverged (split seed {seed}, {pair_key(pair)}): {exc}")
                raise
            with torch.no_grad():
                # smoothed methods are scored on noisy validation copies, as compare scores them on test
                metrics = _val_metrics(method.predict_proba(fit.extra.get(VAL_AS_TEST, fit.val_features)), fit.val_labels)
            sums = per_pair.setdefault(pair_key(pair), {k: 0.0 for k in metrics})
            for k, v in metrics.items():
                sums[k] += v / len(c.split_seeds)
            if prunable:
                trial.report(metrics[metric], step0 + c.train_epochs)
                if index + 1 < len(runs) and trial.should_prune():
                    self._record_prune(trial, f"after split seed {seed} of {pair_key(pair)}", metrics["accuracy"], pair)
                    raise optuna.TrialPruned()
        tolerance = c.acc_tolerance / 100.0
        for key, m in per_pair.items():
            m["constraint"] = self.reference[key] - tolerance - m["accuracy"]
        mean = {k: float(np.mean([m[k] for m in per_pair.values()])) for k in ("ece", "accuracy", "nll")}
        trial.set_user_attr("pairs", per_pair)
        trial.set_user_attr("val", mean)
        trial.set_constraint(ACCURACY, max(m["constraint"] for m in per_pair.values()))
        trial.set_user_attr("seconds", time.perf_counter() - started)
        return (mean["ece"], mean["accuracy"]) if c.objective == "pareto" else mean[c.objective]

    def _checkpoint(self, trial: optuna.Trial, method: PromptMethod, fit: FitData, pair: tuple[str, str], metric: str, step0: int) -> Callable[[int, dict[str, float]], None]:
        """Report the validation objective every tenth of training, and stop the trial if the pruner says so."""
        epochs = method.config.epochs
        every = max(1, epochs // 10)

        def on_epoch(epoch: int, losses: dict[str, float]) -> None:
            if (epoch + 1) % every or epoch + 1 == epochs:
                return
            with torch.no_grad():
                logits = logits_for(fit.val_features, method.learner.text_features(), fit.vlm.logit_scale)
                metrics = _val_metrics(F.softmax(logits, dim=1), fit.val_labels)
            trial.report(metrics[metric], step0 + epoch + 1)
            if trial.should_prune():
                self._record_prune(trial, f"epoch {epoch + 1} of {epochs} (split seed {fit.seed}, {pair_key(pair)})", metrics["accuracy"], pair)
                raise optuna.TrialPruned()

        return on_epoch

    def _record_prune(self, trial: optuna.Trial, where: str, acc: float, pair: tuple[str, str]) -> None:
        trial.set_user_attr("pruned_at", where)
        trial.set_constraint(ACCURACY, self.reference[pair_key(pair)] - self.config.acc_tolerance / 100.0 - acc)


# --------------------------------------------------------------------------- the search


@dataclass
class SearchResult:
    study: optuna.Study
    config: TuneConfig
    storage: str
    ran: int  # trials this process trained (complete, pruned or failed)
    seconds: float

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    @property
    def best(self) -> Optional[FrozenTrial]:
        return select_best(self.trials, self.config.objective)


def open_study(config: TuneConfig, storage: str, name: str, heartbeat: int = 10) -> optuna.Study:
    """Create the study (and enqueue its first trials) or join it, refusing a different search under the same name."""
    backend = open_storage(storage, heartbeat)
    sampler = optuna.samplers.TPESampler()  # reads the constraint each trial sets
    pruner = PRUNERS[config.pruner](config.train_epochs, config.train_epochs * len(config.pairs) * len(config.split_seeds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constraints_func
        try:
            study = optuna.create_study(storage=backend, study_name=name, directions=OBJECTIVES[config.objective], sampler=sampler, pruner=pruner)
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=name, storage=backend, sampler=sampler, pruner=pruner)
            stored = study.user_attrs.get("config")
            if stored is not None and stored != json.loads(json.dumps(config.fingerprint())):
                changed = sorted(k for k in stored if stored.get(k) != json.loads(json.dumps(config.fingerprint())).get(k))
                raise CalbenchError(f"study {name!r} was created with other settings ({', '.join(changed)} differ); use the same options or a new --study NAME")
            return study
    study.set_user_attr("config", config.fingerprint())
    for label, params in first_trials(config.method, config.pairs, config.space):
        study.enqueue_trial(params, user_attrs={"enqueued": label})
    return study


def search(
    config: TuneConfig,
    n_trials: int,
    study_name: str,
    storage: str,
    device: str = "auto",
    cache_dir: Optional[Path] = None,
    weights: Optional[Path] = None,
    data_root: Optional[Path] = None,
    heartbeat: int = 10,
    progress: bool = False,
) -> SearchResult:
    """Run trials until the study holds ``n_trials`` (complete, pruned or failed for a reason);
    any number of processes may run this on the same study at once."""
    if n_trials < 1:
        raise CalbenchError(f"--trials must be at least 1, got {n_trials}")
    for _, params in first_trials(config.method, config.pairs, config.space):  # a bad name fails here, not in trial 0
        make_method(config.method, **method_params(params, config.epochs))
    started = time.perf_counter()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the report lists failed and pruned trials with reasons
    try:
        study = open_study(config, storage, study_name, heartbeat)
        worker = Worker(config, n_trials, device, cache_dir, weights, data_root, progress)
        worker.load_reference(study)
        ran = 0
        with _progress(progress, n_trials) as bar, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            while True:
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial is failed and re-queued
                trials = study.get_trials(deepcopy=False)
                bar(trials, select_best(trials, config.objective))
                waiting = any(t.state == TrialState.WAITING for t in trials)
                if not waiting and sum(counts_toward_total(t) for t in trials) >= n_trials:
                    break
                study.optimize(worker, n_trials=1, catch=(TrainingDiverged, _Surplus))
                ran += 1
    finally:
        optuna.logging.set_verbosity(verbosity)
    return SearchResult(study, config, storage, ran, time.perf_counter() - started)


class _progress:
    """rich progress while trials run: trials finished, current best, ETA (this process's pace)."""

    def __init__(self, enabled: bool, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.total = total
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[best]}"), disable=not enabled)

    def __enter__(self) -> Callable[[list[FrozenTrial], Optional[FrozenTrial]], None]:
        self.bar.__enter__()
        self.task = self.bar.add_task("trial", total=self.total, best="")

        def update(trials: list[FrozenTrial], best: Optional[FrozenTrial]) -> None:
            done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and "fail_reason" in t.user_attrs) for t in trials)
            text = "" if best is None else f"best #{best.number}: " + ", ".join(f"{k} {v:.4f}" for k, v in best.user_attrs.get("val", {}).items())
            self.bar.update(self.task, completed=min(done, self.total), description=f"trial {len(trials)}", best=text)

        return update

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)


# --------------------------------------------------------------------------- after the search


def non_dominated(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials no other trial beats on both (lower ECE, higher accuracy)."""

    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        return a.values[0] <= b.values[0] and a.values[1] >= b.values[1] and tuple(a.values) != tuple(b.values)

    return [t for t in trials if not any(dominates(o, t) for o in trials)]


def best_params_document(result: SearchResult) -> dict[str, Any]:
    """best_params.json: {"method", "params"} as `train --params` / `compare --params` read it, plus provenance."""
    best = result.best
    if best is None:
        raise CalbenchError(f"study {result.study.study_name!r} has no completed trial yet; run more --trials")
    c = result.config
    per_pair = {}
    for pair in c.pairs:
        key = pair_key(pair)
        scored = [t for t in result.trials if t.state == TrialState.COMPLETE and key in t.user_attrs.get("pairs", {})]
        feasible = [t for t in scored if t.user_attrs["pairs"][key]["constraint"] <= 0] or scored
        metric = "ece" if c.objective == "pareto" else c.objective
        own = min(feasible, key=lambda t: (t.user_attrs["pairs"][key][metric], t.number))
        per_pair[key] = {"trial": own.number, "params": method_params(own.params, c.epochs), "val": own.user_attrs["pairs"][key], "shared_val": best.user_attrs["pairs"][key]}
    front = []
    if c.objective == "pareto":  # Optuna's non-dominated feasible trials (lower ECE, higher accuracy)
        # with no feasible trial Optuna's front is empty: then show the unconstrained front, marked so
        members = result.study.best_trials or non_dominated([t for t in result.trials if t.state == TrialState.COMPLETE])
        front = [
            {"trial": t.number, "ece": t.values[0], "accuracy": t.values[1], "feasible": is_feasible(t), "params": method_params(t.params, c.epochs)}
            for t in sorted(members, key=lambda t: t.values[0])
        ]
    return {
        "method": c.method,
        "params": method_params(best.params, c.epochs),
        "study": result.study.study_name,
        "trial": best.number,
        "objective": c.objective,
        "val": best.user_attrs.get("val", {}),
        "feasible": is_feasible(best),
        "reference_accuracy": result.study.user_attrs.get("reference_accuracy", {}),
        "per_pair": per_pair,
        **({"pareto_front": front} if front else {}),
    }


def final_test(
    result: SearchResult,
    best: Mapping[str, Any],
    seeds: Sequence[int],
    out: Path,
    device: str = "auto",
    cache_dir: Optional[Path] = None,
    weights: Optional[Path] = None,
    data_root: Optional[Path] = None,
    progress: bool = False,
) -> list[dict[str, object]]:
    """Score the tuned setting once on the test split, next to CoOp-CE and the hand-set setting;
    rows are labelled ``<method>:tuned`` and ``<method>:paper`` (or ``:default``) and appended to results.csv."""
    c = result.config
    rows: list[dict[str, object]] = []
    epochs = method_params({}, c.epochs)
    for pair in c.pairs:
        model, data = pair
        folder = Path(out) / "final" / f"{model}-{data}"
        common = dict(model=model, data=data, seeds=seeds, shots=c.shots, val_shots=c.val_shots, views=c.views, device=device, cache_dir=cache_dir, weights=weights if len(c.pairs) == 1 else None, data_root=data_root, progress=progress)
        tuned = run_compare(methods=["coop-ce", c.method], out=folder / "tuned", method_params={"coop-ce": epochs, c.method: dict(best["params"])}, **common)
        label, ref = reference_params(c.method, pair, c.space)
        hand = run_compare(methods=[c.method], out=folder / label, method_params={c.method: method_params(ref, c.epochs)}, **common)
        for row in tuned.rows:
            rows.append({**row, "method": f"{c.method}:tuned" if row["method"] == c.method else row["method"]})
        for row in hand.rows:
            rows.append({**row, "method": f"{c.method}:{label}"})
        failures = tuned.failures + hand.failures
        if failures:
            first = failures[0]
            raise CalbenchError(f"final test run failed: {first['method']} (seed {first['seed']}): {first['error']}")
    append_results(rows, Path(out) / "results.csv")
    return rows


def append_results(rows: Sequence[dict[str, object]], path: Path) -> None:
    """Add rows to results.csv, replacing earlier rows of the same (model, dataset, method, seed)."""
    key = lambda r: (str(r["model"]), str(r["dataset"]), str(r["method"]), str(r["seed"]))  # noqa: E731
    new = {key(r) for r in rows}
    old: list[dict[str, object]] = []
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as f:
            old = [r for r in csv.DictReader(f) if key(r) not in new]
    write_csv_atomic([*old, *rows], path, RESULT_COLUMNS)


@dataclass
class TuneRun:
    search: SearchResult
    out: Path
    best_params: Optional[Path] = None
    test_rows: list[dict[str, object]] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)


def default_study_name(method: str, pairs: Sequence[tuple[str, str]], modality: Optional[str]) -> str:
    return f"{method}/modality/{modality}" if modality else f"{method}/{pairs[0][0]}/{pairs[0][1]}"


def modality_pairs(modality: str, data_root: Optional[Path]) -> list[tuple[str, str]]:
    """Every (model, dataset) of one modality whose weights and data are present."""
    from calbench.data import DATASETS
    from calbench.data import availability as data_available
    from calbench.models import MODELS
    from calbench.models import availability as model_available

    models = [m for m in MODELS if MODELS.get(m).modality == modality]
    datasets = [d for d in DATASETS if DATASETS.get(d).modality == modality]
    if not models or not datasets:
        known = sorted({MODELS.get(m).modality for m in MODELS} & {DATASETS.get(d).modality for d in DATASETS})
        raise CalbenchError(f"no models and datasets of modality {modality!r}; modalities with both: {', '.join(known)}")
    pairs = [(m, d) for m in models if model_available(m)[0] for d in datasets if data_available(d, data_root)[0]]
    if not pairs:
        raise CalbenchError(f"no {modality} model and dataset are available offline; see `calbench models` and `calbench datasets`")
    return pairs


def run_tune(
    config: TuneConfig,
    n_trials: int = 50,
    study_name: Optional[str] = None,
    storage: Optional[str] = None,
    out: Optional[Path] = None,
    final_seeds: Sequence[int] = (1, 2, 3),
    search_only: bool = False,
    device: str = "auto",
    cache_dir: Optional[Path] = None,
    weights: Optional[Path] = None,
    data_root: Optional[Path] = None,
    heartbeat: int = 10,
    progress: bool = False,
) -> TuneRun:
    """The whole `calbench tune`: search, best_params.json, the final test table, report.md/report.html."""
    from calbench.tune_report import write_report

    name = study_name or default_study_name(config.method, config.pairs, config.modality)
    out = Path(out) if out is not None else Path("results") / "tune" / name.replace("/", "-")
    out.mkdir(parents=True, exist_ok=True)
    result = search(config, n_trials, name, storage or default_storage(out), device, cache_dir, weights, data_root, heartbeat, progress)
    run = TuneRun(result, out)
    if search_only:
        return run
    document = best_params_document(result)
    run.best_params = out / "best_params.json"
    write_text_atomic(run.best_params, json.dumps(document, indent=2) + "\n")
    run.test_rows = final_test(result, document, final_seeds, out, device, cache_dir, weights, data_root, progress)
    run.reports = write_report(result, document, run.test_rows, out)
    return run
