"""Feature cache: the frozen image encoder runs once per image and view, ever.

One safetensors file per (model fingerprint, dataset split fingerprint, split,
transform, view) holds the features of the images encoded so far and their
indices in the split; asking for more images encodes only the missing ones and
rewrites the file atomically (temp file + rename) after every chunk of views, so a
killed run resumes where its last chunk ended. A corrupt file is rebuilt with a
warning; a changed model, file set or transform gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file
from torch import Tensor

from calbench.atomic import save_safetensors_atomic
from calbench.data.folder import ImageFolderDataset
from calbench.data.transforms import describe, to_tensor
from calbench.errors import warn
from calbench.models.base import VLMBackend


def default_cache_dir() -> Path:
    """``$CALBENCH_CACHE`` if set, else the user cache directory (e.g. ~/.cache/calbench)."""
    env = os.environ.get("CALBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("calbench"))


#: views encoded between saves of a split's cache files: a kill loses at most this many
#: (seconds of GPU time), and at most this many new features wait in memory unsaved
CHUNK_VIEWS = 1000
#: ... or this many seconds of encoding, whichever comes first (a CPU encodes 1000 views slowly)
CHUNK_SECONDS = 60.0


@dataclass
class CacheStats:
    encoded: int = 0
    loaded: int = 0


@dataclass
class _ViewFile:
    """One cache file (one view of one split): the rows it holds, and encoded rows not yet saved."""

    path: Path
    meta: dict[str, str]
    features: Tensor
    indices: Tensor
    new_features: list[Tensor] = field(default_factory=list)
    new_indices: list[Tensor] = field(default_factory=list)

    def add(self, indices: list[int], features: Tensor) -> None:
        self.new_indices.append(torch.tensor(indices, dtype=torch.int64))
        self.new_features.append(features)

    def save(self) -> None:
        """Rewrite the file with every row so far, atomically: a kill leaves the previous save."""
        if not self.new_indices:
            return
        self.features = torch.cat([self.features, *self.new_features])
        self.indices = torch.cat([self.indices, *self.new_indices])
        self.new_features, self.new_indices = [], []
        save_safetensors_atomic(self.path, {"features": self.features, "indices": self.indices}, self.meta)

    def rows(self, wanted: np.ndarray) -> Tensor:
        position = {int(i): row for row, i in enumerate(self.indices.tolist())}
        return self.features[[position[int(i)] for i in wanted]]


class FeatureCache:
    """Image features of one frozen model, keyed so that nothing stale is ever reused.

    New features are saved every ``chunk_size`` views or ``chunk_seconds`` seconds of encoding,
    whichever comes first, so an interrupted run keeps all but the last chunk's work.
    """

    def __init__(
        self,
        root: Path,
        vlm: VLMBackend,
        batch_size: int = 64,
        progress: bool = True,
        chunk_size: int = CHUNK_VIEWS,
        chunk_seconds: float = CHUNK_SECONDS,
    ) -> None:
        if chunk_size < 1 or batch_size < 1:
            raise ValueError(f"chunk_size and batch_size must be at least 1, got {chunk_size} and {batch_size}")
        self.root = Path(root) / "features"
        self.vlm = vlm
        self.batch_size = batch_size
        self.progress = progress
        self.chunk_size = chunk_size
        self.chunk_seconds = chunk_seconds
        self.stats = CacheStats()

    def _key(self, dataset: ImageFolderDataset, split: str, kind: str, view: int) -> tuple[Path, dict[str, str]]:
        meta = {
            "model": self.vlm.fingerprint,
            "dataset": f"{dataset.name}:{dataset.fingerprint(split)}",
            "split": split,
            "transform": describe(kind, self.vlm.preprocess),
            "view": str(view),
            # CUDA encodes under fp16 autocast, the CPU in fp32: different numbers, different keys
            "precision": "fp16-autocast" if self.vlm.device.type == "cuda" else "fp32",
        }
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        return self.root / f"{dataset.name}-{split}-{kind}{view}-{digest}.safetensors", meta

    def _read(self, path: Path) -> tuple[Tensor, Tensor]:
        empty = (torch.zeros(0, self.vlm.embed_dim), torch.zeros(0, dtype=torch.int64))
        if not path.is_file():
            return empty
        try:
            stored = load_file(str(path))
            features, indices = stored["features"], stored["indices"]
            if features.shape[0] != indices.shape[0] or features.shape[1] != self.vlm.embed_dim:
                raise ValueError("inconsistent shapes")
            return features, indices
        except Exception as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            warn(f"feature cache file {path} is unreadable ({reason}); rebuilding it", stacklevel=2)
            return empty

    def features(
        self,
        dataset: ImageFolderDataset,
        split: str,
        indices: Sequence[int],
        kind: str = "eval",
        views: Sequence[int] = (0,),
    ) -> Tensor:
        """Features (len(views), len(indices), D) of images ``indices`` of ``split``, on CPU.

        ``kind`` is "eval" (deterministic preprocessing) or "train" (seeded augmentation,
        one view per index in ``views``). Each image is decoded once for all its missing views.
        """
        wanted = np.asarray(indices, dtype=np.int64)
        files: dict[int, _ViewFile] = {}
        jobs: dict[int, list[int]] = {}  # image index -> views to encode
        for view in dict.fromkeys(views):
            path, meta = self._key(dataset, split, kind, view)
            features, stored = self._read(path)
            missing = np.setdiff1d(wanted, stored.numpy())
            for index in missing.tolist():
                jobs.setdefault(index, []).append(view)
            files[view] = _ViewFile(path, meta, features, stored)
            self.stats.loaded += len(wanted) - len(missing)
        if jobs:
            self._encode(dataset, split, kind, jobs, files)
        return torch.stack([files[view].rows(wanted) for view in views])

    def _encode(
        self,
        dataset: ImageFolderDataset,
        split: str,
        kind: str,
        jobs: dict[int, list[int]],
        files: dict[int, _ViewFile],
    ) -> None:
        """Encode the missing (image, view) pairs into ``files``, saving them chunk by chunk."""
        device = self.vlm.device
        autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
        pending = [(index, view) for index in sorted(jobs) for view in jobs[index]]
        progress = Progress(
            TextColumn(f"encoding {dataset.name}/{split} ({kind})"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
            disable=not self.progress,
        )
        image: list[Any] = [-1, None]  # the last decoded image: its views are consecutive in ``pending``
        with progress, torch.inference_mode(), autocast:
            task = progress.add_task("encode", total=len(pending))
            saved = time.monotonic()
            for chunk_start in range(0, len(pending), self.chunk_size):
                chunk = pending[chunk_start : chunk_start + self.chunk_size]
                for start in range(0, len(chunk), self.batch_size):
                    batch = chunk[start : start + self.batch_size]
                    self._encode_batch(dataset, split, kind, batch, files, image)
                    progress.advance(task, len(batch))
                    if time.monotonic() - saved >= self.chunk_seconds:
                        self._save(files)
                        saved = time.monotonic()
                self._save(files)
                saved = time.monotonic()

    def _encode_batch(
        self,
        dataset: ImageFolderDataset,
        split: str,
        kind: str,
        batch: list[tuple[int, int]],
        files: dict[int, _ViewFile],
        image: list[Any],
    ) -> None:
        pixels = []
        for index, view in batch:
            if image[0] != index:
                image[:] = [index, dataset.load_image(split, index)]
            pixels.append(to_tensor(image[1], kind, self.vlm.preprocess, view, index))
        features = self.vlm.encode_images(torch.stack(pixels).to(self.vlm.device)).float().cpu()
        for view in dict.fromkeys(v for _, v in batch):
            rows = [row for row, (_, v) in enumerate(batch) if v == view]
            files[view].add([batch[row][0] for row in rows], features[rows])
        self.stats.encoded += len(batch)

    @staticmethod
    def _save(files: dict[int, _ViewFile]) -> None:
        for file in files.values():
            file.save()
