"""Regression gating: which metrics of a run fell below a baseline run's.

A metric regresses when it dropped by more than ``tolerance`` *and* beyond the baseline's
confidence interval (the new point estimate lies below the baseline's lower bound), so that a
solver's CI fails on a real loss of fidelity and not on bootstrap noise. A metric the baseline
has and the run lacks, or that became undefined, also fails: a silently vanished estimator is
not a pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from fidelity.core.errors import FidelityError
from fidelity.results import Interval, MetricTable
from reports.format import format_interval

DEFAULT_METRICS = ("pearson", "spearman")


@dataclass(frozen=True)
class Finding:
    """One metric of one (problem, estimator, response) compared with its baseline."""

    problem: str
    estimator: str
    response: str
    metric: str
    baseline: Interval
    current: Interval | None
    status: str  # "ok", "regressed", "missing", "undefined"

    @property
    def drop(self) -> float | None:
        if self.current is None or self.current.value is None or self.baseline.value is None:
            return None
        return self.baseline.value - self.current.value

    def describe(self) -> str:
        where = f"{self.problem} {self.estimator} vs {self.response} {self.metric}"
        base = format_interval(self.baseline)
        if self.status == "missing":
            return f"{where}: in the baseline ({base}) but not in this run"
        if self.status == "undefined":
            return f"{where}: undefined in this run (baseline {base})"
        now = format_interval(self.current)
        return f"{where}: {now} against baseline {base}, drop {self.drop:.4f}"


def metric_names(table: MetricTable) -> set[str]:
    """Every metric name a table holds."""
    return {
        metric
        for by_estimator in table.values()
        for by_response in by_estimator.values()
        for entries in by_response.values()
        for metric in entries
    }


def compare(
    current: MetricTable,
    baseline: MetricTable,
    *,
    tolerance: float = 0.02,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
) -> list[Finding]:
    """Compare two metric tables (problem -> estimator -> response -> metric); one finding per
    baseline metric."""
    if not tolerance >= 0:
        raise FidelityError(f"--tolerance must be >= 0, got {tolerance}")
    findings = []
    for problem, by_estimator in baseline.items():
        for estimator, by_response in by_estimator.items():
            for response, entries in by_response.items():
                for metric in metrics:
                    base = entries.get(metric)
                    if base is None or base.value is None:
                        continue
                    now = current.get(problem, {}).get(estimator, {}).get(response, {}).get(metric)
                    status = _status(now, base, tolerance)
                    findings.append(
                        Finding(problem, estimator, response, metric, base, now, status)
                    )
    return findings


def _status(now: Interval | None, base: Interval, tolerance: float) -> str:
    if now is None:
        return "missing"
    if now.value is None or base.value is None:
        return "undefined"
    drop = base.value - now.value
    below_interval = base.low is None or now.value < base.low
    return "regressed" if drop > tolerance and below_interval else "ok"
