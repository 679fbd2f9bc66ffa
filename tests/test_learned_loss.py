"""The learned loss: shapes, non-negativity, drop-in use, safe save/load."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from pipeline import artifacts
from pipeline.experiments import mse
from pipeline.meta import meta_train
from pipeline.nets import LearnedLoss, build_mlp


def test_learned_loss_is_non_negative_with_softplus():
    torch.manual_seed(0)
    loss = LearnedLoss(2, [16, 16], "relu", output_activation="softplus")
    values = loss.pointwise(100 * torch.randn(1000), 100 * torch.randn(1000))
    assert (values >= 0).all()


def test_learned_loss_without_output_activation_can_be_negative():
    torch.manual_seed(0)
    loss = LearnedLoss(2, [16], "relu", bias=True, output_activation="none")
    assert (loss.pointwise(10 * torch.randn(1000), 10 * torch.randn(1000)) < 0).any()


@pytest.mark.parametrize("shapes", [((7,), (7,)), ((7, 1), (7,)), ((7, 1), (7, 1))])
def test_learned_loss_shapes(shapes):
    loss = LearnedLoss(2, [4])
    inputs = [torch.randn(s) for s in shapes]
    assert loss.join_inputs(*inputs).shape == (7, 2)
    assert loss.pointwise(*inputs).shape == (7,)
    assert loss(*inputs).shape == ()


def test_learned_loss_takes_extra_task_inputs():
    loss = LearnedLoss(5, [4])
    assert loss(torch.randn(3, 1), torch.randn(3), torch.randn(3, 3)).shape == ()


def test_learned_loss_rejects_wrong_width():
    loss = LearnedLoss(3, [4])
    with pytest.raises(ValueError, match="expects 3 input columns, got 2"):
        loss(torch.randn(5), torch.randn(5))


def test_learned_loss_rejects_mismatched_rows():
    loss = LearnedLoss(2, [4])
    with pytest.raises(ValueError, match=r"same N; got \(5,\), \(4,\)"):
        loss(torch.randn(5), torch.randn(4))


def test_sigmoid_transform_feeds_probabilities():
    loss = LearnedLoss(2, [4], prediction_transform="sigmoid")
    logits = torch.tensor([-50.0, 0.0, 50.0])
    joined = loss.join_inputs(logits, torch.zeros(3))
    torch.testing.assert_close(joined[:, 0], torch.tensor([0.0, 0.5, 1.0]))


def _meta_trained_sine_loss():
    torch.manual_seed(0)
    optimizee = build_mlp(1, [32, 8], 1, "relu")
    learned = LearnedLoss(2, [32, 32])
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 64, 1, generator=gen) * 4 - 2
    y = torch.sin(x - torch.pi)
    meta_train(
        optimizee,
        learned,
        mse,
        sample_batch=lambda g: ((x, y), (x, y)),
        n_outer_iterations=150,
        outer_lr=1e-3,
        inner_lr=1e-3,
        n_inner_steps=1,
        meta_batch_size=1,
        generator=gen,
    )
    return learned.requires_grad_(False), x[0], y[0]


def test_learned_loss_works_as_drop_in_loss():
    """A meta-trained loss in a plain nn.Module + torch.optim loop lowers the MSE."""
    learned, x, y = _meta_trained_sine_loss()
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = mse(model(x), y).item()
    for _ in range(50):
        opt.zero_grad()
        learned(model(x), y).backward()
        opt.step()
    after = mse(model(x), y).item()
    assert all(p.grad is not None for p in model.parameters())
    assert after < before


def test_saved_learned_loss_round_trips(tmp_path):
    torch.manual_seed(0)
    loss = LearnedLoss(
        2,
        [6, 5],
        "elu",
        bias=True,
        init="xavier_normal",
        output_activation="none",
        prediction_transform="sigmoid",
    )
    artifacts.save_learned_loss(tmp_path, loss)
    loaded = artifacts.load_learned_loss(tmp_path)
    assert loaded.config == loss.config
    a, b = torch.randn(9), torch.randn(9)
    torch.testing.assert_close(loaded(a, b), loss(a, b))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_loading_weights_refuses_pickled_objects(tmp_path):
    """weights_only=True: a file holding an arbitrary object is rejected."""
    loss = LearnedLoss(2, [4])
    artifacts.save_learned_loss(tmp_path, loss)
    torch.save({"net.0.weight": loss}, tmp_path / artifacts.LOSS_WEIGHTS)
    with pytest.raises(pickle.UnpicklingError):
        artifacts.load_learned_loss(tmp_path)
