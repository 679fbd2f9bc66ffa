"""Atomic, pickle-free reading and writing of pipeline artifacts.

Every file is written to a temporary name in its target folder and renamed
into place, so a killed stage leaves either the old file or the complete new
one, never a truncated file under the final name. Arrays go to ``.npz``
(read with ``allow_pickle=False``) and weights to ``torch.save`` state dicts
read back with ``weights_only=True``: loading never runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, directory: bool) -> None:
    # mkstemp and mkdtemp create private (0600/0700) entries; a finished
    # output gets the mode any other new file would get under the umask
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path next to ``path``; renames it there on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _usual_mode(Path(tmp), directory=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yields a fresh temporary folder that replaces ``path`` on success.

    On an exception the temporary folder is removed and ``path`` is left as
    it was; on success the old ``path`` (if any) is swapped out and deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    )
    try:
        yield tmp
        _usual_mode(tmp, directory=True)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.{tmp.name}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, obj) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path):
    """Reads a JSON file."""
    return json.loads(Path(path).read_text())


def write_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes named arrays to an uncompressed ``.npz``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Reads an ``.npz`` without unpickling objects."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    """Writes a DataFrame as CSV without its index, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_state_dict(path: str | Path, module: torch.nn.Module) -> None:
    """Saves ``module``'s tensors only (no pickled objects), atomically.

    Written through a file object, so the archive inside is always named
    ``archive`` (given a path, torch names it after the temporary file):
    equal weights give equal bytes, and DVC sees an unchanged output.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Loads a state dict with ``weights_only=True`` (no arbitrary code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


LOSS_WEIGHTS = "learned_loss.pt"
LOSS_CONFIG = "learned_loss.json"


def save_learned_loss(folder: str | Path, learned_loss) -> None:
    """Writes a learned loss as ``learned_loss.json`` (config) + ``.pt`` (weights)."""
    folder = Path(folder)
    save_state_dict(folder / LOSS_WEIGHTS, learned_loss)
    write_json(folder / LOSS_CONFIG, learned_loss.config)


def load_learned_loss(folder: str | Path):
    """Rebuilds a loss saved by :func:`save_learned_loss`, frozen, in eval mode."""
    from pipeline.nets import learned_loss_from_config

    folder = Path(folder)
    for name in (LOSS_WEIGHTS, LOSS_CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no {name} in {folder}: not a saved learned loss")
    module = learned_loss_from_config(read_json(folder / LOSS_CONFIG))
    module.load_state_dict(load_state_dict(folder / LOSS_WEIGHTS))
    module.requires_grad_(False)
    return module.eval()
