"""The benchmark's rows: each measures calbench's way and its reference side by side, in one process."""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import CLASSES, KATHER_IMAGES, Models, Peak, Sizes, median_seconds, peak_memory
from calbench.models.base import TokenBatch

#: the run the issue quotes: CalibPrompt, 8 shots, 9 classes, 50 epochs, batch 16
EPOCHS = 50


@dataclass
class Row:
    """One line of the table: calbench's measurement, the reference it is compared with, their ratio."""

    name: str
    ours: str
    reference: str
    ratio: Optional[float]  # reference cost / calbench cost (above 1: calbench is faster), or as the row says
    target: str = ""
    met: Optional[bool] = None
    peak: Optional[Peak] = None
    notes: str = ""
    values: dict[str, Any] | None = None  # raw numbers for --json


def table(results: list[Row]) -> str:
    """The rows as a Markdown table (pasted into benchmarks/README.md)."""
    lines = [
        "| row | calbench | reference | ratio | target | met | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(
            f"| {r.name} | {r.ours} | {r.reference} | {ratio} | {r.target} | {met} | {r.peak.describe() if r.peak else ''} |"
        )
    notes = [f"- {r.name}: {r.notes}" for r in results if r.notes]
    return "\n".join(lines + [""] + notes)


def autocast(device: torch.device) -> Any:
    """The precision calbench encodes images in: fp16 autocast on CUDA, fp32 on the CPU (calbench.cache)."""
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()


# -------------------------------------------------------------------- 1. cache build vs the bare encoder


def cache_build(models: Models, kind: str, data: Path, sizes: Sizes, tmp: Path) -> Row:
    """Images/s of a feature-cache build (decode, preprocess, encode, write) against the encoder's forward
    on tensors already in memory: the floor any design pays once per image."""
    from calbench.cache import FeatureCache
    from calbench.data import load_dataset
    from calbench.data.transforms import eval_transform

    vlm = models.get(kind)
    dataset = load_dataset(str(data), tmp / "data-cache")
    indices = np.arange(min(sizes.cache_images, len(dataset.files("test"))))
    n = len(indices)
    start = time.perf_counter()
    pixels = torch.stack([eval_transform(dataset.load_image("test", int(i)), vlm.preprocess) for i in indices])
    decode = time.perf_counter() - start

    def bare() -> None:
        with torch.inference_mode(), autocast(vlm.device):
            for chunk in pixels.split(64):
                vlm.encode_images(chunk.to(vlm.device))

    fresh = itertools.count()

    def build() -> None:
        FeatureCache(tmp / f"features-{kind}-{next(fresh)}", vlm, progress=False).features(dataset, "test", indices)

    with peak_memory() as peak:
        t_bare = median_seconds(bare, sizes.repeats)
        t_cache = median_seconds(build, sizes.repeats, warmup=False)
    share = t_bare / t_cache
    return Row(
        f"cache build, {models.label(kind)}",
        f"{n / t_cache:.1f} img/s",
        f"{n / t_bare:.1f} img/s bare encoder",
        share,
        ">= 0.80 of the bare encoder",
        share >= 0.8,
        peak,
        f"{n} images of 224 px; decode + preprocess alone {n / decode:.0f} img/s ({decode / t_cache:.0%} of a build)",
        {"images": n, "cache_s": t_cache, "bare_s": t_bare, "decode_s": decode},
    )


# -------------------------------------------------------------------- 2. one run: cached vs online encoding


def one_run(models: Models, kind: str, data: Path, sizes: Sizes, tmp: Path, bare_rate: Optional[float]) -> Row:
    """One CalibPrompt run (8 shots, 9 classes, batch 16) on cached views against ``--online-encoding``
    (the image encoder and fresh augmentations in the loop, as the published code trains)."""
    from calbench.methods import make_method
    from calbench.session import FewShot, RunContext, Session
    from calbench.train import TrainConfig, steps_per_epoch

    session = Session(models.name(kind), str(data), RunContext(device=str(models.device), cache_dir=tmp / "cache"))
    fewshot = FewShot(shots=8, views=2)  # a step costs the same whichever cached view it reads
    params = {"epochs": sizes.run_epochs}
    cached = session.fit_data(1, fewshot, make_method("calibprompt", **params))
    online = session.fit_data(1, fewshot, make_method("calibprompt", **params), online=True)
    with peak_memory() as peak:
        t_cached = median_seconds(lambda: make_method("calibprompt", **params).fit(cached), sizes.repeats)
        t_online = median_seconds(lambda: make_method("calibprompt", **params).fit(online), sizes.repeats, False)
    scale = EPOCHS / sizes.run_epochs
    steps = sizes.run_epochs * steps_per_epoch(len(cached.train_labels), TrainConfig.batch_size)
    views = EPOCHS * len(cached.train_labels)
    once = f"; its {views} cached views take {views / bare_rate:.0f} s to encode once per seed" if bare_rate else ""
    ratio = t_online / t_cached
    return Row(
        f"one CalibPrompt run (50 epochs), cached vs --online-encoding, {models.label(kind)}",
        f"{t_cached * scale:.1f} s",
        f"{t_online * scale:.1f} s online",
        ratio,
        ">= 5x faster",
        ratio >= 5,
        peak,
        f"{steps / t_cached:.1f} steps/s cached, {steps / t_online:.2f} online; timed over "
        f"{sizes.run_epochs} epoch(s), scaled to 50{once}, shared by every method and trial on that seed",
        {"cached_s": t_cached, "online_s": t_online, "epochs_timed": sizes.run_epochs},
    )


# -------------------------------------------------------------------- 3. cut sequences vs full context


def _full_context(vlm: Any, learner: Any) -> tuple[torch.Tensor, TokenBatch]:
    """The embeddings of the padding after the learner's prompts, and the prompts' tokens padded to the
    tower's context length (77 or 256), as the published code runs them."""
    from calbench.models.text import bert_tokens

    cut = learner.tokens
    if cut.attention_mask is not None:  # BERT-style: [CLS] .. [SEP] and masked padding
        tokens = bert_tokens(vlm._tokenizer, learner.prompts, vlm.context_length, vlm.device, cut=False)[1]
    else:  # CLIP-style: everything after EOT
        tokens = TokenBatch(vlm._tokenizer(learner.prompts).to(vlm.device), cut.eot)
    with torch.no_grad():
        tail = vlm.embed_tokens(tokens.ids[:, cut.ids.shape[1] :])
    return tail, tokens


def text_cut(models: Models, kind: str, sizes: Sizes) -> Row:
    """A training step (forward and backward to the context) of the text tower on prompts cut to the
    longest real one against the full context length; and the largest feature difference."""
    from calbench.prompts import PromptLearner

    vlm = models.get(kind)
    learner = PromptLearner(vlm, CLASSES, n_ctx=16, seed=0)
    tail, full = _full_context(vlm, learner)

    def features(cut: bool) -> torch.Tensor:
        embeddings = learner.embeddings()
        if not cut:
            embeddings = torch.cat([embeddings, tail], dim=1)
        return F.normalize(vlm.encode_embeddings(embeddings, learner.tokens if cut else full).float(), dim=-1)

    def step(cut: bool) -> None:
        features(cut).sum().backward()

    with peak_memory() as peak:
        t_full = median_seconds(lambda: step(False), sizes.repeats)
        t_cut = median_seconds(lambda: step(True), sizes.repeats)
    with torch.no_grad():
        diff = float((features(True) - features(False)).abs().max())
    ratio = t_full / t_cut
    clip = kind != "bert"
    return Row(
        f"text step, cut vs full context, {models.label(kind)}",
        f"{t_cut * 1e3:.0f} ms ({learner.tokens.ids.shape[1]} tokens)",
        f"{t_full * 1e3:.0f} ms ({full.ids.shape[1]} tokens)",
        ratio,
        ">= 2x faster, identical features" if clip else "identical features",
        (ratio >= 2 if clip else True) and diff < 1e-4,
        peak,
        f"{len(CLASSES)} prompts of 16 context tokens + class name; max |feature difference| {diff:.1e}",
        {"cut_s": t_cut, "full_s": t_full, "max_diff": diff},
    )


def text_shared(models: Models, kind: str, sizes: Sizes) -> Row:
    """A training step of one learner's 9 cut prompts with their shared start (start token and context)
    run once and no token past each prompt's EOT (calbench.models.shared_prefix) against every prompt
    whole; and the largest feature difference."""
    from calbench.prompts import PromptLearner

    vlm = models.get(kind)
    learner = PromptLearner(vlm, CLASSES, n_ctx=16, seed=0)
    if learner.shared_len is None:
        raise ValueError(f"{models.label(kind)}: this text tower cannot share a prompt start")

    def features(shared: bool) -> torch.Tensor:
        if shared:
            return learner.text_features()
        return F.normalize(vlm.encode_embeddings(learner.embeddings(), learner.tokens).float(), dim=-1)

    with peak_memory() as peak:
        t_whole = median_seconds(lambda: features(False).sum().backward(), sizes.repeats)
        t_shared = median_seconds(lambda: features(True).sum().backward(), sizes.repeats)
    with torch.no_grad():
        diff = float((features(True) - features(False)).abs().max())
    length, start, classes = learner.tokens.ids.shape[1], learner.shared_len, len(CLASSES)
    computed = start + int((learner.tokens.eot - start + 1).sum())
    ratio = t_whole / t_shared
    return Row(
        f"text step, shared prompt start vs whole prompts, {models.label(kind)}",
        f"{t_shared * 1e3:.0f} ms ({computed} tokens)",
        f"{t_whole * 1e3:.0f} ms ({classes * length} tokens)",
        ratio,
        "identical features",
        diff < 1e-4,
        peak,
        f"{classes} cut prompts of {length} tokens, the first {start} (start token + 16 context) run once, "
        f"no token past a prompt's EOT; max |feature difference| {diff:.1e}",
        {"shared_s": t_shared, "whole_s": t_whole, "max_diff": diff, "shared_len": start, "length": length},
    )


# -------------------------------------------------------------------- 4. R runs in one text pass


def text_pass(models: Models, kind: str, sizes: Sizes) -> Row:
    """A training step of R learners' R x 9 prompts in one text-tower pass against R passes of 9 (each
    learner's shared prompt start runs once per pass either way, where the tower allows it)."""
    from calbench.prompts import PromptLearner, text_features_together

    vlm = models.get(kind)
    runs = sizes.runs_in_pass
    learners = [PromptLearner(vlm, CLASSES, n_ctx=16, seed=seed) for seed in range(runs)]

    def step(group: list[Any]) -> None:
        total = sum(features.sum() for features in text_features_together(group))
        total.backward()

    with peak_memory() as peak:
        t_one = median_seconds(lambda: step(learners[:1]), sizes.repeats)
        t_all = median_seconds(lambda: step(learners), sizes.repeats)
    ratio = runs * t_one / t_all
    return Row(
        f"text step, {runs} runs in one pass, {models.label(kind)}",
        f"{t_all * 1e3:.0f} ms for {runs * len(CLASSES)} prompts",
        f"{runs} x {t_one * 1e3:.0f} ms for {len(CLASSES)}",
        ratio,
        "",
        None,
        peak,
        f"{runs * len(CLASSES)} prompts cost {t_all / t_one:.1f}x {len(CLASSES)} prompts"
        + ("; each run's start token and context computed once" if learners[0].shared_len else ""),
        {"one_s": t_one, "all_s": t_all, "runs": runs},
    )


# -------------------------------------------------------------------- 5. the comparison grid


def grid(models: Models, data: Path, sizes: Sizes, tmp: Path, bare_rate: Optional[float]) -> Row:
    """compare's default methods x seeds on one pair, the prompt runs fitted together (calbench.batched)
    against one at a time; the results must agree, and the grid is set against one encoding pass
    over a Kather-sized pair's train + test images."""
    from calbench.calibprompt import PromptMethod
    from calbench.compare import Grid, compare_pair
    from calbench.methods import DEFAULT_METHODS, make_method
    from calbench.results import ResultsStore
    from calbench.session import FewShot, RunContext, Session

    session = Session(models.name("b32"), str(data), RunContext(device=str(models.device), cache_dir=tmp / "cache"))
    methods = list(sizes.grid_methods or DEFAULT_METHODS)
    prompt = [m for m in methods if isinstance(make_method(m), PromptMethod)]
    params = {m: {"epochs": sizes.grid_epochs} for m in prompt}
    plan = Grid(methods, sizes.grid_seeds, FewShot(shots=8), bootstrap=0, method_params=params)
    session.test_features()
    for seed in plan.seeds:  # the cache is built once, outside the timings: both designs read it
        session.fit_data(seed, plan.fewshot, make_method(prompt[0], **params[prompt[0]]))
    compare_pair(session, ResultsStore(tmp / "grid-warm-up"), replace(plan, methods=prompt[:1], seeds=plan.seeds[:1]))
    fresh = itertools.count()
    stores: dict[str, ResultsStore] = {}
    times: dict[str, list[float]] = {"batched": [], "alone": []}
    with peak_memory() as peak:
        for repeat in range(sizes.repeats):  # alternating, so a drift in the machine's load hits both alike
            for label in ("batched", "alone") if repeat % 2 == 0 else ("alone", "batched"):
                stores[label] = ResultsStore(tmp / f"grid-{label}-{next(fresh)}")
                start = time.perf_counter()
                compare_pair(session, stores[label], replace(plan, max_prompts=None if label == "batched" else 0))
                times[label].append(time.perf_counter() - start)
    t_batched, t_alone = statistics.median(times["batched"]), statistics.median(times["alone"])
    diff = _largest_difference(stores["batched"], stores["alone"])
    ratio = t_alone / t_batched
    runs = len(prompt) * len(plan.seeds)
    encode = ""
    if bare_rate:
        encoding = KATHER_IMAGES / bare_rate
        scaled = t_batched * EPOCHS / sizes.grid_epochs
        encode = (
            f"; one encoding pass over a Kather-sized pair ({KATHER_IMAGES} images) takes {encoding:.0f} s, "
            f"the grid scaled to 50 epochs {scaled / encoding:.2g}x that"
        )
    return Row(
        f"grid: {len(methods)} methods x {len(plan.seeds)} seeds, batched vs one by one",
        f"{t_batched:.1f} s",
        f"{t_alone:.1f} s one by one",
        ratio,
        ">= 1.5x faster, identical results",
        ratio >= 1.5 and diff < 1e-4,
        peak,
        f"{models.label('b32')}; {runs} prompt runs of {sizes.grid_epochs} epoch(s), scoring and results "
        f"included; max |probability difference| {diff:.1e}{encode}",
        {"batched_s": t_batched, "alone_s": t_alone, "max_diff": diff, "runs": runs},
    )


def _largest_difference(a: Any, b: Any) -> float:
    largest = 0.0
    for row in a.rows:
        other = b.find(
            model=row["model"], dataset=row["dataset"], method=row["method"], seed=row["seed"], config=row["config"]
        )
        p, q = a.predictions(row), b.predictions(other) if other else None
        if p is None or q is None:
            return float("inf")
        largest = max(largest, float(np.abs(p - q).max()))
    return largest


# -------------------------------------------------------------------- 6. a tuning study


def tuning(models: Models, data: Path, sizes: Sizes, tmp: Path) -> Row:
    """Seconds per trial of a CalibPrompt study, and the share of it outside the training steps
    (Optuna, validation scoring, storage I/O), one trial at a time and ``--batch-trials``."""
    import calbench.batched
    import calbench.calibprompt
    from calbench.methods import make_method
    from calbench.session import FewShot, RunContext, Session
    from calbench.tune import TuneConfig, search
    from calbench.tune.worker import Worker

    name = models.name("b32")
    context = RunContext(device=str(models.device), cache_dir=tmp / "cache")
    Session(name, str(data), context).fit_data(1, FewShot(), make_method("calibprompt", epochs=sizes.trial_epochs))
    clock = {"train": 0.0, "trials": 0.0}
    real_train, real_run = calbench.calibprompt.train_together, Worker.run_trials

    def timed_train(runs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real_train(runs)
        finally:
            clock["train"] += time.perf_counter() - start if clock.get("inside") else 0.0

    def timed_trials(self: Any, trials: Any) -> Any:
        clock["inside"], start = True, time.perf_counter()
        try:
            return real_run(self, trials)
        finally:
            clock["inside"] = False
            clock["trials"] += time.perf_counter() - start

    results = {}
    calbench.calibprompt.train_together = calbench.batched.train_together = timed_train
    Worker.run_trials = timed_trials
    try:
        with peak_memory() as peak:
            for batch in (1, sizes.batch_trials):
                clock.update(train=0.0, trials=0.0)
                config = TuneConfig(
                    "calibprompt", [(name, str(data))], epochs=sizes.trial_epochs, pruner="none", batch_trials=batch
                )
                start = time.perf_counter()
                search(config, sizes.trials, f"bench-{batch}", f"journal:{tmp / f'study-{batch}.log'}", context, 10, 0)
                total = time.perf_counter() - start
                results[batch] = (clock["trials"] / sizes.trials, 1 - clock["train"] / clock["trials"], total)
    finally:
        calbench.calibprompt.train_together = calbench.batched.train_together = real_train
        Worker.run_trials = real_run
    (one, outside, _), (together, _, _) = results[1], results[sizes.batch_trials]
    return Row(
        f"tuning: {sizes.trials} trials of {sizes.trial_epochs} epoch(s)",
        f"{one:.1f} s/trial, {outside:.0%} outside training",
        f"{together:.1f} s/trial with --batch-trials {sizes.batch_trials}",
        one / together,
        "",
        None,
        peak,
        f"{models.label('b32')}; outside training: Optuna, validation scoring, storage I/O (share of the trial time)",
        {str(k): v for k, v in results.items()},
    )


# -------------------------------------------------------------------- section 3: bf16, torch.compile


def bf16(models: Models, kind: str, data: Path, sizes: Sizes, tmp: Path) -> Row:
    """The frozen towers in bf16 (weights and activations; AMX on CPUs that have it) against fp32: image
    encoding, a 10-run text step, and how far a CalibPrompt run's test accuracy and ECE move."""
    from calbench.prompts import PromptLearner, text_features_together

    vlm = models.get(kind)
    low = copy.deepcopy(vlm)
    low.model = low.model.to(torch.bfloat16)
    pixels = torch.randn(16, 3, vlm.preprocess.size, vlm.preprocess.size, device=vlm.device)

    def encode(backend: Any, dtype: torch.dtype) -> None:
        with torch.inference_mode():
            backend.model.encode_image(pixels.to(dtype))

    def step(backend: Any) -> None:
        learners = [PromptLearner(backend, CLASSES, n_ctx=16, seed=s) for s in range(sizes.runs_in_pass)]
        sum(t.sum() for t in text_features_together(learners)).backward()

    with peak_memory() as peak:
        image = median_seconds(lambda: encode(vlm, torch.float32), sizes.repeats)
        image_low = median_seconds(lambda: encode(low, torch.bfloat16), sizes.repeats)
        text = median_seconds(lambda: step(vlm), sizes.repeats)
        text_low = median_seconds(lambda: step(low), sizes.repeats)
        drift = _bf16_drift(vlm, low, data, sizes, tmp)
    ok = drift["accuracy"] <= 0.01 and drift["ece"] <= 0.01
    return Row(
        f"bf16 frozen towers, {models.label(kind)}",
        f"images {image / image_low:.1f}x, text step {text / text_low:.1f}x faster",
        "fp32",
        image / image_low,
        "accuracy and ECE within 1 point of fp32",
        ok,
        peak,
        f"16 images; text: {sizes.runs_in_pass} runs x 9 prompts; a CalibPrompt run moved test accuracy by "
        f"{100 * drift['accuracy']:.2f} and ECE by {100 * drift['ece']:.2f} points (random weights)",
        {"image_s": image, "image_bf16_s": image_low, "text_s": text, "text_bf16_s": text_low, **drift},
    )


def _bf16_drift(vlm: Any, low: Any, data: Path, sizes: Sizes, tmp: Path) -> dict[str, float]:
    """|accuracy| and |ECE| differences of one CalibPrompt run trained and scored with fp32 and bf16 towers
    (eval-view features, so both see the same images)."""
    from calbench.base import FitData
    from calbench.data import load_dataset
    from calbench.data.transforms import eval_transform
    from calbench.methods import make_method
    from calbench.metrics import ece

    dataset = load_dataset(str(data), tmp / "data-cache")
    scores = {}
    for label, backend, dtype in (("fp32", vlm, torch.float32), ("bf16", low, torch.bfloat16)):
        feats = {}
        for split in ("train", "test"):
            images = [
                eval_transform(dataset.load_image(split, i), vlm.preprocess) for i in range(len(dataset.files(split)))
            ]
            with torch.inference_mode():
                out = torch.cat([backend.model.encode_image(p.to(dtype)) for p in torch.stack(images).split(64)])
            feats[split] = F.normalize(out.float(), dim=-1).clone()
        labels = {s: torch.as_tensor(dataset.labels(s)) for s in ("train", "test")}
        fit = FitData(
            backend,
            dataset.classnames,
            "a photo of {}.",
            feats["train"][None],
            labels["train"],
            feats["train"],
            labels["train"],
            1,
        )
        method = make_method("calibprompt", epochs=sizes.run_epochs).fit(fit)
        with torch.no_grad():
            probs = method.predict_proba(feats["test"]).double().numpy()
        y = labels["test"].numpy()
        scores[label] = (float((probs.argmax(1) == y).mean()), ece(probs, y))
    return {
        "accuracy": abs(scores["fp32"][0] - scores["bf16"][0]),
        "ece": abs(scores["fp32"][1] - scores["bf16"][1]),
    }


def compiled(models: Models, kind: str, sizes: Sizes) -> Row:
    """torch.compile of a learner's text features (the path training takes: the shared prompt start where
    the tower allows it): its compile time against the time it saves per training step."""
    from calbench.prompts import PromptLearner

    vlm = models.get(kind)
    learner = PromptLearner(vlm, CLASSES, n_ctx=16, seed=0)
    eager = learner.text_features
    faster = torch.compile(eager)

    def step(fn: Any) -> None:
        fn().sum().backward()

    with peak_memory() as peak:
        start = time.perf_counter()
        step(faster)
        compile_s = time.perf_counter() - start
        t_eager = median_seconds(lambda: step(eager), sizes.repeats)
        t_compiled = median_seconds(lambda: step(faster), sizes.repeats)
    saved = t_eager - t_compiled
    even = f"pays off after {compile_s / saved:.0f} steps (one run: 200)" if saved > 0 else "never pays off"
    return Row(
        f"torch.compile text tower, {models.label(kind)}",
        f"{t_compiled * 1e3:.0f} ms/step compiled",
        f"{t_eager * 1e3:.0f} ms/step eager",
        t_eager / t_compiled,
        "",
        None,
        peak,
        f"{'shared prompt start; ' if learner.shared_len else ''}compiling takes {compile_s:.0f} s and {even}; "
        "every new batch shape (runs leaving a shared pass) compiles again",
        {"compile_s": compile_s, "eager_s": t_eager, "compiled_s": t_compiled},
    )
