"""Typed results built by hand, for tests of the readers (history, gate, reports)."""

from __future__ import annotations

import uuid

from fidelity.results import (
    SCHEMA_VERSION,
    CorrelationMatrix,
    EstimatorRecord,
    Interval,
    ProblemResults,
    RemovedCounts,
    ResponseRecord,
    RunResults,
)


def fake_problem(name: str, metrics: dict[str, dict[str, dict[str, Interval]]]) -> ProblemResults:
    seconds = {"exact": (0.5, 0.25), "cg": (0.1, 0.1)}
    estimators = {
        label: EstimatorRecord(label, {}, {}, *seconds.get(label, (0.1, 0.1))) for label in metrics
    }
    responses = sorted({r for by_response in metrics.values() for r in by_response})
    labels = tuple(f"estimator/{e}" for e in metrics) + tuple(f"response/{r}" for r in responses)
    return ProblemResults(
        name=name,
        requested_as=name,
        description="",
        fingerprint="0" * 64,
        loss="cross_entropy",
        weight_decay=1e-3,
        dtype="torch.float64",
        device="cpu",
        n_train=100,
        n_test=20,
        n_params=10,
        training={},
        n_test_points=5,
        n_removed=RemovedCounts(3, 3),
        top_by=next(iter(metrics)),
        estimators=estimators,
        skipped_estimators={},
        responses={
            r: ResponseRecord("cold", {}, 2.0 if r == "cold" else 1.0, {}) for r in responses
        },
        metrics=metrics,
        correlations=CorrelationMatrix(labels, tuple((1.0,) * len(labels) for _ in labels)),
        per_test=(),
        decomposition=None,
        conformance={},
        most_influential=(),
        timings={"train_seconds": 1.5, "total_seconds": 4.0},
        arrays_file=f"arrays/{name}.npz",
    )


def fake_results(
    suite: str = "nightly",
    created: str = "2026-12-01T00:00:00+00:00",
    pearson: float = 0.9,
    run_id: str | None = None,
) -> RunResults:
    """Two problems, estimators exact (vs cold and pbrf) and cg (vs cold): 12 metrics."""
    interval = Interval(pearson, pearson - 0.05, pearson + 0.02)
    metrics = {"pearson": interval, "spearman": Interval(0.8)}
    table = {"exact": {"cold": metrics, "pbrf": metrics}, "cg": {"cold": metrics}}
    return RunResults(
        schema_version=SCHEMA_VERSION,
        run_id=run_id or uuid.uuid4().hex,
        fidelity_version="0.1.0",
        created=created,
        suite={"name": suite, "metrics": {"confidence": 0.95, "bootstrap": 100}},
        git_revision="abc123",
        environment={},
        execution={},
        timings={"total_seconds": 5.0},
        problems={name: fake_problem(name, table) for name in ("digits-logreg", "cancer-logreg")},
    )
