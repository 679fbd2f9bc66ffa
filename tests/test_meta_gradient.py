"""The ML3 meta-gradient is exact: finite differences and a hand-unrolled loop."""

from __future__ import annotations

import pytest
import torch

from pipeline.experiments import mse
from pipeline.meta import (
    LearnedLossCollapsed,
    adapt,
    batched_forward,
    check_not_collapsed,
    meta_objective,
    meta_train,
    sample_init,
    vmap_forward,
)
from pipeline.nets import LearnedLoss, build_mlp

INNER_LR = 0.1


@pytest.fixture
def problem():
    """A tiny float64 problem: 3 tasks, 7 points, 1-5-1 tanh optimizee."""
    torch.manual_seed(0)
    optimizee = build_mlp(1, [5], 1, "tanh").double()
    learned_loss = LearnedLoss(2, [4], "tanh", bias=True).double()
    theta0 = {
        k: v.double()
        for k, v in sample_init(optimizee, 3, torch.Generator().manual_seed(1)).items()
    }
    x = torch.linspace(-2, 2, 7, dtype=torch.float64).repeat(3, 1)[..., None]
    x = x + 0.1 * torch.arange(3, dtype=torch.float64)[:, None, None]
    y = torch.sin(x)
    return optimizee, learned_loss, theta0, x, y


def engine_meta_gradient(problem, n_steps):
    optimizee, learned_loss, theta0, x, y = problem
    learned_loss.zero_grad()
    loss = meta_objective(
        optimizee,
        learned_loss,
        mse,
        theta0,
        (x, y),
        (x, y),
        inner_lr=INNER_LR,
        n_inner_steps=n_steps,
    ).mean()
    loss.backward()
    return [p.grad.clone() for p in learned_loss.parameters()]


def hand_unrolled_meta_gradient(problem, n_steps):
    """Reference: a Python loop over tasks, plain autograd with create_graph."""
    optimizee, learned_loss, theta0, x, y = problem
    names = list(theta0)
    total = 0.0
    for task in range(x.shape[0]):
        theta = [theta0[n][task].clone().requires_grad_(True) for n in names]
        for _ in range(n_steps):
            w1, b1, w2, b2 = theta
            prediction = torch.tanh(x[task] @ w1.T + b1) @ w2.T + b2
            inner = learned_loss(prediction, y[task])
            grads = torch.autograd.grad(inner, theta, create_graph=True)
            theta = [p - INNER_LR * g for p, g in zip(theta, grads, strict=True)]
        w1, b1, w2, b2 = theta
        prediction = torch.tanh(x[task] @ w1.T + b1) @ w2.T + b2
        total = total + ((prediction - y[task]) ** 2).mean()
    total = total / x.shape[0]
    return list(torch.autograd.grad(total, list(learned_loss.parameters())))


def finite_difference_meta_gradient(problem, n_steps, eps=1e-6):
    optimizee, learned_loss, theta0, x, y = problem

    def value():
        with torch.no_grad():
            return (
                meta_objective(
                    optimizee,
                    learned_loss,
                    mse,
                    theta0,
                    (x, y),
                    (x, y),
                    inner_lr=INNER_LR,
                    n_inner_steps=n_steps,
                )
                .mean()
                .item()
            )

    grads = []
    for p in learned_loss.parameters():
        g = torch.zeros_like(p)
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            plus = value()
            flat[i] = old - eps
            minus = value()
            flat[i] = old
            g.view(-1)[i] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("n_steps", [1, 2])
def test_meta_gradient_matches_finite_differences(problem, n_steps):
    engine = engine_meta_gradient(problem, n_steps)
    reference = finite_difference_meta_gradient(problem, n_steps)
    for got, want in zip(engine, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("n_steps", [1, 2])
def test_meta_gradient_matches_hand_unrolled_loop(problem, n_steps):
    engine = engine_meta_gradient(problem, n_steps)
    reference = hand_unrolled_meta_gradient(problem, n_steps)
    for got, want in zip(engine, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_meta_gradient_reaches_every_learned_loss_parameter(problem):
    grads = engine_meta_gradient(problem, 1)
    names = [n for n, _ in problem[1].named_parameters()]
    assert len(grads) == len(names) == 4
    for name, g in zip(names, grads, strict=True):
        assert torch.isfinite(g).all(), name
        assert (g != 0).any(), f"no meta-gradient reaches {name}"


def test_batched_mlp_forward_equals_vmapped_functional_call(problem):
    optimizee, _, theta0, x, _ = problem
    torch.testing.assert_close(
        batched_forward(optimizee, theta0, x), vmap_forward(optimizee, theta0, x)
    )
    shared = x[0]
    torch.testing.assert_close(
        batched_forward(optimizee, theta0, shared),
        vmap_forward(optimizee, theta0, shared, shared=True),
    )


def test_truncated_backprop_cuts_the_first_steps(problem):
    """Only the last step carries the graph: equal to starting from the detached
    iterate after k - 1 plain SGD steps (reference built by hand here)."""
    optimizee, learned_loss, theta0, x, y = problem
    learned_loss.zero_grad()
    truncated = meta_objective(
        optimizee,
        learned_loss,
        mse,
        theta0,
        (x, y),
        (x, y),
        inner_lr=INNER_LR,
        n_inner_steps=3,
        n_backprop_steps=1,
    ).mean()
    truncated.backward()
    got = [p.grad.clone() for p in learned_loss.parameters()]

    start = adapt(
        optimizee,
        learned_loss,
        theta0,
        x,
        y,
        inner_lr=INNER_LR,
        n_steps=2,
        create_graph=False,
    )
    learned_loss.zero_grad()
    one_step = meta_objective(
        optimizee,
        learned_loss,
        mse,
        start,
        (x, y),
        (x, y),
        inner_lr=INNER_LR,
        n_inner_steps=1,
    ).mean()
    one_step.backward()
    want = [p.grad.clone() for p in learned_loss.parameters()]
    torch.testing.assert_close(truncated, one_step)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    full = engine_meta_gradient(problem, 3)
    assert any(not torch.allclose(g, f) for g, f in zip(got, full, strict=True))


def test_truncated_backprop_warns():
    optimizee = build_mlp(1, [4], 1, "tanh")
    learned_loss = LearnedLoss(2, [4])
    x = torch.randn(1, 5, 1)
    with pytest.warns(UserWarning, match="only the last 1 of 2 inner steps"):
        meta_train(
            optimizee,
            learned_loss,
            mse,
            sample_batch=lambda g: ((x, x), (x, x)),
            n_outer_iterations=1,
            outer_lr=1e-3,
            inner_lr=1e-3,
            n_inner_steps=2,
            meta_batch_size=1,
            n_backprop_steps=1,
            generator=torch.Generator().manual_seed(0),
        )


def _collapsed_loss():
    """A learned loss with a zero output layer: constant softplus(0)."""
    loss = LearnedLoss(2, [4])
    torch.nn.init.zeros_(loss.net[-1].weight)
    return loss


def test_collapse_check_flags_a_constant_loss_and_passes_a_live_one():
    prediction, target = torch.randn(2, 5, 1), torch.randn(2, 5, 1)
    with pytest.raises(LearnedLossCollapsed, match="gradient w.r.t. the prediction"):
        check_not_collapsed(_collapsed_loss(), prediction, target)
    torch.manual_seed(0)
    assert check_not_collapsed(LearnedLoss(2, [4]), prediction, target) > 1e-3


def test_meta_train_stops_on_a_collapsed_loss():
    optimizee = build_mlp(1, [4], 1, "tanh")
    x = torch.randn(1, 5, 1)
    with pytest.raises(LearnedLossCollapsed):
        # a learning rate too small to move the zero layer off zero
        meta_train(
            optimizee,
            _collapsed_loss(),
            mse,
            sample_batch=lambda g: ((x, x), (x, x)),
            n_outer_iterations=2,
            outer_lr=1e-15,
            inner_lr=1e-3,
            n_inner_steps=1,
            meta_batch_size=1,
            generator=torch.Generator().manual_seed(0),
        )
