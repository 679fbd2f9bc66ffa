"""Times the default pipeline end to end: a full `dvc repro`, then a no-op one.

Usage: python benchmarks/time_pipeline.py [--rev REV ...] [--out FILE]

Each REV (default: the working tree) is exported into a fresh temporary
repository and run there with its own params.yaml and a throwaway MLflow
store, so nothing in this checkout changes except FILE (default
benchmarks/pipeline.json). With two revisions, the first is the reference
and the speed-up of the last over it is recorded too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    """Output of a git command run in the repository."""
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


def export(rev: str | None, dest: Path) -> str:
    """Copies ``rev`` (None: the working tree's tracked and new files) to ``dest``."""
    tar = str(dest / "tree.tar")
    if rev is None:
        files = git("ls-files", "-co", "--exclude-standard").split()
        subprocess.run(["tar", "-cf", tar, *files], cwd=REPO, check=True)
        commit = git("rev-parse", "HEAD") + (
            "+dirty" if git("status", "--porcelain") else ""
        )
    else:
        git("archive", "-o", tar, rev)
        commit = git("rev-parse", rev)
    subprocess.run(["tar", "-xf", "tree.tar"], cwd=dest, check=True)
    (dest / "tree.tar").unlink()
    for stale in ("dvc.lock",):
        (dest / stale).unlink(missing_ok=True)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        [
            "git",
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@localhost",
            "commit",
            "-qm",
            "timed copy",
        ],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return commit


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def stage_seconds(root: Path) -> dict[str, float]:
    out = {}
    for path in sorted((root / "metrics").glob("*.json")):
        data = json.loads(path.read_text())
        if "stage_seconds" in data:
            experiment, stage = path.stem.split("_", 1)
            out[f"{stage}@{experiment}"] = data["stage_seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rev",
        action="append",
        default=[],
        help="revision to time (repeatable); default: working tree",
    )
    parser.add_argument(
        "--label", action="append", default=[], help="label of each revision, in order"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "pipeline.json"
    )
    args = parser.parse_args()
    revs = args.rev or [None]
    labels = args.label or [rev or "working tree" for rev in revs]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    runs = []
    for rev, label in zip(revs, labels, strict=True):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            commit = export(rev, root)
            full = timed(["dvc", "repro"], root, env)
            noop = timed(["dvc", "repro"], root, env)
            runs.append(
                {
                    "label": label,
                    "commit": commit,
                    "full_seconds": full,
                    "noop_seconds": noop,
                    "stages": stage_seconds(root),
                }
            )
            print(f"{label}: full {full:.1f} s, no-op {noop:.2f} s", flush=True)
    result = {"runs": runs, "cpu_count": os.cpu_count()}
    if len(runs) >= 2:
        result["speedup"] = runs[0]["full_seconds"] / runs[-1]["full_seconds"]
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
