"""What every benchmark row shares: models with random weights at their published sizes (built offline
from calbench's shipped architecture configs), a generated dataset in calbench's folder layout, timing
as medians of repetitions, and peak memory."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

#: Kather-2016/NCT-CRC-HE-like tissue classes: the class names set the prompts' token lengths
CLASSES = [
    "adipose tissue",
    "background",
    "debris",
    "lymphocytes",
    "mucus",
    "smooth muscle",
    "normal colon mucosa",
    "cancer-associated stroma",
    "colorectal adenocarcinoma epithelium",
]


@dataclass(frozen=True)
class Sizes:
    """How much work each row does: ``full`` is the run quoted in benchmarks/README.md, ``quick`` a smoke run."""

    name: str
    repeats: int  # repetitions per measurement (the median is reported)
    full_models: bool  # published sizes (ViT-B/32, ViT-B/16, 12-layer text towers); else 2-layer stand-ins
    cache_images: int  # images encoded by the cache-build row
    run_epochs: int  # epochs timed by the one-run row (the table extrapolates to 50)
    grid_epochs: int  # epochs of each run in the grid row
    grid_seeds: tuple[int, ...]
    trials: int  # trials of the tuning row
    trial_epochs: int
    batch_trials: int
    runs_in_pass: int  # R of the text-pass row (R x 9 prompts in one pass)
    #: methods of the grid row (default: compare's default grid)
    grid_methods: tuple[str, ...] = ()


#: the pair the grid is set against: Kather et al. 2019 (NCT-CRC-HE-100K: 100,000 train tiles, CRC-VAL-HE-7K:
#: 7,180 test tiles, 9 classes)
KATHER_IMAGES = 100_000 + 7_180
FULL = Sizes("full", 3, True, 64, 5, 5, (1, 2, 3), 6, 5, 3, 10)
QUICK = Sizes("quick", 1, False, 16, 1, 1, (1, 2), 3, 1, 3, 4)
#: benchmarks/gpu.sh: a whole 50-epoch run, a grid of 10 runs (5 prompt methods x 2 seeds), a 20-trial search
GPU = Sizes(
    "gpu",
    3,
    True,
    2048,
    50,
    50,
    (1, 2),
    20,
    50,
    10,
    10,
    ("coop-ce", "coop-ls", "coop-mbls", "coop-focal", "calibprompt"),
)
SIZES = {s.name: s for s in (FULL, QUICK, GPU)}


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one untimed call (caches, allocator, threads)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process's peak so far
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Peak:
    rss: int = 0
    cuda: Optional[int] = None

    def describe(self) -> str:
        text = f"{self.rss / 2**30:.2f} GiB RSS"
        return text if self.cuda is None else f"{text}, {self.cuda / 2**30:.2f} GiB CUDA"


@contextmanager
def peak_memory() -> Iterator[Peak]:
    """The peak resident set size while the block runs (sampled every 20 ms), and the CUDA peak where present."""
    peak, stop = Peak(_rss_bytes()), threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak.rss = max(peak.rss, _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak.rss = max(peak.rss, _rss_bytes())
        if torch.cuda.is_available():
            peak.cuda = torch.cuda.max_memory_allocated()


# ------------------------------------------------------------------------------------------- models


def clip_model(config: str, device: torch.device, full: bool = True) -> Any:
    """A CLIP-style model (open_clip ViT + causal 77-token text tower) with random weights from seed 0:
    ``clip-b32`` / ``clip-b16`` at their published sizes, or the 2-layer ``tiny-random`` stand-in."""
    from calbench.models.open_clip_backend import OpenClipBackend, shipped_config

    cfg = shipped_config(config if full else "tiny-random")
    model_cfg = dict(cfg.get("model_cfg", cfg))
    model_cfg.pop("preprocess_cfg", None)
    preprocess = cfg.get("preprocess_cfg", {})
    return OpenClipBackend.from_config(f"bench-{config}", dict(model_cfg, preprocess_cfg=preprocess), device)


def bert_model(device: torch.device, folder: Path, full: bool = True) -> Any:
    """A BiomedCLIP-style model (timm ViT-B/16 + PubMedBERT text tower, 256-token context, [CLS]
    pooling) with random weights, from calbench's shipped configs; the stand-in shrinks both towers
    to 2 layers. ``folder`` receives the WordPiece vocabulary (whole words of the prompts)."""
    from transformers import BertTokenizerFast

    from calbench.models.open_clip_backend import OpenClipBertBackend, shipped_config

    cfg = shipped_config("biomedclip")
    model_cfg = json.loads(json.dumps(cfg["model_cfg"]))
    text_cfg = model_cfg["text_cfg"]
    bert = shipped_config("biomedbert")
    if not full:
        bert.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        model_cfg["vision_cfg"] = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(bert))
    words = sorted({w for c in CLASSES for w in c.replace("-", " - ").split()} | {"x", ".", "a", "photo", "of"})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    text_cfg.update(hf_model_name=str(folder), hf_model_pretrained=False)
    text_cfg.pop("hf_tokenizer_name", None)
    if "timm_model_name" in model_cfg["vision_cfg"]:
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False
    tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    config = dict(model_cfg, preprocess_cfg=cfg.get("preprocess_cfg", {}) if full else {"size": 32})
    return OpenClipBertBackend.from_config(
        "bench-biomedclip", config, device, tokenizer=tokenizer, context_length=int(text_cfg["context_length"])
    )


@dataclass
class Models:
    """The benchmark's models, built once and registered under ``bench-*`` names so that sessions,
    `compare` and `tune` load the very same objects."""

    device: torch.device
    full: bool
    folder: Path
    built: dict[str, Any] = field(default_factory=dict)

    LABELS = {
        "b32": "ViT-B/32 + CLIP text (12x512)",
        "b16": "ViT-B/16 + CLIP text (12x512)",
        "bert": "ViT-B/16 + PubMedBERT text (12x768)",
    }

    def get(self, kind: str) -> Any:
        if kind not in self.built:
            if kind == "bert":
                self.built[kind] = bert_model(self.device, self.folder / "bert", self.full)
            else:
                self.built[kind] = clip_model({"b32": "clip-b32", "b16": "clip-b16"}[kind], self.device, self.full)
            self._register(kind)
            assert self.built[kind].fingerprint  # hashes every weight once: kept out of the timings
        return self.built[kind]

    def name(self, kind: str) -> str:
        self.get(kind)
        return f"bench-{kind}"

    def label(self, kind: str) -> str:
        return self.LABELS[kind] if self.full else f"{self.LABELS[kind].split(' (')[0]} (2-layer stand-in)"

    def _register(self, kind: str) -> None:
        from calbench.models import MODELS, ModelSpec

        name, vlm = f"bench-{kind}", self.built[kind]
        if name not in MODELS:
            MODELS.add(
                name,
                ModelSpec(
                    name,
                    "benchmark",
                    "random weights",
                    "-",
                    "histopathology",
                    224,
                    "benchmark model",
                    build=lambda path, device, kind=kind: self.built[kind],
                ),
            )
        vlm.name = name


# ------------------------------------------------------------------------------------------- data


def write_dataset(root: Path, train_per_class: int, test_per_class: int, size: int = 224) -> Path:
    """Generated 224 x 224 PNG tiles (smooth colour fields plus texture, so they decode like real tiles)
    in calbench's folder layout, 9 classes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c in range(len(CLASSES)):
            folder = root / "images" / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                coarse = rng.random((8, 8, 3)) * 160 + 40 + 10 * c
                image = np.kron(coarse, np.ones((size // 8, size // 8, 1))) + rng.normal(0, 12, (size, size, 3))
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    (root / "classnames.txt").write_text("".join(f"class{c} {name}\n" for c, name in enumerate(CLASSES)))
    return root


@contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="calbench-bench-") as tmp:
        yield Path(tmp)
