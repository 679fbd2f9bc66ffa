"""Our engine against `higher` on identical problems, same numbers first."""

from __future__ import annotations

import pytest
import torch
from problems import (
    higher_backward,
    meta_gradients,
    mnist_problem,
    ours_meta_loss,
    relative_error,
    sine_problem,
)

CONFIGS = [
    ("sine", 1, 1),
    ("sine", 4, 1),
    ("sine", 16, 1),
    ("sine", 64, 1),
    ("sine", 1, 5),
    ("sine", 1, 10),
    ("sine", 16, 5),
    ("sine", 16, 10),
    ("mnist", 8, 1),
    ("mnist", 8, 5),
    ("mnist", 8, 10),
]
BUILD = {"sine": sine_problem, "mnist": mnist_problem}


def _rounds(n_tasks, n_steps):
    return max(5, 60 // (n_tasks * n_steps) ** 0.5)


@pytest.mark.parametrize("implementation", ["ours", "higher"])
@pytest.mark.parametrize(
    ("experiment", "n_tasks", "n_steps"),
    CONFIGS,
    ids=[f"{e}-T{t}-k{k}" for e, t, k in CONFIGS],
)
def test_meta_iteration(benchmark, experiment, n_tasks, n_steps, implementation):
    problem = BUILD[experiment](n_tasks, n_steps)
    # the two implementations compute the same meta-gradient
    error = relative_error(
        meta_gradients(problem, "ours"), meta_gradients(problem, "higher")
    )
    assert error < 1e-4, f"{problem.name}: meta-gradients differ by {error:.2e}"

    optimizer = torch.optim.Adam(problem.learned_loss.parameters(), lr=1e-3)

    def iteration():
        optimizer.zero_grad()
        if implementation == "ours":
            ours_meta_loss(problem).backward()
        else:
            higher_backward(problem)
        optimizer.step()

    benchmark.group = problem.name
    benchmark.extra_info.update(
        experiment=experiment,
        n_tasks=n_tasks,
        n_inner_steps=n_steps,
        implementation=implementation,
        meta_gradient_relative_error=error,
    )
    benchmark.pedantic(
        iteration, rounds=int(_rounds(n_tasks, n_steps)), warmup_rounds=2
    )
