"""Feature cache: the frozen image encoder runs once per image and view, ever.

One safetensors file per (model fingerprint, dataset split fingerprint, split,
transform, view, and for training views the run seed) holds the features of the images
encoded so far and their indices in the split; asking for more images encodes only the
missing ones. New rows are saved atomically in chunk files as they are encoded, so a
killed run resumes where its last chunk ended, and folded into the main file once the split
is done. A corrupt file is rebuilt with a warning; a changed model, file set or transform
gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load
from torch import Tensor

from calbench.atomic import save_safetensors_atomic
from calbench.data.folder import ImageFolderDataset
from calbench.data.pixels import default_workers, view_batches
from calbench.data.transforms import describe, uses_run_seed
from calbench.errors import check_memory, warn
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
#: a fold marker older than this was left by a killed process (folding takes seconds; calbench's
#: choice, with a wide margin for a slow network file system)
STALE_FOLD_SECONDS = 600.0


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

    def compact(self, read: Callable[[Path], tuple[list[tuple[Tensor, Tensor]], list[Path]]]) -> None:
        """Fold the chunk files into the main file (written atomically before they are removed).

        Processes on several nodes may share the cache and fold one key at once. One at a time
        folds (an exclusive marker file, created with O_EXCL, which network file systems honour):
        it re-reads the main file and every chunk file on disk (``read``), writes their rows and its
        own, and only then removes the chunks it read. A process that finds the marker leaves its
        chunks for the next read to merge, so no process's rows are ever overwritten or lost.
        """
        if not self.parts:
            return
        marker = self.path.with_name(f"{self.path.name}.folding")
        try:
            if marker.is_file() and time.time() - marker.stat().st_mtime > STALE_FOLD_SECONDS:
                marker.unlink(missing_ok=True)  # left by a process killed while folding
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except (FileExistsError, FileNotFoundError):
            return
        try:
            on_disk, parts = read(self.path)
            blocks = [*on_disk, *self.blocks]
            indices, features = torch.cat([i for i, _ in blocks]), torch.cat([f for _, f in blocks])
            first = np.unique(indices.numpy(), return_index=True)[1]  # each image once: the rows on disk first
            indices, features = indices[first], features[first]
            save_safetensors_atomic(self.path, {"features": features, "indices": indices}, self.meta)
            for part in {*parts, *self.parts}:
                part.unlink(missing_ok=True)
            self.blocks, self.parts = [(indices, features)], []
        finally:
            marker.unlink(missing_ok=True)

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
        workers: Optional[int] = None,
    ) -> None:
        if chunk_size < 1 or batch_size < 1:
            raise ValueError(f"chunk_size and batch_size must be at least 1, got {chunk_size} and {batch_size}")
        self.root = Path(root) / "features"
        self.vlm = vlm
        self.batch_size = batch_size
        self.progress = progress
        self.chunk_size = chunk_size
        self.chunk_seconds = chunk_seconds
        #: processes decoding images for the encoder (default: none on a CPU, several on CUDA)
        self.workers = default_workers(vlm.device) if workers is None else workers
        self.stats = CacheStats()

    def key(
        self, dataset: ImageFolderDataset, split: str, kind: str, view: int, seed: Optional[int]
    ) -> tuple[Path, dict[str, str]]:
        """The file holding one view of a split under a transform kind, and the metadata that keys it: any change
        of model, dataset files, transform, precision or run seed is another file, so nothing stale is reused."""
        meta = {
            "model": self.vlm.fingerprint,
            "dataset": f"{dataset.name}:{dataset.fingerprint(split)}",
            "split": split,
            "transform": describe(kind, self.vlm.preprocess),
            "view": str(view),
            # CUDA encodes under fp16 autocast, the CPU in fp32: different numbers, different keys
            "precision": "fp16-autocast" if self.vlm.device.type == "cuda" else "fp32",
        }
        run = ""
        if seed is not None:  # training views are drawn per run seed; every other kind is the same for all runs
            meta["seed"] = str(seed)
            run = f"-seed{seed}"
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        return self.root / f"{dataset.name}-{split}-{kind}{view}{run}-{digest}.safetensors", meta

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
            # One read of the whole file, then parsed: safetensors' load_file parses the header from one
            # open of the path and maps the tensor data from a second, so a file another process replaces
            # in between yields the new file's bytes at the old offsets (indices such as 0x2020202020202020,
            # the new header's padding); the cache's files are replaced while other processes read them.
            stored = load(file.read_bytes())
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
        seed: Optional[int] = None,
    ) -> Tensor:
        """Features (len(views), len(indices), D) of images ``indices`` of ``split``, on CPU.

        ``kind`` is a transform kind of :mod:`calbench.data.transforms`: "eval" (deterministic
        preprocessing), "train" (seeded augmentation) or a noise kind, one view per index in
        ``views``. ``seed`` is the run seed, given exactly for the kinds that draw training views
        per run (:func:`~calbench.data.transforms.uses_run_seed`). Each image is decoded once for
        all its missing views.
        """
        if uses_run_seed(kind) != (seed is not None):
            need = "needs the run seed" if seed is None else "is the same for every run; pass no seed"
            raise ValueError(f"transform kind {kind!r} {need}")
        wanted = np.asarray(indices, dtype=np.int64)
        views = list(views)
        check_memory(  # the stacked result and the views' files it is read from
            2 * len(views) * len(wanted) * self.vlm.embed_dim * 4,
            f"{len(views)} view(s) of {len(wanted)} {split} image(s)",
            "pass fewer --views (epoch e reads view e mod --views) or train fewer epochs",
        )
        files: dict[int, _ViewFile] = {}
        jobs: dict[int, list[int]] = {}  # image index -> views to encode
        for view in dict.fromkeys(views):
            path, meta = self.key(dataset, split, kind, view, seed)
            files[view] = _ViewFile(path, meta, *self._read(path))
            missing = np.setdiff1d(wanted, files[view].stored())
            for index in missing.tolist():
                jobs.setdefault(index, []).append(view)
            self.stats.loaded += len(wanted) - len(missing)
        if jobs:
            self._encode(dataset, split, kind, seed, jobs, files)
        for file in files.values():
            file.compact(self._read)
        return torch.stack([files[view].rows(wanted) for view in views])

    def _encode(
        self,
        dataset: ImageFolderDataset,
        split: str,
        kind: str,
        seed: Optional[int],
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
        with progress, torch.inference_mode(), autocast:
            task = progress.add_task("encode", total=len(pending))
            saved = time.monotonic()
            for chunk_start in range(0, len(pending), self.chunk_size):
                chunk = pending[chunk_start : chunk_start + self.chunk_size]
                args = (dataset, split, kind, self.vlm.preprocess, seed, chunk, self.batch_size, self.workers)
                for batch, pixels in view_batches(*args, pin=device.type == "cuda"):  # decoded in workers on CUDA
                    self._encode_batch(batch, pixels, files)
                    progress.advance(task, len(batch))
                    if time.monotonic() - saved >= self.chunk_seconds:
                        self._save(files)
                        saved = time.monotonic()
                self._save(files)
                saved = time.monotonic()

    def _encode_batch(self, batch: list[tuple[int, int]], pixels: Tensor, files: dict[int, _ViewFile]) -> None:
        features = self.vlm.encode_images(pixels.to(self.vlm.device, non_blocking=True)).float().cpu()
        for view in dict.fromkeys(v for _, v in batch):
            rows = [row for row, (_, v) in enumerate(batch) if v == view]
            files[view].add([batch[row][0] for row in rows], features[rows])
        self.stats.encoded += len(batch)

    @staticmethod
    def _save(files: dict[int, _ViewFile]) -> None:
        for file in files.values():
            file.save_chunk()
