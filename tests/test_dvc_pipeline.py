"""The real `dvc repro`, end to end on tiny params in a temporary copy."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from tiny import REPO, TINY_CELLS, tiny_params_dict, write_params

from pipeline.config import EXPERIMENTS

pytestmark = pytest.mark.slow

REGISTERED = (
    "ml3-sine-loss",
    "ml3-mnist-loss",
    "ml3-frequency-shaped-loss",
    "ml3-frequency-unshaped-loss",
    "ml3-mountain_car-shaped-loss",
    "ml3-mountain_car-unshaped-loss",
    "ml3-reacher-loss",
    "ml3-goal_point_mass-loss",
    "ml3-goal_reacher-loss",
)
# registered only if the authors' settings did not collapse on the tiny run
OPTIONAL = {"ml3-reacher-authors-loss"}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    return env


def _run(args, cwd) -> str:
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """The project's committed and new files, as a fresh git repo, tiny params."""
    dest = tmp_path_factory.mktemp("repo")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    for stale in ("dvc.lock", "metrics"):
        shutil.rmtree(dest / stale, ignore_errors=True) if (
            dest / stale
        ).is_dir() else (dest / stale).unlink(missing_ok=True)
    write_params(dest / "params.yaml", tiny_params_dict())
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        _run(cmd, dest)
    return dest


def test_dvc_repro_end_to_end(repo_copy):
    first = _run(["dvc", "repro"], repo_copy)
    assert _ran(first) == {
        f"{stage}@{name}"
        for stage in ("prepare", "meta_train", "evaluate")
        for name in EXPERIMENTS
    } | {f"generalize@{cell}" for cell in TINY_CELLS} | {"report"}
    assert (repo_copy / "reports" / "report.html").is_file()
    assert (repo_copy / "reports" / "report.md").is_file()

    # the default store: SQLite at the repository root, one experiment each
    store = f"sqlite:///{repo_copy / 'mlflow.db'}"
    # registry_uri too: earlier in-process tests may have set a global one
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    names = {e.name for e in client.search_experiments()}
    assert {f"ml3-{name}" for name in EXPERIMENTS} | {"ml3-report"} <= names
    models = {m.name for m in client.search_registered_models()}
    assert set(REGISTERED) <= models <= set(REGISTERED) | OPTIONAL
    report = (repo_copy / "reports" / "report.md").read_text()
    for heading in (
        "Shaped sine frequency",
        "Mountain car with an intermediate",
        "Model-based RL: the MuJoCo reacher",
        "Model-free RL: point mass reaching goals",
        "Model-free RL: reacher reaching goals",
    ):
        assert f"## {heading}" in report
    assert "figures/mountain_car.gif" in report
    assert "figures/reacher.gif" in report
    assert "## Generalization to unseen settings" in report
    assert "figures/generalize_matrix.png" in report

    metrics = _run(["dvc", "metrics", "show", "--json"], repo_copy)
    assert "final_task_loss" in metrics and "heldout_mse" in metrics

    # nothing changed: nothing reruns
    second = _run(["dvc", "repro"], repo_copy)
    assert _ran(second) == set(), second

    # one experiment's evaluate section changed: only its downstream reruns
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["sine"]["evaluate"]["n_steps"] = 4
    write_params(repo_copy / "params.yaml", params)
    diff = _run(["dvc", "params", "diff"], repo_copy)
    assert "sine.evaluate.n_steps" in diff
    third = _run(["dvc", "repro"], repo_copy)
    assert _ran(third) == {"evaluate@sine", "report"}, third

    # one shaping experiment's code changed: only its own stages rerun
    code = repo_copy / "pipeline" / "mountain_car.py"
    code.write_text(code.read_text() + "\n# edited\n")
    fourth = _run(["dvc", "repro"], repo_copy)
    assert _ran(fourth) == {
        "prepare@mountain_car",
        "meta_train@mountain_car",
        "evaluate@mountain_car",
        "report",
    }, fourth

    # the RL code changed: only the RL experiments' stages rerun
    code = repo_copy / "pipeline" / "rl" / "goal_reaching.py"
    code.write_text(code.read_text() + "\n# edited\n")
    rl = _run(["dvc", "repro"], repo_copy)
    assert _ran(rl) == {
        f"{stage}@{name}"
        for stage in ("prepare", "meta_train", "evaluate")
        for name in ("reacher", "goal_point_mass", "goal_reacher")
    } | {"report"}, rl

    # a new architecture in the grid: only the new cell (and the report) runs
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    params["generalize"]["cells"]["mnist_arch_tanh"] = full["generalize"]["cells"][
        "mnist_arch_tanh"
    ]
    write_params(repo_copy / "params.yaml", params)
    fifth = _run(["dvc", "repro"], repo_copy)
    assert _ran(fifth) == {"generalize@mnist_arch_tanh", "report"}, fifth
    assert "mlp 64 tanh" in (repo_copy / "reports" / "report.md").read_text()

    # one cell's learning rate changed: only that cell reruns
    params["generalize"]["cells"]["sine_lr_3e_3"]["lr"] = 0.002
    write_params(repo_copy / "params.yaml", params)
    sixth = _run(["dvc", "repro"], repo_copy)
    assert _ran(sixth) == {"generalize@sine_lr_3e_3", "report"}, sixth


def test_dvc_experiment_in_temp_copy_logs_to_repository_store(repo_copy):
    """`dvc exp run --temp` (the queue's executor) logs to the repo's mlflow.db."""
    if not (repo_copy / "dvc.lock").exists():
        pytest.skip("needs the pipeline run by test_dvc_repro_end_to_end")
    store = f"sqlite:///{repo_copy / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    sine = client.get_experiment_by_name("ml3-sine").experiment_id
    query = "tags.stage = 'evaluate' and attributes.run_name = 'evaluate'"
    before = len(client.search_runs([sine], filter_string=query))
    _run(["git", "add", "-A"], repo_copy)
    _run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"],
        repo_copy,
    )
    out = _run(
        ["dvc", "exp", "run", "--temp", "-S", "sine.evaluate.n_steps=2"], repo_copy
    )
    assert _ran(out) == {"evaluate@sine", "report"}, out
    runs = client.search_runs([sine], filter_string=query)
    assert len(runs) == before + 1
    assert runs[0].data.params["evaluate.n_steps"] == "2"
    assert not list((repo_copy / ".dvc" / "tmp").rglob("mlflow.db"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_ui_serves_the_store(repo_copy):
    """`make ui` starts the MLflow UI on loopback over the repository's store."""
    import json
    import signal
    import time
    import urllib.request

    if not (repo_copy / "mlflow.db").exists():
        pytest.skip("needs the store written by test_dvc_repro_end_to_end")
    port = _free_port()
    venv = Path(sys.executable).parent.parent
    server = subprocess.Popen(
        ["make", "-s", "ui", f"PORT={port}", f"VENV={venv}"],
        cwd=repo_copy,
        env=_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow UI did not come up in 90 s"
            time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/", timeout=10) as r:
            assert "<html" in r.read().decode().lower()
        query = f"{base}/api/2.0/mlflow/registered-models/search?max_results=100"
        with urllib.request.urlopen(query, timeout=10) as r:
            names = {m["name"] for m in json.load(r)["registered_models"]}
        assert set(REGISTERED) <= names <= set(REGISTERED) | OPTIONAL
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
