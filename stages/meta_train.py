"""Stage ``meta_train``: one learned loss per experiment and seed (and variant).

Reads ``params.yaml`` sections ``runtime``, ``<experiment>.seeds``,
``.optimizee``, ``.learned_loss`` and ``.meta_train``, and the prepared data
in ``data/<experiment>/``. Writes ``models/<experiment>/seed_<s>/`` (learned
loss weights and config, the meta-training curve and the validation curve)
and ``metrics/<experiment>_meta_train.json``. Each seed is a nested MLflow
run; each learned loss is registered as ``ml3-<experiment>-loss``.

The shaping experiments (``frequency``, ``mountain_car``) meta-train two
losses per seed, ``shaped`` and ``unshaped``, into
``seed_<s>/<variant>/``, each a nested run ``meta_train/<variant>/seed=<s>``
registered as ``ml3-<experiment>-<variant>-loss``.

The model-based ``reacher`` meta-trains its loss through a learned dynamics
model: ``seed_<s>/ml3/`` holds the loss (``ml3-reacher-loss``),
``seed_<s>/dynamics/`` the model after its last refresh and its fits. The
seeds of ``meta_train.authors_seeds`` also run the authors' settings
(variant ``authors``): a collapse there is the finding, recorded in the
metrics and as a FAILED nested run, and that loss is not saved. The
model-free ``goal_point_mass`` and ``goal_reacher`` save one loss per seed
like sine. A collapse anywhere else stops the stage (exit status 3).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from pipeline import (
    artifacts,
    frequency,
    meta,
    mountain_car,
    runtime,
    tracking,
)
from pipeline.config import (
    GOAL_EXPERIMENTS,
    RL_EXPERIMENTS,
    SHAPING_EXPERIMENTS,
    VARIANTS,
    load_params,
    stage_sections,
)
from pipeline.experiments import build_experiment, build_learned_loss
from pipeline.layout import Layout, seed_dir
from pipeline.nets import learned_loss_for
from pipeline.rl import envs, goal_reaching, reacher
from stages import _cli

log = logging.getLogger("stages.meta_train")


def run(experiment: str, params_path: Path, root: Path) -> None:
    """Meta-trains and saves a learned loss for every seed (and variant)."""
    all_params = load_params(params_path)
    params = all_params.experiments[experiment]
    device = runtime.configure(all_params.runtime.device, all_params.runtime.n_threads)
    layout = Layout(root)
    section = stage_sections(
        all_params,
        experiment,
        "runtime",
        "seeds",
        "optimizee",
        "learned_loss",
        "meta_train",
    )
    if experiment in RL_EXPERIMENTS:
        _run_rl(experiment, params, section, layout, root)
        return
    mp = params.meta_train
    shaping = experiment in SHAPING_EXPERIMENTS
    variants = VARIANTS if shaping else (None,)
    summary = {}

    if shaping:
        tags = {"meta_gradient": "exact"}
    else:
        truncated = 0 < mp.n_backprop_steps < mp.n_inner_steps
        tags = {"meta_gradient": "truncated" if truncated else "exact"}
    with tracking.stage_run(experiment, "meta_train", section, root=root, tags=tags):
        with artifacts.atomic_dir(layout.models(experiment)) as out:
            for seed in params.seeds:
                data = layout.read_prepared(experiment, seed)
                for variant in variants:
                    folder = seed_dir(out, seed)
                    model_name = f"ml3-{experiment}-loss"
                    stage = "meta_train"
                    if variant is not None:
                        folder, stage = folder / variant, f"meta_train/{variant}"
                        model_name = f"ml3-{experiment}-{variant}-loss"
                    with tracking.seed_run(
                        stage, seed, tags={"variant": variant} if variant else None
                    ):
                        start = time.perf_counter()
                        learned_loss, result = _meta_train(
                            experiment, params, data, seed, variant, device
                        )
                        seconds = time.perf_counter() - start
                        summary[_unit(seed, variant)] = _save_and_log(
                            learned_loss, result, folder, seconds, model_name, seed
                        )
        metrics = {
            "mean": _mean(summary),
            **summary,
            "stage_seconds": round(runtime.process_seconds(), 2),
        }
        artifacts.write_json(layout.metrics(experiment, "meta_train"), metrics)
        tracking.log_metrics(
            tracking.flatten_metrics(metrics["mean"], "mean_")
            | {"stage_seconds": metrics["stage_seconds"]}
        )


def _run_rl(experiment, params, section, layout: Layout, root: Path) -> None:
    """Meta-training of the reinforcement-learning experiments (CPU only)."""
    summary, authors = {}, {}
    progress = _cli.show_progress()
    with tracking.stage_run(
        experiment, "meta_train", section, root=root, tags={"meta_gradient": "exact"}
    ):
        with artifacts.atomic_dir(layout.models(experiment)) as out:
            for seed in params.seeds:
                data = layout.read_prepared(experiment, seed)
                folder = seed_dir(out, seed)
                if experiment in GOAL_EXPERIMENTS:
                    with tracking.seed_run("meta_train", seed):
                        start = time.perf_counter()
                        # one thread, like the reacher (see envs.one_thread)
                        with envs.one_thread():
                            learned_loss, result = goal_reaching.meta_train(
                                params, experiment, data, seed, progress
                            )
                        summary[_unit(seed, None)] = _save_and_log(
                            learned_loss,
                            result,
                            folder,
                            time.perf_counter() - start,
                            f"ml3-{experiment}-loss",
                            seed,
                        )
                    continue
                with tracking.seed_run("meta_train/ml3", seed, tags={"variant": "ml3"}):
                    start = time.perf_counter()
                    trained = reacher.meta_train(params, data, seed, "ml3", progress)
                    seconds = time.perf_counter() - start
                    reacher.save_dynamics(folder / "dynamics", trained.dynamics)
                    fits = pd.DataFrame(trained.model_fits)
                    artifacts.write_csv(folder / "dynamics" / "fits.csv", fits)
                    tracking.log_history(
                        trained.model_fits, step_key="fit", prefix="model_"
                    )
                    tracking.log_artifacts(folder / "dynamics", "dynamics")
                    summary[_unit(seed, None)] = _save_and_log(
                        trained.learned_loss,
                        trained.result,
                        folder / "ml3",
                        seconds,
                        "ml3-reacher-loss",
                        seed,
                    )
                if seed in params.meta_train.authors_seeds:
                    authors[f"seed_{seed}"] = _authors_variant(
                        params, data, seed, folder / "authors", progress
                    )
        metrics = {
            "mean": _mean(summary),
            **summary,
            "stage_seconds": round(runtime.process_seconds(), 2),
        }
        if authors:
            metrics["authors"] = authors
        artifacts.write_json(layout.metrics(experiment, "meta_train"), metrics)
        tracking.log_metrics(
            tracking.flatten_metrics(metrics["mean"], "mean_")
            | {"stage_seconds": metrics["stage_seconds"]}
        )


def _authors_variant(params, data, seed, folder: Path, progress: bool) -> dict:
    """The reacher's loss with the authors' settings: does it collapse?

    A collapse is this run's finding, not a failure of the stage: the nested
    run ends FAILED with the message as a tag, nothing is saved or
    registered, and the metrics say when it collapsed.
    """
    start = time.perf_counter()
    run_id = None
    try:
        with tracking.seed_run(
            "meta_train/authors", seed, tags={"variant": "authors"}
        ) as run:
            run_id = run.info.run_id
            trained = reacher.meta_train(params, data, seed, "authors", progress)
            entry = _save_and_log(
                trained.learned_loss,
                trained.result,
                folder,
                time.perf_counter() - start,
                "ml3-reacher-authors-loss",
                seed,
            )
            return {"collapsed": 0, **entry}
    except meta.LearnedLossCollapsed as err:
        tracking.set_tags(run_id, {"collapse": str(err)[:5000]})
        log.warning("authors' settings, seed %d: %s", seed, err)
        return {
            "collapsed": 1,
            "seconds": round(time.perf_counter() - start, 3),
            "message": str(err),
        }


def _meta_train(experiment, params, data, seed, variant, device):
    """One learned loss, meta-trained: ``(learned_loss, MetaTrainResult)``."""
    mp = params.meta_train
    gen = runtime.generator(seed, f"{experiment}/meta_train")
    progress = _cli.show_progress()

    def seed_learned_loss_init():
        torch.manual_seed(runtime.stream_seed(seed, "learned_loss/init"))

    if variant is None:
        # built first: building the optimizee draws from torch's global RNG,
        # and the learned loss's initial weights must not depend on it
        exp = build_experiment(experiment, params, data, device)
        seed_learned_loss_init()
        learned_loss = build_learned_loss(exp, params).to(device)
        result = meta.meta_train(
            exp.optimizee,
            learned_loss,
            exp.task_loss,
            sample_batch=exp.sample_batch,
            n_outer_iterations=mp.n_outer_iterations,
            outer_lr=mp.outer_lr,
            inner_lr=mp.inner_lr,
            n_inner_steps=mp.n_inner_steps,
            meta_batch_size=mp.meta_batch_size,
            n_backprop_steps=mp.n_backprop_steps,
            generator=gen,
            validate=exp.validate,
            validate_every=mp.validate_every,
            progress=progress,
            device=device,
        )
        return learned_loss, result
    # the shaping experiments are a handful of scalars per step: CPU only
    seed_learned_loss_init()
    if experiment == "frequency":
        learned_loss = learned_loss_for(params.learned_loss, frequency.N_INPUTS)
        result = frequency.meta_train(
            learned_loss, params, data, variant, gen, progress
        )
    else:
        learned_loss = learned_loss_for(params.learned_loss, mountain_car.N_INPUTS)
        result = mountain_car.meta_train(
            learned_loss,
            params,
            data,
            variant,
            mountain_car.seed_policy(params, seed),
            progress,
        )
    return learned_loss, result


def _save_and_log(learned_loss, result, folder, seconds, model_name, seed) -> dict:
    """Saves one learned loss and its curves, logs and registers it."""
    artifacts.save_learned_loss(folder, learned_loss)
    artifacts.write_csv(folder / "meta_curve.csv", pd.DataFrame(result.history))
    artifacts.write_csv(folder / "validation.csv", pd.DataFrame(result.validation))
    first, last = result.validation[0], result.validation[-1]
    seed_summary = {
        "seconds": round(seconds, 3),
        "final_task_loss": result.history[-1]["task_loss"],
        **{f"{k}_start": v for k, v in first.items() if k != "iteration"},
        **{f"{k}_end": v for k, v in last.items() if k != "iteration"},
    }
    tracking.log_history(result.history, step_key="iteration")
    tracking.log_history(result.validation, step_key="iteration")
    tracking.log_metrics({"seconds": seconds})
    tracking.log_artifacts(folder / "meta_curve.csv")
    tracking.log_artifacts(folder / "validation.csv")
    version = tracking.register_learned_loss(
        learned_loss.cpu(),
        folder,
        model_name,
        tags={"seed": seed, "experiment": model_name.split("-")[1]},
    )
    log.info(
        "%s seed %d: %.1f s, validation %s -> %s, registered version %d",
        model_name,
        seed,
        seconds,
        _fmt(first),
        _fmt(last),
        version,
    )
    return seed_summary


def _unit(seed: int, variant: str | None) -> str:
    return f"seed_{seed}" if variant is None else f"seed_{seed}/{variant}"


def _fmt(row: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "iteration")


def _mean(per_unit: dict) -> dict:
    """Mean over seeds; per variant for the shaping experiments."""
    groups: dict = {}
    for unit, values in per_unit.items():
        variant = unit.partition("/")[2]
        groups.setdefault(variant, []).append(values)
    means = {
        variant: {k: float(v) for k, v in pd.DataFrame(rows).mean().items()}
        for variant, rows in groups.items()
    }
    return means.get("", means)


if __name__ == "__main__":
    sys.exit(_cli.main(run, __doc__))
