"""One meta-iteration against one plain SGD step of the same optimizee and batch.

The meta-gradient costs a forward pass, a backward pass and the backward of
that backward; the ratio to a plain training step shows how close the
engine is to that floor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from problems import mnist_problem, ours_meta_loss, sine_problem

BUILD = {"sine": sine_problem, "mnist": mnist_problem}


@pytest.mark.parametrize("experiment", ["sine", "mnist"])
@pytest.mark.parametrize("step", ["meta_iteration", "sgd_step"])
def test_floor(benchmark, experiment, step):
    problem = BUILD[experiment](1, 1)
    x, y = problem.support[0][0], problem.support[1][0]
    model = copy.deepcopy(problem.optimizee)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(problem.theta0[name][0])

    if step == "meta_iteration":
        optimizer = torch.optim.Adam(problem.learned_loss.parameters(), lr=1e-3)

        def run():
            optimizer.zero_grad()
            ours_meta_loss(problem).backward()
            optimizer.step()
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=problem.inner_lr)

        def run():
            optimizer.zero_grad()
            problem.task_loss(model(x), y).backward()
            optimizer.step()

    # both compute a finite loss on the same batch, from the same weights
    loss = (
        ours_meta_loss(problem)
        if step == "meta_iteration"
        else problem.task_loss(model(x), y)
    )
    assert torch.isfinite(loss)
    benchmark.group = f"floor {experiment}"
    benchmark.extra_info.update(experiment=experiment, step=step)
    benchmark.pedantic(run, rounds=100, warmup_rounds=5)
