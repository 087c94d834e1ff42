"""Training losses and regularisers, as pure functions of tensors.

Conventions: ``logits`` is (B, C), ``labels`` is (B,) int64, p = softmax(logits),
f_c is the fraction of batch labels equal to c. Every function returns a scalar
tensor and is differentiable where training needs it. Nothing here touches a
device or a model: callers pass tensors already where they live. Hyper-parameters
(gamma, alpha, ...) are keyword-only and have no defaults here: a method's defaults, with
their sources, live in the one table (:mod:`calbench.published`).

A training objective is a weighted sum of named terms (:class:`Objective`), so
CalibPrompt, its ablations and every CoOp baseline are one table of weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from calbench.registry import Registry

LOSSES: Registry[Callable[..., Tensor]] = Registry("loss")
#: MMCE's Laplacian kernel width, part of the loss's definition (Kumar et al., ICML 2018)
MMCE_BANDWIDTH = 0.4


def _batch_fractions(labels: Tensor, n_classes: int, dtype: torch.dtype) -> Tensor:
    return torch.bincount(labels, minlength=n_classes).to(dtype) / labels.numel()


@LOSSES.register("cross_entropy")
def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Batch mean of -log p_y."""
    return F.cross_entropy(logits, labels)


@LOSSES.register("label_smoothing")
def label_smoothing(logits: Tensor, labels: Tensor, *, alpha: float) -> Tensor:
    """Cross-entropy against 1-alpha on the true class and alpha/(C-1) elsewhere.

    This is the CalibPrompt form; PyTorch's ``label_smoothing=`` spreads alpha/C
    over all classes (the true one included), a different target.
    """
    n_classes = logits.shape[1]
    target = torch.full_like(logits, alpha / (n_classes - 1))
    target.scatter_(1, labels[:, None], 1.0 - alpha)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@LOSSES.register("smac")
def smac(logits: Tensor, labels: Tensor, *, alpha: float) -> Tensor:
    """SMAC: match each class's mean confidence to its smoothed batch frequency.

    s_c = f_c (1 - alpha) + (1 - f_c) alpha / (C - 1); loss = mean_c |mean_b p_bc - s_c|.
    """
    n_classes = logits.shape[1]
    f = _batch_fractions(labels, n_classes, logits.dtype)
    target = f * (1.0 - alpha) + (1.0 - f) * alpha / (n_classes - 1)
    return (F.softmax(logits, dim=1).mean(dim=0) - target).abs().mean()


@LOSSES.register("angular_separation")
def angular_separation(text_features: Tensor) -> Tensor:
    """AS: mean off-diagonal cosine similarity of the class text features.

    Minimising it pushes class prototypes apart: mean_i sum_{j != i} cos(t_i, t_j) / (C - 1).
    """
    t = F.normalize(text_features, dim=1)
    sim = t @ t.T
    sim = sim - torch.diag_embed(torch.diagonal(sim))
    return (sim.sum(dim=1) / (t.shape[0] - 1)).mean()


@LOSSES.register("focal")
def focal(logits: Tensor, labels: Tensor, *, gamma: float) -> Tensor:
    """Focal loss (Lin et al., 2017; Mukhoti et al., 2020): mean of -(1 - p_t)^gamma log p_t."""
    log_pt = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return (-((1.0 - log_pt.exp()) ** gamma) * log_pt).mean()


@LOSSES.register("mdca")
def mdca(logits: Tensor, labels: Tensor) -> Tensor:
    """MDCA (Hebbalaguppe et al., CVPR 2022): mean_c |mean_b p_bc - f_c|."""
    f = _batch_fractions(labels, logits.shape[1], logits.dtype)
    return (F.softmax(logits, dim=1).mean(dim=0) - f).abs().mean()


@LOSSES.register("dca")
def dca(logits: Tensor, labels: Tensor) -> Tensor:
    """DCA (Liang et al., 2020): |mean max-probability - batch accuracy|."""
    conf, pred = F.softmax(logits, dim=1).max(dim=1)
    return (conf.mean() - (pred == labels).to(logits.dtype).mean()).abs()


@LOSSES.register("mmce")
def mmce(logits: Tensor, labels: Tensor, *, bandwidth: float = MMCE_BANDWIDTH) -> Tensor:
    """Weighted MMCE (Kumar et al., ICML 2018) in the widely used public form.

    With r the top-label confidences split into m correct and n wrong predictions
    and K(r, r') = exp(-|r - r'| / bandwidth): MMCE^2 = A/m^2 + B/n^2 - 2X/(mn), where A, B
    and X are the *means* over the correct x correct, wrong x wrong and
    correct x wrong pairs of (1-r)(1-r')K, r r' K and (1-r) r' K. That public form
    divides by the group sizes twice; we keep it so numbers match published runs
    (without its 1e-5 in the denominators). MMCE^2 is a squared kernel distance,
    so it can dip below 0 only by rounding; it is clamped at 0 before
    sqrt(. + 1e-10). 0 for an all-correct or all-wrong batch.
    """
    conf, pred = F.softmax(logits, dim=1).max(dim=1)
    correct = pred == labels
    r_ok, r_bad = conf[correct], conf[~correct]
    m, n = r_ok.numel(), r_bad.numel()
    if m == 0 or n == 0:
        return logits.sum() * 0.0

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-(a[:, None] - b[None, :]).abs() / bandwidth)

    a = ((1 - r_ok)[:, None] * (1 - r_ok)[None, :] * kernel(r_ok, r_ok)).mean()
    b = (r_bad[:, None] * r_bad[None, :] * kernel(r_bad, r_bad)).mean()
    x = ((1 - r_ok)[:, None] * r_bad[None, :] * kernel(r_ok, r_bad)).mean()
    mmce2 = a / m**2 + b / n**2 - 2 * x / (m * n)
    return torch.sqrt(mmce2.clamp(min=0.0) + 1e-10)


@LOSSES.register("mbls")
def mbls(logits: Tensor, labels: Tensor, *, margin: float, alpha: float) -> Tensor:
    """Margin-based label smoothing (Liu et al., CVPR 2022).

    CE + alpha * mean over all B x C entries of relu(max_j l_bj - l_bc - margin).
    """
    distance = logits.max(dim=1, keepdim=True).values - logits
    return F.cross_entropy(logits, labels) + alpha * F.relu(distance - margin).mean()


@LOSSES.register("logit_norm")
def logit_norm(logits: Tensor, labels: Tensor, *, temperature: float) -> Tensor:
    """LogitNorm (Wei et al., ICML 2022): CE of logits / (||logits||_2 + 1e-7) / temperature."""
    norms = logits.norm(p=2, dim=1, keepdim=True) + 1e-7
    return F.cross_entropy(logits / norms / temperature, labels)


@LOSSES.register("zs_norm")
def zs_norm(logits: Tensor, labels: Tensor, zs_logits: Tensor) -> Tensor:
    """ZS-Norm (Murugesan et al., ECCV 2024): CE after mapping each row of logits
    from its own [min, max] onto the zero-shot row's [min, max]."""
    lo, hi = logits.min(dim=1, keepdim=True).values, logits.max(dim=1, keepdim=True).values
    zlo, zhi = zs_logits.min(dim=1, keepdim=True).values, zs_logits.max(dim=1, keepdim=True).values
    rescaled = (logits - lo) / (hi - lo).clamp(min=1e-6) * (zhi - zlo) + zlo
    return F.cross_entropy(rescaled, labels)


@LOSSES.register("zs_penalty")
def zs_penalty(logits: Tensor, labels: Tensor, zs_logits: Tensor) -> Tensor:
    """Penalty (Murugesan et al., ECCV 2024): keep logits inside the zero-shot row's range.

    mean relu(l - max zs) + mean relu(min zs - l), means over all B x C entries.
    ``labels`` is unused; it keeps the signature of the other logit losses.
    """
    zlo, zhi = zs_logits.min(dim=1, keepdim=True).values, zs_logits.max(dim=1, keepdim=True).values
    return F.relu(logits - zhi).mean() + F.relu(zlo - logits).mean()


@LOSSES.register("margin_mean_var")
def margin_mean_var(logits: Tensor, labels: Tensor, *, alpha: float, beta: float) -> Tensor:
    """Margin mean-variance: -alpha mean(m) + beta var(m), m = true logit - best other logit.

    The variance is the population variance (divide by B).
    """
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    margin = true - others.max(dim=1).values
    return -alpha * margin.mean() + beta * margin.var(unbiased=False)


@LOSSES.register("text_moment_matching")
def text_moment_matching(text_features: Tensor, zs_text_features: Tensor) -> Tensor:
    """||mu_t - mu_0||^2 + ||Sigma_t - Sigma_0||_F^2 over the class text features.

    Means are over rows (classes); covariances are (1/C) X^T X of the centred rows.
    """

    def moments(x: Tensor) -> tuple[Tensor, Tensor]:
        mu = x.mean(dim=0)
        centred = x - mu
        return mu, centred.T @ centred / x.shape[0]

    mu_t, cov_t = moments(text_features)
    mu_0, cov_0 = moments(zs_text_features)
    return ((mu_t - mu_0) ** 2).sum() + ((cov_t - cov_0) ** 2).sum()


@cache
def _required_inputs(loss: str) -> tuple[str, ...]:
    """Names of a loss's tensor arguments (its positional ones; hyper-parameters are keyword-only),
    read once per loss."""
    params = inspect.signature(LOSSES.get(loss)).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class Term:
    """One weighted term of an objective: ``weight * LOSSES[loss](**inputs, **kwargs)``."""

    loss: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    """A weighted sum of named loss terms; each term takes the inputs its signature names.

    Available inputs: ``logits``, ``labels``, ``text_features`` and, for methods that
    anchor to the zero-shot model, ``zs_logits`` and ``zs_text_features``.
    """

    terms: Mapping[str, Term]

    def __post_init__(self) -> None:
        for term in self.terms.values():
            LOSSES.get(term.loss)  # fail early, with the list of valid names

    @property
    def inputs(self) -> set[str]:
        """Names of the tensors the terms read (so callers compute only those)."""
        return {name for term in self.terms.values() for name in _required_inputs(term.loss) if name not in term.kwargs}

    def __call__(self, **inputs: Optional[Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Return the total loss and each term's unweighted value (for logging)."""
        total: Optional[Tensor] = None
        parts: dict[str, float] = {}
        for name, term in self.terms.items():
            args = {k: inputs[k] for k in _required_inputs(term.loss) if k not in term.kwargs}
            value = LOSSES.get(term.loss)(**args, **term.kwargs)
            parts[name] = float(value.detach())
            total = term.weight * value if total is None else total + term.weight * value
        assert total is not None, "an objective needs at least one term"
        return total, parts


def calibprompt_objective(*, alpha: float, w_smac: float, w_as: float) -> Objective:
    """CalibPrompt (Basu et al., BMVC 2025): LS(alpha) + w_smac SMAC(alpha) + w_as AS."""
    return Objective(
        {
            "ls": Term("label_smoothing", 1.0, {"alpha": alpha}),
            "smac": Term("smac", w_smac, {"alpha": alpha}),
            "as": Term("angular_separation", w_as),
        }
    )
