"""Benchmarks run once as plain tests unless `--benchmark-enable` is given."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def threads(benchmark):
    """Records the thread count with every result."""
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    yield
