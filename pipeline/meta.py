"""The ML3 engine: differentiable inner SGD on a learned loss, outer Adam.

Optimizee parameters are plain dicts of tensors with a leading task axis
(``[T, ...]``), used through ``torch.func.functional_call``. One task's inner
loop is written for a single task and ``torch.vmap`` runs the meta-batch at
once. The inner gradient is ``torch.func.grad``, which keeps the graph of
every outer tensor it touches (here the learned-loss parameters and, for
k >= 2, the previous inner iterate), so ``backward()`` on the task loss gives
the exact second-order meta-gradient. There is no first-order option: the
learned loss reaches the task loss only through the inner gradient, so
dropping the second-order term would leave its parameters with a zero
meta-gradient.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_init(
    optimizee: nn.Module,
    n: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> Params:
    """Draws ``n`` fresh parameter sets for ``optimizee``, stacked on axis 0.

    The distribution is torch's default for ``nn.Linear`` (weights and
    biases uniform in +-1/sqrt(fan_in)), drawn from ``generator`` so that a
    seed fixes every initialization without touching the global RNG.
    """
    params = {}
    fan_in = None
    for name, p in optimizee.named_parameters():
        if p.dim() == 2:
            fan_in = p.shape[1]
        elif p.dim() != 1 or fan_in is None:
            raise ValueError(
                f"sample_init supports Linear layers only; parameter {name!r} "
                f"has shape {tuple(p.shape)}"
            )
        bound = 1.0 / math.sqrt(fan_in)
        u = torch.rand((n, *p.shape), generator=generator, dtype=p.dtype)
        params[name] = ((2 * u - 1) * bound).to(device)
    return params


def adapt(
    optimizee: nn.Module,
    learned_loss: nn.Module,
    theta: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    inner_lr: float,
    n_steps: int,
) -> Params:
    """``n_steps`` differentiable SGD steps of one task on the learned loss.

    Args:
      theta: the optimizee's parameters for one task (no task axis).
      x, y: that task's training inputs ``[N, ...]`` and targets ``[N, ...]``.

    Returns:
      The updated parameters theta', still attached to the graph of
      ``learned_loss``'s parameters and of ``theta``.
    """

    def inner_objective(th: Params) -> torch.Tensor:
        return learned_loss(functional_call(optimizee, th, (x,)), y)

    for _ in range(n_steps):
        grads = torch.func.grad(inner_objective)(theta)
        theta = {name: p - inner_lr * grads[name] for name, p in theta.items()}
    return theta


def meta_objective(
    optimizee: nn.Module,
    learned_loss: nn.Module,
    task_loss: LossFn,
    theta0: Params,
    support: tuple,
    query: tuple,
    *,
    inner_lr: float,
    n_inner_steps: int,
) -> torch.Tensor:
    """Task loss after the inner loop, for every task of a meta-batch.

    Args:
      theta0: initial optimizee parameters, ``[T, ...]`` per entry.
      support: ``(x, y)`` with a leading task axis, used by the inner steps.
      query: ``(x, y)`` with a leading task axis, scored by ``task_loss``.

    Returns:
      ``[T]`` task losses, differentiable w.r.t. ``learned_loss``'s parameters.
    """

    def one_task(theta, sx, sy, qx, qy):
        theta = adapt(
            optimizee,
            learned_loss,
            theta,
            sx,
            sy,
            inner_lr=inner_lr,
            n_steps=n_inner_steps,
        )
        return task_loss(functional_call(optimizee, theta, (qx,)), qy)

    return torch.vmap(one_task, randomness="error")(theta0, *support, *query)


@dataclass
class MetaTrainResult:
    """Per-iteration history of one meta-training run."""

    history: list[dict]
    validation: list[dict]


def meta_train(
    optimizee: nn.Module,
    learned_loss: nn.Module,
    task_loss: LossFn,
    *,
    sample_batch: Callable[[torch.Generator], tuple[tuple, tuple]],
    n_outer_iterations: int,
    outer_lr: float,
    inner_lr: float,
    n_inner_steps: int,
    meta_batch_size: int,
    generator: torch.Generator,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
    validate_every: int = 25,
    progress: bool = False,
    device: torch.device | str = "cpu",
) -> MetaTrainResult:
    """Meta-trains ``learned_loss`` in place with the ML3 outer loop.

    Each outer iteration draws ``meta_batch_size`` fresh optimizees and a
    meta-batch from ``sample_batch``, takes ``n_inner_steps`` SGD steps on the
    learned loss, scores the result with ``task_loss`` and updates the learned
    loss with Adam on the mean task loss.

    Raises:
      FloatingPointError: if the meta-loss or the meta-gradient is not finite.
    """
    optimizer = torch.optim.Adam(learned_loss.parameters(), lr=outer_lr)
    history, validation = [], []

    def run_validation(iteration):
        if validate is not None:
            validation.append({"iteration": iteration, **validate(learned_loss)})

    run_validation(0)
    bar = tqdm(
        range(1, n_outer_iterations + 1),
        desc="meta-train",
        disable=not progress,
        leave=False,
    )
    for iteration in bar:
        theta0 = sample_init(optimizee, meta_batch_size, generator, device)
        support, query = sample_batch(generator)

        # task loss before the inner step, as a reference point for the curve
        with torch.no_grad():
            before = torch.vmap(
                lambda th, x, y: task_loss(functional_call(optimizee, th, (x,)), y)
            )(theta0, *query).mean()

        # outer step: the meta-gradient flows back through the inner SGD steps
        losses = meta_objective(
            optimizee,
            learned_loss,
            task_loss,
            theta0,
            support,
            query,
            inner_lr=inner_lr,
            n_inner_steps=n_inner_steps,
        )
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.sqrt(
            sum(
                (p.grad**2).sum()
                for p in learned_loss.parameters()
                if p.grad is not None
            )
        )
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise FloatingPointError(
                f"meta-training diverged at outer iteration {iteration}: task loss "
                f"{loss.item()}, meta-gradient norm {grad_norm.item()}; "
                "lower outer_lr or inner_lr"
            )
        optimizer.step()

        history.append(
            {
                "iteration": iteration,
                "task_loss": loss.item(),
                "task_loss_before": before.item(),
                "meta_grad_norm": grad_norm.item(),
            }
        )
        bar.set_postfix(task_loss=f"{loss.item():.4f}")
        if iteration % validate_every == 0 or iteration == n_outer_iterations:
            run_validation(iteration)
    return MetaTrainResult(history=history, validation=validation)


def train_optimizees(
    optimizee: nn.Module,
    loss_fn: LossFn,
    theta0: Params,
    *,
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    n_steps: int,
    measure: Callable[[Params], dict[str, torch.Tensor]],
    eval_every: int = 1,
) -> dict[str, torch.Tensor]:
    """Trains ``R`` optimizees at once by plain SGD on ``loss_fn`` (meta-test).

    Args:
      theta0: initial parameters ``[R, ...]``; pass the same ones for every
        loss that is compared.
      batch: step -> ``(x, y)`` with a leading run axis ``[R, B, ...]``; the
        same function (same data order) for every loss compared.
      measure: parameters ``[R, ...]`` -> metrics of shape ``[R]`` each.
      eval_every: measure at step 0, every ``eval_every`` steps and at the end.

    Returns:
      ``step`` (``[E]``) and each metric as ``[E, R]``.
    """

    def objective(theta, x, y):
        return loss_fn(functional_call(optimizee, theta, (x,)), y)

    step_grad = torch.vmap(torch.func.grad(objective))
    theta = {k: v.detach() for k, v in theta0.items()}
    records: dict[str, list] = {"step": []}

    def record(step):
        records["step"].append(step)
        for name, value in measure(theta).items():
            records.setdefault(name, []).append(value.detach())

    with torch.no_grad():
        record(0)
        for step in range(1, n_steps + 1):
            x, y = batch(step)
            grads = step_grad(theta, x, y)
            theta = {k: theta[k] - lr * grads[k] for k in theta}
            if step % eval_every == 0 or step == n_steps:
                record(step)
    out = {"step": torch.tensor(records.pop("step"))}
    out.update({k: torch.stack(v) for k, v in records.items()})
    return out
