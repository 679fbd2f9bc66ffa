"""The benchmarked configurations and the `higher` reference implementation.

The reference is written the way `higher` is usually used for loss learning:
``innerloop_ctx`` with a differentiable SGD, and a Python loop over the tasks
of a meta-batch. It lives here only, to be timed against the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import higher
import torch
from torch import nn

from pipeline.experiments import bce_with_logits, mse
from pipeline.meta import meta_objective, sample_init
from pipeline.nets import LearnedLoss, build_mlp


@dataclass
class Problem:
    """One meta-iteration's inputs, shared by both implementations."""

    name: str
    optimizee: nn.Module
    learned_loss: LearnedLoss
    task_loss: object
    theta0: dict
    support: tuple
    query: tuple
    inner_lr: float
    n_inner_steps: int

    @property
    def n_tasks(self) -> int:
        return self.support[0].shape[0]


def sine_problem(n_tasks: int, n_inner_steps: int, seed: int = 0) -> Problem:
    """The paper's sine protocol with ``n_tasks`` tasks per meta-batch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    optimizee = build_mlp(1, [100, 10], 1, "relu")
    learned_loss = LearnedLoss(2, [50, 50], "relu", bias=False)
    x = torch.rand(n_tasks, 100, 1, generator=gen) * 4 - 2
    amplitude = torch.rand(n_tasks, 1, 1, generator=gen) * 4.8 + 0.2
    y = amplitude * torch.sin(x - torch.pi)
    return Problem(
        f"sine T={n_tasks} k={n_inner_steps}",
        optimizee,
        learned_loss,
        mse,
        sample_init(optimizee, n_tasks, gen),
        (x, y),
        (x, y),
        1e-3,
        n_inner_steps,
    )


def mnist_problem(n_tasks: int, n_inner_steps: int, seed: int = 0) -> Problem:
    """The binary MNIST protocol (784-64-1, batches of 64) on real digits."""
    from pipeline.data import load_mnist_digits, split_binary_mnist

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_mnist_digits()
    split = split_binary_mnist(
        images, labels, classes=[4, 9], fractions=[0.6, 0.2, 0.2], seed=0
    )
    xs, ys = torch.as_tensor(split["x_train"]), torch.as_tensor(split["y_train"])
    idx = torch.rand(n_tasks, len(xs), generator=gen).argsort(dim=1)
    support, query = idx[:, :64], idx[:, 64:128]
    optimizee = build_mlp(784, [64], 1, "relu")
    learned_loss = LearnedLoss(
        2, [50, 50], "relu", bias=True, prediction_transform="sigmoid"
    )
    return Problem(
        f"mnist T={n_tasks} k={n_inner_steps}",
        optimizee,
        learned_loss,
        bce_with_logits,
        sample_init(optimizee, n_tasks, gen),
        (xs[support], ys[support]),
        (xs[query], ys[query]),
        0.1,
        n_inner_steps,
    )


def ours_meta_loss(p: Problem, n_backprop_steps: int = 0) -> torch.Tensor:
    """The engine's meta-loss for ``p`` (mean task loss after the inner loop)."""
    return meta_objective(
        p.optimizee,
        p.learned_loss,
        p.task_loss,
        p.theta0,
        p.support,
        p.query,
        inner_lr=p.inner_lr,
        n_inner_steps=p.n_inner_steps,
        n_backprop_steps=n_backprop_steps,
    ).mean()


def higher_backward(p: Problem) -> float:
    """The reference: per task, innerloop_ctx + differentiable SGD, backward.

    Accumulates the meta-gradient of the mean task loss in
    ``p.learned_loss``'s ``.grad`` and returns the mean task loss.
    """
    model = p.optimizee
    inner_opt = torch.optim.SGD(model.parameters(), lr=p.inner_lr)
    total = 0.0
    for task in range(p.n_tasks):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(p.theta0[name][task])
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=True) as (
            fmodel,
            diffopt,
        ):
            for _ in range(p.n_inner_steps):
                diffopt.step(
                    p.learned_loss(fmodel(p.support[0][task]), p.support[1][task])
                )
            loss = p.task_loss(fmodel(p.query[0][task]), p.query[1][task]) / p.n_tasks
            loss.backward()
            total += loss.item()
    return total


def meta_gradients(p: Problem, implementation: str) -> list[torch.Tensor]:
    """The meta-gradient of ``p`` by ``ours`` or ``higher``, from zero grads."""
    p.learned_loss.zero_grad()
    if implementation == "ours":
        ours_meta_loss(p).backward()
    else:
        higher_backward(p)
    return [q.grad.clone() for q in p.learned_loss.parameters()]


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters."""
    diff = torch.cat([(x - y).flatten() for x, y in zip(a, b, strict=True)])
    ref = torch.cat([y.flatten() for y in b])
    return (diff.norm() / ref.norm()).item()
