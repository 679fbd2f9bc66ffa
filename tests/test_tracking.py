"""The MLflow store is found from DVC experiment copies too."""

from __future__ import annotations

from pipeline import tracking


def test_store_root_is_repo_inside_dvc_experiment_copy(tmp_path):
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    assert tracking.store_root(copy) == tmp_path / "repo"
    assert tracking.store_root(tmp_path / "repo") == tmp_path / "repo"


def test_tracking_uri_is_absolute_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:9"


def test_flatten_params():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "x",
    }
