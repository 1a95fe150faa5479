"""Fidelity assertions for a solver's own test suite.

    from fidelity.testing import assert_fidelity

    def test_my_solver_tracks_leave_one_out():
        assert_fidelity("mypackage.solvers:MySolver", problem="digits-logreg",
                        response="cold", at_least=0.97, settings={"damping": 0.0})

The estimator (a registered name or an import path ``package.module:Class`` honouring the
estimator contract, which ``check_estimator`` tests) is scored on the named problem against the
named response stage, exactly as ``fidelity run`` would score it. The removed training points are
chosen by a reference estimator (``top_by``, default ``grad-dot``), never by the candidate, so
that every version of a solver is measured on the same removals and the same retrains. Ground
truth (trained model and every retrain) comes from the artefact cache (``cache_dir``, default
``$FIDELITY_CACHE_DIR`` or ``~/.cache/fidelity``), so only the first test run retrains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fidelity.contract import check_estimator
from fidelity.core.cache import ArtifactCache, default_cache_dir
from fidelity.core.errors import FidelityError
from fidelity.reports.format import format_interval
from fidelity.results import Interval, ProblemResults
from fidelity.retrain import Execution
from fidelity.runner import evaluate_problem
from fidelity.suite import parse_suite

CANDIDATE = "candidate"
REFERENCE = "reference"
#: The default ranking of removals: cheap on any model and independent of the candidate.
DEFAULT_TOP_BY = "grad-dot"

__all__ = ["FidelityScore", "assert_fidelity", "check_estimator", "measure_fidelity"]


@dataclass(frozen=True)
class FidelityScore:
    """One estimator's agreement with one response on one problem: the chosen metric, every
    metric with its interval, and the problem's typed results."""

    metric: str
    value: float | None
    low: float | None
    high: float | None
    metrics: dict[str, Interval]
    results: ProblemResults


def measure_fidelity(
    estimator: str,
    *,
    problem: str,
    response: str = "cold",
    metric: str = "pearson",
    settings: dict[str, Any] | None = None,
    response_settings: dict[str, Any] | None = None,
    test_points: int = 10,
    top: int = 20,
    random: int = 20,
    seed: int = 0,
    bootstrap: int = 200,
    cache_dir: Path | str | None = None,
    top_by: str | None = DEFAULT_TOP_BY,
    top_by_settings: dict[str, Any] | None = None,
) -> FidelityScore:
    """Score ``estimator`` against ``response`` on ``problem`` (see the module docstring).

    Removed points: the ``top`` training points with the largest mean |predicted delta| under
    the reference estimator ``top_by`` (a registered kind or import path, configured by
    ``top_by_settings``; ``"exact"`` on small convex problems), plus ``random`` drawn uniformly,
    against ``test_points`` test points. ``top_by=None`` ranks by the candidate itself (the old
    behaviour: each solver change then retrains a different evaluation set).
    """
    estimators = [{**(settings or {}), "kind": estimator, "label": CANDIDATE}]
    if top_by is not None:
        estimators.append({**(top_by_settings or {}), "kind": top_by, "label": REFERENCE})
    suite = parse_suite(
        {
            "name": "fidelity.testing",
            "problems": [problem],
            "seed": seed,
            "selection": {
                "test_points": test_points,
                "top": top,
                "random": random,
                "top_by": REFERENCE if top_by is not None else CANDIDATE,
            },
            "metrics": {"bootstrap": bootstrap},
            "estimators": estimators,
            "responses": [{**(response_settings or {}), "kind": response, "label": response}],
        },
        source="fidelity.testing",
    )
    cache = ArtifactCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    outcome = evaluate_problem(problem, suite, Execution(cache=cache))
    metrics = outcome.results.metrics[CANDIDATE][response]
    if metric not in metrics:
        raise FidelityError(f"unknown metric {metric!r}; valid: {', '.join(metrics)}")
    entry = metrics[metric]
    return FidelityScore(metric, entry.value, entry.low, entry.high, metrics, outcome.results)


def assert_fidelity(
    estimator: str,
    *,
    problem: str,
    at_least: float,
    response: str = "cold",
    metric: str = "pearson",
    bound: str = "value",
    **options: Any,
) -> FidelityScore:
    """Fail (AssertionError) unless ``metric`` of ``estimator`` against ``response`` on
    ``problem`` is at least ``at_least``.

    ``bound = "value"`` tests the point estimate; ``"low"`` the lower end of its bootstrap
    interval (stricter: the estimate must clear the bar beyond sampling noise). Other keyword
    arguments go to ``measure_fidelity``. Returns the score.
    """
    if bound not in ("value", "low"):
        raise FidelityError(f"bound must be 'value' or 'low', got {bound!r}")
    found = measure_fidelity(
        estimator, problem=problem, response=response, metric=metric, **options
    )
    tested = getattr(found, bound)
    if tested is None or not tested >= at_least:
        raise AssertionError(
            f"fidelity of {estimator!r} on {problem!r} against {response!r}: {metric} "
            f"{format_interval(found.metrics[metric])}; its {bound} is below the required "
            f"{at_least}"
        )
    return found
