"""Report tables and figures of the shaping experiments (frequency, mountain car).

Inputs are the tables written by the evaluate stage; nothing is recomputed.
Statistics are over seeds: every seed meta-trained its own shaped and
unshaped loss.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.mountain_car import MAX_POSITION, MIN_POSITION, hill_height  # noqa: E402
from pipeline.report import band, save_figure  # noqa: E402
from pipeline.stats import mean_ci  # noqa: E402

METHOD_ORDER = ("shaped", "unshaped", "mse", "distance")
# the paper's figures, measured with the authors' code (see the README)
AUTHORS_MINIMA = {"shaped": 1, "unshaped": 10, "mse": 10}


def _methods(frame: pd.DataFrame) -> list[str]:
    present = set(frame.method)
    return [m for m in METHOD_ORDER if m in present] + sorted(
        present - set(METHOD_ORDER)
    )


def _panels(n: int):
    """A figure with ``n`` panels in a row (one per target) and their axes."""
    return plt.subplots(1, n, figsize=(4.2 * n, 3.3), squeeze=False)


def _colors(methods) -> dict:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}


def _mean_interval(values, confidence: float) -> str:
    mean, low, high = mean_ci(pd.Series(values, dtype=float), confidence)
    if np.isnan(low):
        return f"{mean:.3g}"
    return f"{mean:.3g} [{low:.3g}, {high:.3g}]"


def minima_table(minima: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Local minima of each loss over the theta grid, per target, over seeds.

    Two counts per loss: every interior local minimum, and those at least
    1 % of the landscape's range deep.
    """
    rows = []
    for target, at in minima.groupby("target"):
        row = {"target omega": f"{target:g}"}
        for method in _methods(at):
            group = at[at.method == method]
            for column, label in (("n_local_minima", "all"), ("n_minima_1pct", ">=1%")):
                counts = group[column]
                row[f"{method} ({label})"] = (
                    f"{_mean_interval(counts, confidence)} "
                    f"(range {counts.min()}-{counts.max()})"
                )
        rows.append(row)
    return pd.DataFrame(rows)


def convergence_table(
    convergence: pd.DataFrame, tolerance: float, confidence: float
) -> pd.DataFrame:
    """Final theta per start and target: mean over seeds and seeds reached."""
    last = convergence[convergence.step == convergence.step.max()]
    rows = []
    for (theta0, target), at in last.groupby(["theta0", "target"]):
        row = {"theta0": f"{theta0:g}", "target": f"{target:g}"}
        for method in _methods(at):
            group = at[at.method == method]
            reached = int(((group.theta - target).abs() <= tolerance).sum())
            row[method] = (
                f"{_mean_interval(group.theta, confidence)}, "
                f"{reached}/{len(group)} within {tolerance:g}"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def plot_landscapes(landscape: pd.DataFrame, seed: int, path: Path) -> Path:
    """Each loss over theta for every target (one seed), scaled to [0, 1]."""
    frame = landscape[landscape.seed == seed]
    targets = sorted(frame.target.unique())
    fig, axes = _panels(len(targets))
    for ax, target in zip(axes[0], targets, strict=True):
        at = frame[frame.target == target]
        for method in _methods(at):
            curve = at[at.method == method].sort_values("theta")
            v = curve.value.to_numpy()
            span = v.max() - v.min()
            ax.plot(
                curve.theta, (v - v.min()) / (span if span > 0 else 1), label=method
            )
        ax.axvline(target, color="k", linestyle=":", linewidth=1)
        ax.set(title=f"target omega = {target:g}", xlabel="theta")
    axes[0][0].set_ylabel("loss (min-max scaled)")
    axes[0][0].legend(fontsize=8)
    return save_figure(
        fig, path, f"Loss landscapes over theta (seed {seed}; dotted: target)"
    )


def plot_convergence(convergence: pd.DataFrame, starts, path: Path) -> Path:
    """Theta over meta-test steps from the given starts, every seed a line."""
    frame = convergence[convergence.theta0.isin(starts)]
    targets = sorted(frame.target.unique())
    methods = _methods(frame)
    fig, axes = _panels(len(targets))
    colors = _colors(methods)
    for ax, target in zip(axes[0], targets, strict=True):
        at = frame[frame.target == target]
        for (method, theta0, seed), run in at.groupby(["method", "theta0", "seed"]):
            first = theta0 == min(starts) and seed == at.seed.min()
            ax.plot(
                run.step,
                run.theta,
                color=colors[method],
                alpha=0.6,
                linewidth=1,
                label=method if first else None,
            )
        ax.axhline(target, color="k", linestyle=":", linewidth=1)
        ax.set(title=f"target omega = {target:g}", xlabel="meta-test SGD step")
    axes[0][0].set_ylabel("theta")
    axes[0][0].legend(fontsize=8)
    return save_figure(
        fig, path, f"theta during meta-test from theta0 in {list(starts)} (all seeds)"
    )


def outcome_table(
    outcomes: pd.DataFrame, train_start: float, confidence: float
) -> pd.DataFrame:
    """From the meta-train start: final position and success per test step."""
    at = outcomes[np.isclose(outcomes.start_position, train_start)]
    rows = []
    for step, group in at.groupby("test_step"):
        row = {"meta-test steps": int(step)}
        for method in _methods(group):
            g = group[group.method == method]
            row[method] = (
                f"{_mean_interval(g.final_position, confidence)}, "
                f"{int(g.success.sum())}/{len(g)} reached"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def seed_table(outcomes: pd.DataFrame, train_start: float) -> pd.DataFrame:
    """Per seed, from the meta-train start: final position after each step.

    A star marks a rollout that reached the flag; ``clipped`` is the share of
    time steps whose action was clipped (no gradient flows there).
    """
    at = outcomes[np.isclose(outcomes.start_position, train_start)]
    rows = []
    for seed, group in at.groupby("seed"):
        row = {"seed": int(seed)}
        initial = group[group.test_step == 0].iloc[0]
        row["initial policy: final p, clipped"] = (
            f"{initial.final_position:.2f}, {initial.clipped_fraction:.0%}"
        )
        for method in _methods(group):
            for step, r in group[
                (group.method == method) & (group.test_step > 0)
            ].groupby("test_step"):
                r = r.iloc[0]
                star = "*" if r.success else ""
                row[f"{method} step {step}"] = (
                    f"{r.final_position:.3f}{star}, {r.clipped_fraction:.0%}"
                )
        rows.append(row)
    return pd.DataFrame(rows)


def start_table(outcomes: pd.DataFrame, n_steps: int) -> pd.DataFrame:
    """Every start state after ``n_steps`` meta-test steps: seeds reaching the flag."""
    at = outcomes[outcomes.test_step == n_steps]
    rows = []
    for start, group in at.groupby("start_position"):
        row = {"start position": f"{start:g}"}
        for method in _methods(group):
            g = group[group.method == method]
            row[method] = (
                f"{int(g.success.sum())}/{len(g)} reached, final "
                f"{g.final_position.mean():.2f}"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def plot_trajectories(
    trajectories: pd.DataFrame, train_start: float, n_steps: int, path: Path
) -> Path:
    """Position over time after ``n_steps`` meta-test steps, and on the hill."""
    at = trajectories[
        np.isclose(trajectories.start_position, train_start)
        & (trajectories.test_step == n_steps)
    ]
    methods = _methods(at)
    colors = _colors(methods)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    track = np.linspace(MIN_POSITION, MAX_POSITION, 200)
    right.plot(track, hill_height(track), color="0.5")
    for (method, seed), run in at.groupby(["method", "seed"]):
        run = run.sort_values("t")
        label = method if seed == at.seed.min() else None
        left.plot(run.t, run.position, color=colors[method], alpha=0.7, label=label)
        right.plot(
            run.position,
            hill_height(run.position),
            "o",
            markersize=3,
            color=colors[method],
            alpha=0.4,
        )
    left.axhline(MAX_POSITION, color="green", linestyle=":", linewidth=1)
    left.set(xlabel="time step", ylabel="position", title="position over time")
    right.set(xlabel="position", ylabel="height", title="visited states on the hill")
    left.legend(fontsize=8)
    return save_figure(
        fig,
        path,
        f"Mountain car from p = {train_start:g} after {n_steps} meta-test steps "
        "(every seed a line)",
    )


def plot_meta_train(
    histories: pd.DataFrame,
    validation: pd.DataFrame,
    path: Path,
    title: str,
    confidence: float,
    yscale: str = "log",
) -> Path:
    """Meta-training curves of each variant: task loss and validation metrics.

    ``yscale`` of the task loss: ``linear`` where it can be negative (the
    REINFORCE task loss of the goal-reaching experiments).
    """
    metrics = [
        c for c in validation.columns if c not in ("iteration", "seed", "variant")
    ]
    fig, axes = plt.subplots(
        1, 1 + len(metrics), figsize=(4.2 * (1 + len(metrics)), 3.3), squeeze=False
    )
    axes = axes[0]
    for variant, group in histories.groupby("variant"):
        smooth = group.copy()
        smooth["task_loss"] = smooth.groupby("seed").task_loss.transform(
            lambda s: s.rolling(10, min_periods=1).mean()
        )
        band(axes[0], smooth, "iteration", "task_loss", variant, confidence)
    axes[0].set(
        title="own task loss (10-iter. mean)", xlabel="outer iteration", yscale=yscale
    )
    for ax, metric in zip(axes[1:], metrics, strict=True):
        for variant, group in validation.groupby("variant"):
            band(ax, group, "iteration", metric, variant, confidence)
        ax.set(title=f"validation: {metric}", xlabel="outer iteration")
    for ax in axes:
        ax.legend(fontsize=8)
    return save_figure(fig, path, title)
