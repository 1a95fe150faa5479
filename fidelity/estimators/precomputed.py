"""Scores computed elsewhere (any library, any machine), read from a file and scored like ours.

The file holds a matrix over the problem's test and training splits:

- ``.npy``: the matrix alone, ``[n_test, n_train]`` of the problem;
- ``.npz`` or ``.safetensors``: ``scores`` (another name with ``key``), optionally with
  ``test_index`` and ``train_index`` (positions in the problem's test and training splits) when
  the matrix covers only some points, ``[len(test_index), len(train_index)]``.

``sign`` declares its convention: ``"removal"`` is DESIGN.md's (the change of the test loss when
the training point is removed, positive = it helped); ``"upweighting"`` is the derivative of the
test loss with respect to upweighting the training point (Koh & Liang's I_up,loss), converted
once here to removal by delta = -(1/N) I_up,loss.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from torch import Tensor

from fidelity.core.errors import FidelityError
from fidelity.core.files import check_index, read_arrays, row_keys
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.estimators.base import Estimator

SIGNS = ("removal", "upweighting")


def load_score_file(path: Path, key: str) -> dict[str, np.ndarray]:
    """``scores`` and, where present, ``test_index`` and ``train_index`` of a score file."""
    arrays = read_arrays(path, "score file", key)
    if key not in arrays:
        raise FidelityError(
            f"score file {str(path)!r} has no array {key!r} (it has {', '.join(arrays)})"
        )
    found = {"scores": arrays[key]}
    for name in ("test_index", "train_index"):
        if name in arrays:
            found[name] = arrays[name]
    return found


class PrecomputedEstimator(Estimator):
    """delta_hat[t, j] read from ``path`` (see the module docstring), converted to removal by
    ``sign``. Examples are matched to rows and columns by their inputs and targets, so it scores
    whatever subsets of the problem's splits the runner asks for; asking for a point the file
    does not cover is an error."""

    name = "scores"

    def __init__(self, *, path: str, sign: str = "removal", key: str = "scores") -> None:
        if not isinstance(path, str) or not path:
            raise FidelityError("scores.path must name a score file")
        if sign not in SIGNS:
            raise FidelityError(f"scores.sign must be one of {', '.join(SIGNS)}, got {sign!r}")
        self.path = path
        self.sign = sign
        self.key = key

    def fit(self, trained: TrainedProblem) -> Self:
        start = time.perf_counter()
        problem = trained.problem
        where = f"score file {self.path!r}"
        stored = load_score_file(Path(self.path), self.key)
        scores = stored["scores"]
        if scores.ndim != 2 or scores.dtype.kind != "f":
            raise FidelityError(f"{where}: scores must be a 2-d floating-point array")
        test_index = check_index(stored.get("test_index"), problem.n_test, "test_index", where)
        train_index = check_index(stored.get("train_index"), problem.n_train, "train_index", where)
        expected = (test_index.size, train_index.size)
        if scores.shape != expected:
            raise FidelityError(
                f"{where}: scores are {scores.shape}, but {problem.name!r} with these indices "
                f"needs {expected} (test points x training points)"
            )
        if not np.isfinite(scores).all():
            raise FidelityError(f"{where}: scores hold NaN or infinite values")
        factor = 1.0 if self.sign == "removal" else -1.0 / problem.n_train
        self.scores_ = torch.as_tensor(factor * scores, dtype=problem.dtype)
        self.test_rows_ = self._positions(problem.test, test_index)
        self.train_columns_ = self._positions(problem.train, train_index)
        self.trained_ = trained
        self.diagnostics_: dict[str, Any] = {
            "covered_test_points": int(test_index.size),
            "covered_training_points": int(train_index.size),
            "fit_seconds": time.perf_counter() - start,
        }
        return self

    @staticmethod
    def _positions(split: Examples, covered: np.ndarray) -> dict[bytes, int]:
        keys = row_keys(split)
        positions: dict[bytes, int] = {}
        for position, index in enumerate(covered.tolist()):
            positions.setdefault(keys[index], position)  # duplicates score alike
        return positions

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        rows = self._lookup(self.test_rows_, test, "test")
        columns = self._lookup(self.train_columns_, train, "training")
        chosen = self.scores_[rows][:, columns]
        return chosen.to(trained.theta.device)

    def _lookup(self, positions: dict[bytes, int], examples: Examples, split: str) -> Tensor:
        found = [positions.get(key) for key in row_keys(examples)]
        missing = sum(position is None for position in found)
        if missing:
            raise FidelityError(
                f"score file {self.path!r} covers no score for {missing} of the {split} points "
                "asked for; give scores for them (or the whole split)"
            )
        return torch.tensor(found, dtype=torch.long)
