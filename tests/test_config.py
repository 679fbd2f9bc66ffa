"""Every params rule stops with a message naming key, value and what is allowed."""

from __future__ import annotations

import copy

import pytest
from tiny import tiny_params_dict, write_params

from pipeline.config import (
    ParamsError,
    load_params,
    parse_params,
)


def broken(path_value):
    """tiny params with one key set (dotted path) to a value; None deletes it."""
    params = copy.deepcopy(tiny_params_dict())
    *parents, last = path_value[0].split(".")
    node = params
    for key in parents:
        node = node[key]
    if path_value[1] is None:
        del node[last]
    else:
        node[last] = path_value[1]
    return params


CASES = [
    (
        ("sine.meta_train.outer_lrr", 0.1),
        r"unknown key sine\.meta_train\.outer_lrr; allowed keys in sine\.meta_train: "
        r"n_outer_iterations, outer_lr",
    ),
    (
        ("sine.meta_train.outer_lr", -0.001),
        r"sine\.meta_train\.outer_lr = -0\.001 is out of range: expected a number > 0",
    ),
    (
        ("mnist.evaluate.n_steps", 0),
        r"mnist\.evaluate\.n_steps = 0 is out of range: expected an integer > 0",
    ),
    (
        ("sine.meta_train.n_inner_steps", 0),
        r"n_inner_steps = 0 is out of range: expected an integer >= 1",
    ),
    (
        ("sine.meta_train.inner_lr", "fast"),
        r"sine\.meta_train\.inner_lr = 'fast' \(str\): expected a number",
    ),
    (
        ("sine.meta_train.n_outer_iterations", 2.5),
        r"n_outer_iterations = 2\.5 \(float\): expected an integer",
    ),
    (
        ("sine.learned_loss.bias", 1),
        r"sine\.learned_loss\.bias = 1 \(int\): expected true or false",
    ),
    (
        ("sine.meta_train.meta_batch_size", True),
        r"meta_batch_size = True \(bool\): expected an integer",
    ),
    (
        ("sine.learned_loss.activation", "swish"),
        r"activation = 'swish': expected one of relu, tanh, elu, gelu",
    ),
    (("runtime.device", "tpu"), r"runtime\.device = 'tpu': expected one of auto, cpu"),
    (
        ("sine.prepare.test_x_range", [5.0]),
        r"test_x_range = \[5\.0\] has 1 items: expected exactly 2",
    ),
    (
        ("sine.prepare.test_x_range", [5.0, -5.0]),
        r"test_x_range = \[5\.0, -5\.0\]: expected \[low, high\] with low <= high",
    ),
    (
        ("sine.optimizee.hidden_sizes", [16, 0]),
        r"hidden_sizes\[1\] = 0 is out of range: expected an integer > 0",
    ),
    (("mnist.prepare.classes", [4, 4]), r"classes = \[4, 4\]: expected two different"),
    (
        ("mnist.prepare.classes", [4, 10]),
        r"classes\[1\] = 10 is out of range: expected an integer <= 9",
    ),
    (
        ("mnist.prepare.split_fractions", [0.5, 0.2, 0.2]),
        r"expected train, validation and test fractions summing to 1",
    ),
    (
        ("sine.meta_train.n_backprop_steps", 2),
        r"n_backprop_steps = 2: expected 0 \(all\) or at most n_inner_steps = 1",
    ),
    (("sine.seeds", [0, 0]), r"sine\.seeds = \[0, 0\]: expected distinct seeds"),
    (("sine.seeds", []), r"sine\.seeds = \[\]: expected a non-empty list"),
    (("mnist.meta_train.outer_lr", None), r"missing key mnist\.meta_train\.outer_lr"),
    (
        ("report.confidence", 1.5),
        r"report\.confidence = 1\.5 is out of range: expected a number <= 0\.999",
    ),
    (("sine.evaluate", "fast"), r"sine\.evaluate = 'fast': expected a mapping"),
    (("extra", {}), r"unknown key params\.yaml \(top level\)\.extra"),
    # the shaping experiments have their own schemas
    (
        ("frequency.meta_train.n_inner_steps", 1),
        r"unknown key frequency\.meta_train\.n_inner_steps; allowed keys in "
        r"frequency\.meta_train: n_outer_iterations, outer_lr, inner_lr, "
        r"tasks_per_iteration, unrolls_per_task",
    ),
    (
        ("mountain_car.prepare.n_intermediate_steps", 40),
        r"n_intermediate_steps = 40: expected at most horizon = 12",
    ),
    (
        ("mountain_car.prepare.test_start_positions", [-0.4, 0.7]),
        r"test_start_positions\[1\] = 0\.7 is out of range: expected a number <= 0\.5",
    ),
    (
        ("frequency.evaluate.landscape_range", [7.0, -7.0]),
        r"landscape_range = \[7\.0, -7\.0\]: expected \[low, high\]",
    ),
    (
        ("frequency.evaluate.landscape_points", 2),
        r"landscape_points = 2 is out of range: expected an integer >= 3",
    ),
    (
        ("mountain_car.optimizee.hidden_sizes", [8]),
        r"unknown key mountain_car\.optimizee\.hidden_sizes; allowed keys in "
        r"mountain_car\.optimizee: hidden_size",
    ),
    (("frequency.evaluate.targets", []), r"targets = \[\]: expected a non-empty"),
    (("mountain_car", None), r"missing key params\.yaml \(top level\)\.mountain_car"),
    # the RL experiments
    (
        ("reacher.prepare.goal_radius_range", [0.05, 0.3]),
        r"reacher\.prepare\.goal_radius_range\[1\] = 0\.3 is out of range: "
        r"expected a number <= 0\.21",
    ),
    (
        ("reacher.evaluate.report_steps", [0, 1, 9]),
        r"reacher\.evaluate\.report_steps = \[0, 1, 9\]: expected steps up to "
        r"n_steps = 2",
    ),
    (
        ("reacher.meta_train.authors_seeds", [7]),
        r"reacher\.meta_train\.authors_seeds has \[7\], which are not in "
        r"reacher\.seeds = \[0, 1\]: expected a subset",
    ),
    (
        ("reacher.meta_train.ensemble_size", 0),
        r"ensemble_size = 0 is out of range: expected an integer >= 1",
    ),
    (
        ("goal_point_mass.evaluate.baseline_lrs", []),
        r"goal_point_mass\.evaluate\.baseline_lrs = \[\]: expected a non-empty",
    ),
    (
        ("goal_reacher.optimizee.activation", "swish"),
        r"goal_reacher\.optimizee\.activation = 'swish': expected one of",
    ),
    (("goal_reacher", None), r"missing key params\.yaml \(top level\)\.goal_reacher"),
]


@pytest.mark.parametrize(("change", "message"), CASES, ids=[c[0][0] for c in CASES])
def test_bad_params_raise_named_error(change, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(broken(change))


def test_repository_params_are_valid():
    from tiny import REPO

    params = load_params(REPO / "params.yaml")
    assert params.experiments["sine"].meta_train.n_outer_iterations == 500


def test_tiny_params_are_valid(tiny_params):
    assert load_params(tiny_params).experiments["mnist"].seeds == [0, 1]


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("sine: [unclosed")
    with pytest.raises(ParamsError, match="is not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_bad_params_stop_stage_and_keep_outputs(tmp_path, tracking):
    """A stage given bad params exits 2 and leaves earlier outputs untouched."""
    from stages import meta_train

    out = tmp_path / "models" / "sine"
    out.mkdir(parents=True)
    (out / "previous.txt").write_text("earlier output")
    path = write_params(
        tmp_path / "params.yaml", broken(("sine.meta_train.outer_lr", -1.0))
    )
    status = meta_train._cli.main(
        meta_train.run,
        meta_train.__doc__,
        ["sine", "--params", str(path), "--root", str(tmp_path)],
    )
    assert status == 2
    assert (out / "previous.txt").read_text() == "earlier output"
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]


def test_float_written_as_1e_minus_3_gets_a_hint():
    with pytest.raises(ParamsError, match=r"write 1\.0e-3"):
        parse_params(broken(("sine.meta_train.outer_lr", "1e-3")))


def test_cuda_without_a_device_is_a_params_error(monkeypatch):
    import torch

    from pipeline.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParamsError, match="runtime.device = 'cuda' but no CUDA"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_batch_sizes_larger_than_the_data_are_params_errors():
    import numpy as np
    import torch

    from pipeline import data
    from pipeline.experiments import bce_with_logits, build_experiment

    params = parse_params(broken(("sine.meta_train.batch_size", 21)))
    arrays = data.prepare_sine(
        params.experiments["sine"].prepare, np.random.default_rng(0)
    )
    with pytest.raises(
        ParamsError,
        match=r"sine\.meta_train\.batch_size = 21: the "
        r"meta-train tasks have 20 points",
    ):
        build_experiment("sine", params.experiments["sine"], arrays)

    params = parse_params(broken(("mnist.meta_train.batch_size", 301)))
    split = {
        f"{k}_{s}": np.zeros((n, 784) if k == "x" else n, np.float32)
        for s, n in (("train", 600), ("val", 200), ("test", 200))
        for k in ("x", "y")
    }
    exp = build_experiment("mnist", params.experiments["mnist"], split)
    # evaluate does not draw meta-train batches, so it is not affected
    assert len(exp.meta_test(bce_with_logits, 0)) > 0
    with pytest.raises(
        ParamsError,
        match=r"batch_size = 301 needs two disjoint "
        r"batches .* use at most 300",
    ):
        exp.sample_batch(torch.Generator().manual_seed(0))


def test_split_that_empties_a_split_stops_prepare(tmp_path, tracking):
    from stages import prepare

    path = write_params(
        tmp_path / "params.yaml",
        broken(("mnist.prepare.split_fractions", [0.5, 0.5, 1e-7])),
    )
    status = prepare._cli.main(
        prepare.run,
        prepare.__doc__,
        ["mnist", "--params", str(path), "--root", str(tmp_path)],
    )
    assert status == 2
    assert not (tmp_path / "data" / "mnist").exists()
