"""Shaped sine frequency: a loss landscape shaped by the true task parameter.

The optimizee has one parameter, y = sin(theta x), and a task is a target
frequency omega with points y = sin(omega x). Plain MSE over theta is full of
local minima. The learned loss sees (prediction, target, x) and nothing else;
meta-training scores its step either with MSE of the outputs (*unshaped*) or
with (theta' - omega)^2, which uses the true frequency (*shaped*). At
meta-test the frequency is unknown to every loss.

Everything here takes batched parameters: ``theta`` of shape ``[R]`` is R
independent optimizees, scored on points ``[R, N]`` (or ``[N]`` shared).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline import shaping
from pipeline.config import VARIANTS, ExperimentParams
from pipeline.meta import MetaTrainResult
from pipeline.nets import LearnedLoss
from pipeline.runtime import generator

N_INPUTS = 3  # prediction, target, x
N_VALIDATION_TASKS = 32


def predict(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sin(theta x)`` for every optimizee: ``[R]`` and ``[R, N]`` -> ``[R, N]``."""
    return torch.sin(theta[:, None] * x)


def loss_inputs(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """The columns any loss of this experiment sees, ``[R * N]`` each.

    The same for both variants and at meta-test: the frequency omega never
    appears here.
    """
    prediction = predict(theta, x)
    y, x = y.expand_as(prediction), x.expand_as(prediction)
    return prediction.reshape(-1), y.reshape(-1), x.reshape(-1)


def mse_pointwise(prediction, target, x):
    """Squared error of every point (the baseline loss)."""
    del x
    return (prediction - target) ** 2


def total_loss(pointwise, theta, x, y) -> torch.Tensor:
    """Sum over optimizees of the mean loss over their points.

    Its gradient w.r.t. ``theta`` is every optimizee's own gradient.
    """
    values = pointwise(*loss_inputs(theta, x, y))
    return values.reshape(theta.shape[0], -1).mean(dim=1).sum()


def task_loss(variant: str, theta, x, y, omega) -> torch.Tensor:
    """The meta-train objective of ``variant`` for iterates ``theta``."""
    if variant == "shaped":
        return ((theta - omega) ** 2).mean()
    if variant == "unshaped":
        return ((predict(theta, x) - y) ** 2).mean()
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


def _uniform(low, high, shape, gen):
    return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float32)


def prepare(params: ExperimentParams, rng: np.random.Generator) -> dict:
    """One seed's meta-test points and the ranges meta-training samples from."""
    p = params.prepare
    return {
        "eval_x": rng.uniform(*p.x_range, size=p.n_eval_points).astype(np.float32),
        "omega_range": np.asarray(p.omega_range, dtype=np.float32),
        "x_range": np.asarray(p.x_range, dtype=np.float32),
        "n_points": np.asarray(p.n_points),
    }


def meta_train(
    learned_loss: LearnedLoss,
    params: ExperimentParams,
    data: dict,
    variant: str,
    gen: torch.Generator,
    progress: bool = False,
) -> MetaTrainResult:
    """Meta-trains ``learned_loss`` in place for ``variant`` (the paper's loop)."""
    mp = params.meta_train
    omega_low, omega_high = data["omega_range"].tolist()
    x_low, x_high = data["x_range"].tolist()
    n_points = int(data["n_points"])
    theta_start = params.optimizee.initial_theta

    def sample_task(g):
        omega = _uniform(omega_low, omega_high, (1,), g)
        x = _uniform(x_low, x_high, (1, n_points), g)
        return omega, x, torch.sin(omega[:, None] * x)

    def initial_theta(task):
        return (torch.full((1,), theta_start),)

    def inner_loss(loss, theta, task):
        _, x, y = task
        return total_loss(loss.pointwise, theta[0], x, y)

    def objective(theta, task):
        omega, x, y = task
        return task_loss(variant, theta[0], x, y, omega)

    val_gen = generator(0, "frequency/validate")
    val_task = sample_validation(data, N_VALIDATION_TASKS, val_gen)

    def validate(loss):
        omega, x, y = val_task
        theta = torch.full_like(omega, theta_start)
        iterates = shaping.train(
            lambda th, _: total_loss(loss.pointwise, th[0], x, y),
            (theta,),
            None,
            lr=mp.inner_lr,
            n_steps=mp.unrolls_per_task,
        )
        final = iterates[-1][0]
        return {
            "val_abs_error": (final - omega).abs().mean().item(),
            "val_mse": ((predict(final, x) - y) ** 2).mean().item(),
        }

    result = shaping.meta_train(
        learned_loss,
        sample_task=sample_task,
        initial_theta=initial_theta,
        inner_loss=inner_loss,
        task_loss=objective,
        schedule=mp,
        generator=gen,
        validate=validate,
        progress=progress,
    )
    task = sample_task(val_gen)
    shaping.check_gradient(learned_loss, inner_loss, initial_theta(task), task)
    return result


def sample_validation(data: dict, n_tasks: int, gen: torch.Generator):
    """Fixed validation tasks: frequencies ``[n]``, points and targets ``[n, N]``."""
    omega_low, omega_high = data["omega_range"].tolist()
    x_low, x_high = data["x_range"].tolist()
    omega = _uniform(omega_low, omega_high, (n_tasks,), gen)
    x = _uniform(x_low, x_high, (n_tasks, int(data["n_points"])), gen)
    return omega, x, torch.sin(omega[:, None] * x)


def count_local_minima(values: np.ndarray, min_prominence: float = 0.0) -> int:
    """Interior local minima of a sampled 1-D curve.

    Runs of equal values count once; a minimum at either end of the grid is
    not counted (the curve may keep falling outside it). With
    ``min_prominence`` > 0 only minima at least that deep count, as a
    fraction of the curve's range: the depth (prominence) of a minimum is
    the lower of the two highest points between it and the nearest lower
    point on each side (or the end of the grid).
    """
    values = np.asarray(values, dtype=float)
    keep = np.concatenate([[True], np.diff(values) != 0])
    v = values[keep]
    if len(v) < 3:
        return 0
    minima = np.flatnonzero((v[1:-1] < v[:-2]) & (v[1:-1] < v[2:])) + 1
    if min_prominence <= 0:
        return len(minima)
    threshold = min_prominence * (v.max() - v.min())
    count = 0
    for i in minima:
        barriers = []
        for side in (v[i::-1], v[i:]):
            lower = np.flatnonzero(side < v[i])
            stop = lower[0] if len(lower) else len(side)
            barriers.append(side[:stop].max())
        count += min(barriers) - v[i] >= threshold
    return int(count)


def landscape(pointwise, thetas: torch.Tensor, x: torch.Tensor, omega: float):
    """Loss value at every ``theta`` of a grid for target frequency ``omega``."""
    y = torch.sin(omega * x)
    with torch.no_grad():
        values = pointwise(*loss_inputs(thetas, x, y))
    return values.reshape(len(thetas), -1).mean(dim=1)


def evaluate(
    params: ExperimentParams, data: dict, losses: dict, seed: int
) -> dict[str, pd.DataFrame]:
    """Landscapes, local minima and convergence of every loss in ``losses``.

    Args:
      losses: method name -> pointwise loss ``(prediction, target, x) -> [N]``.

    Returns:
      ``landscape`` (loss value over the theta grid per target),
      ``minima`` (interior local minima, all and those at least 1 % of the
      landscape's range deep, and the lowest point, per target) and
      ``convergence`` (theta after every meta-test step, per start and
      target), all with a ``seed`` column.
    """
    ep = params.evaluate
    x = torch.as_tensor(data["eval_x"])
    grid = torch.linspace(*ep.landscape_range, ep.landscape_points)
    land, minima, conv = [], [], []
    starts = torch.tensor(ep.initial_thetas)
    targets = torch.tensor(ep.targets)
    theta0 = starts.repeat_interleave(len(targets))
    omega = targets.repeat(len(starts))
    y = torch.sin(omega[:, None] * x)
    for method, pointwise in losses.items():
        for target in ep.targets:
            values = landscape(pointwise, grid, x, target).numpy()
            land.append(
                pd.DataFrame(
                    {"method": method, "target": target, "theta": grid.numpy()}
                ).assign(value=values)
            )
            minima.append(
                {
                    "method": method,
                    "target": target,
                    "n_local_minima": count_local_minima(values),
                    "n_minima_1pct": count_local_minima(values, 0.01),
                    "argmin_theta": float(grid[int(np.argmin(values))]),
                }
            )
        iterates = shaping.train(
            lambda th, _, fn=pointwise: total_loss(fn, th[0], x, y),
            (theta0,),
            None,
            lr=ep.lr,
            n_steps=ep.n_steps,
        )
        for step, (theta,) in enumerate(iterates):
            conv.append(
                pd.DataFrame(
                    {
                        "method": method,
                        "theta0": theta0.numpy(),
                        "target": omega.numpy(),
                        "step": step,
                        "theta": theta.numpy(),
                    }
                )
            )
    return {
        "landscape": pd.concat(land, ignore_index=True).assign(seed=seed),
        "minima": pd.DataFrame(minima).assign(seed=seed),
        "convergence": pd.concat(conv, ignore_index=True).assign(seed=seed),
    }


def summary(tables: dict[str, pd.DataFrame], tolerance: float) -> dict:
    """Headline numbers: mean local minima per target, convergence per method."""
    out: dict = {}
    means = tables["minima"].groupby(["method", "target"]).mean(numeric_only=True)
    for (method, target), row in means.iterrows():
        entry = out.setdefault(method, {})
        entry[f"local_minima_target_{target:g}"] = float(row.n_local_minima)
        entry[f"minima_1pct_target_{target:g}"] = float(row.n_minima_1pct)
    conv = tables["convergence"]
    last = conv[conv.step == conv.step.max()]
    error = (last.theta - last.target).abs()
    for method, group in error.groupby(last.method):
        out.setdefault(method, {})["mean_abs_error"] = float(group.mean())
        out[method]["fraction_reached"] = float((group <= tolerance).mean())
    return out
