"""Every stage runs on tiny params into a temporary folder, MLflow included."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import artifacts, tracking
from pipeline.config import EXPERIMENTS
from pipeline.layout import Layout, seed_dir
from stages import evaluate, generalize, meta_train, prepare, report


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, mlflow_store):
    """All stages, both experiments, on tiny params: (root, params path)."""
    from tiny import REPO, TINY_CELLS, tiny_params_dict, write_params

    root = tmp_path_factory.mktemp("stages")
    params = write_params(root / "params.yaml", tiny_params_dict())
    shutil.copytree(REPO / "benchmarks", root / "benchmarks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_store)
        for name in EXPERIMENTS:
            prepare.run(name, params, root)
            meta_train.run(name, params, root)
            evaluate.run(name, params, root)
        for cell in TINY_CELLS:
            generalize.run(cell, params, root)
        report.run(params, root)
    return root, params


def test_prepare_writes_tasks_and_splits(pipeline_run):
    root, _ = pipeline_run
    layout = Layout(root)
    sine = layout.read_prepared("sine", 1)
    assert sine["test_x"].shape == (3, 20, 1) and sine["test_x_heldout"].shape == (
        3,
        10,
        1,
    )
    # y = A sin(x - p) on every test task (the task definition of the paper)
    want = sine["test_amplitude"][:, None, None] * np.sin(
        sine["test_x"] - sine["test_phase"][:, None, None]
    )
    np.testing.assert_allclose(sine["test_y"], want, rtol=1e-5, atol=1e-6)
    mnist = layout.read_prepared("mnist", 0)
    assert mnist["x_train"].shape == (600, 784)
    assert len(mnist["y_val"]) == len(mnist["y_test"]) == 200
    rows = [set(mnist[f"index_{s}"]) for s in ("train", "val", "test")]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert mnist["y_train"].mean() == pytest.approx(0.5)


def test_meta_train_writes_losses_curves_and_metrics(pipeline_run):
    root, _ = pipeline_run
    layout = Layout(root)
    for name in ("sine", "mnist"):
        for seed in (0, 1):
            folder = seed_dir(layout.models(name), seed)
            loss = artifacts.load_learned_loss(folder)
            assert loss(torch.zeros(4, 1), torch.ones(4)).shape == ()
            curve = pd.read_csv(folder / "meta_curve.csv")
            assert list(curve.iteration) == list(range(1, 7))
            assert np.isfinite(curve.task_loss).all()
        metrics = artifacts.read_json(layout.metrics(name, "meta_train"))
        assert set(metrics) == {"mean", "seed_0", "seed_1", "stage_seconds"}


def test_evaluate_writes_long_curves_for_both_methods(pipeline_run):
    root, _ = pipeline_run
    sine = pd.read_csv(Layout(root).results("sine") / "curves.csv")
    assert set(sine.method) == {"learned", "mse"}
    assert set(sine.split) == {"train", "heldout"}
    assert sorted(sine.step.unique()) == [0, 2, 4, 6]
    # 2 methods x 2 seeds x 3 tasks x 2 runs x 4 steps x 2 splits
    assert len(sine) == 2 * 2 * 3 * 2 * 4 * 2
    # identical initial weights for both losses: equal values at step 0
    start = sine[sine.step == 0].pivot_table(
        index=["seed", "task", "run", "split"], columns="method", values="value"
    )
    np.testing.assert_allclose(start["learned"], start["mse"])
    mnist = pd.read_csv(Layout(root).results("mnist") / "curves.csv")
    assert set(mnist.metric) == {"accuracy", "cross_entropy"}
    assert set(mnist.split) == {"train", "val", "test"}


def test_report_has_tables_figures_and_self_contained_html(pipeline_run):
    root, _ = pipeline_run
    reports = Layout(root).reports
    html = (reports / "report.html").read_text()
    # 10 experiment and performance figures, 4 of the generalization grid, 9 RL
    assert html.count("data:image/png;base64,") == 23
    assert html.count("data:image/gif;base64,") == 2
    assert "http://" not in html and "https://" not in html
    md = (reports / "report.md").read_text()
    for figure in (
        "sine_meta_train",
        "sine_meta_test",
        "mnist_meta_train",
        "mnist_meta_test",
    ):
        assert f"figures/{figure}.png" in md
        assert (reports / "figures" / f"{figure}.png").stat().st_size > 1000
    long = pd.read_csv(reports / "tables" / "final_long.csv")
    assert {"experiment", "method", "seed", "task", "metric", "value"} <= set(long)
    assert "seeds won" in pd.read_csv(reports / "tables" / "sine_comparison.csv")
    # the performance section reads the committed benchmark results
    assert "## Performance" in md and "speed-up" in md
    assert (reports / "figures" / "performance.png").stat().st_size > 1000


def test_mlflow_has_runs_params_histories_and_tags(pipeline_run, mlflow_store):
    client = mlflow.MlflowClient(tracking_uri=mlflow_store)
    exp = client.get_experiment_by_name("ml3-sine")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.stage = 'meta_train' and tags.seed = '1'",
    )
    assert runs
    run = runs[0]
    assert run.data.params["meta_train.outer_lr"] == "0.001"
    assert len(run.data.tags["params_hash"]) == 12 and run.data.tags["git_commit"]
    history = client.get_metric_history(run.info.run_id, "task_loss")
    assert [m.step for m in history] == list(range(1, 7))
    assert "mlflow.parentRunId" in run.data.tags
    artifacts_ = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"learned_loss_weights", "meta_curve.csv"} <= artifacts_


def test_registered_loss_loads_by_name_and_version(pipeline_run, mlflow_store):
    root, _ = pipeline_run
    loaded = tracking.load_registered_loss(
        "ml3-sine-loss", "latest", tracking=mlflow_store
    )
    saved = artifacts.load_learned_loss(seed_dir(Layout(root).models("sine"), 1))
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    torch.testing.assert_close(loaded(x, y), saved(x, y))
    client = mlflow.MlflowClient(tracking_uri=mlflow_store)
    version = client.get_model_version(
        "ml3-sine-loss",
        str(
            max(
                int(v.version)
                for v in client.search_model_versions("name = 'ml3-sine-loss'")
            )
        ),
    )
    assert version.tags["seed"] == "1"
    with pytest.raises(LookupError, match="no registered model named 'nope'"):
        tracking.load_registered_loss("nope", tracking=mlflow_store)


def test_collapsed_loss_fails_the_run_and_is_not_registered(tmp_path, monkeypatch):
    """Stage exit 3, MLflow run FAILED, no model version, no models/ folder."""
    from tiny import tiny_params_dict, write_params

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    params = tiny_params_dict()
    params["sine"]["meta_train"]["outer_lr"] = 1e-15
    path = write_params(tmp_path / "params.yaml", params)
    prepare.run("sine", path, tmp_path)

    monkeypatch.setattr(meta_train, "build_learned_loss", _zeroed_builder())
    status = meta_train._cli.main(
        meta_train.run,
        meta_train.__doc__,
        ["sine", "--params", str(path), "--root", str(tmp_path)],
    )
    assert status == 3
    assert not Layout(tmp_path).models("sine").exists()
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    exp = client.get_experiment_by_name("ml3-sine")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'meta_train'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not client.search_registered_models()


def _zeroed_builder():
    from pipeline.experiments import build_learned_loss

    def build(exp, p):
        loss = build_learned_loss(exp, p)
        torch.nn.init.zeros_(loss.net[-1].weight)
        return loss

    return build


def test_shaping_experiments_write_both_variants_and_their_tables(pipeline_run):
    root, _ = pipeline_run
    layout = Layout(root)
    for name in ("frequency", "mountain_car"):
        for seed in (0, 1):
            for variant in ("shaped", "unshaped"):
                folder = seed_dir(layout.models(name), seed) / variant
                loss = artifacts.load_learned_loss(folder)
                assert loss.config["n_inputs"] == (3 if name == "frequency" else 4)
                curve = pd.read_csv(folder / "meta_curve.csv")
                assert list(curve.iteration) == [1, 2, 3, 4]
        metrics = artifacts.read_json(layout.metrics(name, "meta_train"))
        assert set(metrics["mean"]) == {"shaped", "unshaped"}
    results = layout.results("frequency")
    minima = pd.read_csv(results / "minima.csv")
    assert set(minima.method) == {"shaped", "unshaped", "mse"}
    # 3 methods x 2 seeds x 2 targets
    assert len(minima) == 12 and (minima.n_local_minima >= 0).all()
    conv = pd.read_csv(results / "convergence.csv")
    start = conv[conv.step == 0]
    assert set(start.theta) == {-4.0, 4.0}  # every loss starts from the same theta
    assert sorted(conv.step.unique()) == [0, 1, 2, 3]
    land = pd.read_csv(results / "landscape.csv")
    assert len(land) == 3 * 2 * 2 * 101 and np.isfinite(land.value).all()

    results = layout.results("mountain_car")
    outcomes = pd.read_csv(results / "outcomes.csv")
    assert set(outcomes.method) == {"shaped", "unshaped", "distance"}
    assert sorted(outcomes.start_position.unique()) == [-0.55, -0.4]
    assert sorted(outcomes.test_step.unique()) == [0, 1, 2]
    # before any meta-test step every method rolls out the same policy
    first = outcomes[outcomes.test_step == 0].groupby(["seed", "start_position"])
    assert (first.final_position.nunique() == 1).all()
    gif = (results / "animation.gif").read_bytes()
    assert gif[:6] in (b"GIF87a", b"GIF89a")
    from PIL import Image

    with Image.open(results / "animation.gif") as image:
        # one frame per time step (13); Pillow merges frames that look alike
        assert image.is_animated and 8 <= image.n_frames <= 13
    metrics = artifacts.read_json(layout.metrics("mountain_car", "evaluate"))
    assert "from_train_start_success_step_2" in metrics["mean"]["shaped"]


def test_shaping_losses_are_registered_per_variant(pipeline_run, mlflow_store):
    client = mlflow.MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    names = {m.name for m in client.search_registered_models()}
    assert {
        "ml3-frequency-shaped-loss",
        "ml3-frequency-unshaped-loss",
        "ml3-mountain_car-shaped-loss",
        "ml3-mountain_car-unshaped-loss",
    } <= names
    exp = client.get_experiment_by_name("ml3-mountain_car")
    runs = client.search_runs(
        [exp.experiment_id], filter_string="tags.variant = 'shaped'"
    )
    assert len(runs) == 2  # one nested meta-train run per seed
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {
        "learned_loss_weights",
        "meta_curve.csv",
    }


def test_mountain_car_meta_test_repeats_the_final_validation(pipeline_run):
    """From the meta-train start, one meta-test step = meta-training's check."""
    root, _ = pipeline_run
    layout = Layout(root)
    outcomes = pd.read_csv(layout.results("mountain_car") / "outcomes.csv")
    for seed in (0, 1):
        for variant in ("shaped", "unshaped"):
            folder = seed_dir(layout.models("mountain_car"), seed) / variant
            last = pd.read_csv(folder / "validation.csv").iloc[-1]
            row = outcomes[
                (outcomes.seed == seed)
                & (outcomes.method == variant)
                & (outcomes.start_position == -0.55)
                & (outcomes.test_step == 1)
            ]
            assert row.final_position.item() == pytest.approx(
                last.val_final_position, abs=1e-6
            )


def test_generalize_writes_curves_summary_and_metrics_per_cell(pipeline_run):
    from tiny import TINY_CELLS

    root, _ = pipeline_run
    for cell in TINY_CELLS:
        folder = root / "results" / "generalize" / cell
        curves = pd.read_csv(folder / "curves.csv")
        summary = pd.read_csv(folder / "summary.csv")
        assert set(curves.seed) == {0, 1} and set(curves.cell) == {cell}
        assert sorted(summary.step.unique()) == [2, 4]
        assert (summary.n_seeds == 2).all()
        assert np.isfinite(summary.learned_mean).all()
        metrics = artifacts.read_json(root / "metrics" / f"generalize_{cell}.json")
        assert set(metrics["checkpoints"]) == {"2", "4"}
    ten = pd.read_csv(root / "results/generalize/mnist_data_ten_way/curves.csv")
    # 10-way accuracy starts near chance, far from a binary task's 0.5
    start = ten[(ten.step == 0) & (ten.metric == "accuracy")].value.mean()
    assert start < 0.3


def test_generalize_runs_are_filterable_by_cell_axis_and_horizon(
    pipeline_run, mlflow_store
):
    client = mlflow.MlflowClient(tracking_uri=mlflow_store)
    mnist = client.get_experiment_by_name("ml3-mnist").experiment_id
    cnn = client.search_runs(
        [mnist], "tags.stage = 'generalize' and tags.architecture LIKE 'cnn%'"
    )
    # the stage run, one run per seed and one per checkpoint
    assert {r.info.run_name for r in cnn} == {
        "generalize/mnist_arch_cnn",
        "generalize/mnist_arch_cnn/seed=0",
        "generalize/mnist_arch_cnn/seed=1",
        "generalize/mnist_arch_cnn/horizon=2",
        "generalize/mnist_arch_cnn/horizon=4",
    }
    late = client.search_runs(
        [mnist], "tags.horizon = '4' and tags.dataset = 'mnist 10-way'"
    )
    assert len(late) == 1
    assert "test_accuracy_diff_mean" in late[0].data.metrics
    seed_run = client.search_runs(
        [mnist], "attributes.run_name = 'generalize/mnist_arch_cnn/seed=1'"
    )[0]
    history = client.get_metric_history(seed_run.info.run_id, "learned/test_accuracy")
    assert [m.step for m in history] == [0, 1, 2, 4]


def test_report_has_the_transfer_matrix_and_verdicts(pipeline_run):
    root, _ = pipeline_run
    reports = Layout(root).reports
    md = (reports / "report.md").read_text()
    assert "## Generalization to unseen settings" in md
    assert "figures/generalize_matrix.png" in md
    assert (reports / "figures" / "generalize_matrix.png").stat().st_size > 5000
    from pipeline.report_generalize import VERDICTS

    verdicts = pd.read_csv(reports / "tables" / "generalize_verdicts.csv")
    for step in ("step 2", "step 4"):
        assert {v.rpartition(" (")[0] for v in verdicts[step]} <= set(VERDICTS)
    claims = set(verdicts.claim)
    assert "carries to unseen architectures" in claims
    assert "carries to other learning rates" in claims
    minimizers = pd.read_csv(reports / "tables" / "generalize_sine_minimizers.csv")
    assert list(minimizers.seed) == [0, 1]
    assert np.isfinite(minimizers["minimizer / target (mean)"]).all()
    matrix = pd.read_csv(reports / "tables" / "generalize_matrix.csv")
    # one row per cell and matrix metric: 3 sine cells, 4 MNIST cells x 2
    assert len(matrix) == 3 + 4 * 2
    assert {"step 2", "step 4"} <= set(matrix.columns)


def test_reacher_writes_loss_model_outcomes_and_animation(pipeline_run):
    root, _ = pipeline_run
    layout = Layout(root)
    for seed in (0, 1):
        folder = seed_dir(layout.models("reacher"), seed)
        loss = artifacts.load_learned_loss(folder / "ml3")
        # (state [N, 4], action [N, 2], joint distance [N, 1]) -> scalar
        assert loss(torch.zeros(3, 4), torch.zeros(3, 2), torch.ones(3, 1)).shape == ()
        fits = pd.read_csv(folder / "dynamics" / "fits.csv")
        assert len(fits) >= 2  # the first fit and at least one refresh
    results = layout.results("reacher")
    outcomes = pd.read_csv(results / "outcomes.csv")
    assert set(outcomes.method) == {"learned", "direct"}
    # 2 seeds x 2 held-out goals x 2 methods x (n_steps + 1) meta-test steps
    assert len(outcomes) == 2 * 2 * 2 * 3
    assert outcomes.final_distance.between(0, 0.45).all()
    # the same fresh policy for both methods: equal outcomes before any step
    start = outcomes[outcomes.test_step == 0].pivot_table(
        index=["seed", "goal"], columns="method", values="final_distance"
    )
    np.testing.assert_allclose(start["learned"], start["direct"])
    trajectories = pd.read_csv(results / "trajectories.csv")
    assert {"q1", "q2", "dq1", "dq2", "x", "y", "t"} <= set(trajectories)
    assert (results / "animation.gif").stat().st_size > 1000
    metrics = artifacts.read_json(layout.metrics("reacher", "meta_train"))
    assert {"mean", "seed_0", "seed_1", "authors", "stage_seconds"} <= set(metrics)
    assert set(metrics["authors"]) == {"seed_0"}


def test_goal_reaching_compares_equal_environment_steps(pipeline_run):
    root, _ = pipeline_run
    layout = Layout(root)
    for name in ("goal_point_mass", "goal_reacher"):
        curves = pd.read_csv(layout.results(name) / "curves.csv")
        assert set(curves.method) == {"learned", "reinforce"}
        # updates 0..n_updates for each of 2 seeds x 2 goals x 2 methods
        assert len(curves) == 2 * 2 * 2 * 3
        steps = curves.pivot_table(
            index=["seed", "goal", "update"], columns="method", values="env_steps"
        )
        np.testing.assert_array_equal(steps["learned"], steps["reinforce"])
        assert steps["learned"].max() == 2 * 4 * 6  # updates x episodes x horizon
        chosen = pd.read_csv(layout.results(name) / "baseline_lr.csv")
        assert chosen.groupby("seed").selected.sum().eq(1).all()
        metrics = artifacts.read_json(layout.metrics(name, "evaluate"))
        assert "learned_minus_reinforce" in metrics["mean"]


def test_rl_losses_are_registered_and_load_back(pipeline_run, mlflow_store):
    root, _ = pipeline_run
    rows = torch.randn(5, 4), torch.randn(5, 2), torch.rand(5, 1)
    registered = tracking.load_registered_loss(
        "ml3-reacher-loss", "latest", tracking=mlflow_store
    )
    saved = artifacts.load_learned_loss(
        seed_dir(Layout(root).models("reacher"), 1) / "ml3"
    )
    torch.testing.assert_close(registered(*rows), saved(*rows))
    client = mlflow.MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    for name in ("goal_point_mass", "goal_reacher"):
        versions = client.search_model_versions(f"name = 'ml3-{name}-loss'")
        assert {v.tags["seed"] for v in versions} >= {"0", "1"}


def test_report_has_the_rl_sections(pipeline_run):
    root, _ = pipeline_run
    md = (Layout(root).reports / "report.md").read_text()
    for heading in (
        "Model-based RL: the MuJoCo reacher",
        "Model-free RL: point mass reaching goals",
        "Model-free RL: reacher reaching goals",
    ):
        assert f"## {heading}" in md
    assert md.count("Verdict on held-out goals") == 4
    for figure in ("reacher_trajectories.png", "reacher.gif", "goal_reacher_curves"):
        assert f"figures/{figure}" in md
    assert "The authors' settings" in md


def test_authors_collapse_is_recorded_and_ours_stops_the_stage(tmp_path, monkeypatch):
    """A collapse of the authors' variant is a finding; of ours, exit status 3."""
    from tiny import tiny_params_dict, write_params

    from pipeline.meta import LearnedLossCollapsed
    from pipeline.rl import reacher

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    params = tiny_params_dict()
    params["reacher"]["seeds"] = [0]
    path = write_params(tmp_path / "params.yaml", params)
    prepare.run("reacher", path, tmp_path)
    real = reacher.meta_train

    def collapsing(params, data, seed, variant, progress=False):
        if variant in collapsed_variants:
            raise LearnedLossCollapsed(f"learned loss collapsed ({variant}, test)")
        return real(params, data, seed, variant, progress)

    monkeypatch.setattr(reacher, "meta_train", collapsing)
    collapsed_variants = {"authors"}
    meta_train.run("reacher", path, tmp_path)
    layout = Layout(tmp_path)
    metrics = artifacts.read_json(layout.metrics("reacher", "meta_train"))
    assert metrics["authors"]["seed_0"]["collapsed"] == 1
    assert "authors, test" in metrics["authors"]["seed_0"]["message"]
    assert not (seed_dir(layout.models("reacher"), 0) / "authors").exists()
    assert (seed_dir(layout.models("reacher"), 0) / "ml3").is_dir()
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    exp = client.get_experiment_by_name("ml3-reacher")
    failed = client.search_runs(
        [exp.experiment_id], "attributes.run_name = 'meta_train/authors/seed=0'"
    )
    assert [r.info.status for r in failed] == ["FAILED"]
    assert "authors, test" in failed[0].data.tags["collapse"]
    names = {m.name for m in client.search_registered_models()}
    assert names == {"ml3-reacher-loss"}

    collapsed_variants = {"ml3", "authors"}
    status = meta_train._cli.main(
        meta_train.run,
        meta_train.__doc__,
        ["reacher", "--params", str(path), "--root", str(tmp_path)],
    )
    assert status == 3
    # the earlier outputs are kept as they were
    assert (seed_dir(layout.models("reacher"), 0) / "ml3").is_dir()
    runs = client.search_runs(
        [exp.experiment_id],
        "attributes.run_name = 'meta_train'",
        order_by=["start_time DESC"],
    )
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
