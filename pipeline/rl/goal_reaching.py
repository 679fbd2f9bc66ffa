"""Model-free goal reaching: a learned loss for policy-gradient learning.

The paper's model-free experiment (item 3 of ``ML3.md``) has no public code;
this is our protocol. A Gaussian policy learns to reach a goal from sampled
episodes only: no gradient ever flows through the environment.

Environments (``ENVS``), both with actions clipped to [-1, 1]:

- ``point_mass``: :class:`pipeline.rl.envs.PointMass` from the origin; an
  action is a velocity command in units of the largest step (0.1), so the
  clip of the environment is the clip to [-1, 1].
- ``reacher``: :class:`pipeline.rl.envs.ReacherSim` (MuJoCo Reacher-v5),
  joint torques, from rest at q = (0, 0); the goal is a fingertip target.

The reward of a step is minus the distance (metres for the reacher) of the
point or the fingertip to the goal after the step, minus a small action cost
``0.01 |a|^2`` of the sampled action before clipping (as Reacher-v5 charges
the unclipped action; without it a policy whose means leave the clip range
sees identical episodes and no policy gradient). An episode succeeds when
its final distance is below ``prepare.success_radius``.

Observations (what the policy and the learned loss see):

- point mass ``[4]``: position (x, y) and goal - position;
- reacher ``[8]``: cos q1, sin q1, cos q2, sin q2, the joint velocities
  times 0.1 and (goal - fingertip) times 10, so that every column is O(1)
  (velocities reach ~30 rad/s, distances are ~0.1 m).

The policy is a Gaussian whose mean is an MLP of the observation and whose
log std is a learned vector independent of the state. Parameters are batched
over goals: a tuple of tensors ``(W1 [G, H1, d], b1 [G, H1], ..., log_std
[G, 2])``, one independent policy per goal.

The learned loss M_phi sees one row per time step of the sampled episodes:
the policy's mean action ``[2]`` and the log-probability of the sampled
action (the two columns that depend on theta), the sampled action ``[2]``,
the observation and the advantage (reward-to-go minus its mean over the
goal's episodes at that time step, divided by its std over the goal's
batch). The inner loss is its mean over the rows of a goal, summed over
goals, so each goal's policy gets its own gradient.

The task loss is REINFORCE with that time-step baseline on fresh episodes of
the updated policy: ``-mean[(G_t - b_t) log pi_theta'(a_t | o_t)]``; its
gradient reaches phi through the inner SGD step (second order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline import nets, stats
from pipeline.config import GOAL_EXPERIMENTS, ExperimentParams
from pipeline.meta import LearnedLossCollapsed, MetaTrainResult
from pipeline.nets import LearnedLoss
from pipeline.rl import envs
from pipeline.runtime import generator, numpy_rng, stream_seed

ENVS = ("point_mass", "reacher")
ACTION_DIM = 2
OBS_DIMS = {"point_mass": 4, "reacher": 8}
# mean action [2], log-probability [1], sampled action [2], observation, advantage
N_INPUTS = {env: 2 * ACTION_DIM + 2 + OBS_DIMS[env] for env in ENVS}
# goals the start state can reach: the point mass lives in [-1, 1]^2, the
# reacher's fingertip between |l1 - l2| and l1 + l2 from its base
GOAL_REACH = {"point_mass": (0.0, 1.0), "reacher": (0.01, envs.REACH)}
POINT_MASS_MAX_STEP = 0.1
REACHER_VELOCITY_SCALE = 0.1
REACHER_POSITION_SCALE = 10.0
# weight of the action cost -|a|^2 (sampled action, before clipping) in the
# reward: beyond the clip the environment no longer responds and REINFORCE
# has no signal, so without it a loss that pushes the means out is never told
ACTION_COST = {"point_mass": 0.01, "reacher": 0.01}
METHODS = ("learned", "reinforce")
N_PATH_EPISODES = 2

Theta = tuple[torch.Tensor, ...]


def env_of(experiment: str) -> str:
    """The environment of an experiment: ``goal_point_mass`` -> ``point_mass``."""
    if experiment not in GOAL_EXPERIMENTS:
        raise ValueError(
            f"unknown goal-reaching experiment {experiment!r}; "
            f"valid: {', '.join(GOAL_EXPERIMENTS)}"
        )
    return experiment.removeprefix("goal_")


def prepare(
    params: ExperimentParams, experiment: str, seed: int
) -> dict[str, np.ndarray]:
    """Training goals (drawn per seed) and held-out goals (the same for all seeds).

    Returns:
      ``train_goals [n_train, 2]``, ``test_goals [n_test, 2]`` (float32) and
      ``horizon`` (a 0-d integer array).

    Raises:
      ValueError: if ``prepare.goal_radius_range`` leaves the reachable range.
    """
    env = env_of(experiment)
    p = params.prepare
    low, high = p.goal_radius_range
    reach_low, reach_high = GOAL_REACH[env]
    if not (reach_low <= low <= high <= reach_high):
        raise ValueError(
            f"goal_radius_range = {list(p.goal_radius_range)} is out of reach: the "
            f"{env} reaches goals at {reach_low:g} to {reach_high:g} from its start"
        )
    rng = numpy_rng(seed, f"{experiment}/prepare")
    train = envs.goals_on_workspace(p.n_train_goals, p.goal_radius_range, rng)
    test = envs.spread_goals(p.n_test_goals, p.goal_radius_range)
    return {
        "train_goals": train.astype(np.float32),
        "test_goals": test.astype(np.float32),
        "horizon": np.asarray(p.horizon),
    }


# --- the policy -------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """A batched Gaussian MLP policy; the parameters travel separately as Theta.

    Args:
      n_obs: observation width.
      hidden_sizes: widths of the mean's hidden layers.
      activation: hidden activation (a name of ``nets.ACTIVATIONS``).
      initial_log_std: every log std at initialization.
    """

    n_obs: int
    hidden_sizes: tuple[int, ...]
    activation: str
    initial_log_std: float

    @classmethod
    def from_params(cls, params: ExperimentParams, env: str) -> Policy:
        """The policy of an experiment's ``optimizee`` section."""
        o = params.optimizee
        return cls(
            OBS_DIMS[env], tuple(o.hidden_sizes), o.activation, o.initial_log_std
        )

    def init(self, n: int, gen: torch.Generator) -> Theta:
        """``n`` policies, weights and biases drawn like torch's ``nn.Linear``."""
        sizes = [self.n_obs, *self.hidden_sizes, ACTION_DIM]
        theta = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1 / math.sqrt(n_in)
            theta.append((2 * torch.rand((n, n_out, n_in), generator=gen) - 1) * bound)
            theta.append((2 * torch.rand((n, n_out), generator=gen) - 1) * bound)
        theta.append(torch.full((n, ACTION_DIM), float(self.initial_log_std)))
        return tuple(theta)

    def mean(self, theta: Theta, obs: torch.Tensor) -> torch.Tensor:
        """Mean actions ``[G, N, 2]`` of observations ``[G, N, n_obs]``."""
        act = nets.ACTIVATIONS[self.activation]()
        layers = theta[:-1]
        h = obs
        for i in range(0, len(layers), 2):
            weight, bias = layers[i], layers[i + 1]
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            if i < len(layers) - 2:
                h = act(h)
        return h

    def log_prob(
        self, theta: Theta, obs: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[G, N, 2]`` and log-density ``[G, N]`` of ``actions [G, N, 2]``."""
        mean = self.mean(theta, obs)
        log_std = theta[-1].unsqueeze(1)  # [G, 1, 2]
        z = (actions - mean) * torch.exp(-log_std)
        log_density = -0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)
        return mean, log_density.sum(-1)


# --- environments and episodes ----------------------------------------------


class PointMassEnv:
    """The point mass from the origin; actions in units of the largest step."""

    name = "point_mass"

    def __init__(self):
        self.sim = envs.PointMass(max_step=POINT_MASS_MAX_STEP, bound=1.0)

    def reset(self, goals: torch.Tensor) -> torch.Tensor:
        """Positions ``[N, 2]`` at the start (goals ``[N, 2]``)."""
        self.goals = goals
        self.positions = torch.zeros_like(goals)
        return self.positions

    def observe(self) -> torch.Tensor:
        """Observations ``[N, 4]``: position, goal - position."""
        return torch.cat([self.positions, self.goals - self.positions], -1)

    def step(self, actions: torch.Tensor) -> torch.Tensor:
        """Moves by ``actions`` ``[N, 2]`` (clipped to [-1, 1]); new positions."""
        move = actions.clamp(-1.0, 1.0) * POINT_MASS_MAX_STEP
        self.positions = self.sim.step(self.positions, move)
        return self.positions


class ReacherEnv:
    """Reacher arms from rest at q = (0, 0); one ``ReacherSim`` per batch size."""

    name = "reacher"

    def __init__(self):
        # building N MjData costs ~2 ms per arm: keep one simulator per size
        self._sims: dict[int, envs.ReacherSim] = {}

    def reset(self, goals: torch.Tensor) -> torch.Tensor:
        """Fingertips ``[N, 2]`` at the start (goals ``[N, 2]``)."""
        n = goals.shape[0]
        if n not in self._sims:
            self._sims[n] = envs.ReacherSim(n)
        self.sim = self._sims[n]
        self.goals = goals
        self.states = torch.as_tensor(
            self.sim.reset(np.zeros((n, envs.STATE_DIM)), goals.numpy()),
            dtype=torch.float32,
        )
        return envs.fingertip(self.states[:, :2])

    def observe(self) -> torch.Tensor:
        """Observations ``[N, 8]`` (see the module docstring)."""
        q, dq = self.states[:, :2], self.states[:, 2:]
        to_goal = self.goals - envs.fingertip(q)
        return torch.cat(
            [
                torch.cos(q[:, :1]),
                torch.sin(q[:, :1]),
                torch.cos(q[:, 1:]),
                torch.sin(q[:, 1:]),
                REACHER_VELOCITY_SCALE * dq,
                REACHER_POSITION_SCALE * to_goal,
            ],
            -1,
        )

    def step(self, actions: torch.Tensor) -> torch.Tensor:
        """Applies torques ``[N, 2]`` (the simulator clips them); new fingertips."""
        self.states = torch.as_tensor(
            self.sim.step(actions.numpy()), dtype=torch.float32
        )
        return envs.fingertip(self.states[:, :2])


def make_env(env: str) -> PointMassEnv | ReacherEnv:
    """The environment named ``env`` (one of ``ENVS``)."""
    if env == "point_mass":
        return PointMassEnv()
    if env == "reacher":
        return ReacherEnv()
    raise ValueError(f"unknown environment {env!r}; valid: {', '.join(ENVS)}")


@dataclass
class Episodes:
    """Sampled episodes of G goals, E episodes each, T time steps.

    Attributes:
      obs: observations ``[G, E, T, n_obs]`` where the actions were taken.
      actions: sampled actions ``[G, E, T, 2]`` (before clipping).
      rewards: ``[G, E, T]``: minus the distance after each step, minus the
        action cost.
      positions: point or fingertip ``[G, E, T + 1, 2]``, start first.
      goals: ``[G, 2]``.
    """

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    positions: torch.Tensor
    goals: torch.Tensor

    @property
    def returns(self) -> torch.Tensor:
        """Undiscounted returns ``[G, E]``."""
        return self.rewards.sum(-1)

    @property
    def final_distance(self) -> torch.Tensor:
        """Distance to the goal after the last step ``[G, E]``."""
        return (self.positions[:, :, -1] - self.goals[:, None]).norm(dim=-1)

    @property
    def n_steps(self) -> int:
        """Environment steps of one goal's episodes."""
        return self.rewards.shape[1] * self.rewards.shape[2]


def sample_episodes(
    env,
    policy: Policy,
    theta: Theta,
    goals: torch.Tensor,
    n_episodes: int,
    horizon: int,
    gen: torch.Generator,
) -> Episodes:
    """``n_episodes`` episodes per goal of the policies ``theta`` (one per goal).

    The episodes are data: no gradient flows through them. The action noise
    is drawn from ``gen`` (``[G, E, 2]`` per time step), so a generator state
    fixes the episodes.
    """
    n_goals = goals.shape[0]
    theta = tuple(t.detach() for t in theta)
    std = torch.exp(theta[-1]).unsqueeze(1)  # [G, 1, 2]
    flat_goals = goals.repeat_interleave(n_episodes, 0)  # [G * E, 2], goal-major
    positions = [env.reset(flat_goals)]
    obs, actions = [], []
    with torch.no_grad():
        for _ in range(horizon):
            o = env.observe().view(n_goals, n_episodes, -1)
            noise = torch.randn((n_goals, n_episodes, ACTION_DIM), generator=gen)
            a = policy.mean(theta, o) + std * noise
            obs.append(o)
            actions.append(a)
            positions.append(env.step(a.reshape(-1, ACTION_DIM)))
    positions = torch.stack(positions, 1).view(n_goals, n_episodes, horizon + 1, 2)
    actions = torch.stack(actions, 2)  # [G, E, T, 2]
    rewards = -(positions[:, :, 1:] - goals[:, None, None]).norm(dim=-1)
    rewards = rewards - ACTION_COST[env.name] * (actions**2).sum(-1)
    return Episodes(
        obs=torch.stack(obs, 2),
        actions=actions,
        rewards=rewards,
        positions=positions,
        goals=goals,
    )


# --- losses -----------------------------------------------------------------


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Reward-to-go minus its mean over the goal's episodes per time step.

    Args:
      rewards: ``[G, E, T]``.

    Returns:
      ``G_t - b_t`` ``[G, E, T]``, with ``G_t`` the undiscounted reward-to-go
      and ``b_t`` its mean over the E episodes of the goal at step t.
    """
    to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    return to_go - to_go.mean(dim=1, keepdim=True)


def reinforce_loss(policy: Policy, theta: Theta, episodes: Episodes) -> torch.Tensor:
    """REINFORCE with the time-step baseline, per goal ``[G]``.

    ``-mean_{e, t}[(G_t - b_t) log pi_theta(a_t | o_t)]``; its gradient is
    the policy-gradient estimate (the episodes must come from ``theta``).
    """
    n_goals = episodes.goals.shape[0]
    _, log_p = policy.log_prob(
        theta,
        episodes.obs.reshape(n_goals, -1, policy.n_obs),
        episodes.actions.reshape(n_goals, -1, ACTION_DIM),
    )
    weight = advantages(episodes.rewards).reshape(n_goals, -1)
    return -(weight * log_p).mean(-1)


def loss_inputs(policy: Policy, theta: Theta, episodes: Episodes) -> tuple:
    """The columns of the learned loss, one row per goal, episode and step.

    Returns:
      mean action ``[G * E * T, 2]``, log-probability ``[G * E * T]`` (both
      differentiable w.r.t. ``theta``), sampled action, observation and the
      normalized advantage.
    """
    n_goals = episodes.goals.shape[0]
    obs = episodes.obs.reshape(n_goals, -1, policy.n_obs)
    actions = episodes.actions.reshape(n_goals, -1, ACTION_DIM)
    mean, log_p = policy.log_prob(theta, obs, actions)
    adv = advantages(episodes.rewards).reshape(n_goals, -1)
    # per goal: the scale of returns differs between goals and environments;
    # the epsilon keeps a batch of identical episodes at 0, not at 0 / 0
    adv = adv / (adv.std(dim=1, keepdim=True, correction=0) + 1e-6)
    return (
        mean.reshape(-1, ACTION_DIM),
        log_p.reshape(-1),
        actions.reshape(-1, ACTION_DIM),
        obs.reshape(-1, policy.n_obs),
        adv.reshape(-1),
    )


def learned_values(
    learned_loss: LearnedLoss, policy: Policy, theta: Theta, episodes: Episodes
) -> torch.Tensor:
    """The learned loss of every row, ``[G, E * T]``."""
    values = learned_loss.pointwise(*loss_inputs(policy, theta, episodes))
    return values.view(episodes.goals.shape[0], -1)


def learned_objective(
    learned_loss: LearnedLoss, policy: Policy, theta: Theta, episodes: Episodes
) -> torch.Tensor:
    """The inner loss: the learned loss's mean over each goal's rows, summed."""
    return learned_values(learned_loss, policy, theta, episodes).mean(1).sum()


def sgd_step(
    loss: torch.Tensor, theta: Theta, lr: float, *, create_graph: bool
) -> Theta:
    """``theta - lr * grad(loss)``; with ``create_graph`` it stays differentiable."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"the loss of the inner step is {loss.item()}: expected a finite value"
        )
    grads = torch.autograd.grad(loss, theta, create_graph=create_graph)
    return tuple(t - lr * g for t, g in zip(theta, grads, strict=True))


def leaves(theta: Theta) -> Theta:
    """Detached copies of ``theta`` that require grad: the next step's start."""
    return tuple(t.detach().requires_grad_(True) for t in theta)


def check_collapse(
    learned_loss: LearnedLoss,
    policy: Policy,
    theta: Theta,
    episodes: Episodes,
    tolerance: float,
    iteration: int,
) -> dict[str, float]:
    """Raises :class:`LearnedLossCollapsed` if the learned loss cannot train.

    Two symptoms: the gradient w.r.t. the policy parameters (all goals
    together) has a norm below ``tolerance``, or the loss is constant over
    the rows (std of the row values relative to their mean magnitude below
    ``tolerance``).

    Returns:
      ``grad_norm`` and ``relative_spread`` of the check.
    """
    theta = leaves(theta)
    with torch.enable_grad():
        values = learned_values(learned_loss, policy, theta, episodes)
        grads = torch.autograd.grad(values.mean(1).sum(), theta)
    grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    scale = values.detach().abs().mean().clamp_min(1e-30)
    spread = (values.detach().std(correction=0) / scale).item()
    grad_norm = grad_norm.item()
    if not (grad_norm >= tolerance and spread >= tolerance):
        raise LearnedLossCollapsed(
            f"learned loss collapsed at outer iteration {iteration}: gradient norm "
            f"w.r.t. the policies {grad_norm:.3g}, relative spread of its values "
            f"{spread:.3g} over {values.numel()} rows (expected both >= "
            f"collapse_tolerance {tolerance:g}); not saving it. Try a lower "
            "outer_lr or inner_lr, more episodes_per_update, or another "
            "learned_loss init"
        )
    return {"grad_norm": grad_norm, "relative_spread": spread}


# --- meta-training ----------------------------------------------------------


def meta_train(
    params: ExperimentParams,
    experiment: str,
    data: dict,
    seed: int,
    progress: bool = False,
) -> tuple[LearnedLoss, MetaTrainResult]:
    """Meta-trains one learned loss for ``seed`` on the training goals.

    Each outer iteration draws ``tasks_per_iteration`` training goals and a
    fresh policy per goal, then takes ``unrolls_per_task`` one-step unrolls
    in sequence: episodes of theta, theta' = theta - inner_lr grad(learned
    loss) with the graph, fresh episodes of theta', the REINFORCE task loss
    (mean over goals), an Adam step on phi; the next unroll starts from the
    detached theta'. Validation (every ``validate_every`` iterations, at 0
    and at the end): fresh policies on all training goals, the same number
    of SGD steps at ``inner_lr``, then the mean return and success rate of
    fresh episodes; the learned loss is checked for collapse there.

    Returns:
      The learned loss and its history (``task_loss``, ``return_before``,
      ``return_after``: mean returns of the episodes of theta and theta',
      ``meta_grad_norm``) and validation (``val_return``, ``val_success``,
      ``val_final_distance``, ``val_grad_norm``, ``val_relative_spread``).

    Raises:
      LearnedLossCollapsed: at a validation (see :func:`check_collapse`).
      FloatingPointError: if a loss or the meta-gradient is not finite.
    """
    env_name = env_of(experiment)
    mp = params.meta_train
    env = make_env(env_name)
    policy = Policy.from_params(params, env_name)
    horizon = int(data["horizon"])
    train_goals = torch.as_tensor(data["train_goals"], dtype=torch.float32)
    n_train = train_goals.shape[0]
    if mp.tasks_per_iteration > n_train:
        raise ValueError(
            f"meta_train.tasks_per_iteration = {mp.tasks_per_iteration}: expected at "
            f"most the {n_train} training goals"
        )
    learned_loss = _fresh_learned_loss(params, env_name, seed, experiment)
    optimizer = torch.optim.Adam(learned_loss.parameters(), lr=mp.outer_lr)
    gen = generator(seed, f"{experiment}/meta_train")

    def validate(iteration: int) -> dict:
        # the same policies and noise at every validation: a comparable curve
        val_gen = generator(seed, f"{experiment}/validate")
        theta = leaves(policy.init(n_train, val_gen))
        for step in range(mp.unrolls_per_task):
            episodes = sample_episodes(
                env,
                policy,
                theta,
                train_goals,
                mp.episodes_per_update,
                horizon,
                val_gen,
            )
            if step == 0:
                check = check_collapse(
                    learned_loss,
                    policy,
                    theta,
                    episodes,
                    mp.collapse_tolerance,
                    iteration,
                )
            loss = learned_objective(learned_loss, policy, theta, episodes)
            theta = leaves(sgd_step(loss, theta, mp.inner_lr, create_graph=False))
        episodes = sample_episodes(
            env, policy, theta, train_goals, mp.episodes_per_update, horizon, val_gen
        )
        return {
            "iteration": iteration,
            "val_return": episodes.returns.mean().item(),
            "val_success": _success(episodes, params).mean().item(),
            "val_final_distance": episodes.final_distance.mean().item(),
            "val_grad_norm": check["grad_norm"],
            "val_relative_spread": check["relative_spread"],
        }

    history, validation = [], [validate(0)]
    bar = tqdm(
        range(1, mp.n_outer_iterations + 1),
        desc=f"meta-train {experiment}",
        disable=not progress,
        leave=False,
    )
    for iteration in bar:
        goals = train_goals[torch.randperm(n_train, generator=gen)]
        goals = goals[: mp.tasks_per_iteration]
        theta = leaves(policy.init(goals.shape[0], gen))
        records = []
        for _ in range(mp.unrolls_per_task):
            # inner step on the learned loss, graph kept for the meta-gradient
            before = sample_episodes(
                env, policy, theta, goals, mp.episodes_per_update, horizon, gen
            )
            inner = learned_objective(learned_loss, policy, theta, before)
            new = sgd_step(inner, theta, mp.inner_lr, create_graph=True)

            # task loss: REINFORCE on fresh episodes of the updated policies
            after = sample_episodes(
                env, policy, new, goals, mp.episodes_per_update, horizon, gen
            )
            task_loss = reinforce_loss(policy, new, after).mean()
            optimizer.zero_grad(set_to_none=True)
            task_loss.backward()
            norm = _grad_norm(learned_loss)
            if not (torch.isfinite(task_loss) and math.isfinite(norm)):
                raise FloatingPointError(
                    f"meta-training diverged at outer iteration {iteration}: task "
                    f"loss {task_loss.item()}, meta-gradient norm {norm}; lower "
                    "outer_lr or inner_lr"
                )
            optimizer.step()
            records.append(
                (
                    task_loss.item(),
                    before.returns.mean().item(),
                    after.returns.mean().item(),
                    norm,
                )
            )
            theta = leaves(new)
        task, ret_before, ret_after, norms = np.mean(records, axis=0)
        history.append(
            {
                "iteration": iteration,
                "task_loss": float(task),
                "return_before": float(ret_before),
                "return_after": float(ret_after),
                "meta_grad_norm": float(norms),
            }
        )
        if progress:
            bar.set_postfix(return_after=f"{ret_after:.3f}")
        if iteration % mp.validate_every == 0 or iteration == mp.n_outer_iterations:
            validation.append(validate(iteration))
    return learned_loss, MetaTrainResult(history=history, validation=validation)


def _fresh_learned_loss(params, env_name: str, seed: int, experiment: str):
    # torch's layer init draws from the global RNG: fork it so the seed fixes
    # phi without disturbing the caller's global stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, f"{experiment}/learned_loss"))
        return nets.learned_loss_for(params.learned_loss, N_INPUTS[env_name])


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack(grads)).item()


def _success(episodes: Episodes, params: ExperimentParams) -> torch.Tensor:
    return (episodes.final_distance < params.prepare.success_radius).float()


# --- meta-test --------------------------------------------------------------


def train_policies(
    env,
    policy: Policy,
    theta0: Theta,
    goals: torch.Tensor,
    update,
    *,
    n_updates: int,
    n_episodes: int,
    horizon: int,
    gen: torch.Generator,
) -> list[Episodes]:
    """``n_updates`` updates of the policies, each on fresh episodes.

    Args:
      update: ``(theta, episodes) -> theta``, one update from the episodes.

    Returns:
      The ``n_updates + 1`` batches of episodes: the one of each update
      (sampled before it) and one of the final policies.
    """
    theta = leaves(theta0)
    batches = []
    for _ in range(n_updates):
        batches.append(
            sample_episodes(env, policy, theta, goals, n_episodes, horizon, gen)
        )
        theta = update(theta, batches[-1])
        if not all(torch.isfinite(t).all() for t in theta):
            raise FloatingPointError(
                f"policy parameters became non-finite after update {len(batches)}: "
                "expected finite values; lower the meta-test lr"
            )
    batches.append(sample_episodes(env, policy, theta, goals, n_episodes, horizon, gen))
    return batches


def learned_update(learned_loss: LearnedLoss, policy: Policy, lr: float):
    """Meta-test update: one plain SGD step on the learned loss."""

    def update(theta, episodes):
        loss = learned_objective(learned_loss, policy, theta, episodes)
        return leaves(sgd_step(loss, theta, lr, create_graph=False))

    return update


def reinforce_update(policy: Policy, lr: float):
    """Baseline update: one Adam step on REINFORCE with the time-step baseline.

    Adam is element-wise, so the batched policies stay independent. The
    returned function keeps the optimizer's state between calls and must
    be given back the parameters it returned.
    """
    state: dict = {}

    def update(theta, episodes):
        if "optimizer" not in state:
            state["optimizer"] = torch.optim.Adam(theta, lr=lr)
        loss = reinforce_loss(policy, theta, episodes).sum()
        state["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        state["optimizer"].step()
        return theta

    return update


def evaluate(
    params: ExperimentParams,
    experiment: str,
    data: dict,
    learned_loss: LearnedLoss,
    seed: int,
) -> dict[str, pd.DataFrame]:
    """Meta-test on the held-out goals: the learned loss against REINFORCE.

    Every held-out goal gets a fresh policy (the same for both methods) and
    ``evaluate.n_updates`` updates, each from ``evaluate.episodes_per_update``
    fresh episodes; both methods draw the same action noise, so their first
    batch is identical, and use the same environment steps. ``learned``:
    SGD at ``evaluate.lr`` on the learned loss; ``reinforce``: Adam at the
    learning rate of ``evaluate.baseline_lrs`` whose final mean return on
    the training goals is best (same protocol, its own policies and noise).

    Returns:
      ``curves``: one row per method, goal and update (0 .. n_updates, each
      measured on the episodes sampled before that update; the last on a
      batch of the final policy) with ``env_steps`` (steps per goal spent on
      the updates so far), ``mean_return``, ``success`` (rate) and
      ``final_distance`` (mean). ``baseline_lr``: every lr with its final
      mean return on the training goals and whether it was selected.
      ``paths``: the first episodes at updates 0 and n_updates, position
      (point or fingertip) per time step.
    """
    env_name = env_of(experiment)
    ep = params.evaluate
    env = make_env(env_name)
    policy = Policy.from_params(params, env_name)
    horizon = int(data["horizon"])

    def run(goals, update, stream):
        theta0 = policy.init(goals.shape[0], generator(seed, f"{stream}/policy"))
        return train_policies(
            env,
            policy,
            theta0,
            goals,
            update,
            n_updates=ep.n_updates,
            n_episodes=ep.episodes_per_update,
            horizon=horizon,
            gen=generator(seed, f"{stream}/episodes"),
        )

    # the baseline's learning rate, chosen on the training goals
    train_goals = torch.as_tensor(data["train_goals"], dtype=torch.float32)
    select = f"{experiment}/evaluate/select"
    train_returns = []
    for lr in ep.baseline_lrs:
        final = run(train_goals, reinforce_update(policy, lr), select)[-1]
        train_returns.append(final.returns.mean().item())
    best = int(np.argmax(train_returns))
    baseline_lr = pd.DataFrame(
        {
            "lr": list(ep.baseline_lrs),
            "train_return": train_returns,
            "selected": [i == best for i in range(len(train_returns))],
        }
    )

    test_goals = torch.as_tensor(data["test_goals"], dtype=torch.float32)
    updates = {
        "learned": learned_update(learned_loss, policy, ep.lr),
        "reinforce": reinforce_update(policy, ep.baseline_lrs[best]),
    }
    curves, paths = [], []
    for method in METHODS:
        batches = run(test_goals, updates[method], f"{experiment}/evaluate/test")
        for step, episodes in enumerate(batches):
            curves.append(_curve_rows(episodes, params, method, step))
            if step in (0, ep.n_updates):
                paths.append(_path_rows(episodes, method, step))
    tables = {
        "curves": pd.concat(curves, ignore_index=True),
        "baseline_lr": baseline_lr,
        "paths": pd.concat(paths, ignore_index=True),
    }
    for frame in tables.values():
        frame.insert(0, "seed", seed)
    return tables


def _curve_rows(episodes: Episodes, params, method: str, step: int) -> pd.DataFrame:
    n_goals = episodes.goals.shape[0]
    return pd.DataFrame(
        {
            "method": method,
            "goal": np.arange(n_goals),
            "update": step,
            "env_steps": step * episodes.n_steps,
            "mean_return": episodes.returns.mean(1).numpy(),
            "success": _success(episodes, params).mean(1).numpy(),
            "final_distance": episodes.final_distance.mean(1).numpy(),
        }
    )


def _path_rows(episodes: Episodes, method: str, step: int) -> pd.DataFrame:
    n_goals, n_episodes, n_times, _ = episodes.positions.shape
    shown = min(N_PATH_EPISODES, n_episodes)
    xy = episodes.positions[:, :shown].numpy()  # [G, shown, T + 1, 2]
    goal, episode, t = np.meshgrid(
        np.arange(n_goals), np.arange(shown), np.arange(n_times), indexing="ij"
    )
    goals = episodes.goals.numpy()[goal.ravel()]
    return pd.DataFrame(
        {
            "method": method,
            "goal": goal.ravel(),
            "update": step,
            "episode": episode.ravel(),
            "t": t.ravel(),
            "x": xy[..., 0].ravel(),
            "y": xy[..., 1].ravel(),
            "goal_x": goals[:, 0],
            "goal_y": goals[:, 1],
        }
    )


def summary(curves: pd.DataFrame, confidence: float = 0.95) -> dict:
    """Return and success per method at the last and the middle update.

    Means and t intervals over goals x seeds; ``learned_minus_reinforce``
    compares the two methods pair by pair (same seed and goal), higher is
    better for both metrics.

    Returns:
      ``{"final_update": n, "halfway_update": n // 2, "learned": {"final":
      {...}, "halfway": {...}}, "reinforce": ..., "learned_minus_reinforce":
      {"final": {"return": paired, "success": paired}, "halfway": ...}}``
      with ``return_mean/low/high``, ``success_mean/low/high`` and
      ``final_distance_mean`` per method.
    """
    missing = {"seed", "method", "goal", "update", "mean_return", "success"} - set(
        curves.columns
    )
    if missing:
        raise ValueError(
            "summary expects the columns of evaluate's curves; missing "
            f"{sorted(missing)}"
        )
    n_updates = int(curves["update"].max())
    at = {"final": n_updates, "halfway": n_updates // 2}
    out: dict = {"final_update": n_updates, "halfway_update": n_updates // 2}
    for when, update in at.items():
        rows = curves[curves["update"] == update].sort_values(["seed", "goal"])
        per_method = {m: rows[rows.method == m] for m in METHODS}
        for method, frame in per_method.items():
            entry = out.setdefault(method, {}).setdefault(when, {})
            for name, column in (("return", "mean_return"), ("success", "success")):
                mean, low, high = stats.mean_ci(frame[column], confidence)
                entry.update(
                    {f"{name}_mean": mean, f"{name}_low": low, f"{name}_high": high}
                )
            entry["final_distance_mean"] = float(frame["final_distance"].mean())
        learned, baseline = per_method["learned"], per_method["reinforce"]
        out.setdefault("learned_minus_reinforce", {})[when] = {
            name: stats.paired_summary(
                learned[column].to_numpy(),
                baseline[column].to_numpy(),
                lower_is_better=False,
                confidence=confidence,
            )
            for name, column in (("return", "mean_return"), ("success", "success"))
        }
    return out
