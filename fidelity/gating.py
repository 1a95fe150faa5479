"""Regression gating: which metrics of a run fell below a baseline run's.

A metric regresses when it dropped by more than ``tolerance`` *and* beyond the baseline's
confidence interval (the new point estimate lies below the baseline's lower bound), so that a
solver's CI fails on a real loss of fidelity and not on bootstrap noise. A metric the baseline
has and the run lacks, or that became undefined, also fails: a silently vanished estimator is
not a pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fidelity.errors import FidelityError
from fidelity.metrics import format_interval

DEFAULT_METRICS = ("pearson", "spearman")


@dataclass(frozen=True)
class Finding:
    """One metric of one (problem, estimator, response) compared with its baseline."""

    problem: str
    estimator: str
    response: str
    metric: str
    baseline: dict[str, float | None]
    current: dict[str, float | None] | None
    status: str  # "ok", "regressed", "missing", "undefined"

    @property
    def drop(self) -> float | None:
        if self.current is None or None in (self.current["value"], self.baseline["value"]):
            return None
        return self.baseline["value"] - self.current["value"]

    def describe(self) -> str:
        where = f"{self.problem} {self.estimator} vs {self.response} {self.metric}"
        base = format_interval(self.baseline)
        if self.status == "missing":
            return f"{where}: in the baseline ({base}) but not in this run"
        if self.status == "undefined":
            return f"{where}: undefined in this run (baseline {base})"
        now = format_interval(self.current)
        return f"{where}: {now} against baseline {base}, drop {self.drop:.4f}"


def compare(
    current: dict[str, Any],
    baseline: dict[str, Any],
    *,
    tolerance: float = 0.02,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
) -> list[Finding]:
    """Compare ``results["problems"]``-shaped mappings; one finding per baseline metric."""
    if not tolerance >= 0:
        raise FidelityError(f"--tolerance must be >= 0, got {tolerance}")
    findings = []
    for problem, stored in baseline.items():
        for estimator, by_response in stored["metrics"].items():
            for response, entries in by_response.items():
                for metric in metrics:
                    if metric not in entries or entries[metric].get("value") is None:
                        continue
                    base = entries[metric]
                    now = (
                        current.get(problem, {})
                        .get("metrics", {})
                        .get(estimator, {})
                        .get(response, {})
                        .get(metric)
                    )
                    status = _status(now, base, tolerance)
                    findings.append(
                        Finding(problem, estimator, response, metric, base, now, status)
                    )
    return findings


def _status(now: dict | None, base: dict, tolerance: float) -> str:
    if now is None:
        return "missing"
    if now.get("value") is None:
        return "undefined"
    drop = base["value"] - now["value"]
    below_interval = base.get("low") is None or now["value"] < base["low"]
    return "regressed" if drop > tolerance and below_interval else "ok"


def load_results(path: Path) -> dict[str, Any]:
    """``results.json`` of a run directory, or the file itself."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FidelityError(f"no results.json at {str(path)!r}")
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FidelityError(f"{str(file)!r} is not a results.json: {exc}") from exc
    if not isinstance(results, dict) or "problems" not in results:
        raise FidelityError(f"{str(file)!r} is not a fidelity results.json (no 'problems')")
    return results
