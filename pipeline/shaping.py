"""Meta-training with extra information: the outer loop of the shaping experiments.

In the shaping experiments (sine frequency, mountain car) the task loss of
the *shaped* variant uses information the learned loss never sees (the true
task parameter, an intermediate goal); the *unshaped* variant scores the same
iterate without it. Both variants share this loop, so the only difference
between them is the task loss.

The optimizee is a tuple of tensors. Each task starts from its initial
parameters and takes ``unrolls_per_task`` one-step unrolls in sequence: a
differentiable SGD step on the learned loss, the task loss of the new
iterate, an Adam step on phi, and the next unroll starts from the (detached)
new iterate. This is the authors' protocol for both experiments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.meta import LearnedLossCollapsed, MetaTrainResult

Theta = tuple[torch.Tensor, ...]
# (theta, task) -> scalar; the learned loss is bound by the caller
ThetaLoss = Callable[[Theta, Any], torch.Tensor]


def sgd_step(
    loss: torch.Tensor, theta: Theta, lr: float, *, create_graph: bool
) -> Theta:
    """``theta - lr * grad(loss)``; with ``create_graph`` it stays differentiable."""
    grads = torch.autograd.grad(loss, theta, create_graph=create_graph)
    return tuple(t - lr * g for t, g in zip(theta, grads, strict=True))


def detach(theta: Theta) -> Theta:
    """A new leaf for every tensor of ``theta``, ready for the next step."""
    return tuple(t.detach().requires_grad_(True) for t in theta)


def train(
    loss_fn: ThetaLoss, theta0: Theta, task, *, lr: float, n_steps: int
) -> list[Theta]:
    """Plain SGD on ``loss_fn`` (meta-test): the iterates, ``theta0`` first."""
    iterates = [tuple(t.detach() for t in theta0)]
    theta = detach(theta0)
    for _ in range(n_steps):
        theta = detach(sgd_step(loss_fn(theta, task), theta, lr, create_graph=False))
        iterates.append(tuple(t.detach() for t in theta))
    return iterates


def meta_train(
    learned_loss: torch.nn.Module,
    *,
    sample_task: Callable[[torch.Generator], Any],
    initial_theta: Callable[[Any], Theta],
    inner_loss: Callable[[torch.nn.Module, Theta, Any], torch.Tensor],
    task_loss: ThetaLoss,
    schedule,
    generator: torch.Generator,
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    progress: bool = False,
    on_iteration: Callable[[int], None] | None = None,
) -> MetaTrainResult:
    """Meta-trains ``learned_loss`` in place (see the module docstring).

    Args:
      schedule: the ``meta_train`` section of the experiment
        (:class:`pipeline.config.ShapingMetaTrainParams`): iteration counts,
        learning rates and how often to validate.
      sample_task: draws one meta-train task.
      initial_theta: the optimizee's starting parameters for a task.
      inner_loss: ``(learned_loss, theta, task)`` -> the scalar the inner
        SGD step descends; it must feed the learned loss only what the
        environment provides at meta-test.
      task_loss: scores the iterate after the inner step.
      on_iteration: called with the iteration number after each outer
        iteration's updates, before validation (the reacher refreshes its
        dynamics model there).

    Raises:
      FloatingPointError: if a task loss or a meta-gradient is not finite.
    """
    n_outer_iterations = schedule.n_outer_iterations
    optimizer = torch.optim.Adam(learned_loss.parameters(), lr=schedule.outer_lr)
    history, validation = [], []
    if validate is not None:
        validation.append({"iteration": 0, **validate(learned_loss)})
    bar = tqdm(
        range(1, n_outer_iterations + 1),
        desc="meta-train",
        disable=not progress,
        leave=False,
    )
    for iteration in bar:
        losses, norms = [], []
        for _ in range(schedule.tasks_per_iteration):
            task = sample_task(generator)
            theta = detach(initial_theta(task))
            for _ in range(schedule.unrolls_per_task):
                new = sgd_step(
                    inner_loss(learned_loss, theta, task),
                    theta,
                    schedule.inner_lr,
                    create_graph=True,
                )
                loss = task_loss(new, task)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.linalg.vector_norm(
                    torch.stack(
                        [
                            p.grad.norm()
                            for p in learned_loss.parameters()
                            if p.grad is not None
                        ]
                    )
                )
                if not (torch.isfinite(loss) and torch.isfinite(norm)):
                    raise FloatingPointError(
                        f"meta-training diverged at outer iteration {iteration}: "
                        f"task loss {loss.item()}, meta-gradient norm "
                        f"{norm.item()}; lower outer_lr or inner_lr"
                    )
                optimizer.step()
                losses.append(loss.item())
                norms.append(norm.item())
                theta = detach(new)
        history.append(
            {
                "iteration": iteration,
                "task_loss": sum(losses) / len(losses),
                "task_loss_last_unroll": losses[-1],
                "meta_grad_norm": sum(norms) / len(norms),
            }
        )
        if progress:
            bar.set_postfix(task_loss=f"{history[-1]['task_loss']:.4f}")
        if on_iteration is not None:
            on_iteration(iteration)
        if validate is not None and (
            iteration % schedule.validate_every == 0 or iteration == n_outer_iterations
        ):
            validation.append({"iteration": iteration, **validate(learned_loss)})
    return MetaTrainResult(history=history, validation=validation)


def check_gradient(
    learned_loss: torch.nn.Module,
    inner_loss: Callable[[torch.nn.Module, Theta, Any], torch.Tensor],
    theta: Theta,
    task,
    tol: float = 1e-7,
) -> float:
    """Raises :class:`LearnedLossCollapsed` if the loss gives no gradient.

    A learned loss that is constant in the optimizee's outputs gives every
    optimizee a zero update; checked on a meta-train task.

    Returns:
      The norm of the inner gradient w.r.t. ``theta``.
    """
    theta = detach(theta)
    with torch.enable_grad():
        grads = torch.autograd.grad(inner_loss(learned_loss, theta, task), theta)
    largest = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    if not largest > tol:
        raise LearnedLossCollapsed(
            f"learned loss collapsed: its gradient w.r.t. the optimizee is "
            f"{largest:.3g} on a meta-train task (tolerance {tol:g}), so it would "
            "not train anything; not saving it. Try a lower outer_lr or another "
            "learned_loss init"
        )
    return largest
