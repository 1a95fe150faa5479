"""Helpers shared by the applications: estimators from specs, label flips, accuracy, intervals."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fidelity.core.errors import FidelityError
from fidelity.core.problem import Examples, Problem, TrainedProblem
from fidelity.core.registry import parse_spec
from fidelity.estimators import ESTIMATORS, Estimator
from fidelity.suite import build_component

DEFAULT_ESTIMATORS = ("gnh", "ekfac", "grad-dot")


def build_estimators(specs: Sequence[str]) -> dict[str, Estimator]:
    """Unfitted estimators keyed by their spec, ``kind`` or ``kind[key=value,...]``."""
    if not specs:
        raise FidelityError("name at least one estimator")
    built = {}
    for spec in specs:
        kind, settings = parse_spec(spec, kind="estimator")
        built[spec] = build_component(ESTIMATORS, kind, settings, where=f"estimator {spec!r}")
    return built


def check_classification(problem: Problem, what: str) -> None:
    if problem.loss not in ("bce", "cross_entropy"):
        raise FidelityError(
            f"{what} needs a classification problem; {problem.name!r} is {problem.loss}"
        )


def predictions(trained: TrainedProblem, data: Examples, batch_size: int = 256) -> Tensor:
    """Predicted class of every example (0/1 for bce, argmax for cross_entropy)."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            outputs.append(trained.model(trained.theta, data.x[start : start + batch_size]))
    logits = torch.cat(outputs)
    if trained.problem.loss == "bce":
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def labels(problem: Problem, data: Examples) -> Tensor:
    return data.y[:, 0].long() if problem.loss == "bce" else data.y


def accuracy(trained: TrainedProblem, data: Examples) -> float:
    return float((predictions(trained, data) == labels(trained.problem, data)).double().mean())


def flip_labels(problem: Problem, index: Tensor, generator: torch.Generator) -> Problem:
    """The problem with the training labels at ``index`` flipped: 0 <-> 1 for bce, a uniformly
    drawn other class for cross_entropy."""
    check_classification(problem, "flipping labels")
    y = problem.y_train.clone()
    index = index.to(y.device)
    if problem.loss == "bce":
        y[index] = 1.0 - y[index]
    else:
        classes = int(problem.y_train.max()) + 1
        shift = torch.randint(1, classes, (len(index),), generator=generator).to(y.device)
        y[index] = (y[index] + shift) % classes
    return dataclasses.replace(problem, y_train=y)


def with_labels(problem: Problem, y_train: Tensor) -> Problem:
    return dataclasses.replace(problem, y_train=y_train)


def self_influence(estimator, train: Examples, chunk: int = 256) -> Tensor:
    """delta_hat[j, j] for every training point: the predicted rise of j's own loss when j is
    removed (Koh & Liang's self-influence), in chunks so nothing of size n x n is formed."""
    values = []
    for start in range(0, len(train), chunk):
        part = Examples(train.x[start : start + chunk], train.y[start : start + chunk])
        values.append(estimator.scores(part, part).diagonal())
    return torch.cat(values)


def summary(values: Sequence[float], confidence: float = 0.95) -> dict[str, object]:
    """Mean, standard deviation and a Student-t interval over seeds (none for one value)."""
    array = np.asarray(values, dtype=float)
    entry: dict[str, object] = {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "values": [float(v) for v in array],
        "low": None,
        "high": None,
    }
    if len(array) > 1:
        from scipy import stats

        half = (
            stats.t.ppf(0.5 + confidence / 2, len(array) - 1) * entry["std"] / math.sqrt(len(array))
        )
        entry["low"], entry["high"] = entry["mean"] - half, entry["mean"] + half
    return entry


def text_of(texts: tuple[str, ...] | None, index: int) -> str | None:
    return None if texts is None else texts[index]


def against_baseline(
    values: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
) -> dict[str, object]:
    """``values`` minus ``baseline`` seed by seed (the same seed drew both: the same training
    noise, the same random draw), with a Student-t interval and the two-sided p-value of the
    paired t-test. A method measured once (a convex refit, the same for every seed) is compared
    with every baseline seed (a one-sample test of the baseline around that value). With a
    single difference there is no interval and no test."""
    ours = np.asarray(values, dtype=float)
    theirs = np.asarray(baseline, dtype=float)
    if len(ours) == 1 and len(theirs) > 1:
        ours = np.full(len(theirs), ours[0])
    if len(theirs) == 1 and len(ours) > 1:
        theirs = np.full(len(ours), theirs[0])
    if len(ours) != len(theirs):
        raise FidelityError(f"paired comparison of {len(ours)} and {len(theirs)} seeds")
    differences = ours - theirs
    entry = summary(differences, confidence)
    entry["p_value"] = None
    if len(differences) > 1:
        from scipy import stats

        spread = float(differences.std(ddof=1))
        if spread > 0:
            statistic = float(differences.mean()) / (spread / math.sqrt(len(differences)))
            entry["p_value"] = float(2 * stats.t.sf(abs(statistic), len(differences) - 1))
        else:
            entry["p_value"] = 0.0 if differences.mean() != 0 else 1.0
    return entry
