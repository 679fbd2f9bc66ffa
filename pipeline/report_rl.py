"""Report tables and figures of the reinforcement-learning experiments.

Inputs are the tables written by the evaluate stage; nothing is recomputed.
Every held-out goal of every seed is one paired comparison: both methods
start from the same fresh policy on the same goal. Intervals are over the
goal x seed pairs, as the protocol asks, and each table also counts the
seeds on which the learned loss wins on average over its goals (goals of
one seed share a learned loss, so they are not independent draws).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.report import band, save_figure  # noqa: E402
from pipeline.stats import mean_ci, paired_summary  # noqa: E402

# link lengths of MuJoCo's Reacher-v5 arm (for drawing it)
ARM = (0.1, 0.11)


def _interval(values, confidence: float, digits: int = 3) -> str:
    mean, low, high = mean_ci(pd.Series(values, dtype=float), confidence)
    if np.isnan(low):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} [{low:.{digits}g}, {high:.{digits}g}]"


def verdict(summary: dict, lower_is_better: bool) -> str:
    """'learned better', 'baseline better' or 'no clear difference'.

    Decided by whether the interval of the paired difference (learned minus
    baseline) excludes zero.
    """
    low, high = summary["diff_low"], summary["diff_high"]
    if np.isnan(low) or low <= 0 <= high:
        return "no clear difference"
    learned_lower = high < 0
    return "learned better" if learned_lower == lower_is_better else "baseline better"


def compare(
    frame: pd.DataFrame,
    value: str,
    baseline: str,
    *,
    lower_is_better: bool,
    confidence: float,
) -> dict:
    """Paired learned-vs-baseline statistics of ``value`` over goal x seed pairs.

    ``frame`` holds one row per seed, method and goal at one step.
    """
    wide = frame.pivot_table(
        index=["seed", "goal"], columns="method", values=value, aggfunc="mean"
    ).dropna()
    pairs = paired_summary(
        wide["learned"],
        wide[baseline],
        lower_is_better=lower_is_better,
        confidence=confidence,
    )
    seeds = wide.groupby(level="seed").mean()
    diff = seeds["learned"] - seeds[baseline]
    pairs["seeds_won"] = int((diff < 0).sum() if lower_is_better else (diff > 0).sum())
    pairs["n_seeds"] = len(seeds)
    pairs["verdict"] = verdict(pairs, lower_is_better)
    pairs["learned"] = wide["learned"]
    pairs["baseline"] = wide[baseline]
    return pairs


def comparison_table(
    frame: pd.DataFrame,
    *,
    step: str,
    steps,
    values: dict[str, bool],
    baseline: str,
    confidence: float,
) -> pd.DataFrame:
    """One display row per step and value: both methods, difference, verdict.

    Args:
      step: the column that counts updates (``test_step``, ``update``).
      values: value column -> whether lower is better.
    """
    rows = []
    for at in steps:
        group = frame[frame[step] == at]
        for value, lower in values.items():
            s = compare(
                group, value, baseline, lower_is_better=lower, confidence=confidence
            )
            rows.append(
                {
                    step: at,
                    "metric": value,
                    "learned": _interval(s["learned"], confidence),
                    baseline: _interval(s["baseline"], confidence),
                    "learned - " + baseline: _interval(
                        s["learned"] - s["baseline"], confidence
                    ),
                    "pairs won": f"{s['wins']}/{s['n_pairs']}",
                    "seeds won": f"{s['seeds_won']}/{s['n_seeds']}",
                    "p": f"{s['p_value']:.2g}",
                    "verdict": s["verdict"],
                }
            )
    return pd.DataFrame(rows)


def plot_over_steps(
    frame: pd.DataFrame,
    x: str,
    values: dict[str, str],
    path: Path,
    title: str,
    confidence: float,
) -> Path:
    """Mean and interval band of each value over ``x``, one line per method."""
    fig, axes = plt.subplots(
        1, len(values), figsize=(4.4 * len(values), 3.4), squeeze=False
    )
    for ax, (value, label) in zip(axes[0], values.items(), strict=True):
        for method, group in frame.groupby("method"):
            band(ax, group, x, value, method, confidence)
        ax.set(xlabel=x.replace("_", " "), title=label)
        ax.legend(fontsize=8)
    return save_figure(fig, path, title)


def _draw_arm(ax, q1: float, q2: float, **style) -> None:
    elbow = (ARM[0] * np.cos(q1), ARM[0] * np.sin(q1))
    tip = (elbow[0] + ARM[1] * np.cos(q1 + q2), elbow[1] + ARM[1] * np.sin(q1 + q2))
    ax.plot([0, elbow[0], tip[0]], [0, elbow[1], tip[1]], "-o", markersize=3, **style)


def _method_panels(frame: pd.DataFrame):
    """A square panel per method of ``frame``: the figure, (axis, method)
    pairs and the colour cycle that gives each goal its colour."""
    methods = sorted(set(frame.method))
    fig, axes = plt.subplots(
        1, len(methods), figsize=(4.2 * len(methods), 4.2), squeeze=False
    )
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return fig, list(zip(axes[0], methods, strict=True)), cycle


def plot_arm_paths(
    trajectories: pd.DataFrame, outcomes: pd.DataFrame, path: Path, title: str
) -> Path:
    """Fingertip paths to every held-out goal, one panel per method.

    ``trajectories`` holds one seed at one meta-test step; the final arm
    pose is drawn for each goal, and each goal is a cross in its path's colour.
    """
    fig, panels, cycle = _method_panels(trajectories)
    goals = outcomes.drop_duplicates("goal").set_index("goal")
    for ax, method in panels:
        rows = trajectories[trajectories.method == method]
        for i, (goal, run) in enumerate(rows.groupby("goal")):
            color = cycle[i % len(cycle)]
            run = run.sort_values("t")
            ax.plot(run.x, run.y, color=color, linewidth=1)
            _draw_arm(ax, run.q1.iloc[-1], run.q2.iloc[-1], color=color, alpha=0.35)
            ax.plot(
                goals.goal_x[goal], goals.goal_y[goal], "x", color=color, markersize=8
            )
        reach = sum(ARM)
        ax.add_patch(plt.Circle((0, 0), reach, fill=False, color="0.7", ls=":"))
        ax.set(
            xlim=(-reach * 1.1, reach * 1.1),
            ylim=(-reach * 1.1, reach * 1.1),
            aspect="equal",
            title=method,
            xlabel="x (m)",
            ylabel="y (m)",
        )
    return save_figure(fig, path, title)


def plot_goal_paths(paths: pd.DataFrame, path: Path, title: str) -> Path:
    """Point or fingertip paths of one episode per goal, one panel per method."""
    fig, panels, cycle = _method_panels(paths)
    for ax, method in panels:
        rows = paths[paths.method == method]
        for i, (_, run) in enumerate(rows.groupby("goal")):
            color = cycle[i % len(cycle)]
            run = run.sort_values("t")
            ax.plot(run.x, run.y, color=color, linewidth=1)
            ax.plot(run.goal_x.iloc[0], run.goal_y.iloc[0], "x", color=color)
        ax.plot([0], [0], "k.", markersize=6)
        ax.set(aspect="equal", title=method, xlabel="x", ylabel="y")
    return save_figure(fig, path, title)
