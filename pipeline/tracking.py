"""Everything that talks to MLflow: store location, runs, metrics, models.

By default the store is ``mlflow.db`` (SQLite) and ``mlruns/`` (artifacts)
at the repository root, reached through absolute URIs. ``dvc exp run
--temp``/``--queue`` run stages in a copy under ``.dvc/tmp/exps/``; the root
is then the repository that holds that copy, so queued experiments log to
the same store as ``dvc repro``. ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402  (telemetry must be off before the import)
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

EXPERIMENT_PREFIX = "ml3-"
WEIGHTS_ARTIFACT = "learned_loss_weights"
_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


def store_root(cwd: str | Path | None = None) -> Path:
    """The repository whose ``mlflow.db`` is the default store.

    Inside a DVC experiment copy (``<repo>/.dvc/tmp/exps/<name>``) that is
    ``<repo>``; anywhere else it is ``cwd`` itself.
    """
    cwd = Path(cwd or os.getcwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{store_root(root) / 'mlflow.db'}"


def artifact_location(root: str | Path | None = None) -> str:
    """Absolute URI of the artifact folder new experiments get."""
    return (store_root(root) / "mlruns").as_uri()


def connect(root: str | Path | None = None) -> str:
    """Points MLflow's tracking and registry at the project's store."""
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def experiment_id(name: str, root: str | Path | None = None) -> str:
    """Id of MLflow experiment ``ml3-<name>``, created on first use."""
    full = EXPERIMENT_PREFIX + name
    found = mlflow.get_experiment_by_name(full)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(
        full, artifact_location=f"{artifact_location(root)}/{full}"
    )


def git_commit(root: str | Path) -> str:
    """``HEAD`` of the repository at ``root``, ``+dirty`` if files changed."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def params_hash(params: dict) -> str:
    """A short, stable hash of a params mapping."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` for ``mlflow.log_params``."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


def flatten_metrics(nested: dict, prefix: str = "") -> dict[str, float]:
    """``{"a": {"b": 1.0}}`` -> ``{"a_b": 1.0}``: metric names MLflow accepts."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}".replace("/", "_")
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}_"))
        else:
            flat[name] = float(value)
    return flat


@contextlib.contextmanager
def stage_run(
    experiment: str,
    stage: str,
    params: dict,
    *,
    root: str | Path,
    tags: dict | None = None,
):
    """An MLflow run for one stage execution, with params and provenance tags.

    A run that raises is ended as FAILED by MLflow; the exception propagates.
    """
    connect(root)
    exp_id = experiment_id(experiment, root)
    all_tags = {
        "stage": stage,
        "pipeline_experiment": experiment,
        "git_commit": git_commit(root),
        "params_hash": params_hash(params),
        **(tags or {}),
    }
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=all_tags) as run:
        mlflow.log_params(flatten(params))
        yield run


@contextlib.contextmanager
def nested_run(run_name: str, tags: dict | None = None, params: dict | None = None):
    """A run nested in the active stage run, with its params and tags.

    Each nested run carries the stage's params and tags (for filtering),
    updated with ``tags`` and ``params``.
    """
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("nested runs must be started inside stage_run")
    stored = MlflowClient().get_run(parent.info.run_id).data
    all_tags = {k: v for k, v in stored.tags.items() if not k.startswith("mlflow.")}
    all_tags.update(tags or {})
    # nested runs land in the default experiment unless told the parent's
    with mlflow.start_run(
        experiment_id=parent.info.experiment_id,
        run_name=run_name,
        nested=True,
        tags=all_tags,
    ) as run:
        mlflow.log_params({**stored.params, **(params or {})})
        yield run


@contextlib.contextmanager
def seed_run(stage: str, seed: int, tags: dict | None = None):
    """A nested run ``<stage>/seed=<s>`` for one seed (tag and param ``seed``)."""
    with nested_run(
        f"{stage}/seed={seed}", {"seed": str(seed), **(tags or {})}, {"seed": seed}
    ) as run:
        yield run


def log_history(rows: list[dict], *, step_key: str, prefix: str = "") -> None:
    """Logs every numeric column of ``rows`` as a metric history over ``step_key``."""
    run_id = mlflow.active_run().info.run_id
    metrics = [
        Metric(f"{prefix}{k}", float(v), 0, int(row[step_key]))
        for row in rows
        for k, v in row.items()
        if k != step_key
    ]
    client = MlflowClient()
    for start in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + _METRICS_PER_BATCH])


def log_mean_curves(curves) -> None:
    """Logs a long curves table's mean over seeds, tasks and runs as histories.

    ``curves`` has columns ``method, split, metric, step, value``; each
    (method, split, metric) becomes the metric ``<method>/<split>_<metric>``
    over ``step``.
    """
    means = curves.groupby(["method", "split", "metric", "step"]).value.mean()
    rows: dict[int, dict] = {}
    for (method, split, metric, step), value in means.items():
        rows.setdefault(int(step), {"step": int(step)})[
            f"{method}/{split}_{metric}"
        ] = value
    log_history(list(rows.values()), step_key="step")


def log_metrics(metrics: dict[str, float], step: int = 0) -> None:
    """Logs scalar metrics at ``step``."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(run_id: str, tags: dict) -> None:
    """Sets tags on a run, also one that has ended (a failed nested run)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def log_artifacts(path: str | Path, artifact_path: str | None = None) -> None:
    """Logs a file or a folder as artifacts of the active run."""
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path)


def register_learned_loss(
    module, folder: str | Path, model_name: str, tags: dict | None = None
) -> int:
    """Logs a learned loss as an MLflow model, registers it, returns its version.

    The weights (tensors only) and config are logged too, under
    ``learned_loss_weights/``, so :func:`load_registered_loss` can rebuild
    the loss without unpickling anything.
    """
    import mlflow.pytorch
    import torch

    mlflow.log_artifacts(str(folder), WEIGHTS_ARTIFACT)
    info = mlflow.pytorch.log_model(
        module,
        name="learned_loss",
        registered_model_name=model_name,
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    version = int(info.registered_model_version)
    client = MlflowClient()
    for key, value in {
        "run_id": mlflow.active_run().info.run_id,
        **(tags or {}),
    }.items():
        client.set_model_version_tag(model_name, str(version), key, str(value))
    return version


def load_registered_loss(
    name: str, version: int | str = "latest", *, tracking: str | None = None
):
    """A registered learned loss, frozen and ready to use as a loss function.

    Args:
      name: registered model name, e.g. ``ml3-sine-loss``.
      version: a version number or ``"latest"``.
      tracking: tracking URI; default as :func:`tracking_uri`.

    Only tensors are loaded (``torch.load(weights_only=True)``) and the
    module is rebuilt from its JSON config: no pickled code runs.
    """
    from pipeline.artifacts import load_learned_loss

    uri = tracking or tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if str(version) == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise LookupError(f"no registered model named {name!r} in {uri}")
        version = max(int(v.version) for v in versions)
    mv = client.get_model_version(name, str(version))
    run_id = mv.run_id or (mv.tags or {}).get("run_id")
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=WEIGHTS_ARTIFACT,
            dst_path=tmp,
            tracking_uri=uri,
        )
        return load_learned_loss(local)
