"""Shared fixtures: every test starts from fixed seeds."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# One hypothesis profile for the suite: no per-example deadline (a shared 2-core CI machine makes
# timings meaningless) and derandomized, so that CI runs the same examples every time; tests set
# only their own max_examples.
settings.register_profile(
    "gradlens", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("gradlens")


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module (``pytestmark = usefixtures("one_thread")``): tiny
    models run faster that way, and are immune to an oversubscribed CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
