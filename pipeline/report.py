"""The report: long tables, seed statistics, figures, Markdown and HTML.

Inputs are the saved outputs of earlier stages (meta-test curves in long
format, meta-training curves); nothing is recomputed here. Every figure is a
PNG file; the HTML page embeds them, so it opens with no network.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.stats import mean_ci, paired_summary  # noqa: E402

LOWER_IS_BETTER = {"mse": True, "cross_entropy": True, "accuracy": False}
TITLES = {
    "sine": "Sine regression",
    "mnist": "Binary MNIST",
    "frequency": "Shaped sine frequency",
    "mountain_car": "Mountain car with an intermediate goal",
    "reacher": "Model-based RL: the MuJoCo reacher",
    "goal_point_mass": "Model-free RL: point mass reaching goals",
    "goal_reacher": "Model-free RL: reacher reaching goals",
}
# final meta-test MSE on the training points, mean +- sd over 5 seeds,
# measured by running the authors' public code (facebookresearch/LearningToLearn)
AUTHORS_SINE = {"learned": (2.23, 0.51), "mse": (3.59, 0.85)}


@dataclass
class Section:
    """A report section: heading, paragraphs, tables and figures in order."""

    title: str
    blocks: list = field(default_factory=list)

    def text(self, paragraph: str):
        self.blocks.append(("text", paragraph))

    def table(self, frame: pd.DataFrame, caption: str = ""):
        self.blocks.append(("table", (frame, caption)))

    def figure(self, path: Path, caption: str):
        self.blocks.append(("figure", (path, caption)))


def _fmt(value: float, digits: int = 3) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}g}"
    )


def _interval(mean, low, high) -> str:
    return f"{_fmt(mean)} [{_fmt(low)}, {_fmt(high)}]"


def baseline_method(curves: pd.DataFrame) -> str:
    """The method the learned loss is compared with (the one not called learned)."""
    others = sorted(set(curves.method) - {"learned"})
    if len(others) != 1:
        raise ValueError(
            f"expected 'learned' and one baseline, got {sorted(set(curves.method))}"
        )
    return others[0]


def final_rows(curves: pd.DataFrame) -> pd.DataFrame:
    """The long results table: final-step value per method, seed, task, run, metric."""
    last = curves[curves.step == curves.groupby("experiment").step.transform("max")]
    return last.reset_index(drop=True)


def checkpoint_steps(curves: pd.DataFrame) -> list[int]:
    """An early step (about a tenth of the horizon) and the final step."""
    steps = sorted(curves.step.unique())
    final = steps[-1]
    early = min(steps[1:] or steps, key=lambda s: abs(s - final / 10))
    return sorted({int(early), int(final)})


def compare(group: pd.DataFrame, metric: str, baseline: str, confidence: float):
    """Learned vs baseline on one step, split and metric of the long table.

    Returns the per-seed means (methods as columns) and the paired summaries
    (:func:`paired_summary`) over seeds and over single task instances.
    """
    lower = LOWER_IS_BETTER[metric]
    per_seed = group.groupby(["method", "seed"]).value.mean().unstack("method")
    per_instance = group.pivot_table(
        index=["seed", "task", "run"], columns="method", values="value"
    )
    seeds, instances = (
        paired_summary(
            table["learned"],
            table[baseline],
            lower_is_better=lower,
            confidence=confidence,
        )
        for table in (per_seed, per_instance)
    )
    return per_seed, seeds, instances


def comparison_table(
    curves: pd.DataFrame, baseline: str, confidence: float
) -> pd.DataFrame:
    """Display table: learned vs baseline at checkpoint steps, every split/metric.

    Means and intervals are over seeds (of per-seed means over tasks and
    runs); wins count seeds and single task instances where the learned
    loss is better; p is a paired t-test over seeds.
    """
    rows = []
    # the validation split only monitors meta-training; it stays in the CSVs
    shown = curves[curves.split != "val"]
    for step in checkpoint_steps(curves):
        at = shown[shown.step == step]
        for (split, metric), group in at.groupby(["split", "metric"]):
            per_seed, seeds, inst = compare(group, metric, baseline, confidence)
            rows.append(
                {
                    "step": step,
                    "split": split,
                    "metric": metric,
                    "learned": _interval(*mean_ci(per_seed["learned"], confidence)),
                    baseline: _interval(*mean_ci(per_seed[baseline], confidence)),
                    "learned - baseline": _interval(
                        seeds["diff_mean"], seeds["diff_low"], seeds["diff_high"]
                    ),
                    "seeds won": f"{seeds['wins']}/{seeds['n_pairs']}",
                    "instances won": f"{inst['wins']}/{inst['n_pairs']}",
                    "p (paired t)": _fmt(seeds["p_value"], 2),
                }
            )
    return pd.DataFrame(rows)


def plot_meta_train(
    histories: pd.DataFrame,
    validation: pd.DataFrame,
    path: Path,
    title: str,
    confidence: float,
) -> Path:
    """Meta-training curves: task loss after the inner loop, band over seeds."""
    metrics = [c for c in validation.columns if c not in ("iteration", "seed")]
    fig, axes = plt.subplots(
        1, 1 + len(metrics), figsize=(4.5 * (1 + len(metrics)), 3.4)
    )
    smooth = histories.copy()
    smooth["task_loss"] = smooth.groupby("seed").task_loss.transform(
        lambda s: s.rolling(10, min_periods=1).mean()
    )
    smooth["task_loss_before"] = smooth.groupby("seed").task_loss_before.transform(
        lambda s: s.rolling(10, min_periods=1).mean()
    )
    band(axes[0], smooth, "iteration", "task_loss", "after inner loop", confidence)
    band(
        axes[0],
        smooth,
        "iteration",
        "task_loss_before",
        "before (fresh init)",
        confidence,
    )
    axes[0].set(title="meta-train task loss (10-iter. mean)", xlabel="outer iteration")
    for ax, metric in zip(axes[1:], metrics, strict=True):
        band(ax, validation, "iteration", metric, metric, confidence)
        ax.set(title=f"validation: {metric}", xlabel="outer iteration")
    for ax in axes:
        ax.legend(fontsize=8)
    return save_figure(fig, path, title)


def plot_meta_test(
    curves: pd.DataFrame, path: Path, title: str, confidence: float
) -> Path:
    """Meta-test curves per split and metric, mean over seeds with a band."""
    panels = sorted(curves.groupby(["metric", "split"]).groups)
    n_cols = min(3, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(4.5 * n_cols, 3.3 * n_rows), squeeze=False
    )
    for ax, (metric, split) in zip(axes.flat, panels, strict=False):
        sel = curves[(curves.metric == metric) & (curves.split == split)]
        per_seed = sel.groupby(["method", "seed", "step"], as_index=False).value.mean()
        for method, group in per_seed.groupby("method"):
            band(ax, group, "step", "value", method, confidence)
        ax.set(title=f"{split}: {metric}", xlabel="meta-test SGD step")
        if metric in ("mse", "cross_entropy"):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return save_figure(fig, path, title)


def save_figure(fig, path: Path, title: str) -> Path:
    """Titles, lays out, writes and closes ``fig``; returns ``path``."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def band(ax, frame: pd.DataFrame, x: str, y: str, label: str, confidence: float):
    rows = [(key, *mean_ci(group[y], confidence)) for key, group in frame.groupby(x)]
    stats = pd.DataFrame(rows, columns=[x, "mean", "low", "high"])
    (line,) = ax.plot(stats[x], stats["mean"], label=label)
    ax.fill_between(
        stats[x],
        stats["low"],
        stats["high"],
        alpha=0.2,
        color=line.get_color(),
        linewidth=0,
    )


def sine_paper_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Final training-point MSE, mean +- sd over seeds, beside the authors' numbers."""
    last = curves[(curves.step == curves.step.max()) & (curves.split == "train")]
    per_seed = last.groupby(["method", "seed"]).value.mean()
    rows = []
    for method, (ref_mean, ref_sd) in AUTHORS_SINE.items():
        values = per_seed[method]
        rows.append(
            {
                "method": method,
                "ours: mean ± sd over seeds": (
                    f"{values.mean():.2f} ± {values.std():.2f}"
                ),
                "authors' code": f"{ref_mean:.2f} ± {ref_sd:.2f}",
            }
        )
    return pd.DataFrame(rows)


def render_markdown(title: str, sections: list[Section], base: Path) -> str:
    """The report as Markdown, with figures linked relative to ``base``."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for kind, content in section.blocks:
            if kind == "text":
                lines += [content, ""]
            elif kind == "table":
                frame, caption = content
                if caption:
                    lines += [f"*{caption}*", ""]
                lines += [frame.to_markdown(index=False), ""]
            else:
                path, caption = content
                lines += [
                    f"![{caption}]({path.relative_to(base).as_posix()})",
                    f"*{caption}*",
                    "",
                ]
    return "\n".join(lines)


def render_html(title: str, sections: list[Section]) -> str:
    """The report as one self-contained HTML page (figures inlined as base64)."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}",
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}",
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}",
        "th{background:#f3f3f3} img{max-width:100%} .cap{color:#555;font-style:italic}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for kind, content in section.blocks:
            if kind == "text":
                parts.append(f"<p>{html.escape(content)}</p>")
            elif kind == "table":
                frame, caption = content
                if caption:
                    parts.append(f"<p class='cap'>{html.escape(caption)}</p>")
                parts.append(frame.to_html(index=False, border=0))
            else:
                path, caption = content
                data = base64.b64encode(Path(path).read_bytes()).decode()
                mime = "image/gif" if Path(path).suffix == ".gif" else "image/png"
                parts.append(
                    f"<figure><img alt='{html.escape(caption)}' "
                    f"src='data:{mime};base64,{data}'>"
                    f"<figcaption class='cap'>{html.escape(caption)}"
                    "</figcaption></figure>"
                )
    parts.append("</body></html>")
    return "\n".join(parts)
