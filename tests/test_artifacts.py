"""Outputs are written atomically: a failure leaves the previous version."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import artifacts


def test_atomic_dir_replaces_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_keeps_old_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with artifacts.atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_file_keeps_old_on_failure(tmp_path):
    path = tmp_path / "a.json"
    artifacts.write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        artifacts.write_json(path, {"v": object()})
    assert artifacts.read_json(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_arrays_round_trip_without_pickle(tmp_path):
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.arange(3)}
    artifacts.write_arrays(tmp_path / "a.npz", arrays)
    back = artifacts.read_arrays(tmp_path / "a.npz")
    assert back.keys() == arrays.keys()
    for key in arrays:
        np.testing.assert_array_equal(back[key], arrays[key])
    np.savez(tmp_path / "obj.npz", o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        artifacts.read_arrays(tmp_path / "obj.npz")


def test_outputs_get_the_usual_permissions(tmp_path):
    """Not the private modes of mkstemp/mkdtemp: others may read the results."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        with artifacts.atomic_dir(tmp_path / "out") as tmp:
            artifacts.write_json(tmp / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "a.json").stat().st_mode) == 0o644


def test_equal_weights_give_equal_bytes(tmp_path):
    """No temporary names leak into the file: DVC hashes stay put."""
    import torch

    module = torch.nn.Linear(3, 2)
    artifacts.save_state_dict(tmp_path / "a.pt", module)
    artifacts.save_state_dict(tmp_path / "b.pt", module)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    loaded = artifacts.load_state_dict(tmp_path / "a.pt")
    torch.testing.assert_close(loaded["weight"], module.weight.detach())
