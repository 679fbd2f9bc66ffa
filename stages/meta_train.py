"""Stage ``meta_train``: one learned loss per experiment and seed.

Reads ``params.yaml`` sections ``runtime``, ``<experiment>.seeds``,
``.optimizee``, ``.learned_loss`` and ``.meta_train``, and the prepared data
in ``data/<experiment>/``. Writes ``models/<experiment>/seed_<s>/`` (learned
loss weights and config, the meta-training curve and the validation curve)
and ``metrics/<experiment>_meta_train.json``. Each seed is a nested MLflow
run; each learned loss is registered as ``ml3-<experiment>-loss``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from pipeline import artifacts, meta, runtime, tracking
from pipeline.config import load_params, stage_sections
from pipeline.experiments import build_experiment, build_learned_loss
from pipeline.layout import Layout, seed_dir
from stages import _cli

log = logging.getLogger("stages.meta_train")


def run(experiment: str, params_path: Path, root: Path) -> None:
    """Meta-trains and saves a learned loss for every seed."""
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
    mp = params.meta_train
    summary = {}

    truncated = 0 < mp.n_backprop_steps < mp.n_inner_steps
    tags = {"meta_gradient": "truncated" if truncated else "exact"}
    with tracking.stage_run(experiment, "meta_train", section, root=root, tags=tags):
        with artifacts.atomic_dir(layout.models(experiment)) as out:
            for seed in params.seeds:
                exp = build_experiment(
                    experiment, params, layout.read_prepared(experiment, seed), device
                )
                torch.manual_seed(runtime.stream_seed(seed, "learned_loss/init"))
                learned_loss = build_learned_loss(exp, params).to(device)
                with tracking.seed_run("meta_train", seed):
                    start = time.perf_counter()
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
                        generator=runtime.generator(seed, f"{experiment}/meta_train"),
                        validate=exp.validate,
                        validate_every=mp.validate_every,
                        progress=_cli.show_progress(),
                        device=device,
                    )
                    seconds = time.perf_counter() - start
                    folder = seed_dir(out, seed)
                    artifacts.save_learned_loss(folder, learned_loss)
                    artifacts.write_csv(
                        folder / "meta_curve.csv", pd.DataFrame(result.history)
                    )
                    artifacts.write_csv(
                        folder / "validation.csv", pd.DataFrame(result.validation)
                    )

                    first, last = result.validation[0], result.validation[-1]
                    seed_summary = {
                        "seconds": round(seconds, 3),
                        "final_task_loss": result.history[-1]["task_loss"],
                        **{
                            f"{k}_start": v
                            for k, v in first.items()
                            if k != "iteration"
                        },
                        **{f"{k}_end": v for k, v in last.items() if k != "iteration"},
                    }
                    summary[f"seed_{seed}"] = seed_summary
                    tracking.log_history(result.history, step_key="iteration")
                    tracking.log_history(result.validation, step_key="iteration")
                    tracking.log_metrics({"seconds": seconds})
                    tracking.log_artifacts(folder / "meta_curve.csv")
                    tracking.log_artifacts(folder / "validation.csv")
                    version = tracking.register_learned_loss(
                        learned_loss.cpu(),
                        folder,
                        f"ml3-{experiment}-loss",
                        tags={"seed": seed, "experiment": experiment},
                    )
                    log.info(
                        "%s seed %d: %.1f s, validation %s -> %s, registered "
                        "ml3-%s-loss version %d",
                        experiment,
                        seed,
                        seconds,
                        _fmt(first),
                        _fmt(last),
                        experiment,
                        version,
                    )
        metrics = {
            "mean": _mean(summary),
            **summary,
            "stage_seconds": round(runtime.process_seconds(), 2),
        }
        artifacts.write_json(layout.metrics(experiment, "meta_train"), metrics)
        tracking.log_metrics(
            {f"mean_{k}": v for k, v in metrics["mean"].items()}
            | {"stage_seconds": metrics["stage_seconds"]}
        )


def _fmt(row: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "iteration")


def _mean(per_seed: dict) -> dict:
    frame = pd.DataFrame(per_seed).T
    return {k: float(v) for k, v in frame.mean().items()}


if __name__ == "__main__":
    sys.exit(_cli.main(run, __doc__))
