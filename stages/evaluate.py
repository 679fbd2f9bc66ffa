"""Stage ``evaluate``: meta-test learned losses against the baseline loss.

Reads ``params.yaml`` sections ``runtime``, ``<experiment>.seeds``,
``.optimizee`` and ``.evaluate``, the prepared data and the learned losses
in ``models/<experiment>/``. For every seed it trains fresh optimizees on
the unseen tasks twice, once with the frozen learned loss and once with the
baseline loss, from identical initial weights and data order. Writes
``results/<experiment>/curves.csv`` (one row per method, seed, task, run,
step, split and metric) and ``metrics/<experiment>_evaluate.json``.

For the shaping experiments (``frequency``, ``mountain_car``) the shaped and
the unshaped learned loss and a baseline (MSE; the direct distance-to-goal
objective) are meta-tested from the same starts: ``frequency`` writes
``landscape.csv``, ``minima.csv`` and ``convergence.csv``; ``mountain_car``
writes ``trajectories.csv``, ``outcomes.csv`` and ``animation.gif``.

The reinforcement-learning experiments meta-test on held-out goals from
fresh policies. ``reacher``: the learned loss against descending the task
loss directly, both on real-simulator rollouts with gradients through the
seed's learned dynamics model; writes ``outcomes.csv``,
``trajectories.csv``, ``direct_lr.csv`` and ``animation.gif``.
``goal_point_mass`` and ``goal_reacher``: the learned loss against
REINFORCE with a baseline for the same environment steps; writes
``curves.csv``, ``paths.csv`` and ``baseline_lr.csv``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from pipeline import (
    artifacts,
    frequency,
    mountain_car,
    runtime,
    tracking,
)
from pipeline.config import (
    RL_EXPERIMENTS,
    SHAPING_EXPERIMENTS,
    VARIANTS,
    load_params,
    stage_sections,
)
from pipeline.experiments import build_experiment
from pipeline.layout import Layout, seed_dir
from pipeline.rl import envs, goal_reaching, reacher
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
    if experiment in SHAPING_EXPERIMENTS or experiment in RL_EXPERIMENTS:
        run_tables = _run_shaping if experiment in SHAPING_EXPERIMENTS else _run_rl
        with tracking.stage_run(experiment, "evaluate", section, root=root):
            run_tables(experiment, params, layout)
        return
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
                tracking.log_mean_curves(curves)
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
            tracking.flatten_metrics(metrics["mean"])
            | {"stage_seconds": metrics["stage_seconds"]}
        )
        tracking.log_artifacts(layout.results(experiment) / "curves.csv")
    log.info("%s: %s", experiment, tracking.flatten_metrics(metrics["mean"]))


def _run_shaping(experiment: str, params, layout: Layout) -> None:
    """Meta-test of the shaped and unshaped losses of the shaping experiments."""
    tables: dict[str, list] = {}
    for seed in params.seeds:
        data = layout.read_prepared(experiment, seed)
        models = seed_dir(layout.models(experiment), seed)
        learned = {v: artifacts.load_learned_loss(models / v) for v in VARIANTS}
        with tracking.seed_run("evaluate", seed):
            if experiment == "frequency":
                losses = {v: loss.pointwise for v, loss in learned.items()}
                losses["mse"] = frequency.mse_pointwise
                seed_tables = frequency.evaluate(params, data, losses, seed)
                seed_metrics = frequency.summary(seed_tables, params.evaluate.tolerance)
            else:
                losses = {
                    v: (
                        lambda th, task, starts, loss=loss: (
                            mountain_car.learned_objective(loss, th, task, starts)
                        )
                    )
                    for v, loss in learned.items()
                }
                losses["distance"] = mountain_car.distance_objective
                trajectories = mountain_car.evaluate(
                    params, data, losses, mountain_car.seed_policy(params, seed), seed
                )
                seed_tables = {
                    "trajectories": trajectories,
                    "outcomes": mountain_car.outcomes(
                        trajectories, params.evaluate.success_position
                    ),
                }
                seed_metrics = mountain_car.summary(
                    seed_tables["outcomes"], float(data["start_states"][0, 0])
                )
            tracking.log_metrics(tracking.flatten_metrics(seed_metrics))
        for name, frame in seed_tables.items():
            tables.setdefault(name, []).append(frame)
    joined = {
        name: pd.concat(frames, ignore_index=True) for name, frames in tables.items()
    }
    with artifacts.atomic_dir(layout.results(experiment)) as out:
        for name, frame in joined.items():
            artifacts.write_csv(out / f"{name}.csv", frame)
        if experiment == "frequency":
            metrics = {"mean": frequency.summary(joined, params.evaluate.tolerance)}
        else:
            # one task for every seed: the data of the last seed will do
            start = float(data["start_states"][0, 0])
            metrics = {"mean": mountain_car.summary(joined["outcomes"], start)}
            traj = joined["trajectories"]
            shown = traj[
                (traj.seed == params.seeds[0])
                & (traj.start_position == traj.start_position.iloc[0])
                & (traj.test_step == params.evaluate.n_steps)
            ]
            mountain_car.animate(
                shown,
                out / "animation.gif",
                params.evaluate.animation_fps,
                f"after {params.evaluate.n_steps} meta-test steps "
                f"(seed {params.seeds[0]})",
            )
    metrics["stage_seconds"] = round(runtime.process_seconds(), 2)
    artifacts.write_json(layout.metrics(experiment, "evaluate"), metrics)
    tracking.log_metrics(
        tracking.flatten_metrics(metrics["mean"])
        | {"stage_seconds": metrics["stage_seconds"]}
    )
    tracking.log_artifacts(layout.results(experiment))
    log.info("%s: %s", experiment, tracking.flatten_metrics(metrics["mean"]))


def _run_rl(experiment: str, params, layout: Layout) -> None:
    """Meta-test of the reinforcement-learning experiments on held-out goals."""
    ep = params.evaluate
    tables: dict[str, list] = {}
    for seed in tqdm(
        params.seeds,
        desc=f"evaluate {experiment}",
        disable=not _cli.show_progress(),
    ):
        data = layout.read_prepared(experiment, seed)
        folder = seed_dir(layout.models(experiment), seed)
        with tracking.seed_run("evaluate", seed):
            if experiment == "reacher":
                seed_tables = reacher.evaluate(
                    params,
                    data,
                    artifacts.load_learned_loss(folder / "ml3"),
                    reacher.load_dynamics(folder / "dynamics"),
                    seed,
                )
                seed_metrics = reacher.summary(seed_tables["outcomes"], ep.report_steps)
            else:
                # one thread, like the reacher (see envs.one_thread)
                with envs.one_thread():
                    seed_tables = goal_reaching.evaluate(
                        params,
                        experiment,
                        data,
                        artifacts.load_learned_loss(folder),
                        seed,
                    )
                seed_metrics = goal_reaching.summary(seed_tables["curves"])
            tracking.log_metrics(tracking.flatten_metrics(seed_metrics))
        for name, frame in seed_tables.items():
            tables.setdefault(name, []).append(frame.assign(seed=seed))
    joined = {
        name: pd.concat(frames, ignore_index=True) for name, frames in tables.items()
    }
    with artifacts.atomic_dir(layout.results(experiment)) as out:
        for name, frame in joined.items():
            artifacts.write_csv(out / f"{name}.csv", frame)
        if experiment == "reacher":
            metrics = {"mean": reacher.summary(joined["outcomes"], ep.report_steps)}
            traj = joined["trajectories"]
            seed0 = params.seeds[0]
            reacher.animate(
                traj[(traj.seed == seed0) & (traj.test_step == ep.n_steps)],
                out / "animation.gif",
                ep.animation_fps,
                f"held-out goals after {ep.n_steps} meta-test steps (seed {seed0})",
            )
        else:
            metrics = {"mean": goal_reaching.summary(joined["curves"])}
    metrics["stage_seconds"] = round(runtime.process_seconds(), 2)
    artifacts.write_json(layout.metrics(experiment, "evaluate"), metrics)
    tracking.log_metrics(
        tracking.flatten_metrics(metrics["mean"])
        | {"stage_seconds": metrics["stage_seconds"]}
    )
    tracking.log_artifacts(layout.results(experiment))
    log.info("%s: %s", experiment, tracking.flatten_metrics(metrics["mean"]))


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


if __name__ == "__main__":
    sys.exit(_cli.main(run, __doc__))
