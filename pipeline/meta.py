"""The ML3 engine: differentiable inner SGD on a learned loss, outer Adam.

Optimizee parameters are plain dicts of tensors with a leading task axis
(``[T, ...]``): one meta-batch of T tasks is one set of batched tensors, not
a Python loop. :func:`batched_forward` runs the optimizee on all tasks at
once, with batched matrix products for MLPs of ``nn.Linear`` layers and
``torch.vmap`` over ``torch.func.functional_call`` for any other module.
Tasks are independent, so the gradient of the *sum* of per-task inner losses
with respect to the batched parameters is every task's own gradient; taken
with ``torch.autograd.grad(create_graph=True)`` it keeps the graph to the
learned-loss parameters and to the previous iterate, and ``backward()`` on
the task loss is the exact second-order meta-gradient for any number of
unrolled steps.

There is no first-order option: the learned loss reaches the task loss only
through the inner gradient, so dropping the second-order term would leave its
parameters with a zero meta-gradient. Truncated backpropagation (only the
last few of the k inner steps carry the graph) is offered to bound memory;
it changes the meta-gradient and warns when used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

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


def _is_plain_mlp(optimizee: nn.Module) -> bool:
    return isinstance(optimizee, nn.Sequential) and all(
        isinstance(m, nn.Linear)
        or not list(m.parameters(recurse=True))
        and not list(m.buffers())
        for m in optimizee
    )


def batched_forward(
    optimizee: nn.Module, theta: Params, x: torch.Tensor
) -> torch.Tensor:
    """``optimizee`` applied task by task to ``x``.

    Args:
      theta: parameters with a task axis, ``[T, ...]`` per entry.
      x: inputs ``[T, N, ...]``, or ``[N, ...]`` shared by every task.

    Returns:
      Outputs ``[T, N, ...]``.
    """
    n_tasks = next(iter(theta.values())).shape[0]
    shared = x.dim() < 3 or x.shape[0] != n_tasks
    if not _is_plain_mlp(optimizee):
        return vmap_forward(optimizee, theta, x, shared=shared)
    h = x.expand(n_tasks, *x.shape) if shared else x
    for index, module in enumerate(optimizee):
        if isinstance(module, nn.Linear):
            weight = theta[f"{index}.weight"]  # [T, out, in]
            bias = theta.get(f"{index}.bias")  # [T, out] or None
            if bias is None:
                h = torch.bmm(h, weight.transpose(1, 2))
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        else:
            h = module(h)
    return h


def vmap_forward(
    optimizee: nn.Module, theta: Params, x: torch.Tensor, *, shared: bool = False
) -> torch.Tensor:
    """The general path of :func:`batched_forward`: vmap over functional_call."""
    return torch.vmap(
        lambda th, xi: functional_call(optimizee, th, (xi,)),
        in_dims=(0, None if shared else 0),
    )(theta, x)


def per_task_loss(loss_fn: LossFn, prediction: torch.Tensor, target: torch.Tensor):
    """``loss_fn`` of every task: ``[T, N, ...]`` inputs -> ``[T]`` losses.

    A learned loss (anything with ``pointwise``) scores all rows of all tasks
    in one call; other losses are vmapped over the task axis.
    """
    if hasattr(loss_fn, "pointwise"):
        n_tasks, n_rows = prediction.shape[:2]
        rows = loss_fn.pointwise(prediction.flatten(0, 1), target.flatten(0, 1))
        return rows.view(n_tasks, n_rows).mean(dim=1)
    return torch.vmap(loss_fn)(prediction, target)


def adapt(
    optimizee: nn.Module,
    loss_fn: LossFn,
    theta: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    inner_lr: float,
    n_steps: int,
    n_backprop_steps: int = 0,
    create_graph: bool = True,
) -> Params:
    """``n_steps`` SGD steps of every task on ``loss_fn`` (the inner loop).

    Args:
      theta: parameters ``[T, ...]``.
      x, y: training inputs and targets, ``[T, N, ...]``.
      n_backprop_steps: if > 0, only the last ``n_backprop_steps`` steps keep
        the graph (truncated backpropagation); 0 keeps all of them.
      create_graph: False for plain training (meta-test), no graph at all.

    Returns:
      The updated parameters; with ``create_graph`` they remain attached to
      the graph of ``loss_fn``'s parameters and of ``theta``.
    """
    # under an outer no_grad (validation) the graph is dropped, not the gradient
    create_graph = create_graph and torch.is_grad_enabled()
    first_with_graph = max(n_steps - n_backprop_steps, 0) if n_backprop_steps else 0
    names = list(theta)
    for step in range(n_steps):
        with_graph = create_graph and step >= first_with_graph
        cut = not with_graph or (step == first_with_graph and step > 0)
        if cut or not all(theta[k].requires_grad for k in names):
            # a fresh leaf: nothing before this step is differentiated
            theta = {k: theta[k].detach().requires_grad_(True) for k in names}
        with torch.enable_grad():
            prediction = batched_forward(optimizee, theta, x)
            loss = per_task_loss(loss_fn, prediction, y).sum()
            grads = torch.autograd.grad(
                loss, [theta[k] for k in names], create_graph=with_graph
            )
        theta = {k: theta[k] - inner_lr * g for k, g in zip(names, grads, strict=True)}
    if not create_graph:
        theta = {k: v.detach() for k, v in theta.items()}
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
    n_backprop_steps: int = 0,
) -> torch.Tensor:
    """Task loss after the inner loop, for every task of a meta-batch.

    Args:
      theta0: initial optimizee parameters, ``[T, ...]`` per entry.
      support: ``(x, y)`` with a leading task axis, used by the inner steps.
      query: ``(x, y)`` with a leading task axis, scored by ``task_loss``.

    Returns:
      ``[T]`` task losses, differentiable w.r.t. ``learned_loss``'s parameters.
    """
    theta = adapt(
        optimizee,
        learned_loss,
        theta0,
        *support,
        inner_lr=inner_lr,
        n_steps=n_inner_steps,
        n_backprop_steps=n_backprop_steps,
    )
    qx, qy = query
    return per_task_loss(task_loss, batched_forward(optimizee, theta, qx), qy)


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
    n_backprop_steps: int = 0,
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
    if n_backprop_steps and n_backprop_steps < n_inner_steps:
        warnings.warn(
            f"truncated backpropagation: only the last {n_backprop_steps} of "
            f"{n_inner_steps} inner steps carry the graph, so the meta-gradient "
            "is approximate",
            stacklevel=2,
        )
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
            qx, qy = query
            before = per_task_loss(
                task_loss, batched_forward(optimizee, theta0, qx), qy
            ).mean()

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
            n_backprop_steps=n_backprop_steps,
        )
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in learned_loss.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
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
        if progress:
            bar.set_postfix(task_loss=f"{loss.item():.4f}")
        if iteration % validate_every == 0 or iteration == n_outer_iterations:
            run_validation(iteration)
    check_not_collapsed(
        learned_loss, batched_forward(optimizee, theta0, support[0]), support[1]
    )
    return MetaTrainResult(history=history, validation=validation)


class LearnedLossCollapsed(RuntimeError):
    """The learned loss no longer depends on the prediction: it cannot train."""


def check_not_collapsed(
    learned_loss: nn.Module,
    prediction: torch.Tensor,
    target: torch.Tensor,
    tol: float = 1e-7,
) -> float:
    """Raises :class:`LearnedLossCollapsed` if the loss has no gradient to give.

    A learned loss that is constant in the prediction (for example a Softplus
    output stuck at a constant, or a dead ReLU layer) passes a zero gradient
    to every optimizee, so training with it changes nothing. Checked on a
    meta-train batch: ``prediction`` and ``target`` ``[T, N, ...]``.

    Returns:
      The largest gradient magnitude w.r.t. the prediction, per row.
    """
    with torch.enable_grad():
        prediction = prediction.detach().requires_grad_(True)
        values = per_task_loss(learned_loss, prediction, target).sum()
        (grad,) = torch.autograd.grad(values, prediction)
    # per-task losses are means over N rows: undo that to judge each row
    largest = (grad.abs() * prediction.shape[1]).max().item()
    if not largest > tol:
        raise LearnedLossCollapsed(
            f"learned loss collapsed: its gradient w.r.t. the prediction is at most "
            f"{largest:.3g} on a meta-train batch (tolerance {tol:g}), so it would "
            "not train anything; not saving it. Try a lower outer_lr, "
            "output_activation: none, or another learned_loss init"
        )
    return largest


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
    theta = {k: v.detach() for k, v in theta0.items()}
    records: dict[str, list] = {"step": []}

    def record(step):
        records["step"].append(step)
        with torch.no_grad():
            for name, value in measure(theta).items():
                records.setdefault(name, []).append(value.detach())

    record(0)
    for step in range(1, n_steps + 1):
        x, y = batch(step)
        theta = adapt(
            optimizee, loss_fn, theta, x, y, inner_lr=lr, n_steps=1, create_graph=False
        )
        if step % eval_every == 0 or step == n_steps:
            record(step)
    out = {"step": torch.tensor(records.pop("step"))}
    out.update({k: torch.stack(v) for k, v in records.items()})
    return out
