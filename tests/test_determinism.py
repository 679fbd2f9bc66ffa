"""Same params and seed, same numbers (CPU)."""

from __future__ import annotations

import torch

from pipeline import artifacts
from pipeline.layout import Layout, seed_dir
from stages import meta_train, prepare


def test_same_seed_gives_same_learned_loss(tmp_path, tiny_params, tracking):
    results = []
    for attempt in ("a", "b"):
        root = tmp_path / attempt
        prepare.run("sine", tiny_params, root)
        meta_train.run("sine", tiny_params, root)
        results.append(
            artifacts.load_state_dict(
                seed_dir(Layout(root).models("sine"), 1) / artifacts.LOSS_WEIGHTS
            )
        )
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
    other = artifacts.load_state_dict(
        seed_dir(Layout(tmp_path / "a").models("sine"), 0) / artifacts.LOSS_WEIGHTS
    )
    assert not all(torch.equal(other[k], results[0][k]) for k in other)
