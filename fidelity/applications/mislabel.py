"""Finding flipped labels by self-influence (Koh & Liang 2017, Fig. 6)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fidelity.applications.common import (
    accuracy,
    against_baseline,
    check_classification,
    flip_labels,
    self_influence,
    summary,
    with_labels,
)
from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_loss
from fidelity.core.problem import TrainedProblem
from fidelity.estimators import Estimator
from fidelity.retrain import train


def mislabel(
    trained: TrainedProblem,
    estimators: Mapping[str, Estimator],
    *,
    flip: float = 0.1,
    seeds: Sequence[int] = (0, 1, 2),
    check_fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3),
    cache=None,
) -> dict[str, object]:
    """Flip a fraction ``flip`` of the training labels (drawn per seed), retrain, and rank the
    training points for inspection: by each estimator's self-influence delta_hat[j, j] (highest
    first), by training loss (highest first) and at random. Reports, per ranking, the fraction
    of flipped labels found against the fraction of training data checked (the curve, averaged
    over seeds), its area (AUC: 0.5 is random, 1 finds every flip first), and the test accuracy
    after retraining with the checked points' labels fixed, at each of ``check_fractions``;
    also the accuracy of the clean and of the corrupted model. Estimators are fitted anew on
    each corrupted model. Each ranking is compared with random, seed by seed (the same flips):
    ``auc_beyond_random`` and ``accuracy_beyond_random`` (per checked fraction), with intervals
    and a paired t-test."""

    problem = trained.problem
    check_classification(problem, "mislabel")
    if not 0 < flip < 1:
        raise FidelityError(f"flip must lie in (0, 1), got {flip!r}")
    if not seeds:
        raise FidelityError("mislabel needs at least one seed")
    for fraction in check_fractions:
        if not 0 < fraction <= 1:
            raise FidelityError(f"check fractions must lie in (0, 1], got {fraction!r}")
    n = problem.n_train
    flipped_count = max(1, round(flip * n))
    names = [*estimators, "training loss", "random"]
    curves: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    fixed_accuracy: dict[str, dict[float, list[float]]] = {
        name: {f: [] for f in check_fractions} for name in names
    }
    corrupted_accuracy = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        flipped = torch.randperm(n, generator=generator)[:flipped_count]
        corrupted = flip_labels(problem, flipped, generator)
        model = train(corrupted, cache=cache)
        corrupted_accuracy.append(accuracy(model, problem.test))
        rankings = {
            name: torch.argsort(
                self_influence(estimator.fit(model), corrupted.train).detach().cpu(),
                descending=True,
            )
            for name, estimator in estimators.items()
        }
        losses = per_example_loss(model.model, problem.loss, model.theta, corrupted.train)
        rankings["training loss"] = torch.argsort(losses.detach().cpu(), descending=True)
        rankings["random"] = torch.randperm(n, generator=generator)
        is_flipped = torch.zeros(n, dtype=torch.bool)
        is_flipped[flipped] = True
        for name, order in rankings.items():
            curves[name].append(torch.cumsum(is_flipped[order].double(), 0) / flipped_count)
            for fraction in check_fractions:
                checked = order[: max(1, round(fraction * n))]
                labels = corrupted.y_train.clone()
                labels[checked] = problem.y_train[checked]  # fixing restores the clean label
                repaired = train(with_labels(problem, labels), cache=cache)
                fixed_accuracy[name][fraction].append(accuracy(repaired, problem.test))
    checked_axis = np.arange(1, n + 1) / n
    results: dict[str, dict[str, object]] = {}
    auc_values: dict[str, list[float]] = {}
    for name in names:
        mean_curve = torch.stack(curves[name]).mean(0).numpy()
        aucs = [float(torch.mean(curve)) for curve in curves[name]]
        results[name] = {
            "auc": summary(aucs),
            "found_at": {
                str(f): float(mean_curve[max(1, round(f * n)) - 1]) for f in check_fractions
            },
            "accuracy_after_fixing": {
                str(f): summary(values) for f, values in fixed_accuracy[name].items()
            },
            "curve": _thin(checked_axis, mean_curve),
        }
        auc_values[name] = aucs
    for name in names:
        if name == "random":
            continue
        # The same seed drew the flips for every ranking and for random: a paired comparison.
        results[name]["auc_beyond_random"] = against_baseline(
            auc_values[name], auc_values["random"]
        )
        results[name]["accuracy_beyond_random"] = {
            str(f): against_baseline(values, fixed_accuracy["random"][f])
            for f, values in fixed_accuracy[name].items()
        }
    return {
        "application": "mislabel",
        "problem": problem.name,
        "flip": flip,
        "flipped_count": flipped_count,
        "seeds": [int(s) for s in seeds],
        "check_fractions": [float(f) for f in check_fractions],
        "accuracy_clean": accuracy(trained, problem.test),
        "accuracy_corrupted": summary(corrupted_accuracy),
        "rankings": results,
    }


def _thin(x: np.ndarray, y: np.ndarray, points: int = 201) -> dict[str, list[float]]:
    """At most ``points`` samples of the curve (the JSON stays small for large training sets)."""
    keep = np.unique(np.linspace(0, len(x) - 1, min(points, len(x))).round().astype(int))
    return {"checked": x[keep].tolist(), "found": y[keep].tolist()}
