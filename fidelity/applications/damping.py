"""The damping protocol: sweep each damped estimator's damping, choose it on held-out subsets,
and score the choice on other subsets beside the default and the best in hindsight.

Benchmarks that report each method at the best damping of a grid, scored on the very retrains
that picked it, flatter every method by the optimism of that choice. Here the subsets are drawn
twice as many as scored: the first half selects (the held-out choice), the second half scores,
so the held-out choice's score is what a user who tunes on their own retrains gets, and the best
in hindsight (picked on the scoring half) is shown beside it with the difference.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.problem import TrainedProblem
from fidelity.core.registry import parse_spec
from fidelity.estimators import ESTIMATORS
from fidelity.metrics import lds
from fidelity.results import Interval
from fidelity.retrain import Execution, SubsetsResponse
from fidelity.selection import choose_test_points
from fidelity.suite import build_component

DEFAULT_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_DAMPED = ("exact", "gnh", "kfac", "ekfac", "diagonal", "datainf", "logra", "trak")


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(value) for value in grid)
    if len(values) < 2:
        raise FidelityError("the damping grid needs at least two values")
    if not all(math.isfinite(value) and value > 0 for value in values):
        raise FidelityError(f"damping grid values must be positive and finite, got {list(grid)}")
    return tuple(sorted(set(values)))


def check_damped(specs: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each spec's (kind, settings), or a one-line error for an estimator without damping."""
    parsed = {}
    for spec in specs:
        kind, settings = parse_spec(spec, kind="estimator")
        cls = ESTIMATORS.get(kind)
        if "damping" not in inspect.signature(cls.__init__).parameters:
            raise FidelityError(f"estimator {spec!r} has no damping to sweep")
        parsed[spec] = (kind, dict(settings))
    return parsed


def damping_protocol(
    trained: TrainedProblem,
    specs: Sequence[str],
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    test_points: int = 20,
    subsets: int = 100,
    alpha: float = 0.5,
    seeds: int = 1,
    seed: int = 0,
    bootstrap: int = 1000,
    execution: Execution | None = None,
) -> dict[str, Any]:
    """For each estimator spec (its ``damping`` replaced by each value of ``grid``, and once as
    configured: the default), the LDS on ``test_points`` test points (all, if fewer) of its
    additive predictions against 2 x ``subsets`` retrained subsets keeping ``alpha`` of the
    training set (``seeds`` training seeds per subset on a network), split into a selection half
    and a scoring half. Returns per estimator the
    selection and scoring LDS at every damping (with intervals; a damping the estimator refuses,
    such as an indefinite Hessian, is recorded with its message), and three choices scored on
    the scoring half: the default, the held-out choice (best on the selection half) and the best
    in hindsight (best on the scoring half)."""
    grid = check_grid(grid)
    problem = trained.problem
    if test_points < 1:
        raise FidelityError(f"test_points must be >= 1, got {test_points}")
    parsed = check_damped(specs)
    execution = execution or Execution()
    rng = np.random.default_rng(seed)
    test_index = choose_test_points(problem.n_test, min(test_points, problem.n_test), rng)
    test = problem.test.subset(torch.as_tensor(test_index, device=problem.device))
    response = SubsetsResponse(alphas=(alpha,), subsets=2 * subsets, seeds=seeds, seed=seed)
    found = response.compute(trained, test, execution)
    measured = found.measured.numpy()
    dropped = (1 - found.masks).to(trained.theta)
    halves = {"selection": slice(0, subsets), "scoring": slice(subsets, 2 * subsets)}

    def evaluate(kind: str, settings: Mapping[str, Any], where: str) -> dict[str, Any]:
        try:
            estimator = build_component(ESTIMATORS, kind, settings, where=where)
            scores = estimator.fit(trained).scores(test, problem.train)
        except FidelityError as error:
            return {"refused": " ".join(str(error).split())}
        predicted = (dropped @ scores.T).detach().cpu().numpy()
        params = estimator.get_params()
        # the damping as configured: kfac's relative form, datainf's rule, or a number
        entry: dict[str, Any] = {
            "setting": {key: params[key] for key in ("damping", "damping_ratio") if key in params}
        }
        for half, rows in halves.items():
            value = lds(predicted[rows], measured[rows], n_boot=bootstrap, seed=seed)["lds"]
            entry[half] = _interval(value)
        return entry

    rows = []
    for spec, (kind, settings) in parsed.items():
        default = evaluate(kind, settings, f"estimator {spec!r}")
        swept = [
            {"damping": value, **evaluate(kind, {**settings, "damping": value}, spec)}
            for value in grid
        ]
        scored = [entry for entry in swept if "refused" not in entry]
        row: dict[str, Any] = {"estimator": spec, "default": default, "grid": swept}
        if scored:
            chosen = max(scored, key=lambda entry: _value(entry["selection"]))
            hindsight = max(scored, key=lambda entry: _value(entry["scoring"]))
            row["held_out"] = {"damping": chosen["damping"], "scoring": chosen["scoring"]}
            row["hindsight"] = {"damping": hindsight["damping"], "scoring": hindsight["scoring"]}
            row["optimism"] = _value(hindsight["scoring"]) - _value(chosen["scoring"])
        rows.append(row)
    return {
        "application": "damping",
        "problem": problem.name,
        "grid": list(grid),
        "test_index": test_index.tolist(),
        "alpha": alpha,
        "subsets_per_half": subsets,
        "seeds": seeds,
        "seed": seed,
        "retraining": found.info,
        "rows": rows,
    }


def _interval(value: Interval) -> dict[str, float | None]:
    return {"value": value.value, "low": value.low, "high": value.high}


def _value(interval: Mapping[str, float | None]) -> float:
    value = interval["value"]
    return -math.inf if value is None else float(value)
