"""Feature cache: the frozen image encoder runs once per image and view, ever.

One safetensors file per (model fingerprint, dataset split fingerprint, split,
transform, view) holds the features of the images encoded so far and their
indices in the split; asking for more images encodes only the missing ones and
rewrites the file atomically (temp file + rename). A corrupt file is rebuilt
with a warning; a changed model, file set or transform gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file
from torch import Tensor

from calbench.atomic import save_safetensors_atomic
from calbench.data.folder import ImageFolderDataset
from calbench.data.transforms import describe, to_tensor
from calbench.models.base import VLMBackend


def default_cache_dir() -> Path:
    """``$CALBENCH_CACHE`` if set, else the user cache directory (e.g. ~/.cache/calbench)."""
    env = os.environ.get("CALBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("calbench"))


@dataclass
class CacheStats:
    encoded: int = 0
    loaded: int = 0


class FeatureCache:
    """Image features of one frozen model, keyed so that nothing stale is ever reused."""

    def __init__(self, root: Path, vlm: VLMBackend, batch_size: int = 64, progress: bool = True) -> None:
        self.root = Path(root) / "features"
        self.vlm = vlm
        self.batch_size = batch_size
        self.progress = progress
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
            warnings.warn(f"feature cache file {path} is unreadable ({exc}); rebuilding it", stacklevel=2)
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
        entries = []
        jobs: dict[int, list[int]] = {}  # image index -> views to encode
        for view in views:
            path, meta = self._key(dataset, split, kind, view)
            features, stored = self._read(path)
            missing = np.setdiff1d(wanted, stored.numpy())
            for index in missing.tolist():
                jobs.setdefault(index, []).append(view)
            entries.append((view, path, meta, features, stored))
            self.stats.loaded += len(wanted) - len(missing)

        new = self._encode(dataset, split, kind, jobs) if jobs else {}
        out = []
        for view, path, meta, features, stored in entries:
            added = sorted(i for i, v in new if v == view)
            if added:
                features = torch.cat([features, torch.stack([new[(i, view)] for i in added])])
                stored = torch.cat([stored, torch.tensor(added, dtype=torch.int64)])
                save_safetensors_atomic(path, {"features": features, "indices": stored}, meta)
            position = {int(i): row for row, i in enumerate(stored.tolist())}
            out.append(features[[position[int(i)] for i in wanted]])
        return torch.stack(out)

    def _encode(
        self, dataset: ImageFolderDataset, split: str, kind: str, jobs: dict[int, list[int]]
    ) -> dict[tuple[int, int], Tensor]:
        device = self.vlm.device
        autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
        pending = [(index, view) for index in sorted(jobs) for view in jobs[index]]
        result: dict[tuple[int, int], Tensor] = {}
        progress = Progress(
            TextColumn(f"encoding {dataset.name}/{split} ({kind})"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
            disable=not self.progress,
        )
        with progress, torch.inference_mode(), autocast:
            task = progress.add_task("encode", total=len(pending))
            image_cache: tuple[int, object] = (-1, None)
            for start in range(0, len(pending), self.batch_size):
                batch = pending[start : start + self.batch_size]
                pixels = []
                for index, view in batch:
                    if image_cache[0] != index:
                        image_cache = (index, dataset.load_image(split, index))
                    pixels.append(to_tensor(image_cache[1], kind, self.vlm.preprocess, view, index))
                features = self.vlm.encode_images(torch.stack(pixels).to(device)).float().cpu()
                for key, row in zip(batch, features):
                    result[key] = row.clone()
                progress.advance(task, len(batch))
        self.stats.encoded += len(pending)
        return result
