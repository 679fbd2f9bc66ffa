"""The pipeline's experiments: what each one feeds the generic ML3 engine.

An :class:`Experiment` bundles, for one setting (sine regression, binary
MNIST), the optimizee, the task loss, the baseline loss, the meta-batch
sampler, the validation used during meta-training and the meta-test. The
stages build one from validated params and the prepared data arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import meta
from pipeline.config import ExperimentParams, ParamsError
from pipeline.nets import LearnedLoss, build_mlp, learned_loss_for
from pipeline.runtime import generator

# validation during meta-training starts from the same fixed initializations
# every time (and for every seed), so its curve moves only with the loss
N_VALIDATION_INITS = 16


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error (the regression task loss and baseline)."""
    return ((prediction - target) ** 2).mean()


def bce_with_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of ``[B, 1]`` logits against ``[B]`` labels."""
    return F.binary_cross_entropy_with_logits(logits.squeeze(-1), labels)


@dataclass
class Experiment:
    """Everything experiment-specific that the engine and stages need."""

    name: str
    optimizee: nn.Module
    n_loss_inputs: int
    task_loss: meta.LossFn
    baseline_name: str
    baseline_loss: meta.LossFn
    sample_batch: Callable[[torch.Generator], tuple[tuple, tuple]]
    validate: Callable[[nn.Module], dict[str, float]]
    meta_test: Callable[[nn.Module | meta.LossFn, int], pd.DataFrame]


def build_learned_loss(exp: Experiment, params: ExperimentParams) -> LearnedLoss:
    """A fresh learned loss for ``exp`` with the architecture in ``params``."""
    return learned_loss_for(params.learned_loss, exp.n_loss_inputs)


def _per_run(optimizee, fn, theta, x, y, x_dim=0):
    """``fn(prediction, target)`` per run; ``x_dim=None`` shares the data."""
    prediction = meta.batched_forward(optimizee, theta, x)
    if x_dim is None:
        y = y.expand(prediction.shape[0], *y.shape)
    return meta.per_task_loss(fn, prediction, y)


def _long_rows(curves: dict[str, torch.Tensor], runs: pd.DataFrame) -> pd.DataFrame:
    """``{"split/metric": [E, R]}`` curves to long rows joined with run labels."""
    steps = curves["step"].numpy()
    frames = []
    for key, values in curves.items():
        if key == "step":
            continue
        split, metric = key.split("/")
        values = values.cpu().numpy()
        frame = pd.DataFrame(
            {
                "step": np.repeat(steps, values.shape[1]),
                "run_index": np.tile(np.arange(values.shape[1]), len(steps)),
                "split": split,
                "metric": metric,
                "value": values.reshape(-1),
            }
        )
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out = out.merge(runs, left_on="run_index", right_index=True).drop(
        columns="run_index"
    )
    return out


def sine_experiment(
    params: ExperimentParams,
    data: dict[str, np.ndarray],
    device: torch.device | str = "cpu",
) -> Experiment:
    """Sine regression (the paper's protocol) on one seed's prepared tasks.

    As in the authors' protocol the inner step and the task loss use the
    same training points of a meta-train task; validation and meta-test also
    score held-out points of each task, which the authors did not.
    """
    opt_p, meta_p, eval_p = params.optimizee, params.meta_train, params.evaluate
    optimizee = build_mlp(1, opt_p.hidden_sizes, 1, opt_p.activation).to(device)
    t = {k: torch.as_tensor(v, device=device) for k, v in data.items()}
    n_train_tasks = t["train_x"].shape[0]

    n_points = t["train_x"].shape[1]
    if meta_p.batch_size > n_points:
        raise ParamsError(
            f"params.yaml: sine.meta_train.batch_size = {meta_p.batch_size}: the "
            f"meta-train tasks have {n_points} points; use 0 (all) or at most "
            f"{n_points}"
        )

    def sample_batch(gen):
        tasks = torch.randint(n_train_tasks, (meta_p.meta_batch_size,), generator=gen)
        x, y = t["train_x"][tasks], t["train_y"][tasks]
        if meta_p.batch_size:
            # the same minibatch for the inner step and the task loss
            rows = torch.rand(len(tasks), n_points, generator=gen).argsort(dim=1)
            rows = rows[:, : meta_p.batch_size, None]
            x, y = torch.take_along_dim(x, rows, 1), torch.take_along_dim(y, rows, 1)
        return (x, y), (x, y)

    val_gen = generator(0, "sine/validate")
    val_theta = meta.sample_init(
        optimizee, N_VALIDATION_INITS * n_train_tasks, val_gen, device
    )
    val_tasks = torch.arange(n_train_tasks).repeat(N_VALIDATION_INITS)

    def validate(learned_loss):
        support = (t["train_x"][val_tasks], t["train_y"][val_tasks])
        heldout = (t["train_x_heldout"][val_tasks], t["train_y_heldout"][val_tasks])
        with torch.no_grad():
            theta = meta.adapt(
                optimizee,
                learned_loss,
                val_theta,
                *support,
                inner_lr=meta_p.inner_lr,
                n_steps=meta_p.n_inner_steps,
                create_graph=False,
            )
            train = _per_run(optimizee, mse, theta, *support)
            held = _per_run(optimizee, mse, theta, *heldout)
        return {
            "val_mse_train": train.mean().item(),
            "val_mse_heldout": held.mean().item(),
        }

    def meta_test(loss_fn, seed):
        n_tasks = t["test_x"].shape[0]
        tasks = torch.arange(n_tasks).repeat_interleave(eval_p.n_runs)
        runs = pd.DataFrame(
            {"task": tasks.numpy(), "run": np.tile(np.arange(eval_p.n_runs), n_tasks)}
        )
        theta0 = meta.sample_init(
            optimizee, len(tasks), generator(seed, "sine/evaluate/init"), device
        )
        x, y = t["test_x"][tasks], t["test_y"][tasks]
        x_held, y_held = t["test_x_heldout"][tasks], t["test_y_heldout"][tasks]
        order = batch_order(
            len(tasks),
            x.shape[1],
            eval_p.batch_size,
            eval_p.n_steps,
            generator(seed, "sine/evaluate/order"),
        )

        def batch(step):
            if order is None:
                return x, y
            idx = order[step - 1].to(device)
            return (
                torch.take_along_dim(x, idx[..., None], 1),
                torch.take_along_dim(y, idx[..., None], 1),
            )

        def measure(theta):
            return {
                "train/mse": _per_run(optimizee, mse, theta, x, y),
                "heldout/mse": _per_run(optimizee, mse, theta, x_held, y_held),
            }

        curves = meta.train_optimizees(
            optimizee,
            loss_fn,
            theta0,
            batch=batch,
            lr=eval_p.lr,
            n_steps=eval_p.n_steps,
            measure=measure,
            eval_every=eval_p.eval_every,
        )
        return _long_rows(curves, runs)

    return Experiment(
        name="sine",
        optimizee=optimizee,
        n_loss_inputs=2,
        task_loss=mse,
        baseline_name="mse",
        baseline_loss=mse,
        sample_batch=sample_batch,
        validate=validate,
        meta_test=meta_test,
    )


def batch_order(n_runs, n_items, batch_size, n_steps, gen):
    """``[n_steps, n_runs, batch_size]`` indices, epoch by epoch; None = full batch."""
    if batch_size == 0 or batch_size >= n_items:
        return None
    per_epoch = n_items // batch_size
    n_epochs = -(-n_steps // per_epoch)
    perms = torch.rand(n_epochs, n_runs, n_items, generator=gen).argsort(dim=-1)
    perms = perms[..., : per_epoch * batch_size]
    batches = perms.reshape(n_epochs, n_runs, per_epoch, batch_size).transpose(1, 2)
    return batches.reshape(n_epochs * per_epoch, n_runs, batch_size)[:n_steps]


def accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of ``[B, 1]`` logits on the right side of 0 for ``[B]`` labels."""
    return ((logits.squeeze(-1) > 0).to(labels.dtype) == labels).to(logits.dtype).mean()


def mnist_experiment(
    params: ExperimentParams,
    data: dict[str, np.ndarray],
    device: torch.device | str = "cpu",
) -> Experiment:
    """Binary MNIST classification (our protocol) on the prepared splits.

    Meta-training draws, per task of a meta-batch, a fresh classifier and two
    disjoint batches of the training split: one for the inner step on the
    learned loss, one for the cross-entropy task loss. The validation split
    monitors meta-training; the test split is used only at meta-test.
    """
    opt_p, meta_p, eval_p = params.optimizee, params.meta_train, params.evaluate
    n_features = data["x_train"].shape[1]
    optimizee = build_mlp(n_features, opt_p.hidden_sizes, 1, opt_p.activation).to(
        device
    )
    t = {
        k: torch.as_tensor(v, device=device)
        for k, v in data.items()
        if not k.startswith("index_")
    }
    n_train = t["x_train"].shape[0]
    batch_size = meta_p.batch_size or n_train // 2

    def check_batch_size():
        # only meta-training draws these batches; evaluate never reads them
        if 2 * batch_size > n_train:
            raise ParamsError(
                f"params.yaml: mnist.meta_train.batch_size = {batch_size} needs two "
                f"disjoint batches but the training split has {n_train} examples; "
                f"use at most {n_train // 2}"
            )

    def sample_batch(gen):
        check_batch_size()
        idx = torch.rand(meta_p.meta_batch_size, n_train, generator=gen).argsort(dim=1)
        support, query = idx[:, :batch_size], idx[:, batch_size : 2 * batch_size]
        return (
            (t["x_train"][support], t["y_train"][support]),
            (t["x_train"][query], t["y_train"][query]),
        )

    def validation_set():
        check_batch_size()
        n_val = N_VALIDATION_INITS
        theta = meta.sample_init(
            optimizee, n_val, generator(0, "mnist/validate"), device
        )
        gen = generator(0, "mnist/validate/batches")
        idx = torch.rand(n_val, n_train, generator=gen).argsort(dim=1)[:, :batch_size]
        support = (t["x_train"][idx], t["y_train"][idx])
        query = (t["x_val"].expand(n_val, -1, -1), t["y_val"].expand(n_val, -1))
        return theta, support, query

    cache = {}

    def validate(learned_loss):
        if not cache:
            cache["set"] = validation_set()
        val_theta, val_support, val_query = cache["set"]
        with torch.no_grad():
            losses = meta.meta_objective(
                optimizee,
                learned_loss,
                bce_with_logits,
                val_theta,
                val_support,
                val_query,
                inner_lr=meta_p.inner_lr,
                n_inner_steps=meta_p.n_inner_steps,
            )
        return {"val_cross_entropy": losses.mean().item()}

    def meta_test(loss_fn, seed):
        runs = pd.DataFrame({"task": 0, "run": np.arange(eval_p.n_runs)})
        theta0 = meta.sample_init(
            optimizee, eval_p.n_runs, generator(seed, "mnist/evaluate/init"), device
        )
        order = batch_order(
            eval_p.n_runs,
            n_train,
            eval_p.batch_size,
            eval_p.n_steps,
            generator(seed, "mnist/evaluate/order"),
        )

        def batch(step):
            if order is None:
                return (
                    t["x_train"].expand(eval_p.n_runs, -1, -1),
                    t["y_train"].expand(eval_p.n_runs, -1),
                )
            idx = order[step - 1].to(device)
            return t["x_train"][idx], t["y_train"][idx]

        def measure(theta):
            out = {}
            for split in ("train", "val", "test"):
                x, y = t[f"x_{split}"], t[f"y_{split}"]
                out[f"{split}/accuracy"] = _per_run(
                    optimizee, accuracy_from_logits, theta, x, y, x_dim=None
                )
                out[f"{split}/cross_entropy"] = _per_run(
                    optimizee, bce_with_logits, theta, x, y, x_dim=None
                )
            return out

        curves = meta.train_optimizees(
            optimizee,
            loss_fn,
            theta0,
            batch=batch,
            lr=eval_p.lr,
            n_steps=eval_p.n_steps,
            measure=measure,
            eval_every=eval_p.eval_every,
        )
        return _long_rows(curves, runs)

    return Experiment(
        name="mnist",
        optimizee=optimizee,
        n_loss_inputs=2,
        task_loss=bce_with_logits,
        baseline_name="cross_entropy",
        baseline_loss=bce_with_logits,
        sample_batch=sample_batch,
        validate=validate,
        meta_test=meta_test,
    )


BUILDERS = {"sine": sine_experiment, "mnist": mnist_experiment}


def build_experiment(
    name: str,
    params: ExperimentParams,
    data: dict[str, np.ndarray],
    device: torch.device | str = "cpu",
) -> Experiment:
    """The :class:`Experiment` called ``name`` (one of ``BUILDERS``)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(BUILDERS)}")
    return BUILDERS[name](params, data, device)
