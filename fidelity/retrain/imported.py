"""Subset ground truth retrained elsewhere, in the layouts TRAK and dattri publish, imported as a
subset stage: every estimator of a run then gets an LDS against it, with the same code,
intervals, history rows and report as against subsets retrained here.

The file (``.npz`` or ``.safetensors``) indexes the problem's own splits:

- ``layout = "trak"``: ``masks`` ``[m, N]`` (bool or 0/1: 1 = the training point was KEPT) and
  ``margins`` ``[m, n]``, the measurement of each retrained model on n test points (TRAK's
  model output; another target with ``target``);
- ``layout = "dattri"``: ``indices`` ``[m, s]`` (the training points each model was trained
  on, as dattri's ``calculate_lds_ground_truth`` returns them) and ``values`` ``[m, n]``, the
  target values dattri returns, which it negates ("flipped to be consistent with the score"):
  they are negated back here;

both with ``test_index`` ``[n]`` (positions in the problem's test split) and optionally ``full``
``[n]``, the target on the model trained on everything (never negated, in either layout),
subtracted so that the arrays are changes in the sign convention of every other array. Without
``full`` the values are kept as they are: an LDS (a per-test-point rank correlation over
subsets) does not change when a test point's values are shifted by a constant, so the score is
the same. Masks follow the order of the problem's training split. A test point of the run that
the file does not cover is an error; ``fidelity score --ground-truth`` sets the run's test
points to the file's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.files import check_index, read_arrays, row_keys
from fidelity.core.objective import check_target
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.core.registry import constructor_params
from fidelity.retrain.execution import Execution
from fidelity.retrain.subsets import SubsetResult

LAYOUTS = {"trak": ("masks", "margins", "margin"), "dattri": ("indices", "values", "loss")}


@dataclass(frozen=True)
class GroundTruth:
    """``masks`` ``[m, N]`` (kept weights), ``values`` ``[m, n]`` (measured, in our sign:
    dattri's negation undone; changes when ``changes``, i.e. the file held ``full``) and
    ``test_index`` ``[n]``."""

    masks: np.ndarray
    values: np.ndarray
    test_index: np.ndarray
    changes: bool


def read_ground_truth(path: Path, layout: str, n_train: int, n_test: int) -> GroundTruth:
    """A ground-truth file, checked against a problem with ``n_train`` training and ``n_test``
    test points."""
    if layout not in LAYOUTS:
        raise FidelityError(f"imported.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    where = f"ground-truth file {str(path)!r}"
    arrays = read_arrays(path, "ground-truth file", "values")
    subsets_key, values_key, _ = LAYOUTS[layout]
    for name in (subsets_key, values_key, "test_index"):
        if name not in arrays:
            raise FidelityError(
                f"{where} ({layout} layout) has no array {name!r} (it has {', '.join(arrays)})"
            )
    values = np.asarray(arrays[values_key])
    if values.ndim != 2 or values.dtype.kind != "f":
        raise FidelityError(f"{where}: {values_key} must be a 2-d floating-point array")
    test_index = check_index(arrays["test_index"], n_test, "test_index", where)
    subsets = np.asarray(arrays[subsets_key])
    if layout == "trak":
        if subsets.ndim != 2 or subsets.shape[1] != n_train or subsets.dtype.kind not in "biuf":
            raise FidelityError(
                f"{where}: masks must be [subsets, {n_train}] (one 0/1 weight per training "
                f"point), got {subsets.shape} {subsets.dtype}"
            )
        masks = subsets.astype(np.float64)
        if not np.isin(masks, (0.0, 1.0)).all():
            raise FidelityError(f"{where}: masks must hold 0 and 1 only")
    else:
        if subsets.ndim != 2 or subsets.dtype.kind not in "iu":
            raise FidelityError(f"{where}: indices must be a 2-d integer array [subsets, kept]")
        masks = np.zeros((subsets.shape[0], n_train))
        for row, kept in enumerate(subsets):
            masks[row, check_index(kept, n_train, f"indices[{row}]", where)] = 1.0
        values = -values  # dattri returns the negated target
    if values.shape != (masks.shape[0], test_index.size):
        raise FidelityError(
            f"{where}: {values_key} are {values.shape}, but {masks.shape[0]} subsets x "
            f"{test_index.size} test points need {(masks.shape[0], test_index.size)}"
        )
    kept = masks.sum(1)
    if (kept == 0).any() or (kept == n_train).any():
        raise FidelityError(f"{where}: a subset keeps no training point or every one")
    if "full" in arrays:
        full = np.asarray(arrays["full"], dtype=np.float64)
        if full.shape != (test_index.size,):
            raise FidelityError(f"{where}: full must be [{test_index.size}], got {full.shape}")
        values = values - full  # the target itself in both layouts, never negated
    if not np.isfinite(values).all():
        raise FidelityError(f"{where}: {values_key} hold NaN or infinite values")
    return GroundTruth(masks, values.astype(np.float64), test_index, "full" in arrays)


class ImportedSubsets:
    """Ground truth of subset retraining read from ``path`` (see the module docstring).

    ``layout``: ``trak`` or ``dattri``; ``target``: what the file measured (default: the
    layout's, margin for TRAK, loss for dattri), which sets the sign of the estimators'
    additive predictions as for `subsets`.
    """

    name: ClassVar[str] = "imported"

    def __init__(self, *, path: str, layout: str = "trak", target: str | None = None) -> None:
        if not isinstance(path, str) or not path:
            raise FidelityError("imported.path must name a ground-truth file")
        if layout not in LAYOUTS:
            raise FidelityError(
                f"imported.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}"
            )
        target = check_target(LAYOUTS[layout][2] if target is None else target, "imported")
        self.path = path
        self.layout = layout
        self.target = target

    def get_params(self) -> dict[str, Any]:
        return constructor_params(self)

    def compute(
        self, trained: TrainedProblem, test: Examples, execution: Execution | None = None
    ) -> SubsetResult:
        start = time.perf_counter()
        problem = trained.problem
        found = read_ground_truth(Path(self.path), self.layout, problem.n_train, problem.n_test)
        keys = row_keys(problem.test)
        columns = {keys[index]: column for column, index in enumerate(found.test_index)}
        wanted = [columns.get(key) for key in row_keys(test)]
        missing = sum(column is None for column in wanted)
        if missing:
            raise FidelityError(
                f"ground-truth file {self.path!r} does not cover {missing} of the run's "
                f"{len(test)} test points; score it with `fidelity score --ground-truth`, which "
                "runs on the file's test points"
            )
        values = found.values[:, [column for column in wanted if column is not None]]
        masks = torch.as_tensor(found.masks)
        # One level: TRAK draws each mask's points independently, so the kept fraction varies
        # a little from mask to mask; the LDS is reported at their mean.
        alpha = round(float(found.masks.mean()), 3)
        alphas = torch.full((masks.shape[0],), alpha, dtype=torch.float64)
        info = {
            "subsets": int(masks.shape[0]),
            "seeds": 1,
            "layout": self.layout,
            "changes": found.changes,
            "seconds": time.perf_counter() - start,
        }
        return SubsetResult(masks, alphas, torch.as_tensor(values).unsqueeze(0), info)
