"""Post-hoc calibrators, fitted on validation logits only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from calbench.methods import CALIBRATORS


class TemperatureScaling:
    """One temperature T minimising validation NLL (Guo et al., ICML 2017).

    Optimised over log T with L-BFGS, so T stays positive without constraints.
    """

    def __init__(self) -> None:
        self.temperature = 1.0

    def fit(self, logits: Tensor, labels: Tensor) -> "TemperatureScaling":
        logits = logits.detach().double().cpu()
        labels = labels.detach().cpu()
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.temperature = float(log_t.detach().exp())
        return self

    def predict_proba(self, logits: Tensor) -> Tensor:
        return F.softmax(logits / self.temperature, dim=1)


CALIBRATORS.add("ts", TemperatureScaling)
