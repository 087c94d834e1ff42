"""``--online-encoding``: the image encoder in the training loop, as the published code trains.

The published CalibPrompt and CoOp trainers (Dassl) decode, augment and encode every batch of
few-shot images at every step. calbench normally reads cached views instead
(:mod:`calbench.cache`); :class:`OnlineViews` is the published design behind the trainer's
:class:`~calbench.train.TrainViews` protocol: epoch e encodes view e of each image, the very
crop and flip the cache would hold as view e, so both designs see the same augmentations (a
fresh one every epoch) and train the same prompt up to float rounding; only the cost differs
(``python -m benchmarks`` measures it).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from calbench.data.folder import ImageFolderDataset
from calbench.data.pixels import view_pixels
from calbench.models.base import VLMBackend


class OnlineViews:
    """Few-shot training images encoded batch by batch as training asks for them (frozen encoder, no gradient)."""

    def __init__(
        self,
        dataset: ImageFolderDataset,
        split: str,
        indices: np.ndarray,
        kind: str,
        seed: Optional[int],
        vlm: VLMBackend,
    ) -> None:
        self.dataset, self.split, self.kind, self.seed, self.vlm = dataset, split, kind, seed, vlm
        self.indices = np.asarray(indices, dtype=np.int64)  # row i of the training set is image indices[i] of split

    def batch(self, epoch: int, indices: Tensor) -> Tensor:
        """(B, D) features of training rows ``indices`` under view ``epoch``: decoded, augmented, encoded now."""
        views = [(int(self.indices[row]), epoch) for row in indices.tolist()]
        pixels = view_pixels(self.dataset, self.split, self.kind, self.vlm.preprocess, self.seed, views)
        device = self.vlm.device
        # the precision the feature cache encodes in: fp16 autocast on CUDA, fp32 on the CPU
        autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
        with torch.no_grad(), autocast:  # no_grad, not inference_mode: the features enter the autograd graph
            return self.vlm.encode_images(pixels.to(device)).float()
