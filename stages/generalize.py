"""Stage ``generalize``: one cell of the generalization grid.

``python -m stages.generalize <cell>`` meta-tests the learned losses of the
cell's experiment (``models/<experiment>/seed_<s>/``, one per seed) on the
cell's architecture, dataset and learning rate, against the standard loss,
from the same initial weights and data order. Reads ``params.yaml`` sections
``runtime.n_threads``, ``report.confidence``, ``<experiment>.seeds``,
``<experiment>.prepare`` (the MNIST split),
``generalize.<experiment>`` (shared by the experiment's cells) and
``generalize.cells.<cell>``. Writes ``results/generalize/<cell>/``:
``curves.csv`` (method, seed, task, run, step, split, metric, value at
log-spaced steps) and ``summary.csv`` (paired statistics at the
checkpoints), and ``metrics/generalize_<cell>.json``.

MLflow: a run ``generalize/<cell>`` in the experiment's MLflow experiment,
tagged ``stage=generalize``, ``cell``, ``axis``, ``architecture``,
``dataset``, ``lr``; one nested run per seed with the mean curves; one
nested run per checkpoint (tag ``horizon``) with the paired statistics.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd

from pipeline import artifacts, runtime, tracking
from pipeline import generalize as gz
from pipeline.config import ParamsError, as_dict, load_params
from pipeline.layout import Layout, seed_dir
from stages import _cli

log = logging.getLogger("stages.generalize")

SUMMARY_METRICS = (
    "learned_mean",
    "baseline_mean",
    "diff_mean",
    "diff_low",
    "diff_high",
    "seeds_won",
    "runs_won",
    "p_value",
    "improvement",
)


def run(cell_name: str, params_path: Path, root: Path) -> None:
    """Runs every seed of one cell and writes its curves and summary."""
    params = load_params(params_path)
    cells = params.generalize.cells
    if cell_name not in cells:
        raise ParamsError(
            f"unknown generalization cell {cell_name!r}; cells in params.yaml "
            f"generalize.cells: {', '.join(cells) or '(none)'}"
        )
    cell = cells[cell_name]
    experiment = cell.experiment
    shared = gz.shared_settings(params.generalize, experiment)
    seeds = params.experiments[experiment].seeds
    prepare = params.experiments[experiment].prepare
    runtime.configure("cpu", params.runtime.n_threads)
    layout = Layout(root)
    section = {
        "n_threads": params.runtime.n_threads,
        "confidence": params.report.confidence,
        "seeds": seeds,
        "prepare": as_dict(prepare),
        "shared": as_dict(shared),
        "cell": as_dict(cell),
    }
    tags = {
        "stage": "generalize",
        "cell": cell_name,
        "axis": cell.axis,
        "architecture": gz.architecture_label(cell.architecture),
        "dataset": gz.dataset_label(cell.dataset),
        "lr": str(cell.lr),
    }
    stage = f"generalize/{cell_name}"
    frames = []
    with tracking.stage_run(experiment, stage, section, root=root, tags=tags):
        for seed in seeds:
            learned = artifacts.load_learned_loss(
                seed_dir(layout.models(experiment), seed)
            )
            with tracking.seed_run(stage, seed):
                curves = gz.run_cell_seed(cell, shared, prepare, learned, seed)
                tracking.log_mean_curves(curves)
            frames.append(curves)
        table = pd.concat(frames, ignore_index=True).assign(cell=cell_name)
        table = table[
            ["cell", "method", "seed", "task", "run", "step", "split", "metric"]
            + ["value"]
        ]
        summary = gz.summarize(table, shared.checkpoints, params.report.confidence)
        out_dir = layout.root / "results" / "generalize" / cell_name
        with artifacts.atomic_dir(out_dir) as out:
            artifacts.write_csv(out / "curves.csv", table)
            artifacts.write_csv(out / "summary.csv", summary.assign(cell=cell_name))
        for step, rows in summary.groupby("step"):
            with tracking.nested_run(
                f"{stage}/horizon={step}", {"horizon": str(step)}, {"horizon": step}
            ):
                tracking.log_metrics(_summary_metrics(rows))
        metrics = {
            "checkpoints": {
                str(step): _summary_metrics(rows)
                for step, rows in summary.groupby("step")
            },
            "stage_seconds": round(runtime.process_seconds(), 2),
        }
        artifacts.write_json(
            layout.root / "metrics" / f"generalize_{cell_name}.json", metrics
        )
        final = metrics["checkpoints"][str(max(shared.checkpoints))]
        tracking.log_metrics(final | {"stage_seconds": metrics["stage_seconds"]})
        tracking.log_artifacts(out_dir)
    log.info("%s: %s", cell_name, final)


def _summary_metrics(rows: pd.DataFrame) -> dict[str, float]:
    """``<split>_<metric>_<statistic>`` for one checkpoint's summary rows."""
    return {
        f"{row.split}_{row.metric}_{key}": float(getattr(row, key))
        for row in rows.itertuples()
        for key in SUMMARY_METRICS
    }


if __name__ == "__main__":
    sys.exit(_cli.main(run, __doc__, per_experiment=False, positional="cell_name"))
