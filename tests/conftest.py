"""Suite-wide settings.

- One intra-op thread: the suite runs on 2 shared cores, where torch's default thread pool
  makes small models several times slower.
- One Hypothesis profile for every property test, so that a failure in CI reproduces on
  any machine: examples are derived from each test's name (`derandomize`), not from a
  random seed or from a local example database that CI does not have; `print_blob` prints
  the failing example's blob for `@reproduce_failure`. `HYPOTHESIS_PROFILE=thorough` runs
  more, random examples locally (with the database); a test's own `@settings` still
  overrides single fields such as `max_examples`.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
