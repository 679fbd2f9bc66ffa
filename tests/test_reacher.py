"""The model-based reacher: simulator, dynamics model, gradients, collapse, stages."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import artifacts, nets
from pipeline.config import parse_experiment
from pipeline.meta import LearnedLossCollapsed
from pipeline.rl import envs, reacher
from pipeline.rl.dynamics import ProbabilisticEnsemble


def _params(**sections):
    """The repository's reacher params shrunk to a second, with overrides."""
    from tiny import tiny_params_dict

    params = parse_experiment("reacher", tiny_params_dict()["reacher"])
    tiny = {
        "prepare": {
            "horizon": 8,
            "n_train_goals": 3,
            "n_test_goals": 2,
            "n_random_rollouts": 12,
        },
        "optimizee": {"hidden_sizes": [8]},
        "learned_loss": {"hidden_sizes": [8, 8]},
        "meta_train": {
            "n_outer_iterations": 4,
            "validate_every": 2,
            "tasks_per_iteration": 2,
            "model_hidden_sizes": [16],
            "model_epochs": 3,
            "refresh_every": 2,
            "refresh_rollouts": 2,
            "refresh_epochs": 1,
        },
        "evaluate": {"n_steps": 2, "report_steps": [0, 2], "direct_lrs": [1e-4, 1e-3]},
    }
    for name, changes in sections.items():
        tiny[name] = {**tiny.get(name, {}), **changes}
    return dataclasses.replace(
        params,
        **{
            name: dataclasses.replace(getattr(params, name), **changes)
            for name, changes in tiny.items()
        },
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny ops: a second thread only adds barriers (see envs.one_thread)
    with envs.one_thread():
        yield


@pytest.fixture(scope="module")
def data():
    return reacher.prepare(_params(), seed=0)


def _setting(params):
    return reacher.Setting.of(params, params.prepare.horizon)


def test_reacher_sim_step_matches_dt():
    # the model integrates angles with reacher.DT; it must be the sim's step
    assert envs.ReacherSim(1).dt == pytest.approx(reacher.DT, abs=1e-12)


def test_reacher_sim_is_deterministic():
    rng = np.random.default_rng(3)
    starts = np.concatenate([rng.uniform(-2, 2, (3, 2)), np.zeros((3, 2))], 1)
    actions = rng.uniform(-1, 1, (3, 20, 2))
    # two separate simulators, same starts and torques: the same numbers
    first, second = reacher.replay(starts, actions), reacher.replay(starts, actions)
    np.testing.assert_array_equal(first, second)
    assert np.abs(first[:, -1] - first[:, 0]).max() > 0.1  # and the arms moved


def test_prepare_is_deterministic_per_seed(data):
    params = _params()
    again = reacher.prepare(params, seed=0)
    for key, value in data.items():
        np.testing.assert_array_equal(value, again[key], err_msg=key)
    other = reacher.prepare(params, seed=1)
    assert not np.array_equal(other["train_goals_xy"], data["train_goals_xy"])
    # the held-out goals are one spiral, the same for every seed
    np.testing.assert_array_equal(other["test_goals_xy"], data["test_goals_xy"])
    n, h = params.prepare.n_random_rollouts, params.prepare.horizon
    assert data["random_states"].shape == (n, h + 1, 4)
    assert data["random_actions"].shape == (n, h, 2)
    assert data["random_states"].dtype == np.float32
    # the joint goals put the fingertip on the fingertip goals
    tips = envs.fingertip(data["test_goals_q"].astype(np.float64))
    np.testing.assert_allclose(tips, data["test_goals_xy"], atol=1e-6)


def test_probabilistic_ensemble_fits_damped_linear_system():
    # a damped oscillator driven by a force, written out in NumPy:
    # dv = dt (-k x - c v + u), 1500 random transitions
    rng = np.random.default_rng(0)
    x, v, u = rng.uniform(-1, 1, (3, 1500))
    dt, k, c = 0.1, 2.0, 0.5
    dv = dt * (-k * x - c * v + u)
    inputs = torch.tensor(np.stack([x, v, u], 1), dtype=torch.float32)
    target = torch.tensor(dv[:, None], dtype=torch.float32)
    model = ProbabilisticEnsemble(
        3, 1, 2, [32, 32], generator=torch.Generator().manual_seed(0)
    )
    model.fit(
        inputs[:1200],
        target[:1200],
        epochs=40,
        lr=3e-3,
        batch_size=100,
        generator=torch.Generator().manual_seed(1),
    )
    # held-out MSE in standardized units, where the data's variance is 1
    assert model.mse(inputs[1200:], target[1200:]) < 0.01


def test_model_step_integrates_velocity_by_trapezoid():
    # a model that predicts a constant velocity change of (1, -2) per step
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, -2.0]]).expand(len(x), 2)

    state = torch.tensor([[0.5, 1.0, 3.0, 4.0]])
    nxt = reacher.model_step(Constant(), state, torch.zeros(1, 2))
    # by hand: v' = v + dv, q' = q + dt (v + v') / 2
    want = [0.5 + 0.02 * 3.5, 1.0 + 0.02 * 3.0, 4.0, 2.0]
    np.testing.assert_allclose(nxt[0].numpy(), want, rtol=1e-6)


def test_task_loss_by_hand():
    goal = torch.tensor([[0.0, 1.0]])
    # two steps: the states after the start are 2 and 1 rad from the goal (q2)
    states = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0], [0.0, 2.0, 0.0, 2.0]]]
    )
    got = reacher.task_loss(states, goal, final_weight=10.0, velocity_weight=0.5)
    # 10 * 1 + (2 + 1) / 2 + 0.5 * (1 + 4) / 2
    assert got.item() == pytest.approx(10 + 1.5 + 1.25)


def test_policy_is_squashed_into_control_range():
    theta = reacher.initial_policies([4], 3, torch.Generator().manual_seed(0))
    # huge output weights: tanh saturates at the torque limit, never beyond
    theta = (*theta[:2], theta[2] * 1e4, theta[3])
    states = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    actions = reacher.act(theta, states, torch.zeros(3, 2), torch.nn.Tanh())
    assert actions.shape == (3, 2)
    assert actions.abs().max() <= 1.0


def test_output_scale_quiets_only_the_output_layer():
    full = reacher.initial_policies([4], 3, torch.Generator().manual_seed(0))
    quiet = reacher.initial_policies(
        [4], 3, torch.Generator().manual_seed(0), output_scale=0.01
    )
    # same draws; the hidden layer as drawn, the output layer x 0.01
    torch.testing.assert_close(quiet[0], full[0])
    torch.testing.assert_close(quiet[1], full[1])
    torch.testing.assert_close(quiet[2], 0.01 * full[2])
    torch.testing.assert_close(quiet[3], 0.01 * full[3])
    states = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    loud = reacher.act(full, states, torch.zeros(3, 2), torch.nn.Tanh())
    calm = reacher.act(quiet, states, torch.zeros(3, 2), torch.nn.Tanh())
    assert calm.abs().max() < 0.05 * loud.abs().max()


def _float64_setup(seed=0):
    """A tiny float64 policy batch, model and learned loss."""
    params = _params(prepare={"horizon": 4})
    gen = torch.Generator().manual_seed(seed)
    dynamics = ProbabilisticEnsemble(reacher.N_FEATURES, 2, 2, [8], generator=gen)
    dynamics.double().requires_grad_(False)
    theta = tuple(
        t.double()
        for t in reacher.initial_policies([6], 2, torch.Generator().manual_seed(1))
    )
    goals_q = torch.tensor([[0.5, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    torch.manual_seed(seed)
    loss = nets.LearnedLoss(
        reacher.N_INPUTS, [6, 6], "elu", bias=True, init="default"
    ).double()
    mean = torch.tensor([0.1, 0.2, 1.0, -1.0, 0.0, 0.1, 2.0])
    std = torch.tensor([1.0, 1.5, 5.0, 5.0, 0.5, 0.5, 1.0])
    wrapped = reacher.StandardizedLoss(loss, mean, std).double()
    return params, dynamics, theta, goals_q, wrapped


def test_meta_gradient_matches_finite_differences():
    params, dynamics, theta, goals_q, loss = _float64_setup()
    setting = _setting(params)

    def objective():
        task, _, _ = reacher.unrolled_task_loss(
            loss, reacher.detach(theta), goals_q, dynamics, setting, inner_lr=0.05
        )
        return task.sum()

    params_phi = list(loss.parameters())
    analytic = torch.autograd.grad(objective(), params_phi)
    # central differences along one random direction in phi, float64
    gen = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params_phi]
    eps = 1e-6

    def moved(sign):
        with torch.no_grad():
            for p, d in zip(params_phi, direction, strict=True):
                p.add_(sign * eps * d)
        value = objective().item()
        with torch.no_grad():
            for p, d in zip(params_phi, direction, strict=True):
                p.sub_(sign * eps * d)
        return value

    numeric = (moved(1) - moved(-1)) / (2 * eps)
    exact = sum((g * d).sum() for g, d in zip(analytic, direction, strict=True)).item()
    assert exact == pytest.approx(numeric, rel=1e-6, abs=1e-10)
    assert abs(exact) > 1e-6  # and the check is not 0 == 0


def test_meta_gradient_reaches_every_learned_loss_parameter():
    params, dynamics, theta, goals_q, loss = _float64_setup(seed=3)
    task, _, _ = reacher.unrolled_task_loss(
        loss, reacher.detach(theta), goals_q, dynamics, _setting(params), 0.05
    )
    names = [name for name, _ in loss.named_parameters()]
    grads = torch.autograd.grad(task.sum(), list(loss.parameters()))
    for name, grad in zip(names, grads, strict=True):
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_grounded_rollout_has_sim_values_and_model_gradients():
    params, dynamics, theta, goals_q, _ = _float64_setup()
    goals = reacher.Goals(goals_q, envs.fingertip(goals_q.numpy()))
    theta = reacher.detach(theta)
    sim = envs.ReacherSim(2)
    setting = _setting(params)
    states, _ = reacher.rollout_grounded(
        theta, goals, dynamics, 4, setting.activation, sim
    )
    real, _ = reacher.rollout_grounded(theta, goals, None, 4, setting.activation, sim)
    # values: the simulator's; gradient: through the model, not zero
    np.testing.assert_array_equal(states.detach().numpy(), real.detach().numpy())
    grads = torch.autograd.grad(states[:, -1, :2].sum(), theta)
    assert sum(g.abs().sum() for g in grads) > 0
    assert not real.requires_grad or not any(
        g is not None
        for g in torch.autograd.grad(real[:, -1, :2].sum(), theta, allow_unused=True)
    )


def test_standardized_loss_folds_into_first_layer():
    torch.manual_seed(0)
    loss = nets.LearnedLoss(
        reacher.N_INPUTS, [16, 16], "elu", bias=True, init="default"
    )
    mean = torch.tensor([0.5, -1.0, 3.0, -2.0, 0.1, -0.1, 2.0])
    std = torch.tensor([2.0, 0.5, 10.0, 20.0, 0.7, 0.3, 1.5])
    wrapped = reacher.StandardizedLoss(loss, mean, std)
    folded = wrapped.folded()
    assert isinstance(folded, nets.LearnedLoss)
    rows = torch.randn(50, 7, generator=torch.Generator().manual_seed(1)) * std + mean
    inputs = (rows[:, :4], rows[:, 4:6], rows[:, 6])
    np.testing.assert_allclose(
        folded.pointwise(*inputs).detach().numpy(),
        wrapped.pointwise(*inputs).detach().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    # the wrapped loss is untouched, and the folded one has no extra tensors
    assert wrapped.loss.net[0].weight is loss.net[0].weight
    assert set(folded.state_dict()) == set(loss.state_dict())


def test_standardized_loss_rejects_wrong_statistics():
    loss = nets.LearnedLoss(reacher.N_INPUTS, [4], "elu", bias=True)
    with pytest.raises(ValueError, match=r"shape \(7,\).*mean \(6,\)"):
        reacher.StandardizedLoss(loss, torch.zeros(6), torch.ones(7))
    no_bias = nets.LearnedLoss(reacher.N_INPUTS, [4], "elu", bias=False)
    with pytest.raises(ValueError, match="bias"):
        reacher.StandardizedLoss(no_bias, torch.full((7,), 0.5), torch.ones(7))
    # scaling alone folds without a bias
    scaled = reacher.StandardizedLoss(no_bias, torch.zeros(7), torch.full((7,), 2.0))
    rows = (torch.ones(3, 4), torch.ones(3, 2), torch.ones(3))
    torch.testing.assert_close(
        scaled.folded().pointwise(*rows), scaled.pointwise(*rows)
    )


def _collapse_check(loss):
    params, dynamics, theta, goals_q, _ = _float64_setup()
    setting = _setting(params)
    return reacher.check_collapse(
        loss.double(),
        theta,
        goals_q,
        dynamics,
        4,
        setting.activation,
        tolerance=1e-6,
        iteration=7,
    )


def _fresh_loss():
    torch.manual_seed(0)
    return nets.LearnedLoss(reacher.N_INPUTS, [8, 8], "elu", bias=True, init="default")


def test_check_collapse_raises_on_zeroed_loss():
    loss = _fresh_loss()
    with torch.no_grad():
        for p in loss.parameters():
            p.zero_()
    # every output is softplus(0): constant, and no gradient
    with pytest.raises(LearnedLossCollapsed, match="iteration 7.*spread of 0"):
        _collapse_check(loss)


def test_check_collapse_raises_on_loss_that_ignores_its_inputs():
    loss = _fresh_loss()
    with torch.no_grad():
        loss.net[0].weight.zero_()  # the rest is intact, but sees no input
    with pytest.raises(LearnedLossCollapsed, match="gradient w.r.t. the policy"):
        _collapse_check(loss)


def test_check_collapse_passes_fresh_loss():
    measured = _collapse_check(_fresh_loss())
    assert measured["loss_spread"] > 1e-3
    assert measured["inner_grad_norm"] > 1e-3


def test_meta_train_stops_early_when_loss_collapses(data, monkeypatch):
    build = nets.learned_loss_for

    def zeroed(p, n_inputs):
        loss = build(p, n_inputs)
        with torch.no_grad():
            for param in loss.parameters():
                param.zero_()
        return loss

    monkeypatch.setattr(reacher.nets, "learned_loss_for", zeroed)
    params = _params(meta_train={"n_outer_iterations": 50, "validate_every": 1})
    with pytest.raises(LearnedLossCollapsed, match="iteration 0") as err:
        reacher.meta_train(params, data, seed=0, variant="ml3")
    assert len(err.value.result.history) == 0


def test_meta_train_runs_on_tiny_params(data, tmp_path):
    params = _params()
    out = reacher.meta_train(params, data, seed=0, variant="ml3")
    history = pd.DataFrame(out.result.history)
    assert list(history.iteration) == [1, 2, 3, 4]
    assert {"task_loss", "task_loss_before", "meta_grad_norm"} <= set(history)
    validation = pd.DataFrame(out.result.validation)
    assert list(validation.iteration) == [0, 2, 4]
    assert {"val_final_distance", "val_final_joint_distance"} <= set(validation)
    # the first fit and one refit per refresh_every iterations
    fits = pd.DataFrame(out.model_fits)
    assert list(fits.iteration) == [0, 2, 4]
    assert np.isfinite(fits.drop(columns=["fit", "iteration"]).to_numpy()).all()
    # both artifacts survive the pipeline's save and load
    artifacts.save_learned_loss(tmp_path / "loss", out.learned_loss)
    loaded = artifacts.load_learned_loss(tmp_path / "loss")
    rows = (torch.randn(5, 4), torch.randn(5, 2), torch.rand(5))
    torch.testing.assert_close(
        loaded.pointwise(*rows), out.learned_loss.pointwise(*rows)
    )
    reacher.save_dynamics(tmp_path / "dynamics", out.dynamics)
    dynamics = reacher.load_dynamics(tmp_path / "dynamics")
    x = torch.randn(5, reacher.N_FEATURES)
    torch.testing.assert_close(dynamics(x), out.dynamics(x))
    # same seed, same numbers
    again = reacher.meta_train(params, data, seed=0, variant="ml3")
    assert again.result.history == out.result.history


def test_meta_train_rejects_unknown_variant(data):
    with pytest.raises(ValueError, match="'mine'.*ml3, authors"):
        reacher.meta_train(_params(), data, seed=0, variant="mine")


def test_evaluate_returns_documented_columns(data):
    params = _params()
    torch.manual_seed(0)
    loss = nets.learned_loss_for(params.learned_loss, reacher.N_INPUTS)
    dynamics = reacher.build_dynamics(params.meta_train, torch.Generator())
    x, y = reacher.transitions(data["random_states"], data["random_actions"])
    dynamics.set_normalization(x, y)
    dynamics.requires_grad_(False)
    tables = reacher.evaluate(params, data, loss, dynamics, seed=0)
    keys = [
        "seed",
        "method",
        "goal",
        "goal_x",
        "goal_y",
        "test_step",
        "final_distance",
        "final_joint_distance",
        "task_loss",
        "success",
    ]
    outcomes = tables["outcomes"]
    assert list(outcomes.columns) == keys
    n_test, n_steps = params.prepare.n_test_goals, params.evaluate.n_steps
    assert len(outcomes) == 2 * n_test * (n_steps + 1)
    # the same fresh policy for both methods: equal at step 0
    start = outcomes[outcomes.test_step == 0].pivot(
        index="goal", columns="method", values="final_distance"
    )
    np.testing.assert_array_equal(start.learned, start.direct)
    trajectories = tables["trajectories"]
    assert list(trajectories.columns) == [
        *keys,
        *["t", "q1", "q2", "dq1", "dq2", "x", "y"],
    ]
    assert set(trajectories.test_step) == set(params.evaluate.report_steps)
    assert len(trajectories) == 2 * n_test * 2 * (params.prepare.horizon + 1)
    direct_lr = tables["direct_lr"]
    assert list(direct_lr.columns) == ["lr", "train_final_distance", "selected"]
    assert direct_lr.selected.sum() == 1
    assert direct_lr.train_final_distance[direct_lr.selected].item() == pytest.approx(
        direct_lr.train_final_distance.min()
    )


def test_summary_by_hand():
    rows = []
    for seed in (0, 1):
        for goal in (0, 1):
            for method, distance in (("learned", 0.01 * (goal + 1)), ("direct", 0.05)):
                rows.append(
                    {
                        "seed": seed,
                        "method": method,
                        "goal": goal,
                        "test_step": 1,
                        "final_distance": distance + 0.01 * seed,
                        "success": distance < 0.02,
                    }
                )
    got = reacher.summary(pd.DataFrame(rows), [1])
    # learned: 0.01, 0.02, 0.02, 0.03 -> mean 0.02; half succeed
    assert got["learned"]["step_1"]["final_distance_mean"] == pytest.approx(0.02)
    assert got["learned"]["step_1"]["success_rate"] == 0.5
    assert got["direct"]["step_1"]["success_rate"] == 0.0
    paired = got["learned_minus_direct"]["step_1"]
    assert paired["n_pairs"] == 4 and paired["wins"] == 4
    assert paired["diff_mean"] == pytest.approx(-0.035)
    with pytest.raises(ValueError, match=r"report steps \[5\]"):
        reacher.summary(pd.DataFrame(rows), [5])


def test_animate_writes_gif(tmp_path):
    t = np.arange(3)
    frame = pd.DataFrame(
        {
            "seed": 0,
            "method": np.repeat(["learned", "direct"], 3),
            "goal": 0,
            "goal_x": 0.1,
            "goal_y": 0.05,
            "test_step": 2,
            "t": np.tile(t, 2),
            "q1": np.tile(0.3 * t, 2),
            "q2": np.tile(0.5 * t, 2),
        }
    )
    path = tmp_path / "arm.gif"
    reacher.animate(frame, path, fps=5, title="test")
    assert path.read_bytes()[:6] == b"GIF89a"
    assert math.isfinite(path.stat().st_size)
