"""Image views decoded and preprocessed for the encoder, batch by batch, in worker processes where it pays.

On a GPU the encoder outruns one CPU core decoding PNG/JPEG and cropping by an order of
magnitude, so a feature-cache build would run at the decoder's pace: there, batches are prepared
by DataLoader workers into pinned memory while the GPU encodes the previous ones. On a CPU the
encoder already keeps every core busy and decoding is a small share of a build
(``python -m benchmarks``, cache-build row), so batches are prepared in the process itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from calbench.data.folder import ImageFolderDataset
from calbench.data.transforms import to_tensor
from calbench.models.base import PreprocessConfig

#: DataLoader workers decoding for a CUDA encoder (calbench's choice: a few cores feed one GPU at
#: ViT-B speed; more add start-up time and memory for little)
CUDA_WORKERS = 8


def default_workers(device: torch.device) -> int:
    """Decoding workers for an encoder on ``device``: none on a CPU, up to :data:`CUDA_WORKERS` on CUDA."""
    if device.type != "cuda":
        return 0
    return max(0, min(CUDA_WORKERS, (os.cpu_count() or 1) - 1))


def view_pixels(
    dataset: ImageFolderDataset,
    split: str,
    kind: str,
    preprocess: PreprocessConfig,
    seed: Optional[int],
    batch: Sequence[tuple[int, int]],
) -> Tensor:
    """(B, 3, H, W) pixels of the (image, view) pairs of ``batch``; each image decoded once for its views
    (they are consecutive), each view drawn as :func:`calbench.data.transforms.to_tensor` defines it."""
    pixels, last, image = [], -1, None
    for index, view in batch:
        if index != last:
            last, image = index, dataset.load_image(split, index)
        pixels.append(to_tensor(image, kind, preprocess, view, index, split, seed))
    return torch.stack(pixels)


class _Batches(Dataset):
    """Item i is batch i's pixels, or the error that stopped it (re-raised in the main process as it is:
    DataLoader would wrap it in a traceback, and a user error is one line)."""

    def __init__(self, args: tuple, batches: list[list[tuple[int, int]]]) -> None:
        self.args, self.batches = args, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Union[Tensor, Exception]:
        try:
            return view_pixels(*self.args, self.batches[i])
        except Exception as exc:  # noqa: BLE001 - handed to the main process, which raises it
            return exc


def view_batches(
    dataset: ImageFolderDataset,
    split: str,
    kind: str,
    preprocess: PreprocessConfig,
    seed: Optional[int],
    pending: Sequence[tuple[int, int]],
    batch_size: int,
    workers: int = 0,
    pin: bool = False,
) -> Iterator[tuple[list[tuple[int, int]], Tensor]]:
    """(batch, pixels) for ``pending`` (image, view) pairs in batches of ``batch_size``, in order; prepared
    by ``workers`` DataLoader processes (into pinned memory with ``pin``), or here with none."""
    batches = [list(pending[i : i + batch_size]) for i in range(0, len(pending), batch_size)]
    args = (dataset, split, kind, preprocess, seed)
    if workers <= 0 or len(batches) < 2:
        for batch in batches:
            yield batch, view_pixels(*args, batch)
        return
    loader = DataLoader(
        _Batches(args, batches), batch_size=None, num_workers=min(workers, len(batches)), pin_memory=pin
    )
    for batch, pixels in zip(batches, loader):
        if isinstance(pixels, Exception):
            raise pixels
        yield batch, pixels
