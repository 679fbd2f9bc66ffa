"""Devices, threads and random streams."""

from __future__ import annotations

import logging
import zlib

import numpy as np
import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from pipeline.config import ParamsError

        raise ParamsError(
            "params.yaml: runtime.device = 'cuda' but no CUDA device is available; "
            "use auto or cpu"
        )
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; valid devices: auto, cpu, cuda")
    return torch.device(name)


def configure(device: str, n_threads: int) -> torch.device:
    """Sets torch's thread count and returns the device to compute on."""
    torch.set_num_threads(n_threads)
    resolved = resolve_device(device)
    log.info("computing on %s with %d threads", resolved, n_threads)
    return resolved


def process_seconds() -> float:
    """Wall time since this process started, imports included."""
    import time

    import psutil

    return time.time() - psutil.Process().create_time()


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for the named random stream of a run seed.

    Separate streams (``meta_train``, ``evaluate`` ...) keep one purpose's
    draws from shifting another's when a setting changes.
    """
    key = zlib.crc32(stream.encode())
    return int(
        np.random.SeedSequence([seed, key]).generate_state(2, np.uint64)[0]
        >> np.uint64(1)
    )


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`stream_seed`."""
    return torch.Generator().manual_seed(stream_seed(seed, stream))


def numpy_rng(seed: int, stream: str) -> np.random.Generator:
    """A NumPy generator seeded by :func:`stream_seed`."""
    return np.random.default_rng(stream_seed(seed, stream))
