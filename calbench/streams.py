"""Random streams: every draw of a run comes from a stream named by its role and the run seed.

Two roles seeded alike draw the same numbers: a CoOp context initialised from generator(seed) and
a batch order from generator(seed) start from one sequence, and a few-shot split and a bootstrap
from ``default_rng(seed)`` pick correlated items. Here each stream's seed words are
``[TAG, role, count, *values]``: the role word keeps roles apart, and the count of values keeps
numpy's zero padding of short entropy from making ``[7, 0]`` the same stream as ``[7]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: the first seed word of every stream here: "calb" in ASCII, so no bare integer seed, nor the data
#: streams' fixed-length words (calbench.data.transforms, corruptions), starts the same way
TAG = 0x63616C62
ROLES = (
    "fewshot-split",  # which train-pool images are the shots and the validation images
    "context-init",  # a learned prompt's random N(0, 0.02^2) context
    "batch-order",  # the order the trainer visits the shots in, each epoch
    "bootstrap",  # the ECE interval's resamples of test items
    "conformal",  # the uniform draws of randomized APS and RAPS, and RAPS's tuning hold-out
    "certify-subset",  # the test images `certify` certifies
)


def words(role: str, *values: int) -> list[int]:
    """The seed words of ``role``'s stream for ``values`` (the run seed first, then any sub-stream)."""
    if role not in ROLES:
        raise ValueError(f"unknown random stream {role!r}; one of {', '.join(ROLES)}")
    if any(int(v) < 0 for v in values):
        raise ValueError(f"stream values must be non-negative, got {values}")
    return [TAG, ROLES.index(role), len(values), *(int(v) for v in values)]


def rng(role: str, *values: int) -> np.random.Generator:
    """A numpy generator of ``role``'s stream."""
    return np.random.default_rng(words(role, *values))


def torch_seed(role: str, *values: int) -> int:
    """A 63-bit seed of ``role``'s stream for ``torch.Generator().manual_seed``."""
    state: Any = np.random.SeedSequence(words(role, *values)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
