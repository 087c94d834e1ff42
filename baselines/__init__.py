"""Comparison methods; importing this package registers them in :data:`calbench.base.METHODS` (imported once, by :mod:`calbench.methods`)."""

from calbench.baselines import coop, posthoc, promptsmooth, zero_shot  # noqa: F401
