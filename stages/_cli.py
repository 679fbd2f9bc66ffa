"""Command-line wiring shared by the stage modules."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import EXPERIMENTS, ParamsError
from pipeline.meta import LearnedLossCollapsed

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def show_progress() -> bool:
    """Progress bars only when a person is watching a terminal."""
    return sys.stderr.isatty()


def main(
    run: Callable[..., None],
    doc: str,
    argv=None,
    *,
    per_experiment: bool = True,
    positional: str | None = None,
) -> int:
    """Parses ``[experiment] [--params P] [--root R]`` and calls ``run``.

    ``positional`` names a free positional argument passed to ``run`` under
    that name instead of the experiment (the generalize stage's cell).

    Returns the exit status: 0; 2 for bad params; 3 for a collapsed learned
    loss (a message, no traceback, in both cases).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if per_experiment:
        parser.add_argument("experiment", choices=EXPERIMENTS)
    if positional:
        parser.add_argument(positional)
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (default: params.yaml)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("."),
        help="repository root for inputs and outputs (default: .)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("mlflow", "alembic", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kwargs = {"params_path": args.params, "root": args.root.resolve()}
    if per_experiment:
        kwargs["experiment"] = args.experiment
    if positional:
        kwargs[positional] = getattr(args, positional)
    try:
        run(**kwargs)
    except ParamsError as err:
        logging.getLogger("stages").error("%s", err)
        return 2
    except LearnedLossCollapsed as err:
        # the stage's MLflow run is already marked FAILED and nothing was saved
        logging.getLogger("stages").error("%s", err)
        return 3
    return 0
