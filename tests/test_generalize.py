"""The generalization grid: architectures, BatchNorm policy, K-way loss, cells."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import REPO, tiny_params_dict
from torch import nn

from pipeline import data
from pipeline import generalize as gz
from pipeline.config import (
    MLPArchitectureParams,
    ParamsError,
    load_params,
    parse_params,
)
from pipeline.nets import LearnedLoss, build_mlp


def _arch(**kw):
    return MLPArchitectureParams(**{"hidden_sizes": [6], **kw})


def _loss_for(experiment: str) -> LearnedLoss:
    torch.manual_seed(0)
    transform = "sigmoid" if experiment == "mnist" else "identity"
    return LearnedLoss(2, (8, 8), bias=True, prediction_transform=transform)


def _long(values, step: int, split: str, metric: str) -> pd.DataFrame:
    """Curves rows from ``(method, seed, run, value)`` tuples at one step."""
    frame = pd.DataFrame(values, columns=["method", "seed", "run", "value"])
    return frame.assign(task=0, step=step, split=split, metric=metric)


@pytest.mark.parametrize(
    "name", list(load_params(REPO / "params.yaml").generalize.cells)
)
def test_every_cell_of_the_grid_trains_a_few_steps(name):
    """Each architecture/dataset of params.yaml builds, trains, gives finite metrics."""
    params = load_params(REPO / "params.yaml").generalize
    cell = params.cells[name]
    shared = dataclasses.replace(
        gz.shared_settings(params, cell.experiment),
        n_steps=3,
        checkpoints=[1, 3],
        n_runs=2,
        **({"n_tasks": 2} if cell.experiment == "sine" else {"batch_size": 16}),
    )
    prepare = load_params(REPO / "params.yaml").experiments[cell.experiment].prepare
    curves = gz.run_cell_seed(cell, shared, prepare, _loss_for(cell.experiment), seed=0)
    assert set(curves.method) == {
        "learned",
        "mse" if cell.experiment == "sine" else "cross_entropy",
    }
    assert set(curves.step) == {0, 1, 2, 3}
    assert np.isfinite(curves.value).all()
    # both losses start from the same weights: identical step-0 metrics
    start = curves[curves.step == 0].pivot_table(
        index=["task", "run", "split", "metric"], columns="method", values="value"
    )
    np.testing.assert_array_equal(start.iloc[:, 0], start.iloc[:, 1])
    # and the learned loss moved them
    moved = curves[(curves.method == "learned") & (curves.metric != "accuracy")]
    assert not np.allclose(
        moved[moved.step == 0].value.to_numpy(), moved[moved.step == 3].value.to_numpy()
    )


def test_batched_mlp_matches_torch_modules_run_by_run():
    net = gz.BatchedNet(_arch(hidden_sizes=[7, 5], activation="tanh"), (4,), 3)
    theta = net.init(3, torch.Generator().manual_seed(0))
    x = torch.randn(3, 10, 4)
    out, _ = net.forward(theta, x, train=True)
    for r in range(3):
        module = build_mlp(4, [7, 5], 3, "tanh")
        names = ["fc0", "fc1", "out"]
        for layer, name in zip(module[::2], names, strict=True):
            layer.weight.data = theta[f"{name}.weight"][r]
            layer.bias.data = theta[f"{name}.bias"][r]
        torch.testing.assert_close(out[r], module(x[r]))


def test_batched_cnn_matches_torch_convolutions():
    arch = load_params(REPO / "params.yaml").generalize.cells["mnist_arch_cnn"]
    net = gz.BatchedNet(arch.architecture, (1, 8, 8), 2)
    theta = net.init(2, torch.Generator().manual_seed(1))
    x = torch.rand(2, 5, 64)
    out, _ = net.forward(theta, x, train=True)
    for r in range(2):
        h = x[r].view(5, 1, 8, 8)
        for i in range(2):
            w, b = theta[f"conv{i}.weight"][r], theta[f"conv{i}.bias"][r]
            h = torch.relu(nn.functional.conv2d(h, w, b, stride=2, padding=1))
        h = torch.relu(h.flatten(1) @ theta["fc0.weight"][r].T + theta["fc0.bias"][r])
        want = h @ theta["out.weight"][r].T + theta["out.bias"][r]
        torch.testing.assert_close(out[r], want)


def test_default_init_follows_torch_bounds():
    net = gz.BatchedNet(_arch(hidden_sizes=[50]), (400,), 1)
    theta = net.init(4, torch.Generator().manual_seed(0))
    bound = 1 / np.sqrt(400)
    assert theta["fc0.weight"].abs().max() <= bound
    assert theta["fc0.weight"].abs().max() > 0.95 * bound


def _torch_bn_net(theta, momentum):
    module = nn.Sequential(
        nn.Linear(3, 6),
        nn.BatchNorm1d(6, momentum=momentum),
        nn.ReLU(),
        nn.Linear(6, 1),
    )
    for layer, name in (
        (module[0], "fc0"),
        (module[1], "fc0_norm"),
        (module[3], "out"),
    ):
        layer.weight.data = theta[f"{name}.weight"][0].clone()
        layer.bias.data = theta[f"{name}.bias"][0].clone()
    return module


@pytest.mark.parametrize("bn_eval", ["running", "batch"])
def test_batchnorm_policy_takes_evaluation_statistics_from_where_it_says(bn_eval):
    """Train 5 SGD steps on batches; evaluate as nn.BatchNorm1d would."""
    arch = _arch(norm="batchnorm", bn_eval=bn_eval, bn_momentum=0.3)
    net = gz.BatchedNet(arch, (3,), 1)
    theta = net.init(1, torch.Generator().manual_seed(0))
    reference = _torch_bn_net(theta, momentum=0.3)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05)
    state = net.init_state(1)
    gen = torch.Generator().manual_seed(1)
    theta = {k: v.requires_grad_(True) for k, v in theta.items()}
    for _ in range(5):
        x, y = (
            torch.randn(1, 16, 3, generator=gen),
            torch.randn(1, 16, 1, generator=gen),
        )
        out, stats = net.forward(theta, x, state=state, train=True)
        grads = torch.autograd.grad(((out - y) ** 2).mean(), list(theta.values()))
        theta = {
            k: (v - 0.05 * g).detach().requires_grad_(True)
            for (k, v), g in zip(theta.items(), grads, strict=True)
        }
        state = net.update_state(state, stats)
        reference.train()
        sgd.zero_grad()
        ((reference(x[0]) - y[0]) ** 2).mean().backward()
        sgd.step()
    bn = reference[1]
    torch.testing.assert_close(state["fc0_norm.mean"][0], bn.running_mean)
    torch.testing.assert_close(state["fc0_norm.var"][0], bn.running_var)

    # an evaluation set far from the training batches: the two policies differ
    x_eval = 3.0 + 2.0 * torch.randn(1, 40, 3, generator=gen)
    out, _ = net.forward(theta, x_eval, state=state, train=False, bn_eval=bn_eval)
    if bn_eval == "running":
        reference.eval()  # normalizes with the running statistics
    else:
        reference.train()  # normalizes with the evaluated set's own statistics
    with torch.no_grad():
        torch.testing.assert_close(out[0], reference(x_eval[0]))
    other = "batch" if bn_eval == "running" else "running"
    out_other, _ = net.forward(theta, x_eval, state=state, train=False, bn_eval=other)
    assert not torch.allclose(out, out_other, atol=1e-3)


def test_batchnorm_running_policy_needs_the_statistics():
    net = gz.BatchedNet(_arch(norm="batchnorm"), (3,), 1)
    theta = net.init(1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="running statistics"):
        net.forward(theta, torch.randn(1, 4, 3), train=False, bn_eval="running")


def test_per_class_loss_shapes_gradients_and_finite_differences():
    binary = LearnedLoss(2, (8, 8), bias=True, prediction_transform="sigmoid").double()
    loss = gz.PerClassLoss(binary)
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    assert loss.pointwise(logits, labels).shape == (6,)
    value = loss(logits, labels)
    assert value.dim() == 0
    value.backward()
    # the gradient reaches every logit and every parameter of the loss network
    assert (logits.grad != 0).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert torch.autograd.gradcheck(
        lambda z: loss(z, labels), (logits.detach().requires_grad_(True),)
    )
    # and through an SGD step into the loss parameters (the meta-gradient)
    weights = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 5, dtype=torch.float64)
    (g,) = torch.autograd.grad(loss(x @ weights, labels), weights, create_graph=True)
    after = weights - 0.5 * g
    binary.zero_grad()
    nn.functional.cross_entropy(x @ after, labels).backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in binary.parameters()
    )


def test_per_class_loss_is_the_binary_loss_per_column():
    binary = LearnedLoss(2, (8,), bias=True, prediction_transform="sigmoid")
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    p = torch.softmax(logits, -1)
    onehot = nn.functional.one_hot(labels, 3).float()
    columns = [
        binary.output(binary.net(torch.stack([p[:, c], onehot[:, c]], -1))).squeeze(-1)
        for c in range(3)
    ]
    want = torch.stack(columns, -1)
    torch.testing.assert_close(
        gz.PerClassLoss(binary).pointwise(logits, labels), want.sum(-1)
    )
    torch.testing.assert_close(
        gz.PerClassLoss(binary, "mean").pointwise(logits, labels), want.mean(-1)
    )


def test_per_class_loss_rejects_a_regression_loss():
    with pytest.raises(ValueError, match="prediction_transform sigmoid"):
        gz.PerClassLoss(LearnedLoss(2, (4,)))


def test_split_digits_is_stratified_and_matches_the_binary_split():
    x, y = data.load_mnist_digits()
    binary = data.split_binary_mnist(
        x, y, classes=[4, 9], fractions=[0.6, 0.2, 0.2], seed=0
    )
    again = data.split_digits(
        x / np.float32(255.0), y, classes=[4, 9], fractions=[0.6, 0.2, 0.2], seed=0
    )
    for key in binary:
        np.testing.assert_array_equal(binary[key], again[key])
    ten = data.split_digits(
        x, y, classes=list(range(10)), fractions=[0.6, 0.2, 0.2], seed=0
    )
    assert ten["y_train"].dtype == np.int64
    counts = np.bincount(ten["y_test"], minlength=10)
    assert counts.min() >= 0.18 * 500 and counts.max() <= 0.22 * 500
    np.testing.assert_array_equal(y[ten["index_test"]], ten["y_test"])


def test_log_steps_cover_the_checkpoints():
    assert gz.log_steps(1000, [10, 100, 1000]) == [
        0,
        1,
        2,
        5,
        10,
        20,
        50,
        100,
        200,
        500,
        1000,
    ]
    assert gz.log_steps(30, [7]) == [0, 1, 2, 5, 7, 10, 20, 30]


def test_summarize_pairs_seeds_and_marks_the_interval():
    values = [
        (method, seed, run, value)
        for seed in range(5)
        for run in range(2)
        for method, value in (("learned", 1.0 + 0.01 * seed), ("mse", 2.0))
    ]
    summary = gz.summarize(_long(values, 10, "heldout", "mse"), [10], 0.95).iloc[0]
    assert summary.seeds_won == 5 and summary.runs_won == 10
    assert summary.diff_mean == pytest.approx(-0.98)
    assert summary.interval_excludes_zero
    assert summary.improvement == pytest.approx(0.49)


def test_summarize_improvement_of_accuracy_is_the_error_reduction():
    values = [
        (m, s, 0, v)
        for s in range(3)
        for m, v in (("learned", 0.98), ("cross_entropy", 0.96))
    ]
    summary = gz.summarize(_long(values, 1, "test", "accuracy"), [1], 0.95).iloc[0]
    assert summary.improvement == pytest.approx(0.5)
    assert summary.seeds_won == 3


def test_improvement_is_bounded_and_symmetric():
    assert gz.improvement(1.0, 2.0, "mse") == pytest.approx(0.5)
    assert gz.improvement(2.0, 1.0, "mse") == pytest.approx(-0.5)
    assert gz.improvement(1e6, 1.0, "cross_entropy") == pytest.approx(-(1 - 1e-6))
    # both perfect: no difference, not 0 / 0
    assert gz.improvement(1.0, 1.0, "accuracy") == 0.0
    assert gz.improvement(0.99, 1.0, "accuracy") == pytest.approx(-1.0)
    assert np.isnan(gz.improvement(float("nan"), 1.0, "mse"))


def _with_cell(**changes):
    raw = tiny_params_dict()
    cell = raw["generalize"]["cells"]["mnist_reference"]
    for key, value in changes.items():
        cell[key] = value
    return raw


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architecture": {"kind": "resnet"}}, "unknown kind; valid: mlp, cnn"),
        (
            {"architecture": {"kind": "mlp", "hidden_sizes": [8], "norm": "layer"}},
            "expected one of none, batchnorm",
        ),
        (
            {"dataset": {"name": "cifar", "classes": [1, 2]}},
            "valid: sine, mnist, digits",
        ),
        (
            {"dataset": {"name": "mnist", "classes": [3, 3]}},
            "two or more different digits",
        ),
        (
            {
                "dataset": {
                    "name": "sine",
                    "amplitude_range": [1.0, 1.0],
                    "phase_range": [0.0, 0.0],
                    "x_range": [0.0, 1.0],
                }
            },
            "meta-tested on mnist, digits",
        ),
        ({"axis": "width"}, "expected one of reference, architecture, dataset, lr"),
        ({"experiment": "frequency"}, "expected one of sine, mnist"),
        ({"lr": 0}, "out of range"),
    ],
)
def test_bad_cells_name_what_is_allowed(change, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(_with_cell(**change))


def test_cnn_on_sine_and_late_checkpoints_are_rejected():
    raw = tiny_params_dict()
    raw["generalize"]["cells"]["sine_reference"]["architecture"] = {
        "kind": "cnn",
        "channels": [4],
        "hidden_sizes": [],
    }
    with pytest.raises(ParamsError, match="needs image inputs"):
        parse_params(raw)
    raw = tiny_params_dict()
    raw["generalize"]["mnist"]["checkpoints"] = [2, 50]
    with pytest.raises(ParamsError, match="up to n_steps = 4"):
        parse_params(raw)
    raw = tiny_params_dict()
    raw["generalize"]["cells"]["Bad-Name"] = raw["generalize"]["cells"][
        "sine_reference"
    ]
    with pytest.raises(ParamsError, match="lower-case letters"):
        parse_params(raw)


def test_unknown_cell_on_the_command_line_lists_the_cells(
    tiny_params, tmp_path, caplog
):
    from stages import generalize

    code = generalize._cli.main(
        generalize.run,
        generalize.__doc__,
        ["nope", "--params", str(tiny_params), "--root", str(tmp_path)],
        per_experiment=False,
        positional="cell_name",
    )
    assert code == 2
    assert "unknown generalization cell 'nope'" in caplog.text
    assert "sine_reference, sine_arch_batchnorm" in caplog.text


@pytest.mark.parametrize(
    ("tally", "word"),
    [
        ((3, 0, 3), "held"),
        ((2, 1, 3), "partly held"),
        ((1, 1, 3), "mixed"),
        ((0, 2, 3), "did not hold"),
        ((0, 0, 3), "no clear difference"),
    ],
)
def test_verdict_words(tally, word):
    from pipeline.report_generalize import verdict

    better, worse, total = tally
    assert verdict(better, worse, total) == word


@pytest.mark.parametrize(
    "name", ["sine_arch_batchnorm", "mnist_reference", "mnist_data_ten_way"]
)
def test_both_losses_see_the_same_weights_and_data_order(name):
    """With the baseline passed twice, the two curves are identical."""
    params = load_params(REPO / "params.yaml")
    cell = params.generalize.cells[name]
    shared = dataclasses.replace(
        gz.shared_settings(params.generalize, cell.experiment),
        n_steps=6,
        checkpoints=[6],
        n_runs=2,
        **({"n_tasks": 2} if cell.experiment == "sine" else {"batch_size": 16}),
    )
    prepare = params.experiments[cell.experiment].prepare
    task = gz.build_task(cell, shared, prepare, seed=1)
    net = gz.BatchedNet(cell.architecture, task.input_shape, task.n_outputs)
    standard = gz.losses_for(task, _loss_for(cell.experiment), "sum")
    baseline = [v for k, v in standard.items() if k != "learned"][0]
    curves = gz.run_seed(
        net,
        task,
        {"learned": baseline, "copy": baseline},
        seed=1,
        lr=cell.lr,
        n_steps=6,
        batch_size=shared.batch_size,
        checkpoints=[6],
        init_key="k",
    )
    wide = curves.pivot_table(
        index=["task", "run", "step", "split", "metric"],
        columns="method",
        values="value",
    )
    np.testing.assert_array_equal(wide["learned"], wide["copy"])
    assert not np.allclose(wide.xs(0, level="step"), wide.xs(6, level="step"))


def test_per_class_loss_with_two_classes_is_the_binary_loss_on_both_sides():
    """K = 2: p1 = sigmoid(z1 - z0), so the sum is M(p1, y) + M(1 - p1, 1 - y)."""
    binary = LearnedLoss(2, (8,), bias=True, prediction_transform="sigmoid")
    logits = torch.randn(7, 2)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    margin = logits[:, 1] - logits[:, 0]
    y = labels.float()
    want = binary.pointwise(margin, y) + binary.pointwise(-margin, 1 - y)
    torch.testing.assert_close(gz.PerClassLoss(binary).pointwise(logits, labels), want)


def test_diverged_runs_lose_the_cell_instead_of_being_averaged_away():
    values = [
        (method, seed, run, value)
        for seed in range(3)
        for run in range(2)
        for method, value in (
            ("learned", np.nan if (seed, run) == (0, 1) else 0.1),
            ("mse", 0.2),
        )
    ]
    summary = gz.summarize(_long(values, 5, "heldout", "mse"), [5], 0.95).iloc[0]
    assert summary.diverged_learned == 1 and summary.diverged_baseline == 0
    assert summary.improvement == -1.0 and summary.interval_excludes_zero
    assert np.isnan(summary.learned_mean)
    # the diverged run is the one run the learned loss does not win
    assert summary.runs_won == 5 and summary.n_runs == 6


def test_accuracy_of_diverged_logits_is_nan_not_chance():
    logits = torch.tensor([[0.3, 0.1], [float("nan"), 0.0]])
    acc = gz.accuracy_rows(logits, torch.tensor([0, 1]))
    assert acc[0] == 1 and torch.isnan(acc[1])
    binary = gz.accuracy_rows(torch.tensor([[float("inf")], [-1.0]]), torch.ones(2))
    assert torch.isnan(binary[0]) and binary[1] == 0


def test_cnn_batchnorm_matches_batchnorm2d():
    from pipeline.config import CNNArchitectureParams

    arch = CNNArchitectureParams(
        channels=[3], kernel_size=3, stride=1, hidden_sizes=[], norm="batchnorm"
    )
    net = gz.BatchedNet(arch, (1, 5, 5), 2)
    theta = net.init(1, torch.Generator().manual_seed(0))
    theta["conv0_norm.weight"] = torch.rand(1, 3) + 0.5
    theta["conv0_norm.bias"] = torch.randn(1, 3)
    state = net.init_state(1)
    x = torch.randn(1, 8, 25)
    out, stats = net.forward(theta, x, state=state, train=True)
    state = net.update_state(state, stats)
    bn = nn.BatchNorm2d(3, momentum=0.1)
    bn.weight.data, bn.bias.data = (
        theta["conv0_norm.weight"][0],
        theta["conv0_norm.bias"][0],
    )
    conv = nn.functional.conv2d(
        x[0].view(8, 1, 5, 5),
        theta["conv0.weight"][0],
        theta["conv0.bias"][0],
        padding=1,
    )
    h = torch.relu(bn.train()(conv)).flatten(1)
    want = h @ theta["out.weight"][0].T + theta["out.bias"][0]
    torch.testing.assert_close(out[0], want)
    torch.testing.assert_close(state["conv0_norm.mean"][0], bn.running_mean)
    torch.testing.assert_close(state["conv0_norm.var"][0], bn.running_var)


def test_batchnorm_refuses_a_batch_of_one():
    net = gz.BatchedNet(_arch(norm="batchnorm"), (3,), 1)
    theta = net.init(1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="more than one value per channel"):
        net.forward(theta, torch.randn(1, 1, 3), train=True)


def test_a_reference_cell_must_be_the_meta_train_setting():
    raw = tiny_params_dict()
    raw["generalize"]["cells"]["mnist_reference"]["architecture"]["activation"] = "tanh"
    with pytest.raises(ParamsError, match="a reference cell is the mnist meta-train"):
        parse_params(raw)
    raw = tiny_params_dict()
    raw["generalize"]["cells"]["mnist_reference"]["dataset"]["classes"] = [3, 5]
    with pytest.raises(ParamsError, match=r"dataset.classes = \[3, 5\]"):
        parse_params(raw)


@pytest.mark.parametrize("experiment", ["sine", "mnist"])
def test_loss_minimizers_find_the_minimum_of_a_known_loss(tmp_path, experiment):
    """|p - y| as a learned loss: minimum at the target (probability 0 or 1)."""
    from pipeline import artifacts
    from pipeline.report_generalize import loss_minimizers

    transform = "sigmoid" if experiment == "mnist" else "identity"
    loss = LearnedLoss(
        2, (2,), bias=False, output_activation="none", prediction_transform=transform
    )
    with torch.no_grad():
        loss.net[0].weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        loss.net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
    artifacts.save_learned_loss(tmp_path / "seed_3", loss)
    table = loss_minimizers(tmp_path, [3], experiment)
    if experiment == "sine":
        assert table["minimizer / target (mean)"].item() == pytest.approx(1.0)
    else:
        assert table["minimizing probability, label 0"].item() == pytest.approx(0.0)
        assert table["minimizing probability, label 1"].item() == pytest.approx(1.0)
