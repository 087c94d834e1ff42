"""Zero-shot CLIP classification with the dataset's hand prompt."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from calbench.base import FitData, LogitMethod, register_method
from calbench.train import logits_for


@register_method("zero-shot", "hand prompt, no training")
class ZeroShot(LogitMethod):
    _text: Optional[Tensor] = None  # the hand prompts' features, once fitted

    def fit(self, data: FitData) -> ZeroShot:
        self._text = data.hand_features()
        self._scale = data.vlm.logit_scale
        return self

    def predict_logits(self, features: Tensor) -> Tensor:
        if self._text is None:
            raise RuntimeError("call fit() first")
        return logits_for(features.to(self._text.device), self._text, self._scale)
