"""Stage ``evaluate``: meta-test learned losses against the baseline loss.

Reads ``params.yaml`` sections ``runtime``, ``<experiment>.seeds``,
``.optimizee`` and ``.evaluate``, the prepared data and the learned losses
in ``models/<experiment>/``. For every seed it trains fresh optimizees on
the unseen tasks twice, once with the frozen learned loss and once with the
baseline loss, from identical initial weights and data order. Writes
``results/<experiment>/curves.csv`` (one row per method, seed, task, run,
step, split and metric) and ``metrics/<experiment>_evaluate.json``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from pipeline import artifacts, runtime, tracking
from pipeline.config import load_params, stage_sections
from pipeline.experiments import build_experiment
from pipeline.layout import Layout, seed_dir
from stages import _cli

log = logging.getLogger("stages.evaluate")


def run(experiment: str, params_path: Path, root: Path) -> None:
    """Writes the meta-test curves of every seed."""
    all_params = load_params(params_path)
    params = all_params.experiments[experiment]
    device = runtime.configure(all_params.runtime.device, all_params.runtime.n_threads)
    layout = Layout(root)
    section = stage_sections(
        all_params, experiment, "runtime", "seeds", "optimizee", "evaluate"
    )
    frames = []

    with tracking.stage_run(experiment, "evaluate", section, root=root):
        for seed in tqdm(
            params.seeds,
            desc=f"evaluate {experiment}",
            disable=not _cli.show_progress(),
        ):
            exp = build_experiment(
                experiment, params, layout.read_prepared(experiment, seed), device
            )
            learned = artifacts.load_learned_loss(
                seed_dir(layout.models(experiment), seed)
            ).to(device)
            with tracking.seed_run("evaluate", seed):
                curves = pd.concat(
                    [
                        exp.meta_test(learned, seed).assign(method="learned"),
                        exp.meta_test(exp.baseline_loss, seed).assign(
                            method=exp.baseline_name
                        ),
                    ],
                    ignore_index=True,
                ).assign(experiment=experiment, seed=seed)
                frames.append(curves)
                _log_seed(curves)
        table = pd.concat(frames, ignore_index=True)[
            [
                "experiment",
                "method",
                "seed",
                "task",
                "run",
                "step",
                "split",
                "metric",
                "value",
            ]
        ]
        with artifacts.atomic_dir(layout.results(experiment)) as out:
            artifacts.write_csv(out / "curves.csv", table)
        metrics = {
            **final_metrics(table),
            "stage_seconds": round(runtime.process_seconds(), 2),
        }
        artifacts.write_json(layout.metrics(experiment, "evaluate"), metrics)
        tracking.log_metrics(
            {k.replace("/", "_"): v for k, v in _flat(metrics["mean"]).items()}
            | {"stage_seconds": metrics["stage_seconds"]}
        )
        tracking.log_artifacts(layout.results(experiment) / "curves.csv")
    log.info("%s: %s", experiment, _flat(metrics["mean"]))


def _log_seed(curves: pd.DataFrame) -> None:
    """Mean over tasks and runs of every curve, logged with its step."""
    means = curves.groupby(["method", "split", "metric", "step"]).value.mean()
    rows: dict[int, dict] = {}
    for (method, split, metric, step), value in means.items():
        rows.setdefault(int(step), {"step": int(step)})[
            f"{method}/{split}_{metric}"
        ] = value
    tracking.log_history(list(rows.values()), step_key="step")


def final_metrics(table: pd.DataFrame) -> dict:
    """Final-step value per method, split and metric: mean over all and per seed."""
    last = table[table.step == table.step.max()]
    per_seed = last.groupby(["seed", "method", "split", "metric"]).value.mean()
    out: dict = {"mean": {}}
    for (method, split, metric), value in (
        last.groupby(["method", "split", "metric"]).value.mean().items()
    ):
        out["mean"].setdefault(method, {})[f"{split}_{metric}"] = float(value)
    for (seed, method, split, metric), value in per_seed.items():
        out.setdefault(f"seed_{seed}", {}).setdefault(method, {})[
            f"{split}_{metric}"
        ] = float(value)
    return out


def _flat(nested: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


if __name__ == "__main__":
    sys.exit(_cli.main(run, __doc__))
