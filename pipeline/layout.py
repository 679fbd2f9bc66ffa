"""Where each stage reads and writes, relative to the repository root.

``dvc.yaml`` declares the same paths; keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Paths of every pipeline artifact under ``root``."""

    root: Path

    def data(self, experiment: str) -> Path:
        """``prepare`` output: the experiment's tasks and splits."""
        return self.root / "data" / experiment

    @staticmethod
    def prepared_name(experiment: str, seed: int) -> str:
        """File name of the prepared arrays for ``seed``.

        MNIST shares one split and the mountain car one task across seeds.
        """
        shared = {"mnist": "splits.npz", "mountain_car": "task.npz"}
        return shared.get(experiment, f"seed_{seed}.npz")

    def read_prepared(self, experiment: str, seed: int) -> dict:
        """The prepared arrays a later stage needs for ``seed``."""
        from pipeline.artifacts import read_arrays

        path = self.data(experiment) / self.prepared_name(experiment, seed)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: run the prepare stage for {experiment!r} "
                "with the same seeds (dvc repro)"
            )
        return read_arrays(path)

    def models(self, experiment: str) -> Path:
        """``meta_train`` output: one folder per seed with the learned loss."""
        return self.root / "models" / experiment

    def results(self, experiment: str) -> Path:
        """``evaluate`` output: meta-test curves, long format."""
        return self.root / "results" / experiment

    def metrics(self, experiment: str, stage: str) -> Path:
        """The small JSON that ``dvc metrics show`` reads for a stage."""
        return self.root / "metrics" / f"{experiment}_{stage}.json"

    @property
    def reports(self) -> Path:
        """``report`` output: Markdown, HTML, figures and tables."""
        return self.root / "reports"


def seed_dir(folder: Path, seed: int) -> Path:
    """The per-seed subfolder of a stage output."""
    return folder / f"seed_{seed}"
