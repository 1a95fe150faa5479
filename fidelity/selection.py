"""Which test points are measured and which training points are removed."""

from __future__ import annotations

import numpy as np

from fidelity.core.errors import FidelityError


def choose_test_points(n_test: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct test indices drawn uniformly (all of them, sorted, if count >= n)."""
    if count >= n_test:
        return np.arange(n_test)
    return np.sort(rng.choice(n_test, size=count, replace=False))


def choose_removals(
    predicted: np.ndarray | None, n_train: int, *, top: int, random: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Removed training indices and the reason each was chosen ("top" or "random").

    ``top`` points have the largest mean |predicted delta| over the measured test points
    (``predicted`` is ``[n_test, n_train]``); the ``random`` points are drawn uniformly from the
    rest, so the two sets are disjoint.
    """
    if top + random > n_train:
        raise FidelityError(
            f"cannot remove {top} top + {random} random points from {n_train} training points"
        )
    if top and predicted is None:
        raise FidelityError("top-|influence| selection needs an estimator's predictions")
    chosen = np.empty(0, dtype=np.int64)
    if top and predicted is not None:
        strength = np.abs(predicted).mean(axis=0)
        # Stable sort with index tie-break keeps the choice deterministic.
        chosen = np.argsort(-strength, kind="stable")[:top]
    rest = np.setdiff1d(np.arange(n_train), chosen)
    drawn = np.sort(rng.choice(rest, size=random, replace=False)) if random else rest[:0]
    indices = np.concatenate([chosen, drawn]).astype(np.int64)
    reasons = np.array(["top"] * len(chosen) + ["random"] * len(drawn))
    return indices, reasons
