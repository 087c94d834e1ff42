"""Comparison methods; importing this package registers them in :data:`calbench.methods.METHODS`."""
from calbench.baselines import coop, posthoc, promptsmooth, zero_shot  # noqa: F401
