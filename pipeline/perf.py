"""Performance tables and plots from saved benchmark results.

Reads the JSON that ``pytest-benchmark --benchmark-json`` writes for
``tests/benchmarks`` (medians of side-by-side runs, machine info, thread
count) and the pipeline timing written by ``benchmarks/time_pipeline.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def raw_memory(rows: pd.DataFrame) -> list[dict]:
    """The extra info of each memory benchmark, without other benchmarks' columns."""
    sel = rows[rows.group == "memory"]
    return [
        {
            k: v
            for k, v in row.items()
            if isinstance(v, (list, dict))
            or (k not in ("name", "group") and pd.notna(v))
        }
        for _, row in sel.iterrows()
    ]


def benchmark_rows(raw: dict) -> pd.DataFrame:
    """One row per benchmark: its extra info and median seconds."""
    rows = []
    for bench in raw["benchmarks"]:
        rows.append(
            {
                "name": bench["name"],
                "group": bench["group"],
                "median_s": bench["stats"]["median"],
                "rounds": bench["stats"]["rounds"],
                **bench["extra_info"],
            }
        )
    return pd.DataFrame(rows)


def versus_higher(rows: pd.DataFrame) -> pd.DataFrame:
    """Median ms per outer iteration, ours vs `higher`, and the speed-up."""
    wide = rows.dropna(subset=["implementation"]).pivot_table(
        index=["experiment", "n_tasks", "n_inner_steps"],
        columns="implementation",
        values="median_s",
    )
    out = pd.DataFrame(
        {
            "ours (ms)": (1e3 * wide["ours"]).round(2),
            "higher (ms)": (1e3 * wide["higher"]).round(2),
            "speed-up": (wide["higher"] / wide["ours"]).round(2),
        }
    ).reset_index()
    out = out.rename(columns={"n_tasks": "tasks", "n_inner_steps": "k"})
    return out.astype({"tasks": int, "k": int})


def floor_ratios(rows: pd.DataFrame) -> pd.DataFrame:
    """Meta-iteration time over plain SGD step time, per experiment (k = 1)."""
    sel = rows[rows.group.str.startswith("floor")]
    wide = sel.pivot_table(index="experiment", columns="step", values="median_s")
    return pd.DataFrame(
        {
            "meta-iteration (ms)": (1e3 * wide["meta_iteration"]).round(3),
            "SGD step (ms)": (1e3 * wide["sgd_step"]).round(3),
            "ratio": (wide["meta_iteration"] / wide["sgd_step"]).round(2),
        }
    ).reset_index()


def memory_info(rows: pd.DataFrame) -> dict:
    """The memory benchmarks' recorded numbers."""
    info = {}
    for bench in raw_memory(rows):
        info.update(bench)
    return info


def plot_scaling(table: pd.DataFrame, memory: dict, path: Path) -> Path:
    """Time vs meta-batch size and vs k (ours vs higher), graph memory vs k."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    sine = table[table.experiment == "sine"]
    by_tasks = sine[sine.k == 1].sort_values("tasks")
    for column, label in (("ours (ms)", "ours"), ("higher (ms)", "higher")):
        axes[0].plot(by_tasks.tasks, by_tasks[column], marker="o", label=label)
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="tasks per meta-batch",
        ylabel="ms per outer iteration",
        title="sine, k = 1",
    )
    for tasks, style in ((1, "-"), (16, "--")):
        by_k = sine[sine.tasks == tasks].sort_values("k")
        for column, label in (("ours (ms)", "ours"), ("higher (ms)", "higher")):
            axes[1].plot(
                by_k.k,
                by_k[column],
                style,
                marker="o",
                label=f"{label}, {tasks} task(s)",
            )
    axes[1].set(
        yscale="log",
        xlabel="unrolled steps k",
        ylabel="ms per outer iteration",
        title="sine",
    )
    if memory.get("steps"):
        mib = 1 / 2**20
        axes[2].plot(
            memory["steps"],
            [b * mib for b in memory["graph_bytes"]],
            marker="o",
            label="exact",
        )
        axes[2].plot(
            memory["steps"],
            [b * mib for b in memory["truncated_graph_bytes"]],
            marker="o",
            label="truncated to 1 step",
        )
        axes[2].set(
            xlabel="unrolled steps k",
            ylabel="graph memory (MiB)",
            title="sine, 16 tasks",
        )
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
