"""Suite-wide settings: one intra-op thread (the suite runs on 2 shared cores, where torch's
default thread pool makes small models several times slower)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
