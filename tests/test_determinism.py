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


def test_sine_meta_train_batch_size_is_used(tmp_path, tiny_params, tracking):
    """A minibatch setting changes the learned loss (the param is not ignored)."""
    from tiny import tiny_params_dict, write_params

    params = tiny_params_dict()
    params["sine"]["meta_train"]["batch_size"] = 5
    other = write_params(tmp_path / "other.yaml", params)
    weights = []
    for name, path in (("full", tiny_params), ("minibatch", other)):
        root = tmp_path / name
        prepare.run("sine", path, root)
        meta_train.run("sine", path, root)
        weights.append(
            artifacts.load_state_dict(
                seed_dir(Layout(root).models("sine"), 0) / artifacts.LOSS_WEIGHTS
            )
        )
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_same_seed_gives_same_meta_test_curves(tmp_path, tiny_params, tracking):
    import pandas as pd

    from stages import evaluate

    curves = []
    for attempt in ("a", "b"):
        root = tmp_path / attempt
        for stage in (prepare, meta_train, evaluate):
            stage.run("mnist", tiny_params, root)
        curves.append(pd.read_csv(Layout(root).results("mnist") / "curves.csv"))
    pd.testing.assert_frame_equal(curves[0], curves[1])
