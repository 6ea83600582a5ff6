"""Suite-wide settings.

- One intra-op thread: the suite runs on 2 shared cores, where torch's default thread pool
  makes small models several times slower.
- One Hypothesis profile for every property test, so that a failure in CI reproduces on
  any machine: examples are derived from each test's name (`derandomize`), not from a
  random seed or from a local example database that CI does not have; `print_blob` prints
  the failing example's blob for `@reproduce_failure`. `HYPOTHESIS_PROFILE=thorough` runs
  more, random examples locally (with the database); a test's own `@settings` still
  overrides single fields such as `max_examples`.
- One definition of where the shared real data sets live (`shared_data`, `require_data`):
  `$DUALRERANK_DATA` when set and non-empty, else `../shared/data` beside the checkout.
  Tests that need a data set ask `require_data` for it and skip, naming the missing path
  and the variable, when it is absent, so the suite passes on a machine without the data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

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


REPO = Path(__file__).resolve().parents[1]
DATA_VARIABLE = "DUALRERANK_DATA"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder: `$DUALRERANK_DATA`, or `../shared/data` beside the checkout
    when the variable is unset or empty (an empty value does not mean the current folder).

    Session-scoped, so it is read before any test's function-scoped monkeypatch of the
    variable. The folder may not exist: ask `require_data` for a data set a test needs.
    """
    return Path(os.environ.get(DATA_VARIABLE) or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def require_data(shared_data) -> Callable[[str], Path]:
    """`require_data("letor/MQ2008/S1.txt") -> Path`: the path under the shared data folder,
    or skip the calling test with a reason naming the missing path and the variable."""

    def require(sub: str) -> Path:
        path = shared_data / sub
        if not path.exists():
            pytest.skip(f"{path} not found (shared data folder {shared_data}; set {DATA_VARIABLE} to point elsewhere)")
        return path

    return require
