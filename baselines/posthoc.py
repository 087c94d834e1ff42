"""Post-hoc calibrators, fitted on validation logits only, written ``<method>+<id>``.

``ts`` and ``vs`` are fitted here (L-BFGS on the validation NLL, checked against
netcal in the tests); ``hist``, ``iso`` and ``beta`` use netcal's implementations
(one-vs-all on the softmax probabilities, rows renormalised).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from calbench.base import CALIBRATORS


def _lbfgs_nll(params: list[Tensor], logits_fn: Callable[[], Tensor], labels: Tensor) -> None:
    """Minimise the mean NLL of ``logits_fn()`` over ``params`` (float64, strong Wolfe line search)."""
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits_fn(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)


class TemperatureScaling:
    """One temperature T minimising validation NLL (Guo et al., ICML 2017).

    Optimised over log T, so T stays positive without constraints.
    """

    def __init__(self) -> None:
        self.temperature = 1.0

    def fit(self, logits: Tensor, labels: Tensor) -> TemperatureScaling:
        z = logits.detach().double().cpu()
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        _lbfgs_nll([log_t], lambda: z / log_t.exp(), labels.detach().cpu())
        self.temperature = float(log_t.detach().exp())
        return self

    def predict_proba(self, logits: Tensor) -> Tensor:
        return F.softmax(logits / self.temperature, dim=1)


class VectorScaling:
    """Per-class scale w and bias b on the logits, softmax(w * z + b) (Guo et al., ICML 2017)."""

    def __init__(self) -> None:
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def fit(self, logits: Tensor, labels: Tensor) -> VectorScaling:
        z = logits.detach().double().cpu()
        w = torch.ones(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        _lbfgs_nll([w, b], lambda: z * w + b, labels.detach().cpu())
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def predict_proba(self, logits: Tensor) -> Tensor:
        assert self.weight is not None and self.bias is not None, "call fit() first"
        z = logits.double()
        return F.softmax(z * self.weight.to(z.device) + self.bias.to(z.device), dim=1).to(logits.dtype)


class NetcalCalibrator:
    """A netcal calibrator on softmax probabilities (multiclass: one-vs-all, renormalised).

    On two columns netcal calibrates the positive class only and returns a 1-D array of its
    probability; that is turned back into the (N, 2) distribution [1 - p, p].
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.model = factory()

    def fit(self, logits: Tensor, labels: Tensor) -> NetcalCalibrator:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # netcal's pyro/scipy deprecation chatter
            self.model.fit(F.softmax(logits.double(), dim=1).cpu().numpy(), labels.cpu().numpy())
        return self

    def predict_proba(self, logits: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probs = np.asarray(self.model.transform(F.softmax(logits.double(), dim=1).cpu().numpy()), dtype=np.float64)
        if logits.shape[1] == 2 and probs.size == logits.shape[0]:  # two classes: p(class 1) only
            positive = np.clip(np.nan_to_num(probs.reshape(-1), nan=0.5), 0.0, 1.0)
            probs = np.stack([1.0 - positive, positive], axis=1)
        probs = np.nan_to_num(probs, nan=0.0)
        totals = probs.sum(axis=1, keepdims=True)
        uniform = np.full_like(probs, 1.0 / probs.shape[1])
        probs = np.where(
            totals > 0, probs / np.where(totals > 0, totals, 1.0), uniform
        )  # an all-zero row knows nothing
        return torch.as_tensor(probs, device=logits.device)


def _netcal(name: str) -> Callable[[], NetcalCalibrator]:
    def build() -> NetcalCalibrator:
        from netcal import binning, scaling

        factories = {
            "hist": lambda: binning.HistogramBinning(bins=10),
            "iso": binning.IsotonicRegression,
            "beta": scaling.BetaCalibration,
        }
        return NetcalCalibrator(factories[name])

    return build


CALIBRATORS.add("ts", TemperatureScaling)
CALIBRATORS.add("vs", VectorScaling)
for _name in ("hist", "iso", "beta"):
    CALIBRATORS.add(_name, _netcal(_name))
