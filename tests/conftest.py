"""Shared fixtures: tiny params and a throwaway MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny import tiny_params_dict, write_params

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def tiny_params(tmp_path) -> Path:
    """Path of a tiny params.yaml in the test's temporary folder."""
    return write_params(tmp_path / "params.yaml", tiny_params_dict())


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """A SQLite MLflow store shared by the tests of one session."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def tracking(mlflow_store, monkeypatch) -> str:
    """Points the pipeline's MLflow logging at the session's test store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    return mlflow_store
