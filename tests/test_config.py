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
