"""Environments of the reinforcement-learning experiments.

``ReacherSim`` drives N copies of gymnasium's MuJoCo ``Reacher-v5`` arm at
the level of joint state and torques: a state is (q1, q2, dq1, dq2), an
action the two joint torques in [-1, 1] (the model's control range), and
one step is the environment's ``frame_skip`` MuJoCo steps (0.02 s). The
target of the XML is moved to the goal, so that rendered frames show it;
it is a passive body and does not touch the arm.

``PointMass`` is a point in the plane moved by clipped velocity commands,
the 2D navigation task of the meta-RL literature, in torch and batched.

Both are deterministic: the same start states and actions give the same
states (tested), so every rollout of the pipeline is reproducible.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

# link lengths of the Reacher-v5 XML: body1 sits at 0.1 on body0, the
# fingertip at 0.11 on body1
LINK_LENGTHS = (0.1, 0.11)
REACH = sum(LINK_LENGTHS)
STATE_DIM = 4  # q1, q2, dq1, dq2
ACTION_DIM = 2
ELBOW_LIMIT = 3.0  # |q2| <= 3 rad in the XML


def fingertip(q: torch.Tensor | np.ndarray):
    """Fingertip position ``[..., 2]`` of joint angles ``[..., 2]``."""
    lib = torch if isinstance(q, torch.Tensor) else np
    q1, q2 = q[..., 0], q[..., 1]
    l1, l2 = LINK_LENGTHS
    x = l1 * lib.cos(q1) + l2 * lib.cos(q1 + q2)
    y = l1 * lib.sin(q1) + l2 * lib.sin(q1 + q2)
    return lib.stack([x, y], -1) if lib is torch else np.stack([x, y], -1)


def inverse_kinematics(xy: np.ndarray) -> np.ndarray:
    """Joint angles ``[N, 2]`` that put the fingertip at ``xy`` ``[N, 2]``.

    The elbow-down solution (q2 >= 0) of the two-link arm; raises if a
    point is out of reach.
    """
    xy = np.asarray(xy, dtype=np.float64)
    l1, l2 = LINK_LENGTHS
    r2 = (xy**2).sum(-1)
    cos_q2 = (r2 - l1**2 - l2**2) / (2 * l1 * l2)
    if np.any(np.abs(cos_q2) > 1 + 1e-9):
        raise ValueError(
            f"goal out of reach: distances {np.sqrt(r2).round(4).tolist()} from "
            f"the base, the arm reaches {LINK_LENGTHS[1] - LINK_LENGTHS[0]:.2f} to "
            f"{REACH:.2f} m"
        )
    q2 = np.arccos(np.clip(cos_q2, -1.0, 1.0))
    q1 = np.arctan2(xy[..., 1], xy[..., 0]) - np.arctan2(
        l2 * np.sin(q2), l1 + l2 * np.cos(q2)
    )
    q1 = (q1 + np.pi) % (2 * np.pi) - np.pi
    return np.stack([q1, q2], -1)


def wrap_angle(a):
    """Angles mapped to [-pi, pi) (differentiable almost everywhere for tensors)."""
    if isinstance(a, torch.Tensor):
        return torch.atan2(torch.sin(a), torch.cos(a))
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def joint_distance(state: torch.Tensor, goal_q: torch.Tensor) -> torch.Tensor:
    """Distance in joint space ``[...]``: q1 is a free hinge, so it wraps."""
    d1 = wrap_angle(state[..., 0] - goal_q[..., 0])
    d2 = state[..., 1] - goal_q[..., 1]
    return torch.sqrt(d1**2 + d2**2 + 1e-12)


def goals_on_workspace(n: int, radius_range, rng: np.random.Generator) -> np.ndarray:
    """``n`` fingertip goals ``[n, 2]``, uniform in area over an annulus."""
    low, high = radius_range
    radius = np.sqrt(rng.uniform(low**2, high**2, n))
    angle = rng.uniform(-np.pi, np.pi, n)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], -1)


def spread_goals(n: int, radius_range, offset: float = 0.0) -> np.ndarray:
    """``n`` goals spread over the annulus: a spiral of angles and radii.

    Deterministic (no draws): the held-out goals cover every direction and
    distance, ``offset`` (radians) turns the spiral.
    """
    low, high = radius_range
    golden = math.pi * (3 - math.sqrt(5))
    k = np.arange(n)
    radius = np.sqrt(low**2 + (high**2 - low**2) * (k + 0.5) / n)
    angle = wrap_angle(offset + golden * k)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], -1)


class ReacherSim:
    """``n`` MuJoCo reacher arms stepped together (see the module docstring).

    Args:
      n: how many arms (independent ``MjData`` of one model).
    """

    def __init__(self, n: int):
        import gymnasium
        import mujoco

        self._mujoco = mujoco
        env = gymnasium.make("Reacher-v5")
        self.env = env.unwrapped
        self.model = self.env.model
        self.frame_skip = int(self.env.frame_skip)
        self.dt = float(self.model.opt.timestep) * self.frame_skip
        self.ctrl_range = np.asarray(self.model.actuator_ctrlrange, dtype=np.float64)
        self.data = [mujoco.MjData(self.model) for _ in range(n)]
        self.n = n

    def reset(self, states: np.ndarray, goals_xy: np.ndarray | None = None):
        """Puts arm i in ``states[i]`` (q1, q2, dq1, dq2); targets at goals."""
        states = np.asarray(states, dtype=np.float64).reshape(self.n, STATE_DIM)
        goals = (
            np.zeros((self.n, 2))
            if goals_xy is None
            else np.asarray(goals_xy, dtype=np.float64).reshape(self.n, 2)
        )
        for d, s, g in zip(self.data, states, goals, strict=True):
            self._mujoco.mj_resetData(self.model, d)
            d.qpos[:2] = s[:2]
            d.qpos[2:] = g
            d.qvel[:2] = s[2:]
            d.qvel[2:] = 0.0
            self._mujoco.mj_forward(self.model, d)
        return self.states()

    def states(self) -> np.ndarray:
        """The arms' states ``[n, 4]``."""
        return np.stack(
            [np.concatenate([d.qpos[:2], d.qvel[:2]]) for d in self.data]
        ).astype(np.float64)

    def step(self, actions: np.ndarray) -> np.ndarray:
        """Applies torques ``[n, 2]`` (clipped to the control range) for one step."""
        actions = np.clip(
            np.asarray(actions, dtype=np.float64).reshape(self.n, ACTION_DIM),
            self.ctrl_range[:, 0],
            self.ctrl_range[:, 1],
        )
        for d, a in zip(self.data, actions, strict=True):
            d.ctrl[:] = a
            for _ in range(self.frame_skip):
                self._mujoco.mj_step(self.model, d)
        return self.states()

    def render(self, index: int, renderer) -> np.ndarray:
        """An RGB frame of arm ``index`` from a ``mujoco.Renderer``."""
        renderer.update_scene(self.data[index], camera=-1)
        return renderer.render()


def rollout_sim(sim: ReacherSim, act, start: np.ndarray, horizon: int, goals=None):
    """Closed-loop rollout of ``act(states [n, 4] tensor) -> [n, 2]`` in ``sim``.

    Returns float32 tensors: states ``[n, horizon + 1, 4]`` (start first) and
    the actions ``[n, horizon]`` the policy chose (before clipping); no
    gradient flows through the simulator.
    """
    states = [sim.reset(start, goals)]
    actions = []
    for _ in range(horizon):
        with torch.no_grad():
            a = act(torch.as_tensor(states[-1], dtype=torch.float32))
        actions.append(a.numpy())
        states.append(sim.step(actions[-1]))
    return (
        torch.as_tensor(np.stack(states, 1), dtype=torch.float32),
        torch.as_tensor(np.stack(actions, 1), dtype=torch.float32),
    )


class PointMass:
    """Points in the plane, ``p <- clip(p + clip(a, -max_step, max_step))``.

    The 2D navigation task of the meta-RL literature: start at the origin,
    reward minus the distance to the goal. Positions stay in
    ``[-bound, bound]^2``. Batched over the first axis, in torch.
    """

    STATE_DIM = 2
    ACTION_DIM = 2

    def __init__(self, max_step: float = 0.1, bound: float = 1.0):
        self.max_step = max_step
        self.bound = bound

    def step(self, positions: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        move = actions.clamp(-self.max_step, self.max_step)
        return (positions + move).clamp(-self.bound, self.bound)


@contextlib.contextmanager
def one_thread():
    """Runs the block on one torch thread, then restores the thread count.

    A rollout is hundreds of tiny ops in sequence: a second thread
    has nothing to share and, on a busy machine, its barriers cost far more
    than the ops (20 reacher meta-training iterations: 4.8 s of CPU on one thread,
    265 s on two, with two other processes on the 2 cores). One thread also
    makes the numbers independent of ``runtime.n_threads``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
