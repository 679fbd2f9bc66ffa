"""Report of the generalization grid: transfer matrix, verdicts, cell curves.

Inputs are the ``summary.csv`` and ``curves.csv`` each ``generalize`` cell
wrote; nothing is recomputed but means of the saved curves. The
*improvement* of a cell (:func:`pipeline.generalize.improvement`) compares
the loss, or the error ``1 - accuracy``, of the learned and the standard
loss: ``(baseline - learned) / max(baseline, learned)``, in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.generalize import architecture_label, dataset_label  # noqa: E402
from pipeline.report import band, save_figure  # noqa: E402

# the metrics the matrix shows, per experiment: (split, metric)
MATRIX_METRICS = {
    "sine": [("heldout", "mse")],
    "mnist": [("test", "accuracy"), ("test", "cross_entropy")],
}
AXIS_ORDER = ("reference", "architecture", "dataset", "lr")
TITLES = {"sine": "sine loss", "mnist": "MNIST loss"}


def read_cells(root: Path, cells: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Summaries and curves of the cells in params (stale folders are ignored)."""
    summaries, curves = [], []
    for name in cells:
        folder = root / "results" / "generalize" / name
        if not (folder / "summary.csv").is_file():
            raise FileNotFoundError(
                f"{folder / 'summary.csv'} is missing: run the generalize stage "
                f"for cell {name!r} (dvc repro)"
            )
        summaries.append(pd.read_csv(folder / "summary.csv"))
        curves.append(pd.read_csv(folder / "curves.csv"))
    return pd.concat(summaries, ignore_index=True), pd.concat(curves, ignore_index=True)


def cell_table(cells: dict) -> pd.DataFrame:
    """One row per cell: experiment, axis and what it sets."""
    rows = [
        {
            "cell": name,
            "experiment": cell.experiment,
            "axis": cell.axis,
            "architecture": architecture_label(cell.architecture),
            "dataset": dataset_label(cell.dataset),
            "lr": cell.lr,
        }
        for name, cell in cells.items()
    ]
    frame = pd.DataFrame(rows)
    frame["order"] = frame.axis.map(AXIS_ORDER.index)
    return frame.sort_values(["experiment", "order"], kind="stable").drop(
        columns="order"
    )


def setting(row) -> str:
    """What a cell changes against the meta-training setting, for labels."""
    if row.axis == "architecture":
        return row.architecture
    if row.axis == "dataset":
        return row.dataset
    if row.axis == "lr":
        return f"lr {row.lr:g}"
    return f"meta-train setting ({row.architecture}, {row.dataset}, lr {row.lr:g})"


def _mark(row) -> str:
    if not row.interval_excludes_zero:
        return ""
    return "+" if row.improvement > 0 else "-"


def _select(summary: pd.DataFrame, cell: str, split: str, metric: str):
    """The summary rows of one cell, split and metric (one per checkpoint)."""
    return summary[
        (summary.cell == cell) & (summary.split == split) & (summary.metric == metric)
    ]


def matrix_table(summary: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Improvement per cell (rows) and checkpoint (columns), every matrix metric.

    A trailing ``+`` (``-``) marks cells where the interval of the paired
    difference over seeds excludes zero in favour of (against) the learned
    loss.
    """
    rows = []
    for cell in cells.itertuples():
        for split, metric in MATRIX_METRICS[cell.experiment]:
            sel = _select(summary, cell.cell, split, metric)
            row = {
                "experiment": cell.experiment,
                "axis": cell.axis,
                "setting": setting(cell),
                "metric": f"{split} {metric}",
            }
            for r in sel.sort_values("step").itertuples():
                row[f"step {r.step}"] = f"{r.improvement:+.0%}{_mark(r)}"
            rows.append(row)
    return pd.DataFrame(rows)


def detail_table(summary: pd.DataFrame, cells: pd.DataFrame, experiment: str):
    """Per cell at each checkpoint: both losses, the difference, wins, p."""
    rows = []
    for cell in cells[cells.experiment == experiment].itertuples():
        for split, metric in MATRIX_METRICS[experiment]:
            sel = _select(summary, cell.cell, split, metric)
            for r in sel.sort_values("step").itertuples():
                rows.append(
                    {
                        "setting": setting(cell),
                        "metric": f"{split} {metric}",
                        "step": r.step,
                        "learned": f"{r.learned_mean:.4g}",
                        r.baseline: f"{r.baseline_mean:.4g}",
                        "learned - baseline [CI]": (
                            f"{r.diff_mean:.3g} [{r.diff_low:.3g}, {r.diff_high:.3g}]"
                        ),
                        "seeds won": f"{r.seeds_won}/{r.n_seeds}",
                        "runs won": f"{r.runs_won}/{r.n_runs}",
                        "p": f"{r.p_value:.2g}",
                        "diverged runs (learned / baseline)": (
                            f"{r.diverged_learned} / {r.diverged_baseline}"
                        ),
                    }
                )
    return pd.DataFrame(rows)


def plot_matrix(summary: pd.DataFrame, cells: pd.DataFrame, path: Path) -> Path:
    """Heat maps: cells x checkpoints, colour = improvement, * = interval clear.

    One row of panels per learned loss (its meta-test settings as rows), one
    panel per matrix metric.
    """
    experiments = [e for e in MATRIX_METRICS if (cells.experiment == e).any()]
    n_cols = max(len(MATRIX_METRICS[e]) for e in experiments)
    heights = [int((cells.experiment == e).sum()) for e in experiments]
    fig, axes = plt.subplots(
        len(experiments),
        n_cols,
        figsize=(4.2 + 2.6 * n_cols, 0.3 * sum(heights) + 1.6 * len(experiments)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    steps = sorted(summary.step.unique())
    image = None
    for row, exp in enumerate(experiments):
        these = cells[cells.experiment == exp]
        for col in range(n_cols):
            ax = axes[row, col]
            if col >= len(MATRIX_METRICS[exp]):
                ax.axis("off")
                continue
            split, metric = MATRIX_METRICS[exp][col]
            grid = np.full((len(these), len(steps)), np.nan)
            for i, cell in enumerate(these.itertuples()):
                sel = _select(summary, cell.cell, split, metric)
                for r in sel.itertuples():
                    j = steps.index(r.step)
                    grid[i, j] = r.improvement
                    star = "*" if r.interval_excludes_zero else ""
                    dark = abs(r.improvement) > 0.6
                    text = f"{r.improvement:+.0%}{star}"
                    if metric == "accuracy":
                        # near-perfect accuracy makes relative errors extreme
                        text += f" ({100 * r.diff_mean:+.1f} pt)"
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if dark else "black",
                    )
            image = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
            ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=8)
            labels = [
                "meta-train setting" if c.axis == "reference" else setting(c)
                for c in these.itertuples()
            ]
            ax.set_yticks(
                range(len(these)),
                [
                    f"{c.axis}: {label}"[:44]
                    for c, label in zip(these.itertuples(), labels, strict=True)
                ]
                if col == 0
                else [],
                fontsize=7,
            )
            ax.set_title(f"{TITLES[exp]} → {split} {metric}", fontsize=9)
            if row == len(experiments) - 1 or col >= len(MATRIX_METRICS[exp]) - 1:
                ax.set_xlabel("meta-test SGD steps", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="improvement")
    fig.suptitle(
        "Transfer matrix: meta-train setting (panel row) x meta-test setting "
        "(row); * = interval excludes zero",
        fontsize=10,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _short_label(cell) -> str:
    if cell.axis == "reference":
        return "reference: meta-train setting"
    label = setting(cell).removeprefix("sine ")
    return f"{cell.axis}: {label}"[:52]


def plot_cell_curves(
    curves: pd.DataFrame,
    cells: pd.DataFrame,
    experiment: str,
    split: str,
    metric: str,
    path: Path,
    confidence: float,
) -> Path:
    """One panel per cell: the metric over steps, mean over seeds with a band."""
    these = cells[cells.experiment == experiment]
    n_cols = 4
    n_rows = -(-len(these) // n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(4.0 * n_cols, 2.9 * n_rows), squeeze=False
    )
    sel = curves[(curves.split == split) & (curves.metric == metric)]
    for ax, cell in zip(axes.flat, these.itertuples(), strict=False):
        at = sel[sel.cell == cell.cell]
        per_seed = at.groupby(["method", "seed", "step"], as_index=False).value.mean()
        per_seed = per_seed[per_seed.step > 0]
        for method, group in per_seed.groupby("method"):
            band(ax, group, "step", "value", method, confidence)
        ax.set_xscale("log")
        if metric != "accuracy":
            ax.set_yscale("log")
        ax.set_title(_short_label(cell), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(these) :]:
        ax.axis("off")
    return save_figure(
        fig, path, f"{TITLES[experiment]}: {split} {metric} over meta-test steps"
    )


def _at(summary, cell, split, metric, step):
    sel = _select(summary, cell, split, metric)
    sel = sel[sel.step == step]
    return sel.iloc[0] if len(sel) else None


def _tally(summary, names, split, metric, step) -> tuple[int, int, int]:
    """Cells better / worse (interval excludes zero) / unresolved at ``step``."""
    better = worse = neither = 0
    for name in names:
        r = _at(summary, name, split, metric, step)
        if r is None:
            continue
        if r.interval_excludes_zero and r.improvement > 0:
            better += 1
        elif r.interval_excludes_zero:
            worse += 1
        else:
            neither += 1
    return better, worse, neither


VERDICTS = ("held", "partly held", "mixed", "no clear difference", "did not hold")


def verdict(better: int, worse: int, total: int) -> str:
    """A claim's verdict from its cells' tally (see :func:`verdicts`)."""
    if total and better == total:
        return "held"
    if better and better > worse:
        return "partly held"
    if better:
        return "mixed"
    if worse:
        return "did not hold"
    return "no clear difference"


def verdicts(summary: pd.DataFrame, cells: pd.DataFrame, steps) -> pd.DataFrame:
    """One row per generalization claim, learned loss and metric.

    For every checkpoint: the cells where the learned loss is better than the
    standard loss, worse (the interval over seeds excluding zero either way)
    and unresolved, and the verdict: *held* if better in every cell,
    *partly held* if better in more cells than worse, *mixed* if better in
    some but worse in as many or more, *did not hold* if worse in some and
    better in none, *no clear difference* if neither anywhere.
    """
    claims = {
        "carries to unseen architectures": "architecture",
        "carries to unseen datasets / task families": "dataset",
        "carries to other learning rates": "lr",
        "helps in the meta-train setting itself": "reference",
    }
    rows = []
    for exp in MATRIX_METRICS:
        these = cells[cells.experiment == exp]
        for claim, axis in claims.items():
            names = list(these[these.axis == axis].cell)
            if not names:
                continue
            for split, metric in MATRIX_METRICS[exp]:
                row = {
                    "learned loss": TITLES[exp],
                    "claim": claim,
                    "metric": f"{split} {metric}",
                }
                for step in steps:
                    better, worse, neither = _tally(summary, names, split, metric, step)
                    total = better + worse + neither
                    row[f"step {step}"] = (
                        f"{verdict(better, worse, total)} ({better}/{worse}/{neither})"
                    )
                rows.append(row)
    return pd.DataFrame(rows)


def ahead_steps(curves: pd.DataFrame, cell: str, split: str, metric: str):
    """Logged steps (> 0) where the learned loss's mean over seeds is better."""
    sel = curves[
        (curves.cell == cell)
        & (curves.split == split)
        & (curves.metric == metric)
        & (curves.step > 0)
    ]
    means = sel.groupby(["step", "method"]).value.mean().unstack("method")
    baseline = [m for m in means.columns if m != "learned"][0]
    better = means["learned"] < means[baseline]
    if metric == "accuracy":
        better = means["learned"] > means[baseline]
    return [int(step) for step, ahead in better.items() if ahead]


def horizon_sentence(summary, curves, cells, experiment, steps) -> str:
    """Where the learned loss helps, stops helping or hurts over the horizon."""
    ref = cells[(cells.experiment == experiment) & (cells.axis == "reference")]
    if ref.empty:
        return ""
    name = ref.cell.iloc[0]
    parts = []
    for split, metric in MATRIX_METRICS[experiment]:
        words = []
        for step in steps:
            r = _at(summary, name, split, metric, step)
            if r is None:
                continue
            if not r.interval_excludes_zero:
                state = "no clear difference"
            elif r.improvement > 0:
                state = "helps"
            else:
                state = "hurts"
            words.append(f"{state} at {step} steps ({r.improvement:+.0%})")
        ahead = ahead_steps(curves, name, split, metric)
        words.append(
            "its mean over seeds is ahead at steps "
            + (", ".join(map(str, ahead)) if ahead else "none")
            + " of the logged ones"
        )
        parts.append(f"{split} {metric}: " + ", ".join(words))
    return (
        f"Horizon, {TITLES[experiment]} in its meta-train setting: "
        + "; ".join(parts)
        + "."
    )


def headline(summary, cells, experiment, steps) -> str:
    """One sentence per learned loss: unseen cells won and lost per checkpoint."""
    names = list(
        cells[(cells.experiment == experiment) & (cells.axis != "reference")].cell
    )
    split, metric = MATRIX_METRICS[experiment][0]
    parts = []
    for step in steps:
        better, worse, neither = _tally(summary, names, split, metric, step)
        parts.append(f"{better} better / {worse} worse at {step} steps")
    return (
        f"The {TITLES[experiment]} against the standard loss on {len(names)} unseen "
        f"settings ({split} {metric}, interval over seeds excluding zero): "
        + ", ".join(parts)
        + "."
    )


def loss_minimizers(models: Path, seeds, experiment: str) -> pd.DataFrame:
    """Where each seed's learned loss is lowest, as a function of the prediction.

    Sine: the minimizing prediction over a fine grid for targets +-1, +-2, +-4,
    as a fraction of the target. MNIST: the minimizing probability for label
    0 and for label 1 (over logits in [-12, 12]). A loss whose minimum is not
    at the target keeps pulling the optimizee away from the MSE or
    cross-entropy optimum however long it trains.
    """
    import torch

    from pipeline.artifacts import load_learned_loss

    rows = []
    for seed in seeds:
        loss = load_learned_loss(models / f"seed_{seed}")
        with torch.no_grad():
            if experiment == "sine":
                grid = torch.linspace(-10.0, 10.0, 4001)
                ratios = []
                for target in (-4.0, -2.0, -1.0, 1.0, 2.0, 4.0):
                    values = loss.pointwise(grid, torch.full_like(grid, target))
                    ratios.append(grid[values.argmin()].item() / target)
                rows.append(
                    {
                        "seed": seed,
                        "minimizer / target (mean)": round(float(np.mean(ratios)), 3),
                        "range": f"{min(ratios):.3f} to {max(ratios):.3f}",
                    }
                )
            else:
                logits = torch.linspace(-12.0, 12.0, 4801)
                row = {"seed": seed}
                for label in (0.0, 1.0):
                    values = loss.pointwise(logits, torch.full_like(logits, label))
                    best = torch.sigmoid(logits[values.argmin()]).item()
                    row[f"minimizing probability, label {label:.0f}"] = round(best, 3)
                rows.append(row)
    return pd.DataFrame(rows)
