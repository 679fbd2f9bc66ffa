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
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path
