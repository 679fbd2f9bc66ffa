"""Mountain car with an intermediate goal: extra information for exploration.

A differentiable mountain car written in torch, so that the task loss of a
rollout has a gradient with respect to the policy, and through the inner
SGD step with respect to the learned loss. The car cannot drive straight up
the right hill: it must first swing up the left one. The learned loss sees
(state, action, distance of the state to the goal) at every time step.
Meta-training scores its step by the distance of the rollout's states to the
goal (*unshaped*), or (*shaped*) of the first states to a point up the left
hill and of the rest to the goal. At meta-test only the goal is known.

Policies are batched: parameters ``w1 [R, H, 2]`` and ``w2 [R, 1, H]`` are R
linear policies ``a = w2 w1 s`` (no bias, no activation), rolled out from
start states ``[R, 2]``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from pipeline import shaping
from pipeline.config import VARIANTS, ExperimentParams
from pipeline.meta import MetaTrainResult
from pipeline.nets import LearnedLoss
from pipeline.runtime import generator

# the equations of the paper's environment
GRAVITY = 9.8
GRAVITY_SCALE = 0.2
POWER_SCALE = 0.2
FRICTION = 0.3
DT = 0.1
MAX_SPEED = 1.5
MIN_POSITION, MAX_POSITION = -1.2, 0.5
MAX_ACTION = 0.25
N_INPUTS = 4  # position, velocity, action, distance to the goal


def step(state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """One time step: ``[R, 2]`` states (position, velocity), ``[R]`` actions."""
    position, velocity = state[..., 0], state[..., 1]
    action = action.clamp(-MAX_ACTION, MAX_ACTION)
    acceleration = (
        -GRAVITY * GRAVITY_SCALE * torch.cos(3 * position)
        + action / POWER_SCALE
        - FRICTION * velocity
    )
    velocity = (velocity + acceleration * DT).clamp(-MAX_SPEED, MAX_SPEED)
    position = (position + DT * velocity).clamp(MIN_POSITION, MAX_POSITION)
    # an inelastic left wall: the car stops there
    velocity = torch.where(
        (position <= MIN_POSITION) & (velocity < 0),
        torch.zeros_like(velocity),
        velocity,
    )
    return torch.stack([position, velocity], dim=-1)


def hill_height(position):
    """Height of the track (for drawing): its slope gives the gravity term."""
    return np.sin(3 * np.asarray(position)) / 3


def initial_policy(n_hidden: int, gen: torch.Generator, n: int = 1) -> shaping.Theta:
    """``n`` policies drawn like torch's default ``nn.Linear`` initialization."""

    def uniform(shape, fan_in):
        bound = 1 / math.sqrt(fan_in)
        return (2 * torch.rand(shape, generator=gen) - 1) * bound

    return uniform((n, n_hidden, 2), 2), uniform((n, 1, n_hidden), n_hidden)


def seed_policy(params: ExperimentParams, seed: int) -> shaping.Theta:
    """The initial policy of ``seed``: meta-training and meta-test start here."""
    gen = generator(seed, "mountain_car/policy")
    return initial_policy(params.optimizee.hidden_size, gen)


def act(theta: shaping.Theta, state: torch.Tensor) -> torch.Tensor:
    """Actions ``[R]`` of the linear policies ``theta`` in states ``[R, 2]``."""
    w1, w2 = theta
    hidden = torch.einsum("rhi,ri->rh", w1, state)
    return torch.einsum("roh,rh->ro", w2, hidden).squeeze(-1)


def rollout(theta: shaping.Theta, start: torch.Tensor, horizon: int):
    """States ``[R, horizon + 1, 2]`` (start first) and actions ``[R, horizon]``."""
    states, actions = [start], []
    for _ in range(horizon):
        actions.append(act(theta, states[-1]))
        states.append(step(states[-1], actions[-1]))
    return torch.stack(states, dim=1), torch.stack(actions, dim=1)


def loss_inputs(states: torch.Tensor, actions: torch.Tensor, goal: torch.Tensor):
    """The columns the learned loss sees at each time step, ``[R * T, d]``.

    State and action at step t and the distance of that state to the goal.
    The same for both variants and at meta-test: the intermediate goal never
    appears here.
    """
    visited = states[:, :-1]
    distance = (visited - goal).norm(dim=-1)
    return (
        visited.reshape(-1, 2),
        actions.reshape(-1, 1),
        distance.reshape(-1, 1),
    )


def task_loss(variant: str, states: torch.Tensor, task: dict) -> torch.Tensor:
    """Mean distance of the visited states (after the start) to their targets.

    ``shaped``: the first ``n_intermediate_steps`` states are scored against
    the intermediate goal, the rest against the goal; ``unshaped``: all
    against the goal.
    """
    visited = states[:, 1:]
    to_goal = (visited - task["goal"]).norm(dim=-1)
    if variant == "unshaped":
        return to_goal.mean()
    if variant == "shaped":
        n = task["n_intermediate_steps"]
        to_mid = (visited[:, :n] - task["intermediate_goal"]).norm(dim=-1)
        return torch.cat([to_mid, to_goal[:, n:]], dim=1).mean()
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


def prepare(params: ExperimentParams) -> dict:
    """The task as arrays: start states, goals and the horizon."""
    p = params.prepare
    starts = [p.start_state] + [[x, 0.0] for x in p.test_start_positions]
    return {
        "start_states": np.asarray(starts, dtype=np.float32),
        "goal": np.asarray(p.goal, dtype=np.float32),
        "intermediate_goal": np.asarray(p.intermediate_goal, dtype=np.float32),
        "horizon": np.asarray(p.horizon),
        "n_intermediate_steps": np.asarray(p.n_intermediate_steps),
    }


def task_from(data: dict) -> dict:
    """Prepared arrays as tensors; ``start`` is the meta-train start state."""
    return {
        "start": torch.as_tensor(data["start_states"][:1]),
        "starts": torch.as_tensor(data["start_states"]),
        "goal": torch.as_tensor(data["goal"]),
        "intermediate_goal": torch.as_tensor(data["intermediate_goal"]),
        "horizon": int(data["horizon"]),
        "n_intermediate_steps": int(data["n_intermediate_steps"]),
    }


def learned_objective(loss, theta, task, start=None) -> torch.Tensor:
    """The inner loss: the learned loss summed over the batched policies."""
    start = task["start"] if start is None else start
    states, actions = rollout(theta, start, task["horizon"])
    values = loss.pointwise(*loss_inputs(states, actions, task["goal"]))
    return values.reshape(states.shape[0], -1).mean(dim=1).sum()


def distance_objective(theta, task, start=None) -> torch.Tensor:
    """Direct baseline: mean distance to the goal, summed over policies."""
    start = task["start"] if start is None else start
    states, _ = rollout(theta, start, task["horizon"])
    return (states[:, 1:] - task["goal"]).norm(dim=-1).mean(dim=1).sum()


def meta_train(
    learned_loss: LearnedLoss,
    params: ExperimentParams,
    data: dict,
    variant: str,
    theta0: shaping.Theta,
    progress: bool = False,
) -> MetaTrainResult:
    """Meta-trains ``learned_loss`` from the fixed initial policy ``theta0``."""
    mp = params.meta_train
    task = task_from(data)

    def objective(theta, t):
        return task_loss(variant, rollout(theta, t["start"], t["horizon"])[0], t)

    def validate(loss):
        iterates = shaping.train(
            lambda th, t: learned_objective(loss, th, t),
            theta0,
            task,
            lr=mp.inner_lr,
            n_steps=mp.unrolls_per_task,
        )
        states, _ = rollout(iterates[-1], task["start"], task["horizon"])
        return {
            "val_final_position": states[0, -1, 0].item(),
            "val_max_position": states[0, :, 0].max().item(),
            "val_distance_to_goal": task_loss("unshaped", states, task).item(),
        }

    result = shaping.meta_train(
        learned_loss,
        sample_task=lambda gen: task,
        initial_theta=lambda t: theta0,
        inner_loss=learned_objective,
        task_loss=objective,
        schedule=mp,
        generator=torch.Generator(),
        validate=validate,
        progress=progress,
    )
    shaping.check_gradient(learned_loss, learned_objective, theta0, task)
    return result


def evaluate(
    params: ExperimentParams,
    data: dict,
    losses: dict,
    theta0: shaping.Theta,
    seed: int,
) -> pd.DataFrame:
    """Trajectories after 0..n_steps meta-test SGD steps from every start state.

    Args:
      losses: method name -> ``(theta, task, start) -> scalar`` objective.
      theta0: the seed's initial policy (the one meta-training started from).

    Returns:
      One row per method, start state, meta-test step and time step with the
      position, the velocity and the policy's action (before clipping).
    """
    ep = params.evaluate
    task = task_from(data)
    frames = []
    # one start at a time: the rollout from the meta-train start is then the
    # very computation of meta-training's validation (batched sums round
    # differently, and the dynamics amplify it near the hill top)
    for start in task["starts"]:
        start = start[None]
        for method, objective in losses.items():
            iterates = shaping.train(
                lambda th, t, fn=objective, s=start: fn(th, t, s),
                theta0,
                task,
                lr=ep.lr,
                n_steps=ep.n_steps,
            )
            for test_step, policy in enumerate(iterates):
                with torch.no_grad():
                    states, actions = rollout(policy, start, task["horizon"])
                # the action taken in each state; none in the last one
                action = np.append(actions[0].numpy(), np.nan)
                frames.append(
                    pd.DataFrame(
                        {
                            "method": method,
                            # float32, as prepared (written as -0.55, not
                            # -0.550000011920929)
                            "start_position": start[0, 0].numpy(),
                            "test_step": test_step,
                            "t": np.arange(states.shape[1]),
                            "position": states[0, :, 0].numpy(),
                            "velocity": states[0, :, 1].numpy(),
                            "action": action,
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True).assign(seed=seed)


def outcomes(trajectories: pd.DataFrame, success_position: float) -> pd.DataFrame:
    """Final and extreme positions, success and clipping of every rollout.

    ``clipped_fraction``: the share of time steps whose action was beyond the
    limit and clipped; there the rollout has no gradient w.r.t. the policy.
    """
    keys = ["seed", "method", "start_position", "test_step"]
    grouped = trajectories.sort_values("t").groupby(keys)
    out = grouped.agg(
        final_position=("position", "last"),
        final_velocity=("velocity", "last"),
        max_position=("position", "max"),
        min_position=("position", "min"),
        clipped_fraction=(
            "action",
            lambda a: float((a.dropna().abs() >= MAX_ACTION).mean()),
        ),
    ).reset_index()
    out["success"] = out.max_position >= success_position - 1e-6
    return out


def summary(outcomes: pd.DataFrame, train_start: float) -> dict:
    """Success rate and final position per method and meta-test step.

    ``from_train_start`` is the start state of meta-training; ``other_starts``
    pools the other start states.
    """
    out: dict = {}
    at_start = np.isclose(outcomes.start_position, train_start)
    for where, rows in (
        ("from_train_start", outcomes[at_start]),
        ("other_starts", outcomes[~at_start]),
    ):
        if rows.empty:
            continue
        for (method, step), group in rows.groupby(["method", "test_step"]):
            entry = out.setdefault(method, {})
            entry[f"{where}_success_step_{step}"] = float(group.success.mean())
            entry[f"{where}_final_position_step_{step}"] = float(
                group.final_position.mean()
            )
    return out


def animate(trajectories: pd.DataFrame, path, fps: int, title: str) -> None:
    """A GIF of the cars of ``trajectories`` (one row of panels per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    methods = list(dict.fromkeys(trajectories.method))
    track = np.linspace(MIN_POSITION, MAX_POSITION, 200)
    fig, axes = plt.subplots(
        1, len(methods), figsize=(4 * len(methods), 3), squeeze=False
    )
    cars, trails, clocks, paths = [], [], [], []
    for ax, method in zip(axes[0], methods, strict=True):
        ax.plot(track, hill_height(track), color="0.4")
        ax.axvline(MAX_POSITION, color="green", linestyle=":")
        ax.set_title(method)
        ax.set_xlim(MIN_POSITION - 0.05, MAX_POSITION + 0.05)
        ax.set_ylim(-0.45, 0.45)
        ax.set_xlabel("position")
        (car,) = ax.plot([], [], "o", color="tab:red", markersize=10)
        (trail,) = ax.plot([], [], "-", color="tab:red", alpha=0.3)
        clock = ax.text(0.03, 0.92, "", transform=ax.transAxes)
        cars.append(car)
        trails.append(trail)
        clocks.append(clock)
        paths.append(trajectories[trajectories.method == method].sort_values("t"))
    fig.suptitle(title)
    fig.tight_layout()
    n_frames = max(len(p) for p in paths)

    def draw(frame):
        for car, trail, clock, p in zip(cars, trails, clocks, paths, strict=True):
            pos = p.position.to_numpy()[: frame + 1]
            car.set_data([pos[-1]], [hill_height(pos[-1])])
            trail.set_data(pos, hill_height(pos))
            clock.set_text(f"t = {len(pos) - 1}, p = {pos[-1]:.2f}")
        return cars + trails + clocks

    anim = FuncAnimation(fig, draw, frames=n_frames, blit=False)
    anim.save(str(path), writer=PillowWriter(fps=fps))
    plt.close(fig)
