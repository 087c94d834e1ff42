"""Feature cache: the frozen image encoder runs once per image and view, ever.

One safetensors file per (model fingerprint, dataset split fingerprint, split,
transform, view) holds the features of the images encoded so far and their
indices in the split; asking for more images encodes only the missing ones. New rows
are saved atomically in chunk files as they are encoded, so a killed run resumes where
its last chunk ended, and folded into the main file once the split is done. A corrupt
file is rebuilt with a warning; a changed model, file set or transform gives a new key.
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
    """One cache file (one view of one split) and its chunk files.

    Each chunk of new rows is written once, to a chunk file beside the main file; when the
    split is encoded the chunks are folded into the main file and removed. So every row is
    written twice at most, however large the split, and a kill leaves the chunks saved so far,
    which the next read merges.
    """

    path: Path
    meta: dict[str, str]
    blocks: list[tuple[Tensor, Tensor]]  # (indices, features) held in memory, saved ones first
    parts: list[Path] = field(default_factory=list)  # chunk files not yet folded into ``path``
    unsaved: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def add(self, indices: list[int], features: Tensor) -> None:
        self.unsaved.append((torch.tensor(indices, dtype=torch.int64), features))

    def save_chunk(self) -> None:
        """Write the rows encoded since the last save as one chunk file, atomically."""
        if not self.unsaved:
            return
        indices, features = torch.cat([i for i, _ in self.unsaved]), torch.cat([f for _, f in self.unsaved])
        part = self.path.with_name(f"{self.path.stem}.part-{os.getpid()}-{time.time_ns()}{self.path.suffix}")
        save_safetensors_atomic(part, {"features": features, "indices": indices}, self.meta)
        self.parts.append(part)
        self.blocks.append((indices, features))
        self.unsaved = []

    def compact(self) -> None:
        """Fold the chunk files into the main file (written atomically before they are removed)."""
        if not self.parts:
            return
        indices, features = torch.cat([i for i, _ in self.blocks]), torch.cat([f for _, f in self.blocks])
        save_safetensors_atomic(self.path, {"features": features, "indices": indices}, self.meta)
        for part in self.parts:
            part.unlink(missing_ok=True)
        self.blocks, self.parts = [(indices, features)], []

    def stored(self) -> np.ndarray:
        return torch.cat([i for i, _ in self.blocks]).numpy()

    def rows(self, wanted: np.ndarray) -> Tensor:
        indices, features = torch.cat([i for i, _ in self.blocks]), torch.cat([f for _, f in self.blocks])
        position = {int(i): row for row, i in enumerate(indices.tolist())}
        return features[[position[int(i)] for i in wanted]]


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

    def _read(self, path: Path) -> tuple[list[tuple[Tensor, Tensor]], list[Path]]:
        """The main file's rows and those of any chunk files beside it (a run killed before folding
        them in), each image once; unreadable files are warned about and left out."""
        parts = sorted(path.parent.glob(f"{path.stem}.part-*{path.suffix}"))
        blocks, seen = [], np.zeros(0, dtype=np.int64)
        for file in [path, *parts]:
            if not file.is_file():
                continue
            indices, features = self._load(file)
            keep = ~np.isin(indices.numpy(), seen)  # a kill between folding and removing repeats rows
            if keep.any():
                blocks.append((indices[keep], features[keep]))
                seen = np.concatenate([seen, indices.numpy()[keep]])
        empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, self.vlm.embed_dim))
        return blocks or [empty], [p for p in parts if p.is_file()]

    def _load(self, file: Path) -> tuple[Tensor, Tensor]:
        try:
            stored = load_file(str(file))
            features, indices = stored["features"], stored["indices"]
            if features.shape[0] != indices.shape[0] or features.shape[1] != self.vlm.embed_dim:
                raise ValueError("inconsistent shapes")
            return indices, features
        except Exception as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            warn(f"feature cache file {file} is unreadable ({reason}); rebuilding it", stacklevel=3)
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, self.vlm.embed_dim)

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
            files[view] = _ViewFile(path, meta, *self._read(path))
            missing = np.setdiff1d(wanted, files[view].stored())
            for index in missing.tolist():
                jobs.setdefault(index, []).append(view)
            self.stats.loaded += len(wanted) - len(missing)
        if jobs:
            self._encode(dataset, split, kind, jobs, files)
        for file in files.values():
            file.compact()
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
            file.save_chunk()
