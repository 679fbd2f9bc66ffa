"""Model-free goal reaching: episodes, policy, losses, collapse, the stage units."""

from __future__ import annotations

import dataclasses
import math
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import load_params
from pipeline.meta import LearnedLossCollapsed, MetaTrainResult
from pipeline.nets import LearnedLoss
from pipeline.rl import goal_reaching as gr

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
EXPERIMENTS = ("goal_point_mass", "goal_reacher")


@cache
def _repo_params():
    return load_params(REPO_PARAMS)


def tiny(experiment: str):
    """The experiment's params.yaml section shrunk to a fraction of a second."""
    p = _repo_params().experiments[experiment]

    def shrink(section, **values):
        return dataclasses.replace(getattr(p, section), **values)

    return dataclasses.replace(
        p,
        prepare=shrink("prepare", horizon=5, n_train_goals=3, n_test_goals=2),
        optimizee=shrink("optimizee", hidden_sizes=[8]),
        learned_loss=shrink("learned_loss", hidden_sizes=[8, 8]),
        meta_train=shrink(
            "meta_train",
            n_outer_iterations=3,
            tasks_per_iteration=2,
            unrolls_per_task=2,
            episodes_per_update=3,
            validate_every=2,
        ),
        evaluate=shrink(
            "evaluate", n_updates=2, episodes_per_update=3, baseline_lrs=[0.01, 0.1]
        ),
    )


def _setup(experiment, seed=0, n_goals=2):
    params = tiny(experiment)
    env_name = gr.env_of(experiment)
    data = gr.prepare(params, experiment, seed)
    policy = gr.Policy.from_params(params, env_name)
    goals = torch.as_tensor(data["train_goals"][:n_goals])
    return params, gr.make_env(env_name), policy, goals, int(data["horizon"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_sample_episodes_same_generator_seed_same_numbers(experiment):
    params, env, policy, goals, horizon = _setup(experiment)
    theta = policy.init(len(goals), torch.Generator().manual_seed(3))

    def sample():
        return gr.sample_episodes(
            env, policy, theta, goals, 3, horizon, torch.Generator().manual_seed(7)
        )

    first, second = sample(), sample()
    for name in ("obs", "actions", "rewards", "positions"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.obs.shape == (2, 3, horizon, gr.OBS_DIMS[env.name])
    assert first.positions.shape == (2, 3, horizon + 1, 2)
    # every episode starts at the same place: the origin, or the stretched arm
    start = (0.0, 0.0) if env.name == "point_mass" else (0.21, 0.0)
    torch.testing.assert_close(
        first.positions[:, :, 0], torch.tensor(start).expand(2, 3, 2)
    )
    other = gr.sample_episodes(
        env, policy, theta, goals, 3, horizon, torch.Generator().manual_seed(8)
    )
    assert not torch.equal(first.actions, other.actions)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_prepare_deterministic_per_seed_test_goals_shared(experiment):
    params = tiny(experiment)
    a, b = gr.prepare(params, experiment, 0), gr.prepare(params, experiment, 0)
    other = gr.prepare(params, experiment, 1)
    np.testing.assert_array_equal(a["train_goals"], b["train_goals"])
    assert not np.array_equal(a["train_goals"], other["train_goals"])
    np.testing.assert_array_equal(a["test_goals"], other["test_goals"])
    low, high = params.prepare.goal_radius_range
    for key in ("train_goals", "test_goals"):
        radius = np.linalg.norm(a[key], axis=1)
        assert np.all((radius >= low - 1e-6) & (radius <= high + 1e-6))
    assert int(a["horizon"]) == params.prepare.horizon


def test_prepare_goal_out_of_reach_raises():
    params = tiny("goal_reacher")
    far = dataclasses.replace(
        params,
        prepare=dataclasses.replace(params.prepare, goal_radius_range=[0.1, 0.3]),
    )
    with pytest.raises(ValueError, match=r"goal_radius_range = \[0.1, 0.3\].*0.21"):
        gr.prepare(far, "goal_reacher", 0)


def test_env_of_unknown_experiment_raises():
    assert gr.env_of("goal_reacher") == "reacher"
    with pytest.raises(ValueError, match="goal_point_mass, goal_reacher"):
        gr.env_of("reacher")


def test_policy_log_prob_matches_torch_normal():
    policy = gr.Policy(4, (5,), "tanh", -0.7)
    theta = list(policy.init(3, torch.Generator().manual_seed(0)))
    theta[-1] = torch.tensor([[-0.7, 0.2], [0.0, -1.5], [0.3, 0.1]])
    obs = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1))
    actions = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(2))
    mean, log_p = policy.log_prob(tuple(theta), obs, actions)
    # reference: torch.distributions with a diagonal covariance
    reference = torch.distributions.Normal(mean, theta[-1].exp()[:, None])
    torch.testing.assert_close(log_p, reference.log_prob(actions).sum(-1))
    # the mean is the MLP: tanh(obs W1^T + b1) W2^T + b2
    w1, b1, w2, b2, _ = theta
    hidden = torch.tanh(obs @ w1.transpose(1, 2) + b1[:, None])
    torch.testing.assert_close(mean, hidden @ w2.transpose(1, 2) + b2[:, None])


def _hand_episodes():
    # one goal, two episodes of two steps; the rewards make the advantages
    # (reward-to-go minus its mean over episodes per step) easy by hand:
    # to-go e0 = [-3, -2], e1 = [-3, 0]; baseline [-3, -1]; A = [[0, -1], [0, 1]]
    obs = torch.tensor(
        [[[[1.0, 0.0], [0.5, -1.0]], [[0.0, 2.0], [-1.0, 1.0]]]], dtype=torch.float64
    )
    actions = torch.tensor(
        [[[[0.3, -0.2], [0.1, 0.4]], [[-0.5, 0.2], [0.7, -0.3]]]], dtype=torch.float64
    )
    rewards = torch.tensor([[[-1.0, -2.0], [-3.0, 0.0]]], dtype=torch.float64)
    return gr.Episodes(
        obs=obs,
        actions=actions,
        rewards=rewards,
        positions=torch.zeros(1, 2, 3, 2, dtype=torch.float64),
        goals=torch.zeros(1, 2, dtype=torch.float64),
    )


def test_advantages_hand_computed():
    expected = torch.tensor([[[0.0, -1.0], [0.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(gr.advantages(_hand_episodes().rewards), expected)


def test_reinforce_loss_gradient_matches_hand_computed():
    # a linear Gaussian policy, mean = W o + b, std = exp(log_std)
    policy = gr.Policy(2, (), "tanh", 0.0)
    w = torch.tensor([[[0.2, -0.1], [0.4, 0.3]]], dtype=torch.float64)
    b = torch.tensor([[0.05, -0.02]], dtype=torch.float64)
    log_std = torch.tensor([[-0.5, 0.1]], dtype=torch.float64)
    theta = gr.leaves((w, b, log_std))
    episodes = _hand_episodes()
    loss = gr.reinforce_loss(policy, theta, episodes)
    grads = torch.autograd.grad(loss.sum(), theta)

    # by hand: loss = -1/4 sum_r A_r log pi(a_r | o_r), and for a Gaussian
    # d log pi / d mu = (a - mu) / s^2, d log pi / d log s = (a - mu)^2 / s^2 - 1
    adv = torch.tensor([0.0, -1.0, 0.0, 1.0], dtype=torch.float64)
    o = episodes.obs.reshape(4, 2)
    a = episodes.actions.reshape(4, 2)
    mu = o @ w[0].T + b[0]
    var = torch.exp(2 * log_std[0])
    d_mu = -(adv[:, None] * (a - mu) / var) / 4  # d loss / d mu, [4, 2]
    want_w = d_mu.T @ o
    want_b = d_mu.sum(0)
    want_log_std = -(adv[:, None] * ((a - mu) ** 2 / var - 1)).sum(0) / 4
    torch.testing.assert_close(grads[0][0], want_w)
    torch.testing.assert_close(grads[1][0], want_b)
    torch.testing.assert_close(grads[2][0], want_log_std)


def _meta_loss(learned_loss, policy, theta, before, after, inner_lr):
    new = gr.sgd_step(
        gr.learned_objective(learned_loss, policy, theta, before),
        theta,
        inner_lr,
        create_graph=True,
    )
    return gr.reinforce_loss(policy, new, after).mean()


def _as_double(episodes):
    return gr.Episodes(
        **{
            f.name: getattr(episodes, f.name).double()
            for f in dataclasses.fields(episodes)
        }
    )


def test_meta_gradient_reaches_every_learned_loss_parameter_and_matches_fd():
    params, env, policy, goals, horizon = _setup("goal_point_mass")
    gen = torch.Generator().manual_seed(0)
    theta = policy.init(len(goals), gen)
    before = gr.sample_episodes(env, policy, theta, goals, 3, horizon, gen)
    after = gr.sample_episodes(env, policy, theta, goals, 3, horizon, gen)
    torch.manual_seed(0)
    learned_loss = LearnedLoss(
        gr.N_INPUTS["point_mass"],
        (8, 8),
        "elu",
        bias=True,
        init="default",
        output_activation="none",
    ).double()
    theta = gr.leaves(tuple(t.double() for t in theta))
    before, after = _as_double(before), _as_double(after)

    loss = _meta_loss(learned_loss, policy, theta, before, after, 0.1)
    loss.backward()
    # the output bias adds a constant to the loss: it moves no policy, so the
    # inner step, and with it the task loss, does not depend on it
    output_bias = f"net.{len(learned_loss.net) - 1}.bias"
    for name, p in learned_loss.named_parameters():
        if name == output_bias:
            assert p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    # the meta-gradient is second order: compare with a central difference
    # of the task loss along a random direction of phi, in float64
    direction = [
        torch.randn(p.shape, generator=gen, dtype=torch.float64)
        for p in learned_loss.parameters()
    ]
    analytic = sum(
        (p.grad * d).sum() if p.grad is not None else 0.0
        for p, d in zip(learned_loss.parameters(), direction, strict=True)
    ).item()
    eps = 1e-6

    def moved(sign):
        with torch.no_grad():
            for p, d in zip(learned_loss.parameters(), direction, strict=True):
                p.add_(sign * eps * d)
        value = _meta_loss(learned_loss, policy, theta, before, after, 0.1).item()
        with torch.no_grad():
            for p, d in zip(learned_loss.parameters(), direction, strict=True):
                p.sub_(sign * eps * d)
        return value

    numeric = (moved(1) - moved(-1)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-10)


def test_check_collapse_raises_on_constant_loss_not_on_fresh():
    params, env, policy, goals, horizon = _setup("goal_point_mass")
    gen = torch.Generator().manual_seed(0)
    theta = policy.init(len(goals), gen)
    episodes = gr.sample_episodes(env, policy, theta, goals, 3, horizon, gen)
    torch.manual_seed(0)
    learned_loss = gr.nets.learned_loss_for(
        params.learned_loss, gr.N_INPUTS["point_mass"]
    )
    check = gr.check_collapse(learned_loss, policy, theta, episodes, 1e-6, 0)
    assert check["grad_norm"] > 1e-6 and check["relative_spread"] > 1e-6
    with torch.no_grad():
        for p in learned_loss.parameters():
            p.zero_()
    with pytest.raises(LearnedLossCollapsed, match="outer iteration 7.*gradient norm"):
        gr.check_collapse(learned_loss, policy, theta, episodes, 1e-6, 7)


def test_meta_train_collapsed_loss_is_reported(monkeypatch):
    # a loss whose last layer is zero is constant from the start: the first
    # validation (iteration 0) must refuse it
    real = gr._fresh_learned_loss

    def zeroed(*args):
        loss = real(*args)
        with torch.no_grad():
            for p in loss.net[-1].parameters():
                p.zero_()
        return loss

    monkeypatch.setattr(gr, "_fresh_learned_loss", zeroed)
    params = tiny("goal_point_mass")
    data = gr.prepare(params, "goal_point_mass", 0)
    with pytest.raises(LearnedLossCollapsed, match="iteration 0"):
        gr.meta_train(params, "goal_point_mass", data, 0)


@cache
def _trained(experiment, seed=0):
    params = tiny(experiment)
    data = gr.prepare(params, experiment, seed)
    learned_loss, result = gr.meta_train(params, experiment, data, seed)
    return params, data, learned_loss, result


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_meta_train_runs_on_tiny_params(experiment):
    params, data, learned_loss, result = _trained(experiment)
    assert isinstance(learned_loss, LearnedLoss)
    assert learned_loss.config["n_inputs"] == gr.N_INPUTS[gr.env_of(experiment)]
    assert isinstance(result, MetaTrainResult)
    assert [h["iteration"] for h in result.history] == [1, 2, 3]
    assert {"task_loss", "return_before", "return_after", "meta_grad_norm"} <= set(
        result.history[0]
    )
    # validated at 0, every validate_every (2) and at the end (3)
    assert [v["iteration"] for v in result.validation] == [0, 2, 3]
    for row in result.validation:
        assert math.isfinite(row["val_return"]) and 0 <= row["val_success"] <= 1


def test_meta_train_same_seed_same_learned_loss():
    params, data, first, _ = _trained("goal_point_mass")
    second, _ = gr.meta_train(params, "goal_point_mass", data, 0)
    for (name, a), b in zip(
        first.state_dict().items(), second.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_evaluate_documented_columns_equal_env_steps(experiment):
    params, data, learned_loss, _ = _trained(experiment)
    tables = gr.evaluate(params, experiment, data, learned_loss, seed=0)
    curves, lrs, paths = tables["curves"], tables["baseline_lr"], tables["paths"]
    assert list(curves.columns) == [
        "seed", "method", "goal", "update", "env_steps", "mean_return", "success",
        "final_distance",
    ]  # fmt: skip
    assert list(lrs.columns) == ["seed", "lr", "train_return", "selected"]
    assert list(paths.columns) == [
        "seed", "method", "goal", "update", "episode", "t", "x", "y", "goal_x",
        "goal_y",
    ]  # fmt: skip
    n_updates, n_test = params.evaluate.n_updates, params.prepare.n_test_goals
    assert len(curves) == 2 * n_test * (n_updates + 1)
    # the same environment steps for both methods, update by update
    steps = curves.pivot_table("env_steps", ["goal", "update"], "method")
    assert (steps.learned == steps.reinforce).all()
    per_update = params.evaluate.episodes_per_update * params.prepare.horizon
    assert steps.learned.max() == n_updates * per_update
    # same policies and noise: the first batch is the same for both methods
    first = curves[curves["update"] == 0].pivot_table("mean_return", "goal", "method")
    np.testing.assert_array_equal(first.learned, first.reinforce)
    assert lrs.lr.tolist() == params.evaluate.baseline_lrs
    assert lrs.selected.sum() == 1
    assert lrs.train_return[lrs.selected].item() == lrs.train_return.max()
    assert set(paths["update"]) == {0, n_updates}
    assert paths.t.max() == params.prepare.horizon


def test_summary_paired_over_goals_and_seeds():
    # two seeds x two goals; learned is better by 1 on every pair at the end
    rows = []
    for seed in (0, 1):
        for goal in (0, 1):
            for update in (0, 1, 2):
                for method, bonus in (("learned", 1.0), ("reinforce", 0.0)):
                    rows.append(
                        {
                            "seed": seed,
                            "method": method,
                            "goal": goal,
                            "update": update,
                            "env_steps": update * 10,
                            "mean_return": -5.0 + goal + update + bonus * (update > 0),
                            "success": float(method == "learned"),
                            "final_distance": 0.1,
                        }
                    )
    out = gr.summary(pd.DataFrame(rows))
    assert out["final_update"] == 2 and out["halfway_update"] == 1
    # learned at update 2: returns -2, -1 for goals 0, 1 (both seeds)
    assert out["learned"]["final"]["return_mean"] == pytest.approx(-1.5)
    diff = out["learned_minus_reinforce"]["final"]["return"]
    assert diff["diff_mean"] == pytest.approx(1.0)
    assert diff["wins"] == 4 and diff["n_pairs"] == 4
