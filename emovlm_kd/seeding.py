"""Seeds derived from several integers, and blocks run under a seeded RNG (per-sample augmentation and sampling)."""

import random
from contextlib import contextmanager

import numpy as np
import torch


def derived_seed(*keys: int) -> int:
    """A seed derived from several integers (e.g. the run's seed, an epoch, an image index)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@contextmanager
def seeded_rng(*keys: int):
    """Run a block with Python's and torch's CPU RNG seeded from `keys` (restored afterwards).

    Used for per-sample augmentation, so an image gets the same crop in a given epoch whatever the process count,
    worker count or resumption point.
    """
    seed = derived_seed(*keys)
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


__all__ = ["derived_seed", "seeded_rng"]
