"""Reward learning for model-based RL: the paper's MuJoCo reacher.

A two-link arm (gymnasium's ``Reacher-v5``, driven through
:class:`pipeline.rl.envs.ReacherSim`) starts at rest, stretched along the x
axis, and should put its fingertip on a goal within ``horizon`` steps of
0.02 s. A state is (q1, q2, dq1, dq2), a goal its joint-space counterpart
``q_g`` (elbow-down inverse kinematics of the fingertip target).

- **Policy**: a deterministic MLP over (state, goal state) with a leading
  goal axis: ``G`` policies are one tuple of tensors ``[G, ...]``.
- **Dynamics model**: a :class:`~pipeline.rl.dynamics.ProbabilisticEnsemble`
  predicts the change of the joint velocities; angles are integrated from
  the velocities. It is fitted on random-torque rollouts and refreshed
  during meta-training with real rollouts of the current policies.
- **Learned loss** M_phi: one row per time step, (state reached, action,
  joint distance to the goal), mean over time, summed over goals.
- **Meta-train**: one differentiable SGD step of fresh policies on M_phi
  through the model, then the task loss (10 x final + mean joint distance
  + a velocity penalty) of the new policies' model rollouts; Adam on phi.
- **Meta-test**: on held-out goals, fresh policies take SGD steps on M_phi
  or on the task loss itself (the *direct* baseline), both on *grounded*
  rollouts: the state values come from the simulator, the gradients from
  the model (see :func:`rollout_grounded`).

The learned loss's inputs may be standardized during meta-training; the
standardization is folded into its first layer at the end, so the saved
loss is a plain :class:`~pipeline.nets.LearnedLoss` on raw inputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline import artifacts, nets, stats
from pipeline.config import REACHER_VARIANTS, ExperimentParams
from pipeline.meta import LearnedLossCollapsed, MetaTrainResult
from pipeline.nets import LearnedLoss
from pipeline.rl import envs
from pipeline.rl.dynamics import ProbabilisticEnsemble
from pipeline.runtime import generator, numpy_rng, stream_seed

Theta = tuple[torch.Tensor, ...]

N_INPUTS = 7  # learned loss: state 4, action 2, joint distance to the goal 1
# ReacherSim's step, frame_skip 2 x 0.01 s of RK4 (tested against the sim)
DT = 0.02
# dynamics-model inputs: q2 (raw and as sin, cos), dq1, dq2, a1, a2 and how
# deep the elbow is, now and after a free step, beyond its limit (see
# model_features). The arm moves in the horizontal plane (gravity along z),
# so nothing depends on q1: dropping it makes the model exactly invariant to
# the base angle, which random data would otherwise have to teach it.
N_FEATURES = 9
POLICY_INPUTS = 8  # state 4, goal state 4 = (q_g, 0, 0)
# actions of the refresh rollouts get N(0, 0.1^2) added: the model also sees
# what happens next to the policies' own trajectories
REFRESH_ACTION_NOISE = 0.1
HELDOUT_FRACTION = 0.1  # random rollouts kept out of every model fit
N_PROBE_POLICIES = 8  # fresh policies whose real rollouts score every model fit
DYNAMICS_WEIGHTS = "dynamics.pt"
DYNAMICS_CONFIG = "dynamics.json"


# ---------------------------------------------------------------------------
# prepare


def prepare(params: ExperimentParams, seed: int) -> dict[str, np.ndarray]:
    """Goals and random-torque rollouts of one seed, as arrays.

    Training goals are drawn per seed; the held-out goals are one spiral over
    the workspace, the same for every seed. The random rollouts (the first
    dynamics model's data) start at rest at uniform angles (the elbow within
    its limits) and hold each random torque for a random number of steps, so
    that they reach the speeds of policies that push one way for long
    (i.i.d. torques average out and stay slow).

    Returns:
      ``train_goals_xy``/``test_goals_xy`` ``[n, 2]`` fingertip goals,
      ``train_goals_q``/``test_goals_q`` ``[n, 2]`` their joint angles,
      ``random_states`` ``[R, H + 1, 4]``, ``random_actions`` ``[R, H, 2]``
      (float32) and ``horizon`` (a 0-d array).
    """
    p = params.prepare
    rng = numpy_rng(seed, "reacher/prepare")
    train_xy = envs.goals_on_workspace(p.n_train_goals, p.goal_radius_range, rng)
    test_xy = envs.spread_goals(p.n_test_goals, p.goal_radius_range)
    actions = random_torques(p.n_random_rollouts, p.horizon, rng)
    starts = np.zeros((p.n_random_rollouts, envs.STATE_DIM))
    starts[:, 0] = rng.uniform(-np.pi, np.pi, p.n_random_rollouts)
    limit = envs.ELBOW_LIMIT
    starts[:, 1] = rng.uniform(-limit, limit, p.n_random_rollouts)
    states = replay(starts, actions)
    return {
        "train_goals_xy": train_xy.astype(np.float32),
        "train_goals_q": envs.inverse_kinematics(train_xy).astype(np.float32),
        "test_goals_xy": test_xy.astype(np.float32),
        "test_goals_q": envs.inverse_kinematics(test_xy).astype(np.float32),
        "random_states": states.astype(np.float32),
        "random_actions": actions.astype(np.float32),
        "horizon": np.asarray(p.horizon),
    }


def random_torques(n: int, horizon: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, horizon, 2]`` torques in [-1, 1], each held for 1-32 steps.

    Every rollout has its own hold length (a power of two) and amplitude in
    [0.1, 1], so the data covers slow moves near a goal as well as fast
    spins.
    """
    hold = 2 ** rng.integers(0, 6, n)  # 1 .. 32 steps
    amplitude = rng.uniform(0.1, 1.0, n)
    draws = rng.uniform(-1.0, 1.0, (n, horizon, envs.ACTION_DIM))
    # step t uses the draw of its hold segment's first step
    index = (np.arange(horizon)[None] // hold[:, None]) * hold[:, None]
    held = np.take_along_axis(draws, index[..., None], axis=1)
    return held * amplitude[:, None, None]


def replay(starts: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Real states ``[n, H + 1, 4]`` of open-loop torques ``[n, H, 2]``."""
    sim = envs.ReacherSim(len(starts))
    states = [sim.reset(starts)]
    for t in range(actions.shape[1]):
        states.append(sim.step(actions[:, t]))
    return np.stack(states, 1)


# ---------------------------------------------------------------------------
# policies


def initial_policies(
    hidden_sizes, n: int, gen: torch.Generator, output_scale: float = 1.0
) -> Theta:
    """``n`` fresh policy MLPs ``8 -> hidden_sizes -> 2``, stacked on axis 0.

    Weights and biases are drawn like torch's default ``nn.Linear``
    initialization (uniform in +-1/sqrt(fan_in)) from ``gen``; the output
    layer's are then multiplied by ``output_scale``. With 1, a fresh policy
    pushes torques of ~0.5, which spin this fast arm (gear 200) in circles;
    a small scale gives quiet policies that start near rest. Returns
    ``(w1 [n, h1, 8], b1 [n, h1], ..., w [n, 2, h], b [n, 2])``.
    """
    sizes = [POLICY_INPUTS, *hidden_sizes, envs.ACTION_DIM]
    theta = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        bound = 1.0 / math.sqrt(fan_in)
        for shape in ((n, fan_out, fan_in), (n, fan_out)):
            theta.append((2 * torch.rand(shape, generator=gen) - 1) * bound)
    theta[-2], theta[-1] = theta[-2] * output_scale, theta[-1] * output_scale
    return tuple(theta)


def act(
    theta: Theta, states: torch.Tensor, goals_q: torch.Tensor, activation: nn.Module
) -> torch.Tensor:
    """Torques ``[G, 2]`` of ``G`` policies in states ``[G, 4]``, goals ``[G, 2]``.

    The output is squashed by tanh into the control range [-1, 1] rather
    than clipped: a clipped torque has zero gradient, and a fresh policy
    that pushes beyond the range would never learn to push less.
    """
    return policy(theta, goals_q, activation)(states)


def policy(
    theta: Theta, goals_q: torch.Tensor, activation: nn.Module
) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`act` for fixed goals, as a function of the states ``[G, 4]``.

    What does not change along a rollout is computed once: the first
    layer's goal term and the transposed weights (a rollout is hundreds of
    tiny ops, so their count sets its time).
    """
    goal_state = torch.cat([goals_q, torch.zeros_like(goals_q)], dim=-1)
    w1 = theta[0].transpose(1, 2)  # [G, 8, h1]
    first_bias = torch.baddbmm(
        theta[1].unsqueeze(1), goal_state.unsqueeze(1), w1[:, envs.STATE_DIM :]
    )
    layers = [(first_bias, w1[:, : envs.STATE_DIM])]
    for i in range(2, len(theta), 2):
        layers.append((theta[i + 1].unsqueeze(1), theta[i].transpose(1, 2)))

    def forward(states: torch.Tensor) -> torch.Tensor:
        h = states.unsqueeze(1)  # [G, 1, 4]
        for i, (bias, weight) in enumerate(layers):
            h = torch.baddbmm(bias, h, weight)
            h = activation(h) if i < len(layers) - 1 else torch.tanh(h)
        return h.squeeze(1)

    return forward


def detach(theta: Theta) -> Theta:
    """A new leaf for every tensor of ``theta``, ready for the next step."""
    return tuple(t.detach().requires_grad_(True) for t in theta)


# ---------------------------------------------------------------------------
# dynamics model


def elbow_penetration(q2: torch.Tensor) -> torch.Tensor:
    """How far ``q2`` is beyond the elbow's limit, signed; 0 within +-3 rad."""
    return q2 - q2.clamp(-envs.ELBOW_LIMIT, envs.ELBOW_LIMIT)


def model_features(states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """The model's inputs ``[..., 9]`` of states ``[..., 4]``, actions ``[..., 2]``.

    The elbow's limit is a stiff spring beyond +-3 rad in MuJoCo (a hit at
    23 rad/s goes 0.2 rad deep and stops within a step). A smooth network
    fed q2 alone blurs that edge; the penetration depth now and after a
    free step (q2 + dt dq2) make it a kink at 0 of two inputs. Held-out
    one-step MSE (standardized) of a 3 x 200-200 ensemble, 30 epochs on 180
    random rollouts: 0.20 without them, 0.019 with them; in steps that touch
    the limit 1.9 -> 0.17 (seed 0).
    """
    q2, velocity = states[..., 1:2], states[..., 2:]
    return torch.cat(
        [
            q2,
            torch.sin(q2),
            torch.cos(q2),
            velocity,
            actions,
            elbow_penetration(q2),
            elbow_penetration(q2 + DT * velocity[..., 1:2]),
        ],
        dim=-1,
    )


def model_step(
    dynamics: ProbabilisticEnsemble, states: torch.Tensor, actions: torch.Tensor
) -> torch.Tensor:
    """Next states ``[G, 4]`` predicted from states ``[G, 4]``, actions ``[G, 2]``.

    The model predicts the velocity change; the angles follow by the
    trapezoid rule, exact for a velocity linear in time over the step. On
    random-torque data of the simulator it leaves an RMS angle error of
    3.5e-3 rad per step, against 2.5e-2 for explicit or semi-implicit Euler
    (measured on 64 rollouts of 65 steps, true velocities).
    """
    velocity = states[..., 2:]
    next_velocity = velocity + dynamics(model_features(states, actions))
    angles = states[..., :2] + (DT / 2) * (velocity + next_velocity)
    return torch.cat([angles, next_velocity], dim=-1)


def transitions(states, actions) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs ``[N, 9]`` and velocity changes ``[N, 2]`` of rollouts.

    ``states [R, H + 1, 4]`` and ``actions [R, H, 2]`` (arrays or tensors).
    """
    states = torch.as_tensor(states, dtype=torch.float32)
    actions = torch.as_tensor(actions, dtype=torch.float32)
    x = model_features(states[:, :-1], actions)
    y = states[:, 1:, 2:] - states[:, :-1, 2:]
    return x.reshape(-1, N_FEATURES), y.reshape(-1, 2)


def build_dynamics(mp, gen: torch.Generator) -> ProbabilisticEnsemble:
    """A fresh ensemble shaped by the ``meta_train`` section ``mp``."""
    return ProbabilisticEnsemble(
        N_FEATURES, 2, mp.ensemble_size, mp.model_hidden_sizes, generator=gen
    )


def save_dynamics(folder: str | Path, dynamics: ProbabilisticEnsemble) -> None:
    """Writes the model as ``dynamics.json`` (config) + ``dynamics.pt`` (tensors)."""
    folder = Path(folder)
    artifacts.save_state_dict(folder / DYNAMICS_WEIGHTS, dynamics)
    artifacts.write_json(folder / DYNAMICS_CONFIG, dynamics.config)


def load_dynamics(folder: str | Path) -> ProbabilisticEnsemble:
    """Rebuilds a model saved by :func:`save_dynamics`, frozen, in eval mode."""
    folder = Path(folder)
    for name in (DYNAMICS_WEIGHTS, DYNAMICS_CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"no {name} in {folder}: not a saved reacher dynamics model"
            )
    dynamics = ProbabilisticEnsemble(**artifacts.read_json(folder / DYNAMICS_CONFIG))
    dynamics.load_state_dict(artifacts.load_state_dict(folder / DYNAMICS_WEIGHTS))
    dynamics.requires_grad_(False)
    return dynamics.eval()


# ---------------------------------------------------------------------------
# rollouts and losses


class Sims:
    """One :class:`~pipeline.rl.envs.ReacherSim` per batch size, made on demand.

    Every rollout resets its arms, so reusing a simulator changes nothing
    but the time spent building it.
    """

    def __init__(self):
        self._sims: dict[int, envs.ReacherSim] = {}

    def __call__(self, n: int) -> envs.ReacherSim:
        if n not in self._sims:
            self._sims[n] = envs.ReacherSim(n)
        return self._sims[n]


@dataclass
class Goals:
    """``G`` goals: joint angles ``q [G, 2]`` (tensor) and fingertips ``xy``."""

    q: torch.Tensor
    xy: np.ndarray

    def __len__(self) -> int:
        return len(self.q)

    def take(self, index) -> Goals:
        """The goals at ``index`` (an integer array or tensor)."""
        index = np.asarray(index)
        return Goals(self.q[torch.as_tensor(index)], self.xy[index])

    def repeat(self, n: int) -> Goals:
        """These goals ``n`` times over, ``[n * G, ...]``."""
        return Goals(self.q.repeat(n, 1), np.tile(self.xy, (n, 1)))


def rollout_model(
    theta: Theta,
    goals_q: torch.Tensor,
    dynamics: ProbabilisticEnsemble,
    horizon: int,
    activation: nn.Module,
):
    """Rollouts of ``G`` policies through the model, from rest at q = 0.

    Returns states ``[G, horizon + 1, 4]`` (start first) and actions
    ``[G, horizon, 2]``, differentiable w.r.t. ``theta`` and the model.
    """
    state = theta[0].new_zeros(len(goals_q), envs.STATE_DIM)
    states, actions = [state], []
    pi = policy(theta, goals_q, activation)
    for _ in range(horizon):
        actions.append(pi(state))
        state = model_step(dynamics, state, actions[-1])
        states.append(state)
    return torch.stack(states, 1), torch.stack(actions, 1)


def rollout_grounded(
    theta: Theta,
    goals: Goals,
    dynamics: ProbabilisticEnsemble | None,
    horizon: int,
    activation: nn.Module,
    sim: envs.ReacherSim,
    action_noise: np.ndarray | None = None,
):
    """Real rollouts of ``G`` policies whose gradients flow through the model.

    Each next state is ``s_real + (m - m.detach())`` with ``m`` the model's
    prediction from the current state and action: its value is the
    simulator's, its derivative w.r.t. state and action is the model's.
    With ``dynamics=None`` no model is evaluated and no gradient flows
    through the transitions (measurement only).

    Args:
      action_noise: ``[G, horizon, 2]`` added to the torques sent to the
        simulator (clipped there); the returned actions are the policy's.

    Returns:
      States ``[G, horizon + 1, 4]`` and actions ``[G, horizon, 2]`` in the
      dtype of ``theta``.
    """
    dtype = theta[0].dtype
    real = sim.reset(np.zeros((len(goals), envs.STATE_DIM)), goals.xy)
    state = torch.as_tensor(real, dtype=dtype)
    states, actions = [state], []
    pi = policy(theta, goals.q.to(dtype), activation)
    for t in range(horizon):
        action = pi(state)
        sent = action.detach().numpy()
        if action_noise is not None:
            sent = sent + action_noise[:, t]
        real = torch.as_tensor(sim.step(sent), dtype=dtype)
        if dynamics is not None:
            predicted = model_step(dynamics, state, action)
            state = real + (predicted - predicted.detach())
        else:
            state = real
        states.append(state)
        actions.append(action)
    return torch.stack(states, 1), torch.stack(actions, 1)


def task_loss(
    states: torch.Tensor, goals_q: torch.Tensor, final_weight, velocity_weight
) -> torch.Tensor:
    """Task loss ``[G]`` of rollouts ``[G, H + 1, 4]``.

    ``final_weight`` x the final joint distance + the mean joint distance
    of the states after the start + ``velocity_weight`` x their mean squared
    joint speed (dq1^2 + dq2^2).
    """
    visited = states[:, 1:]
    distance = envs.joint_distance(visited, goals_q[:, None].to(states.dtype))
    speed2 = (visited[..., 2:] ** 2).sum(-1)
    return (
        final_weight * distance[:, -1]
        + distance.mean(1)
        + velocity_weight * speed2.mean(1)
    )


def loss_rows(states: torch.Tensor, actions: torch.Tensor, goals_q: torch.Tensor):
    """The learned loss's rows, ``[G * H, 4]``, ``[G * H, 2]``, ``[G * H]``.

    Each action is paired with the state it led to (so the final state,
    which the task loss weighs most, is seen) and that state's joint
    distance to the goal. No goal coordinates: the goal enters through the
    distance only, as in the paper.
    """
    reached = states[:, 1:]
    distance = envs.joint_distance(reached, goals_q[:, None].to(states.dtype))
    return (
        reached.reshape(-1, envs.STATE_DIM),
        actions.reshape(-1, envs.ACTION_DIM),
        distance.reshape(-1),
    )


def learned_objective(loss, states, actions, goals_q) -> torch.Tensor:
    """The learned loss of every rollout, ``[G]``: its mean over time steps."""
    values = loss.pointwise(*loss_rows(states, actions, goals_q))
    return values.view(len(states), -1).mean(1)


# ---------------------------------------------------------------------------
# learned loss with standardized inputs


class StandardizedLoss(nn.Module):
    """A :class:`LearnedLoss` that sees its inputs standardized.

    ``pointwise`` joins the inputs, subtracts ``mean``, divides by ``std``
    and applies the wrapped loss's network; :meth:`folded` returns a plain
    ``LearnedLoss`` on raw inputs with the same outputs.
    """

    def __init__(self, loss: LearnedLoss, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        width = loss.config["n_inputs"]
        if mean.shape != (width,) or std.shape != (width,):
            raise ValueError(
                f"standardization statistics must have shape ({width},); got "
                f"mean {tuple(mean.shape)}, std {tuple(std.shape)}"
            )
        if not loss.config["bias"] and bool((mean != 0).any()):
            raise ValueError(
                "input standardization folds its shift into the first layer's "
                "bias, but learned_loss.bias is false; set it to true or "
                "normalize_inputs to false"
            )
        if loss.config["prediction_transform"] != "identity":
            raise ValueError(
                "input standardization needs prediction_transform: identity, got "
                f"{loss.config['prediction_transform']!r}"
            )
        self.loss = loss
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    def preactivation(self, *inputs) -> torch.Tensor:
        """The network's value of every row before the output activation, ``[N]``."""
        x = self.loss.join_inputs(*inputs)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.loss.net(x).squeeze(-1)

    def pointwise(self, *inputs) -> torch.Tensor:
        """Loss value of every row, ``[N]``, of the raw inputs."""
        return self.loss.output(self.preactivation(*inputs))

    def forward(self, *inputs) -> torch.Tensor:
        """Mean loss over rows."""
        return self.pointwise(*inputs).mean()

    @torch.no_grad()
    def folded(self) -> LearnedLoss:
        """A plain ``LearnedLoss`` on raw inputs: W' = W / std, b' = b - W' mean."""
        loss = copy.deepcopy(self.loss)
        first = loss.net[0]
        weight = first.weight / self.std
        if first.bias is not None:  # without one, the mean is 0 (checked)
            first.bias.copy_(first.bias - weight @ self.mean)
        first.weight.copy_(weight)
        return loss


def input_statistics(data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ``[7]`` of the learned loss's columns on the random data.

    States and actions of the random-torque rollouts; distances of their
    states to every training goal.
    """
    states = torch.as_tensor(data["random_states"][:, 1:]).reshape(-1, 4)
    actions = torch.as_tensor(data["random_actions"]).reshape(-1, 2)
    goals = torch.as_tensor(data["train_goals_q"])
    distance = envs.joint_distance(states[:, None], goals[None]).reshape(-1)
    columns = [states, actions, distance[:, None]]
    mean = torch.cat([c.mean(0) for c in columns])
    std = torch.cat([c.std(0) for c in columns]).clamp_min(1e-6)
    return mean, std


# ---------------------------------------------------------------------------
# collapse check


def check_collapse(
    loss,
    theta: Theta,
    goals_q: torch.Tensor,
    dynamics: ProbabilisticEnsemble,
    horizon: int,
    activation: nn.Module,
    *,
    tolerance: float,
    iteration: int,
) -> dict[str, float]:
    """Raises :class:`LearnedLossCollapsed` if the loss cannot train a policy.

    Two symptoms, on model rollouts of the policies ``theta``: the outputs
    over all rows are (nearly) constant, relative spread std / mean|value|
    below ``tolerance``; or the gradient of the inner loss w.r.t. the
    policy parameters has a norm below ``tolerance``.

    Returns:
      ``loss_spread`` and ``inner_grad_norm``, as measured.
    """
    theta = detach(theta)
    with torch.enable_grad():
        states, actions = rollout_model(theta, goals_q, dynamics, horizon, activation)
        values = loss.pointwise(*loss_rows(states, actions, goals_q))
        grads = torch.autograd.grad(
            values.view(len(goals_q), -1).mean(1).sum(), theta, allow_unused=True
        )
    values = values.detach()
    spread = (values.std() / values.abs().mean().clamp_min(1e-30)).item()
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads if g is not None))
    if not (spread > tolerance and norm > tolerance):
        raise LearnedLossCollapsed(
            f"reacher learned loss collapsed at outer iteration {iteration}: on a "
            f"meta-train batch its outputs (mean {values.mean().item():.3g}) have "
            f"a relative spread of {spread:.3g} and its gradient w.r.t. the "
            f"policy parameters a norm of {norm:.3g} (tolerance {tolerance:g}), "
            "so it would not train a policy; not saving it. Try "
            "normalize_inputs: true, a lower outer_lr, a larger inner_lr or "
            "learned_loss.output_activation: none"
        )
    return {"loss_spread": spread, "inner_grad_norm": norm}


# ---------------------------------------------------------------------------
# training policies (validation, meta-test)


def train_policies(
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    theta0: Theta,
    goals: Goals,
    lrs: torch.Tensor,
    n_steps: int,
    *,
    dynamics: ProbabilisticEnsemble,
    horizon: int,
    activation: nn.Module,
    sim: envs.ReacherSim,
) -> list[torch.Tensor]:
    """``n_steps`` SGD steps of ``G`` policies on grounded rollouts.

    Args:
      objective: ``(states, actions) -> [G]``, one value per policy; the
        gradient of its sum is every policy's own gradient.
      lrs: ``[G]``, a learning rate per policy.

    Returns:
      The real states ``[G, H + 1, 4]`` of the policy after each step
      ``0..n_steps`` (step 0: before training).
    """
    theta = detach(theta0)
    real = []
    for step in range(n_steps + 1):
        with torch.enable_grad():
            states, actions = rollout_grounded(
                theta,
                goals,
                dynamics if step < n_steps else None,
                horizon,
                activation,
                sim,
            )
            real.append(states.detach())
            if step == n_steps:
                break
            grads = torch.autograd.grad(
                objective(states, actions).sum(), theta, allow_unused=True
            )
        theta = detach(
            tuple(
                t if g is None else t - lrs.view(-1, *[1] * (t.dim() - 1)) * g
                for t, g in zip(theta, grads, strict=True)
            )
        )
    return real


def final_distances(states: torch.Tensor, goals: Goals) -> dict[str, np.ndarray]:
    """Final fingertip (m) and joint distances ``[G]`` of real rollouts."""
    final = states[:, -1].double()
    tip = envs.fingertip(final[:, :2]).numpy()
    return {
        "final_distance": np.linalg.norm(tip - goals.xy, axis=-1),
        "final_joint_distance": envs.joint_distance(final, goals.q.double()).numpy(),
    }


# ---------------------------------------------------------------------------
# meta-training


@dataclass
class MetaTrainOutput:
    """What meta-training a reacher loss yields.

    Attributes:
      learned_loss: the loss on raw inputs (standardization folded in), CPU.
      dynamics: the model after its last refresh.
      result: per-iteration history and validation rows.
      model_fits: one row per model fit (``fit``, ``iteration``, ``nll``,
        ``heldout_mse`` ...).
    """

    learned_loss: LearnedLoss
    dynamics: ProbabilisticEnsemble
    result: MetaTrainResult
    model_fits: list[dict]


@dataclass
class Setting:
    """What every rollout and task loss of a run needs, bundled."""

    horizon: int
    activation: nn.Module
    final_weight: float
    velocity_weight: float
    hidden_sizes: list
    output_scale: float

    def fresh_policies(self, n: int, gen: torch.Generator) -> Theta:
        """:func:`initial_policies` of this run's architecture and scale."""
        return initial_policies(self.hidden_sizes, n, gen, self.output_scale)

    def task_loss(self, states, goals_q):
        """:func:`task_loss` with this run's weights, ``[G]``."""
        return task_loss(states, goals_q, self.final_weight, self.velocity_weight)

    @classmethod
    def of(cls, params: ExperimentParams, horizon: int) -> Setting:
        """The setting of the ``reacher`` params, for rollouts of ``horizon``."""
        return cls(
            horizon=horizon,
            activation=nets.ACTIVATIONS[params.optimizee.activation](),
            final_weight=params.prepare.final_weight,
            velocity_weight=params.prepare.velocity_weight,
            hidden_sizes=list(params.optimizee.hidden_sizes),
            output_scale=params.optimizee.output_scale,
        )


def _goals(data: dict, split: str) -> Goals:
    return Goals(
        torch.as_tensor(data[f"{split}_goals_q"], dtype=torch.float32),
        np.asarray(data[f"{split}_goals_xy"], dtype=np.float64),
    )


def _variant_settings(mp, variant: str) -> tuple[float, float, bool]:
    """``(outer_lr, inner_lr, normalize_inputs)`` of a variant."""
    if variant == "ml3":
        return mp.outer_lr, mp.inner_lr, mp.normalize_inputs
    if variant == "authors":
        return mp.authors_outer_lr, mp.authors_inner_lr, mp.authors_normalize_inputs
    raise ValueError(
        f"unknown reacher variant {variant!r}; valid: {', '.join(REACHER_VARIANTS)}"
    )


class _ModelData:
    """The model's training transitions, its held-out checks, and its fits."""

    def __init__(self, data, mp, setting: Setting, probe: Goals, seed: int, sims):
        states, actions = data["random_states"], data["random_actions"]
        n_heldout = max(1, int(round(HELDOUT_FRACTION * len(states))))
        if n_heldout >= len(states):
            raise ValueError(
                f"reacher.prepare.n_random_rollouts must be >= 2 to hold one out "
                f"for the model's checks; got {len(states)}"
            )
        self.x, self.y = transitions(states[:-n_heldout], actions[:-n_heldout])
        self.heldout_states = torch.as_tensor(states[-n_heldout:])
        self.heldout_actions = torch.as_tensor(actions[-n_heldout:])
        self.heldout = transitions(self.heldout_states, self.heldout_actions)
        self.mp, self.setting, self.sims = mp, setting, sims
        self.gen = generator(seed, "reacher/model")
        self.noise_rng = numpy_rng(seed, "reacher/refresh")
        self.model = build_dynamics(mp, self.gen)
        # fresh policies on training goals, rolled out for real once: every
        # fit is scored on the kind of rollout meta-training starts from
        self.probe = probe
        self.probe_theta = setting.fresh_policies(
            len(probe), generator(seed, "reacher/probe")
        )
        with torch.no_grad():
            self.probe_states, _ = rollout_grounded(
                self.probe_theta,
                probe,
                None,
                setting.horizon,
                setting.activation,
                sims(len(probe)),
            )
        self.fits: list[dict] = []

    def fit(self, iteration: int, epochs: int) -> None:
        history = self.model.fit(
            self.x,
            self.y,
            epochs=epochs,
            lr=self.mp.model_lr,
            batch_size=self.mp.model_batch_size,
            generator=self.gen,
        )
        self.fits.append(
            {
                "fit": len(self.fits),
                "iteration": iteration,
                "n_transitions": len(self.x),
                "nll": history[-1],
                **self.check(),
            }
        )

    @torch.no_grad()
    def check(self) -> dict[str, float]:
        """One-step and horizon errors of the model against the simulator."""
        heldout_mse = self.model.mse(*self.heldout)
        # open-loop replay of the held-out random torques
        state = self.heldout_states[:, 0]
        replayed = [state]
        for t in range(self.heldout_actions.shape[1]):
            state = model_step(self.model, state, self.heldout_actions[:, t])
            replayed.append(state)
        random_error = envs.joint_distance(
            torch.stack(replayed, 1), self.heldout_states[..., :2]
        )
        # closed loop: the fresh probe policies through the model
        predicted, _ = rollout_model(
            self.probe_theta,
            self.probe.q,
            self.model,
            self.setting.horizon,
            self.setting.activation,
        )
        policy_error = envs.joint_distance(predicted, self.probe_states[..., :2])
        return {
            "heldout_mse": heldout_mse,
            "random_rollout_error": random_error.mean().item(),
            "random_final_error": random_error[:, -1].mean().item(),
            "policy_rollout_error": policy_error.mean().item(),
            "policy_final_error": policy_error[:, -1].mean().item(),
        }

    def refresh(self, iteration: int, theta: Theta, goals: Goals) -> None:
        """Adds real rollouts of the policies ``theta`` and refits."""
        shape = (len(goals), self.setting.horizon, envs.ACTION_DIM)
        noise = REFRESH_ACTION_NOISE * self.noise_rng.standard_normal(shape)
        with torch.no_grad():
            states, actions = rollout_grounded(
                theta,
                goals,
                None,
                self.setting.horizon,
                self.setting.activation,
                self.sims(len(goals)),
                action_noise=noise,
            )
        # the model must learn the torques that were applied, noise included
        applied = np.clip(actions.numpy() + noise, -1.0, 1.0)
        x, y = transitions(states, applied)
        self.x, self.y = torch.cat([self.x, x]), torch.cat([self.y, y])
        self.fit(iteration, self.mp.refresh_epochs)


def meta_train(
    params: ExperimentParams,
    data: dict,
    seed: int,
    variant: str,
    progress: bool = False,
) -> MetaTrainOutput:
    """Meta-trains one reacher learned loss (see the module docstring).

    Runs on one torch thread (see :func:`pipeline.rl.envs.one_thread`).

    Args:
      params: the ``reacher`` experiment's params.
      data: the seed's arrays from :func:`prepare`.
      variant: ``ml3`` (``outer_lr``, ``inner_lr``, ``normalize_inputs``)
        or ``authors`` (their ``authors_*`` counterparts).

    Raises:
      LearnedLossCollapsed: if, at a validation or at the end, the loss is
        constant in its inputs or gives no gradient to the policy. It
        carries the rows so far as ``result``.
      FloatingPointError: if a task loss or a meta-gradient is not finite.
    """
    with envs.one_thread():
        return _meta_train(params, data, seed, variant, progress)


def _meta_train(params, data, seed, variant, progress) -> MetaTrainOutput:
    mp = params.meta_train
    outer_lr, inner_lr, normalize = _variant_settings(mp, variant)
    setting = Setting.of(params, int(data["horizon"]))
    sims = Sims()
    train_goals = _goals(data, "train")
    gen = generator(seed, "reacher/meta_train")

    # the dynamics model on the random-torque data
    probe = train_goals.take(np.arange(N_PROBE_POLICIES) % len(train_goals))
    model_data = _ModelData(data, mp, setting, probe, seed, sims)
    model_data.fit(0, mp.model_epochs)
    dynamics = model_data.model

    # the learned loss: its own stream, so that its init is the same whatever
    # else a seed draws
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "reacher/learned_loss"))
        inner = nets.learned_loss_for(params.learned_loss, N_INPUTS)
    if normalize:
        mean, std = input_statistics(data)
    else:
        mean, std = torch.zeros(N_INPUTS), torch.ones(N_INPUTS)
    loss = StandardizedLoss(inner, mean, std)
    optimizer = torch.optim.Adam(loss.parameters(), lr=outer_lr)

    val_theta = setting.fresh_policies(
        len(train_goals), generator(seed, "reacher/validate")
    )

    def validate(iteration, theta, goals) -> dict:
        checked = check_collapse(
            loss,
            theta,
            goals.q,
            dynamics,
            setting.horizon,
            setting.activation,
            tolerance=mp.collapse_tolerance,
            iteration=iteration,
        )
        real = train_policies(
            lambda s, a: learned_objective(loss, s, a, train_goals.q),
            val_theta,
            train_goals,
            torch.full((len(train_goals),), inner_lr),
            mp.unrolls_per_task,
            dynamics=dynamics,
            horizon=setting.horizon,
            activation=setting.activation,
            sim=sims(len(train_goals)),
        )[-1]
        distances = final_distances(real, train_goals)
        return {
            "iteration": iteration,
            "val_final_distance": float(distances["final_distance"].mean()),
            "val_final_joint_distance": float(distances["final_joint_distance"].mean()),
            "val_task_loss": setting.task_loss(real, train_goals.q).mean().item(),
            "val_loss_spread": checked["loss_spread"],
            "val_inner_grad_norm": checked["inner_grad_norm"],
        }

    history, validation = [], []
    n_tasks = mp.tasks_per_iteration
    bar = tqdm(
        range(1, mp.n_outer_iterations + 1),
        desc=f"meta-train reacher ({variant})",
        disable=not progress,
        leave=False,
    )
    try:
        # a first check on a batch like the ones meta-training will see
        check_gen = generator(seed, "reacher/check")
        first = _draw_goals(train_goals, n_tasks, check_gen)
        first_theta = setting.fresh_policies(n_tasks, check_gen)
        validation.append(validate(0, first_theta, first))
        for iteration in bar:
            goals = _draw_goals(train_goals, n_tasks, gen)
            theta = detach(setting.fresh_policies(n_tasks, gen))
            rows = []
            for _ in range(mp.unrolls_per_task):
                start = theta
                row, theta = _unroll(
                    loss, optimizer, theta, goals, dynamics, setting, inner_lr
                )
                rows.append(row)
                if not all(math.isfinite(v) for v in row.values()):
                    raise FloatingPointError(
                        f"reacher meta-training diverged at outer iteration "
                        f"{iteration}: task loss {row['task_loss']}, meta-gradient "
                        f"norm {row['meta_grad_norm']}; lower outer_lr or inner_lr"
                    )
            history.append(
                {
                    "iteration": iteration,
                    **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]},
                }
            )
            if progress:
                bar.set_postfix(task_loss=f"{history[-1]['task_loss']:.3f}")
            if mp.refresh_every and iteration % mp.refresh_every == 0:
                model_data.refresh(
                    iteration,
                    *_refresh_policies(
                        loss, train_goals, mp, setting, gen, dynamics, inner_lr
                    ),
                )
            if iteration % mp.validate_every == 0 or iteration == mp.n_outer_iterations:
                validation.append(validate(iteration, start, goals))
    except LearnedLossCollapsed as err:
        err.result = MetaTrainResult(history=history, validation=validation)
        raise
    return MetaTrainOutput(
        learned_loss=loss.folded(),
        dynamics=dynamics,
        result=MetaTrainResult(history=history, validation=validation),
        model_fits=model_data.fits,
    )


def _draw_goals(goals: Goals, n: int, gen: torch.Generator) -> Goals:
    """``n`` of ``goals``, distinct while there are enough of them."""
    if n <= len(goals):
        index = torch.randperm(len(goals), generator=gen)[:n]
    else:
        index = torch.randint(0, len(goals), (n,), generator=gen)
    return goals.take(index.numpy())


def unrolled_task_loss(
    loss, theta: Theta, goals_q: torch.Tensor, dynamics, setting: Setting, inner_lr
):
    """Task loss ``[G]`` of the policies after one inner step on ``loss``.

    The inner step ``theta' = theta - inner_lr grad_theta loss`` is taken on
    model rollouts with the graph kept, so the result is a function of the
    learned loss's parameters (second order). Also returns ``theta'`` and
    the task loss ``[G]`` before the step, the inner gradient's norm and the
    mean learned-loss value.
    """
    horizon, activation = setting.horizon, setting.activation
    states, actions = rollout_model(theta, goals_q, dynamics, horizon, activation)
    inner = learned_objective(loss, states, actions, goals_q)
    grads = torch.autograd.grad(inner.sum(), theta, create_graph=True)
    new = tuple(t - inner_lr * g for t, g in zip(theta, grads, strict=True))
    after, _ = rollout_model(new, goals_q, dynamics, horizon, activation)
    extras = {
        "rows": tuple(r.detach() for r in loss_rows(states, actions, goals_q)),
        "task_loss_before": setting.task_loss(states, goals_q).detach(),
        "inner_grad_norm": math.sqrt(
            sum(float((g.detach() ** 2).sum()) for g in grads)
        ),
        "learned_loss_mean": inner.mean().item(),
    }
    return setting.task_loss(after, goals_q), new, extras


def _unroll(loss, optimizer, theta, goals, dynamics, setting: Setting, inner_lr):
    """One unroll: the task loss after an inner step, then Adam on phi.

    Returns the row of numbers to record and the (detached) new policies.
    """
    task, new, extras = unrolled_task_loss(
        loss, theta, goals.q, dynamics, setting, inner_lr
    )
    task = task.mean()
    optimizer.zero_grad(set_to_none=True)
    # only phi's gradient: the model's and the policies' would be wasted work
    task.backward(inputs=list(loss.parameters()))
    meta_grad = math.sqrt(
        sum(float((p.grad**2).sum()) for p in loss.parameters() if p.grad is not None)
    )
    optimizer.step()
    with torch.no_grad():
        # a Softplus output's slope is sigmoid(z): below z = -20 it is < 2e-9
        z = loss.preactivation(*extras["rows"])
    row = {
        "task_loss": task.item(),
        "task_loss_before": extras["task_loss_before"].mean().item(),
        "meta_grad_norm": meta_grad,
        "inner_grad_norm": extras["inner_grad_norm"],
        "learned_loss_mean": extras["learned_loss_mean"],
        "preactivation_mean": z.mean().item(),
        "preactivation_max": z.max().item(),
        "saturated_fraction": (z < -20).double().mean().item(),
    }
    return row, detach(new)


def _refresh_policies(loss, train_goals, mp, setting: Setting, gen, dynamics, lr):
    """Policies like the ones meta-training scores, and their goals.

    ``refresh_rollouts`` fresh policies on training goals after
    ``unrolls_per_task`` SGD steps on the learned loss through the model.
    """
    goals = train_goals.take(
        torch.randint(
            0, len(train_goals), (mp.refresh_rollouts,), generator=gen
        ).numpy()
    )
    theta = detach(setting.fresh_policies(len(goals), gen))
    for _ in range(mp.unrolls_per_task):
        with torch.enable_grad():
            states, actions = rollout_model(
                theta, goals.q, dynamics, setting.horizon, setting.activation
            )
            grads = torch.autograd.grad(
                learned_objective(loss, states, actions, goals.q).sum(), theta
            )
        theta = detach(tuple(t - lr * g for t, g in zip(theta, grads, strict=True)))
    return tuple(t.detach() for t in theta), goals


# ---------------------------------------------------------------------------
# meta-test


def evaluate(
    params: ExperimentParams,
    data: dict,
    learned_loss: LearnedLoss,
    dynamics: ProbabilisticEnsemble,
    seed: int,
) -> dict[str, pd.DataFrame]:
    """Fresh policies on held-out goals, trained on the learned loss or directly.

    Every test goal gets one fresh policy (the same for both methods), then
    ``n_steps`` SGD steps on grounded rollouts: on the learned loss at
    ``evaluate.lr`` (``learned``), or on the task loss (``direct``) at the
    rate of ``evaluate.direct_lrs`` with the lowest mean final fingertip
    distance on the training goals after ``n_steps`` (chosen here, from
    other fresh policies). Runs on one torch thread
    (see :func:`pipeline.rl.envs.one_thread`).

    Returns:
      ``outcomes``: one row per method, goal and meta-test step (final
      fingertip distance in m, final joint distance, real task loss,
      success); ``trajectories``: the real rollouts at ``report_steps``, one
      row per time step; ``direct_lr``: the learning-rate selection.
    """
    with envs.one_thread():
        return _evaluate(params, data, learned_loss, dynamics, seed)


def _evaluate(params, data, learned_loss, dynamics, seed) -> dict[str, pd.DataFrame]:
    ep = params.evaluate
    setting = Setting.of(params, int(data["horizon"]))
    sims = Sims()
    train_goals, test_goals = _goals(data, "train"), _goals(data, "test")
    common = {
        "dynamics": dynamics,
        "horizon": setting.horizon,
        "activation": setting.activation,
    }

    def direct(goals):
        return lambda s, a: setting.task_loss(s, goals.q)

    # the direct baseline's learning rate, chosen on the training goals
    n_lrs, n_train = len(ep.direct_lrs), len(train_goals)
    theta = setting.fresh_policies(n_train, generator(seed, "reacher/evaluate/select"))
    many = train_goals.repeat(n_lrs)
    real = train_policies(
        direct(many),
        tuple(t.repeat(n_lrs, *[1] * (t.dim() - 1)) for t in theta),
        many,
        torch.tensor(ep.direct_lrs, dtype=torch.float32).repeat_interleave(n_train),
        ep.n_steps,
        sim=sims(len(many)),
        **common,
    )[-1]
    scores = final_distances(real, many)["final_distance"].reshape(n_lrs, n_train)
    scores = scores.mean(1)
    best = int(np.argmin(scores))
    direct_lr = pd.DataFrame(
        {
            "lr": ep.direct_lrs,
            "train_final_distance": scores,
            "selected": np.arange(n_lrs) == best,
        }
    )

    # both methods at once: learned on the first half, direct on the second
    n_test = len(test_goals)
    theta = setting.fresh_policies(n_test, generator(seed, "reacher/evaluate"))
    both = test_goals.repeat(2)

    def objective(states, actions):
        learned = learned_objective(
            learned_loss, states[:n_test], actions[:n_test], test_goals.q
        )
        return torch.cat([learned, setting.task_loss(states[n_test:], test_goals.q)])

    lrs = torch.tensor([ep.lr] * n_test + [ep.direct_lrs[best]] * n_test)
    real = train_policies(
        objective,
        tuple(torch.cat([t, t]) for t in theta),
        both,
        lrs,
        ep.n_steps,
        sim=sims(len(both)),
        **common,
    )
    outcomes, trajectories = [], []
    report_steps = set(ep.report_steps)
    for test_step, states in enumerate(real):
        keys = pd.DataFrame(
            {
                "seed": seed,
                "method": ["learned"] * n_test + ["direct"] * n_test,
                "goal": np.tile(np.arange(n_test), 2),
                "goal_x": both.xy[:, 0],
                "goal_y": both.xy[:, 1],
                "test_step": test_step,
                **final_distances(states, both),
                "task_loss": setting.task_loss(states, both.q).numpy(),
            }
        )
        keys["success"] = keys.final_distance < ep.success_radius
        outcomes.append(keys)
        if test_step in report_steps:
            trajectories.append(_trajectory_rows(keys, states))
    return {
        "outcomes": pd.concat(outcomes, ignore_index=True),
        "trajectories": pd.concat(trajectories, ignore_index=True),
        "direct_lr": direct_lr,
    }


def _trajectory_rows(keys: pd.DataFrame, states: torch.Tensor) -> pd.DataFrame:
    """One row per rollout and time step: ``keys`` repeated, state, fingertip."""
    n, steps = states.shape[:2]
    flat = states.reshape(-1, 4).double()
    tip = envs.fingertip(flat[:, :2]).numpy()
    rows = keys.loc[np.repeat(np.arange(n), steps)].reset_index(drop=True)
    rows["t"] = np.tile(np.arange(steps), n)
    for i, name in enumerate(("q1", "q2", "dq1", "dq2")):
        rows[name] = flat[:, i].numpy()
    rows["x"], rows["y"] = tip[:, 0], tip[:, 1]
    return rows


def summary(outcomes: pd.DataFrame, report_steps, confidence: float = 0.95) -> dict:
    """Final distance and success per method and report step, and the difference.

    Args:
      outcomes: the ``outcomes`` table of :func:`evaluate` (one or more seeds).
      report_steps: meta-test steps to summarize.

    Returns:
      ``{method: {"step_<k>": {final_distance_mean, final_distance_low,
      final_distance_high, success_rate}}, "learned_minus_direct":
      {"step_<k>": paired statistics over (seed, goal) pairs}}``; intervals
      are Student-t over goals x seeds.
    """
    missing = set(report_steps) - set(outcomes.test_step)
    if missing:
        raise ValueError(
            f"report steps {sorted(missing)} are not in the outcomes, which have "
            f"test steps {sorted(set(outcomes.test_step))}"
        )
    out: dict = {}
    for method in sorted(set(outcomes.method)):
        rows = outcomes[outcomes.method == method]
        for step in report_steps:
            at = rows[rows.test_step == step]
            mean, low, high = stats.mean_ci(at.final_distance, confidence)
            out.setdefault(method, {})[f"step_{step}"] = {
                "final_distance_mean": float(mean),
                "final_distance_low": float(low),
                "final_distance_high": float(high),
                "success_rate": float(at.success.mean()),
            }
    if {"learned", "direct"} <= set(outcomes.method):
        table = outcomes.pivot_table(
            index=["seed", "goal", "test_step"],
            columns="method",
            values="final_distance",
        )
        for step in report_steps:
            at = table.xs(step, level="test_step")
            out.setdefault("learned_minus_direct", {})[f"step_{step}"] = (
                stats.paired_summary(
                    at["learned"],
                    at["direct"],
                    lower_is_better=True,
                    confidence=confidence,
                )
            )
    return out


def animate(trajectories: pd.DataFrame, path, fps: int, title: str) -> None:
    """A GIF of the arms of ``trajectories``, one panel per method.

    Every (seed, goal, test step) rollout of a method is drawn in its panel,
    in its own colour, with its goal as a cross; filter the table to the
    rollouts to show first.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    if trajectories.empty:
        raise ValueError("animate: no trajectories to draw (the table is empty)")
    methods = list(dict.fromkeys(trajectories.method))
    fig, axes = plt.subplots(
        1, len(methods), figsize=(4 * len(methods), 4.2), squeeze=False
    )
    reach = envs.REACH * 1.1
    colours = plt.get_cmap("tab20").colors
    arms, clocks, paths = [], [], []
    for ax, method in zip(axes[0], methods, strict=True):
        ax.set_title(method)
        ax.set_xlim(-reach, reach)
        ax.set_ylim(-reach, reach)
        ax.set_aspect("equal")
        ax.add_patch(plt.Circle((0, 0), envs.REACH, fill=False, color="0.8"))
        rows = trajectories[trajectories.method == method]
        groups = rows.sort_values("t").groupby(["seed", "goal", "test_step"])
        for i, (_, rollout) in enumerate(groups):
            colour = colours[i % len(colours)]
            ax.plot(rollout.goal_x.iloc[0], rollout.goal_y.iloc[0], "x", color=colour)
            (arm,) = ax.plot([], [], "o-", color=colour, lw=2, markersize=3)
            arms.append(arm)
            paths.append(rollout[["q1", "q2"]].to_numpy())
        clocks.append(ax.text(0.03, 0.94, "", transform=ax.transAxes))
    fig.suptitle(title)
    fig.tight_layout()
    n_frames = max(len(p) for p in paths)
    l1, l2 = envs.LINK_LENGTHS

    def draw(frame):
        for arm, q in zip(arms, paths, strict=True):
            q1, q2 = q[min(frame, len(q) - 1)]
            elbow = (l1 * np.cos(q1), l1 * np.sin(q1))
            tip = envs.fingertip(np.array([q1, q2]))
            arm.set_data([0, elbow[0], tip[0]], [0, elbow[1], tip[1]])
        for clock in clocks:
            clock.set_text(f"t = {frame * DT:.2f} s")
        return arms + clocks

    anim = FuncAnimation(fig, draw, frames=n_frames, blit=False)
    anim.save(str(path), writer=PillowWriter(fps=fps))
    plt.close(fig)
