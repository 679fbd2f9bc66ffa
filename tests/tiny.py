"""Tiny params for tests: the repository's params.yaml shrunk to seconds."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_params_dict() -> dict:
    """The repository's params.yaml shrunk to seconds of compute."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in ("sine", "mnist"):
        exp = params[name]
        exp["seeds"] = [0, 1]
        exp["meta_train"].update(n_outer_iterations=6, validate_every=3)
        exp["evaluate"].update(n_steps=6, eval_every=2, n_runs=2)
    params["sine"]["prepare"].update(n_points=20, n_heldout_points=10, n_test_tasks=3)
    params["sine"]["optimizee"]["hidden_sizes"] = [16, 8]
    params["sine"]["learned_loss"]["hidden_sizes"] = [8, 8]
    params["mnist"]["optimizee"]["hidden_sizes"] = [8]
    params["mnist"]["learned_loss"]["hidden_sizes"] = [8, 8]
    params["mnist"]["meta_train"].update(
        batch_size=16, meta_batch_size=2, n_inner_steps=2
    )
    params["mnist"]["evaluate"]["batch_size"] = 16
    for name in ("frequency", "mountain_car"):
        exp = params[name]
        exp["seeds"] = [0, 1]
        exp["meta_train"].update(n_outer_iterations=4, validate_every=2)
    params["frequency"]["prepare"].update(n_points=16, n_eval_points=16)
    params["frequency"]["learned_loss"]["hidden_sizes"] = [6, 6]
    params["frequency"]["meta_train"].update(tasks_per_iteration=2, unrolls_per_task=3)
    params["frequency"]["evaluate"].update(
        targets=[0.5, -2.0], initial_thetas=[-4.0, 4.0], n_steps=3, landscape_points=101
    )
    car = params["mountain_car"]
    car["prepare"].update(
        horizon=12, n_intermediate_steps=5, test_start_positions=[-0.4]
    )
    car["optimizee"]["hidden_size"] = 8
    car["learned_loss"]["hidden_sizes"] = [16, 16]
    car["evaluate"]["n_steps"] = 2
    arm = params["reacher"]
    arm["seeds"] = [0, 1]
    arm["prepare"].update(
        horizon=10, n_train_goals=3, n_test_goals=2, n_random_rollouts=8
    )
    arm["optimizee"]["hidden_sizes"] = [8, 8]
    arm["learned_loss"]["hidden_sizes"] = [16, 16]
    arm["meta_train"].update(
        n_outer_iterations=4,
        tasks_per_iteration=2,
        authors_seeds=[0],
        model_hidden_sizes=[16, 16],
        model_epochs=3,
        model_batch_size=32,
        refresh_every=2,
        refresh_rollouts=2,
        refresh_epochs=2,
        validate_every=2,
    )
    arm["evaluate"].update(n_steps=2, report_steps=[0, 1, 2], direct_lrs=[1e-5, 1e-4])
    for name in ("goal_point_mass", "goal_reacher"):
        exp = params[name]
        exp["seeds"] = [0, 1]
        exp["prepare"].update(horizon=6, n_train_goals=3, n_test_goals=2)
        exp["optimizee"]["hidden_sizes"] = [8]
        exp["learned_loss"]["hidden_sizes"] = [8, 8]
        exp["meta_train"].update(
            n_outer_iterations=3,
            tasks_per_iteration=2,
            unrolls_per_task=2,
            episodes_per_update=4,
            validate_every=2,
        )
        exp["evaluate"].update(
            n_updates=2, episodes_per_update=4, baseline_lrs=[0.01, 0.1]
        )
    gen = params["generalize"]
    gen["sine"].update(
        n_steps=4, checkpoints=[2, 4], n_tasks=2, n_points=20, n_heldout_points=10
    )
    gen["mnist"].update(n_steps=4, checkpoints=[2, 4], n_runs=2, batch_size=16)
    gen["cells"] = {name: gen["cells"][name] for name in TINY_CELLS}
    # the reference cells follow the shrunk meta-train optimizees
    for name in ("sine", "mnist"):
        gen["cells"][f"{name}_reference"]["architecture"]["hidden_sizes"] = params[
            name
        ]["optimizee"]["hidden_sizes"]
    return params


# one cell of each kind: reference, BatchNorm, learning rate, CNN, 10-way,
# another dataset
TINY_CELLS = (
    "sine_reference",
    "sine_arch_batchnorm",
    "sine_lr_3e_3",
    "mnist_reference",
    "mnist_arch_cnn",
    "mnist_data_ten_way",
    "mnist_data_digits_4_9",
)


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path
