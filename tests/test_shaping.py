"""The shaping experiments: mountain car physics, landscapes, hidden information."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import frequency, mountain_car, shaping
from pipeline.config import parse_experiment
from pipeline.meta import LearnedLossCollapsed
from pipeline.nets import LearnedLoss


def _params(name):
    from tiny import tiny_params_dict

    return parse_experiment(name, tiny_params_dict()[name])


def numpy_step(position, velocity, action):
    """The paper's mountain car equations, written out once more in NumPy."""
    action = min(max(action, -0.25), 0.25)
    velocity = (
        velocity
        + (-9.8 * 0.2 * np.cos(3 * position) + action / 0.2 - 0.3 * velocity) * 0.1
    )
    velocity = min(max(velocity, -1.5), 1.5)
    position = min(max(position + 0.1 * velocity, -1.2), 0.5)
    if position == -1.2 and velocity < 0:
        velocity = 0.0
    return position, velocity


def test_torch_mountain_car_matches_numpy_step():
    rng = np.random.default_rng(0)
    # random states and actions, plus the clipped cases: wall, speed, action
    states = np.concatenate(
        [
            np.stack([rng.uniform(-1.2, 0.5, 200), rng.uniform(-1.5, 1.5, 200)], 1),
            [[-1.19, -1.4], [0.49, 1.5], [-0.5, 1.49], [-1.2, -0.1]],
        ]
    )
    actions = np.concatenate([rng.uniform(-0.6, 0.6, 200), [0.0, 0.3, 1.0, -1.0]])
    got = mountain_car.step(
        torch.tensor(states, dtype=torch.float64), torch.tensor(actions)
    ).numpy()
    want = np.array(
        [numpy_step(p, v, a) for (p, v), a in zip(states, actions, strict=True)]
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert got[-4, 1] == 0.0 and got[-4, 0] == -1.2  # stopped at the left wall


def test_gradient_flows_from_final_state_to_policy():
    theta = tuple(
        t.double().requires_grad_(True)
        for t in mountain_car.initial_policy(16, torch.Generator().manual_seed(0))
    )
    start = torch.tensor([[-0.55, 0.0]], dtype=torch.float64)
    states, _ = mountain_car.rollout(theta, start, 35)
    grads = torch.autograd.grad(states[0, -1, 0], theta)
    assert all(g.abs().sum() > 0 for g in grads)
    # and it is the derivative: compare with a central finite difference
    direction = [torch.randn_like(t) for t in theta]
    eps = 1e-6

    def final(sign):
        moved = tuple(
            t.detach() + sign * eps * d for t, d in zip(theta, direction, strict=True)
        )
        return mountain_car.rollout(moved, start, 35)[0][0, -1, 0].item()

    numeric = (final(1) - final(-1)) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction, strict=True)).item()
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_count_local_minima_on_known_functions():
    x = np.linspace(-7, 7, 2001)
    assert frequency.count_local_minima(np.cos(x)) == 2  # at -pi and pi
    x = np.linspace(0, 2 * np.pi, 2001)
    assert frequency.count_local_minima(np.sin(3 * x)) == 3  # pi/2, 7pi/6, 11pi/6
    assert frequency.count_local_minima(x**2) == 0  # minimum at the left end only
    # a flat bottom counts once, a flat shoulder not at all
    assert frequency.count_local_minima(np.array([3, 1, 1, 1, 2, 2, 3])) == 1
    assert frequency.count_local_minima(np.array([3, 2, 2, 1, 4])) == 1


def test_shallow_minima_are_filtered_by_prominence():
    from scipy.signal import find_peaks

    x = np.linspace(-7, 7, 2001)
    rippled = np.cos(x) + 0.002 * np.sin(60 * x)
    assert frequency.count_local_minima(rippled) > 10
    assert frequency.count_local_minima(rippled, 0.01) == 2
    # depths: 1 is 0.25 of the range deep (barrier 2), 0 is 0.75 (barrier 3)
    curve = np.array([3.0, 1.0, 2.0, 0.0, 4.0])
    assert frequency.count_local_minima(curve, 0.4) == 1
    assert frequency.count_local_minima(curve, 0.2) == 2
    # the same depths as SciPy's prominence of the negated curve
    rng = np.random.default_rng(0)
    noisy = np.cumsum(rng.normal(size=500))
    for fraction in (0.01, 0.05, 0.2):
        height = fraction * (noisy.max() - noisy.min())
        peaks, _ = find_peaks(-noisy, prominence=height)
        assert frequency.count_local_minima(noisy, fraction) == len(peaks)


def test_mse_landscape_has_the_paper_structure():
    """Many minima for MSE, the lowest one at the target frequency."""
    x = torch.linspace(-5, 5, 64)
    grid = torch.linspace(-7, 7, 1401)
    values = frequency.landscape(frequency.mse_pointwise, grid, x, 0.5).numpy()
    assert grid[np.argmin(values)].item() == pytest.approx(0.5, abs=0.011)
    assert frequency.count_local_minima(values) >= 8


def _capture_inputs(loss: LearnedLoss) -> list:
    seen = []
    loss.net.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    return seen


@pytest.mark.parametrize("name", ["frequency", "mountain_car"])
def test_learned_loss_never_sees_the_extra_information(name):
    """Inputs to M_phi: same width and values with and without shaping.

    Both variants start from the same learned loss and the same first task:
    their first inner step must feed M_phi identical rows, and so must the
    meta-test of the two trained losses (the task loss is the only
    difference). For the mountain car, moving the intermediate goal (the
    extra information) must not change them either.
    """
    params = _params(name)
    module = frequency if name == "frequency" else mountain_car
    first_inner = params.meta_train.unrolls_per_task  # after the validation calls
    seen_train, seen_test = {}, {}
    for variant, moved in (("shaped", False), ("unshaped", False), ("shaped", True)):
        torch.manual_seed(0)
        loss = LearnedLoss(module.N_INPUTS, [8], "elu", bias=True)
        seen = _capture_inputs(loss)
        theta0 = mountain_car.initial_policy(8, torch.Generator().manual_seed(1))
        if name == "frequency":
            data = frequency.prepare(params, np.random.default_rng(0))
            frequency.meta_train(
                loss, params, data, variant, torch.Generator().manual_seed(1)
            )
        else:
            data = mountain_car.prepare(params)
            if moved:
                data["intermediate_goal"] = data["intermediate_goal"] + 0.3
            mountain_car.meta_train(loss, params, data, variant, theta0)
        seen_train[(variant, moved)] = seen[first_inner]
        seen.clear()
        if name == "frequency":
            frequency.evaluate(params, data, {variant: loss.pointwise}, 0)
        else:
            objective = lambda th, task, starts, fn=loss: (  # noqa: E731
                mountain_car.learned_objective(fn, th, task, starts)
            )
            mountain_car.evaluate(params, data, {variant: objective}, theta0, 0)
        seen_test[(variant, moved)] = seen[0]
    for seen in (seen_train, seen_test):
        first = seen[("shaped", False)]
        assert first.dim() == 2 and first.shape[1] == module.N_INPUTS
        for other in seen.values():
            torch.testing.assert_close(other, first)


def test_shaped_task_loss_uses_the_true_frequency_only():
    theta = torch.tensor([0.3, -1.0])
    x = torch.rand(2, 5)
    y = torch.sin(torch.tensor([[2.0], [-3.0]]) * x)
    omega = torch.tensor([2.0, -3.0])
    shaped = frequency.task_loss("shaped", theta, x, y, omega)
    assert shaped.item() == pytest.approx(((0.3 - 2) ** 2 + (-1 + 3) ** 2) / 2)
    unshaped = frequency.task_loss("unshaped", theta, x, y, omega + 1)
    torch.testing.assert_close(
        unshaped, ((torch.sin(theta[:, None] * x) - y) ** 2).mean()
    )
    with pytest.raises(ValueError, match="valid: shaped, unshaped"):
        frequency.task_loss("both", theta, x, y, omega)


def test_meta_gradient_through_the_frequency_step_matches_finite_differences():
    torch.manual_seed(0)
    loss = LearnedLoss(3, [5], "elu", bias=True, output_activation="none").double()
    x = torch.linspace(-2, 2, 16, dtype=torch.float64)[None]
    y, omega = torch.sin(1.3 * x), torch.tensor([1.3], dtype=torch.float64)
    theta = (torch.tensor([0.2], dtype=torch.float64, requires_grad=True),)

    def objective():
        new = shaping.sgd_step(
            frequency.total_loss(loss.pointwise, theta[0], x, y),
            theta,
            0.5,
            create_graph=True,
        )
        return frequency.task_loss("shaped", new[0], x, y, omega)

    weight = loss.net[0].weight
    (analytic,) = torch.autograd.grad(objective(), weight)
    numeric = torch.zeros_like(weight)
    eps = 1e-6
    with torch.no_grad():
        for index in np.ndindex(*weight.shape):
            weight[index] += eps
            with torch.enable_grad():
                up = objective().item()
            weight[index] -= 2 * eps
            with torch.enable_grad():
                down = objective().item()
            weight[index] += eps
            numeric[index] = (up - down) / (2 * eps)
    assert analytic.abs().max() > 1e-4
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_constant_loss_is_detected_as_collapsed():
    params = _params("mountain_car")
    data = mountain_car.prepare(params)
    loss = LearnedLoss(mountain_car.N_INPUTS, [8], "elu", bias=True)
    torch.nn.init.zeros_(loss.net[-1].weight)  # output = softplus(bias): constant
    theta0 = mountain_car.initial_policy(8, torch.Generator().manual_seed(0))
    task = mountain_car.task_from(data)
    with pytest.raises(LearnedLossCollapsed, match="collapsed"):
        shaping.check_gradient(loss, mountain_car.learned_objective, theta0, task)
    torch.manual_seed(0)
    healthy = LearnedLoss(mountain_car.N_INPUTS, [8], "elu", bias=True)
    assert (
        shaping.check_gradient(healthy, mountain_car.learned_objective, theta0, task)
        > 0
    )


def test_outcomes_mark_success_at_the_flag():
    import pandas as pd

    traj = pd.DataFrame(
        {
            "seed": 0,
            "method": ["a"] * 3 + ["b"] * 3,
            "start_position": -0.55,
            "test_step": 1,
            "t": [0, 1, 2] * 2,
            "position": [-0.55, 0.5, 0.4, -0.55, -0.6, -0.3],
            "velocity": 0.0,
            "action": [0.3, -0.25, np.nan, 0.1, -0.2, np.nan],
        }
    )
    out = mountain_car.outcomes(traj, 0.5).set_index("method")
    assert out.success.to_dict() == {"a": True, "b": False}
    assert out.final_position.to_dict() == {"a": 0.4, "b": -0.3}
    assert out.clipped_fraction.to_dict() == {"a": 1.0, "b": 0.0}
