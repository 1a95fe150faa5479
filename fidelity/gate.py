"""Regression gating: did a run's fidelity drop against a baseline run's?

Both runs store the predicted and actual deltas of every estimator and response on their test
and removed points. Where the two runs share those points (the same suite configuration does),
each metric's drop ``baseline - current`` gets a **paired** two-way bootstrap interval: every
replicate resamples the same test points and the same removed points in both runs, so the
sampling noise the runs share cancels. A metric regresses when

- its drop exceeds ``tolerance`` and the paired interval of the drop excludes zero, or
- its drop exceeds the hard ``floor``, whatever the intervals say.

Where no pairing is possible (a baseline given as results.json alone, a metric without stored
arrays: LDS, counterfactual and group entries), the drop is unpaired and fails beyond
``tolerance`` only when the current value also falls below the baseline's own interval, and
beyond ``floor`` always. A metric the baseline has and the run lacks, or that became undefined,
fails too: a silently vanished estimator is not a pass. The metric values results.json states
are checked against its arrays before they are compared: an edited or damaged run directory
is refused, not gated.

Runs of different suite configurations (``RunResults.configuration``) are not comparable;
``configuration_changes`` names what differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fidelity.core.errors import FidelityError
from fidelity.metrics import METRICS, paired_differences
from fidelity.reports import load_problem_arrays
from fidelity.reports.format import format_interval
from fidelity.results import Interval, MetricTable, RunResults

DEFAULT_METRICS = ("pearson", "spearman")
#: Fewest shared test points and removed points a paired comparison needs.
MIN_PAIRED_TESTS = 2
MIN_PAIRED_REMOVED = 3
#: How closely results.json's metric values must match what its arrays give.
CONSISTENCY_TOLERANCE = 1e-6

#: (problem, estimator, response, metric)
MetricKey = tuple[str, str, str, str]


@dataclass(frozen=True)
class GateSettings:
    """How ``check`` and ``nightly`` decide: the drop tolerated, the hard floor, the metrics
    compared and the paired bootstrap."""

    tolerance: float = 0.02
    floor: float = 0.10
    metrics: tuple[str, ...] = DEFAULT_METRICS
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.tolerance < math.inf):
            raise FidelityError(f"--tolerance must be a number >= 0, got {self.tolerance}")
        if not (self.tolerance <= self.floor < math.inf):
            raise FidelityError(
                f"--floor must be a number >= the tolerance ({self.tolerance:g}), got {self.floor}"
            )
        if not self.metrics:
            raise FidelityError("the gate needs at least one metric")
        if not 0 <= self.bootstrap <= 100_000:
            raise FidelityError(f"--bootstrap must lie in [0, 100000], got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise FidelityError(f"confidence must lie in (0, 1), got {self.confidence}")

    def to_json(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "floor": self.floor,
            "metrics": list(self.metrics),
            "bootstrap": self.bootstrap,
            "confidence": self.confidence,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Side:
    """One run of a comparison: its results, the directory holding its arrays (None for a
    results.json alone or a recorded run whose directory is gone) and how messages name it."""

    results: RunResults
    run_dir: Path | None
    name: str


@dataclass(frozen=True)
class Finding:
    """One metric of one (problem, estimator, response) compared with its baseline."""

    problem: str
    estimator: str
    response: str
    metric: str
    baseline: Interval
    current: Interval | None
    #: baseline - current; with a paired interval where ``paired``
    drop: Interval | None
    paired: bool
    status: str  # "ok", "regressed", "missing", "undefined"
    reason: str = ""

    def describe(self) -> str:
        where = f"{self.problem} {self.estimator} vs {self.response} {self.metric}"
        base = format_interval(self.baseline)
        if self.status == "missing":
            return f"{where}: in the baseline ({base}) but not in this run"
        if self.status == "undefined":
            return f"{where}: undefined in this run (baseline {base})"
        now = format_interval(self.current)
        kind = "paired" if self.paired else "unpaired"
        drop = f"drop {format_interval(self.drop)} ({kind})"
        return f"{where}: {now} against baseline {base}, {drop}" + (
            f": {self.reason}" if self.reason else ""
        )

    def to_json(self) -> dict[str, Any]:
        def interval(entry: Interval | None) -> dict[str, float | None] | None:
            return None if entry is None else vars(entry).copy()

        return {
            "problem": self.problem,
            "estimator": self.estimator,
            "response": self.response,
            "metric": self.metric,
            "status": self.status,
            "reason": self.reason,
            "paired": self.paired,
            "baseline": interval(self.baseline),
            "current": interval(self.current),
            "drop": interval(self.drop),
        }


@dataclass(frozen=True)
class Verdict:
    """What a check decided: pass or fail, every finding, against what, and why."""

    passed: bool
    findings: tuple[Finding, ...]
    settings: GateSettings
    baseline: str | None  # how the baseline is named; None on a first run
    baseline_run_id: str | None
    first: bool = False  # no earlier passing run of this configuration: passes as the first
    configuration_changes: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def failures(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if finding.status != "ok")

    def summary(self) -> str:
        if self.first:
            return "passed: first run of this configuration, now its baseline"
        failed = len(self.failures)
        paired = sum(finding.paired for finding in self.findings)
        counts = f"{len(self.findings)} metric(s), {paired} paired"
        return f"failed: {failed} of {counts}" if failed else f"passed: {counts}"

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "summary": self.summary(),
            "first": self.first,
            "baseline": self.baseline,
            "baseline_run_id": self.baseline_run_id,
            "settings": self.settings.to_json(),
            "configuration_changes": list(self.configuration_changes),
            "notes": list(self.notes),
            "findings": [finding.to_json() for finding in self.findings],
        }


def metric_names(table: MetricTable) -> set[str]:
    """Every metric name a table holds."""
    return {
        metric
        for by_estimator in table.values()
        for by_response in by_estimator.values()
        for entries in by_response.values()
        for metric in entries
    }


def configuration_changes(current: RunResults, baseline: RunResults) -> list[str]:
    """What differs between two runs' configurations, one line per changed value
    (``suite.estimators[1].kind: 'exact' -> 'lissa'``), empty when they are equal."""
    changes: list[str] = []
    _diff(baseline.configuration(), current.configuration(), "", changes)
    return changes


def _diff(old: Any, new: Any, path: str, changes: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys(), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in new:
                changes.append(f"{where}: removed (was {old[key]!r})")
            elif key not in old:
                changes.append(f"{where}: added ({new[key]!r})")
            else:
                _diff(old[key], new[key], where, changes)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for position, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(a, b, f"{path}[{position}]", changes)
    elif old != new:
        changes.append(f"{path}: {old!r} -> {new!r}")


def paired_drops(
    current: Side, baseline: Side, settings: GateSettings
) -> tuple[dict[MetricKey, Interval], list[str]]:
    """The paired drop of every metric both runs store arrays for, on the test and removed
    points they share, and notes on what could not be paired. results.json's values are
    checked against the arrays on the way (an edited run directory is refused)."""
    drops: dict[MetricKey, Interval] = {}
    notes: list[str] = []
    metrics = [metric for metric in settings.metrics if metric in METRICS]
    if not metrics:
        return drops, notes
    for side in (baseline, current):
        if side.run_dir is None:
            notes.append(f"{side.name}: no run directory with arrays, compared unpaired")
    if baseline.run_dir is None or current.run_dir is None:
        return drops, notes
    for name, base_problem in baseline.results.problems.items():
        now_problem = current.results.problems.get(name)
        if now_problem is None:
            continue
        base_arrays = load_problem_arrays(baseline.run_dir, base_problem)
        now_arrays = load_problem_arrays(current.run_dir, now_problem)
        rows = _shared(base_arrays["test_index"], now_arrays["test_index"])
        cols = _shared(base_arrays["removed_index"], now_arrays["removed_index"])
        if len(rows[0]) < MIN_PAIRED_TESTS or len(cols[0]) < MIN_PAIRED_REMOVED:
            notes.append(
                f"{name}: the runs share {len(rows[0])} test and {len(cols[0])} removed points, "
                "too few to pair; compared unpaired"
            )
            continue
        if len(cols[0]) < len(base_arrays["removed_index"]):
            notes.append(
                f"{name}: paired on the {len(cols[0])} of {len(base_arrays['removed_index'])} "
                "removed points both runs scored"
            )
        for estimator, response in base_problem.pairs():
            keys = (f"estimator/{estimator}", f"response/{response}")
            if not all(key in now_arrays and key in base_arrays for key in keys):
                continue
            base_pair = [base_arrays[key] for key in keys]
            now_pair = [now_arrays[key] for key in keys]
            for metric in metrics:
                for side, problem, pair in (
                    (baseline, base_problem, base_pair),
                    (current, now_problem, now_pair),
                ):
                    _check_consistent(
                        side,
                        problem.metric(estimator, response, metric),
                        pair,
                        (name, estimator, response, metric),
                    )
            found = paired_differences(
                (base_pair[0][rows[0]][:, cols[0]], base_pair[1][rows[0]][:, cols[0]]),
                (now_pair[0][rows[1]][:, cols[1]], now_pair[1][rows[1]][:, cols[1]]),
                metrics,
                n_boot=settings.bootstrap,
                confidence=settings.confidence,
                seed=settings.seed,
            )
            for metric, drop in found.items():
                drops[(name, estimator, response, metric)] = drop
    return drops, notes


def _shared(baseline: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions, in each run, of the indices both hold (in the baseline's order)."""
    where = {int(index): position for position, index in enumerate(current)}
    pairs = [(i, where[int(index)]) for i, index in enumerate(baseline) if int(index) in where]
    if not pairs:
        return np.zeros(0, int), np.zeros(0, int)
    first, second = zip(*pairs, strict=True)
    return np.array(first), np.array(second)


def _check_consistent(
    side: Side, stated: Interval | None, pair: list[np.ndarray], key: MetricKey
) -> None:
    if stated is None:
        return
    with np.errstate(invalid="ignore", divide="ignore"):
        recomputed = float(METRICS[key[3]](np.asarray(pair[0], float), np.asarray(pair[1], float)))
    if stated.value is None:
        agrees = not math.isfinite(recomputed)
    else:
        agrees = abs(recomputed - stated.value) <= CONSISTENCY_TOLERANCE * max(1, abs(recomputed))
    if not agrees:
        problem, estimator, response, metric = key
        raise FidelityError(
            f"{side.name}: results.json states {problem} {estimator} vs {response} {metric} "
            f"{stated.value} but its arrays give {recomputed:.6g}: the run directory was "
            "edited or damaged; rerun it"
        )


def compare(
    current: MetricTable,
    baseline: MetricTable,
    settings: GateSettings | None = None,
    *,
    drops: Mapping[MetricKey, Interval] | None = None,
) -> list[Finding]:
    """One finding per defined baseline metric of ``settings.metrics``; ``drops`` holds the
    paired drops where there are any (see the module docstring for the rule)."""
    settings = settings or GateSettings()
    drops = drops or {}
    findings = []
    for problem, by_estimator in baseline.items():
        for estimator, by_response in by_estimator.items():
            for response, entries in by_response.items():
                for metric in settings.metrics:
                    base = entries.get(metric)
                    if base is None or base.value is None:
                        continue
                    now = current.get(problem, {}).get(estimator, {}).get(response, {}).get(metric)
                    paired = drops.get((problem, estimator, response, metric))
                    findings.append(
                        _finding(problem, estimator, response, metric, base, now, paired, settings)
                    )
    return findings


def _finding(
    problem: str,
    estimator: str,
    response: str,
    metric: str,
    base: Interval,
    now: Interval | None,
    paired: Interval | None,
    settings: GateSettings,
) -> Finding:
    def found(status: str, drop: Interval | None, reason: str = "") -> Finding:
        return Finding(
            problem,
            estimator,
            response,
            metric,
            base,
            now,
            drop,
            paired is not None,
            status,
            reason,
        )

    if now is None:
        return found("missing", None)
    if now.value is None or base.value is None:
        return found("undefined", None)
    drop = paired if paired is not None else Interval(base.value - now.value)
    size = drop.value if drop.value is not None else base.value - now.value
    if size > settings.floor:
        return found("regressed", drop, f"the drop exceeds the hard floor {settings.floor:g}")
    if size > settings.tolerance:
        if paired is not None and (paired.low is None or paired.low > 0):
            return found("regressed", drop, "beyond the tolerance, paired interval above zero")
        if paired is None and (base.low is None or now.value < base.low):
            return found("regressed", drop, "beyond the tolerance and below the baseline interval")
    return found("ok", drop)


def gate(current: Side, baseline: Side, settings: GateSettings) -> Verdict:
    """Compare ``current`` with ``baseline`` (paired where the arrays allow) and decide."""
    drops, notes = paired_drops(current, baseline, settings)
    findings = compare(
        current.results.metric_table(), baseline.results.metric_table(), settings, drops=drops
    )
    if not findings:
        # Nothing to compare is a wrong baseline, not a regression.
        raise FidelityError(
            f"the baseline {baseline.name} holds no defined {', '.join(settings.metrics)} to "
            "compare with"
        )
    return Verdict(
        passed=all(finding.status == "ok" for finding in findings),
        findings=tuple(findings),
        settings=settings,
        baseline=baseline.name,
        baseline_run_id=baseline.results.run_id,
        configuration_changes=tuple(configuration_changes(current.results, baseline.results)),
        notes=tuple(notes),
    )


def first_run(settings: GateSettings) -> Verdict:
    """The verdict on the first run of a configuration: nothing to compare with, a pass."""
    return Verdict(True, (), settings, None, None, first=True)
