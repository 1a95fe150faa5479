"""Regression gating: a drop beyond tolerance and interval fails; noise and equality pass;
the paired bootstrap of a metric's drop, against the one-replicate-at-a-time metrics."""

import numpy as np
import pytest

from fidelity.core.errors import FidelityError
from fidelity.gate import GateSettings, compare
from fidelity.metrics import METRICS, paired_differences
from fidelity.results import Interval


def settings(**options):
    return GateSettings(**options)


def problems(pearson=0.90, low=0.85, high=0.93, spearman=0.80):
    def entry():
        return {
            "pearson": Interval(pearson, low, high),
            "spearman": Interval(spearman, spearman - 0.05, spearman + 0.05),
            "kendall": Interval(0.6, 0.5, 0.7),
        }

    return {"p": {"exact": {"cold": entry()}, "cg": {"cold": entry()}}}


def statuses(findings):
    return {(f.estimator, f.metric): f.status for f in findings}


def test_identical_runs_pass():
    findings = compare(problems(), problems())
    assert len(findings) == 4 and all(f.status == "ok" for f in findings)


def test_a_drop_beyond_tolerance_and_interval_fails():
    current = problems()
    current["p"]["cg"]["cold"]["pearson"] = Interval(0.80, 0.75, 0.85)
    found = statuses(compare(current, problems(), settings(tolerance=0.02)))
    assert found[("cg", "pearson")] == "regressed"
    assert sum(status != "ok" for status in found.values()) == 1
    (failure,) = [f for f in compare(current, problems()) if f.status != "ok"]
    assert failure.drop.value == pytest.approx(0.10) and not failure.paired
    assert "p cg vs cold pearson: 0.8000" in failure.describe()


def test_a_drop_inside_the_baseline_interval_or_tolerance_passes():
    current = problems(pearson=0.86)  # drop 0.04 > tolerance but above the baseline low 0.85
    assert all(f.status == "ok" for f in compare(current, problems(), settings(tolerance=0.02)))
    wide = problems(pearson=0.80)  # below the interval, but within a tolerance of 0.15
    assert all(
        f.status == "ok" for f in compare(wide, problems(), settings(tolerance=0.15, floor=0.2))
    )
    without_interval = problems(low=None, high=None)
    assert statuses(compare(problems(pearson=0.86), without_interval))[("exact", "pearson")] == (
        "regressed"
    )


def test_missing_and_undefined_metrics_fail_and_metric_choice_is_honoured():
    current = problems()
    del current["p"]["cg"]
    current["p"]["exact"]["cold"]["spearman"] = Interval(None)
    found = statuses(compare(current, problems()))
    assert found[("cg", "pearson")] == "missing"
    assert found[("exact", "spearman")] == "undefined"
    only_kendall = compare(problems(), problems(), settings(metrics=("kendall",)))
    assert {f.metric for f in only_kendall} == {"kendall"}
    with pytest.raises(FidelityError, match="tolerance"):
        settings(tolerance=-1)
    with pytest.raises(FidelityError, match="floor"):
        settings(tolerance=0.2, floor=0.1)


def test_a_drop_beyond_the_floor_fails_whatever_the_intervals():
    wide = problems(pearson=0.77, low=0.37, high=0.89)
    current = problems(pearson=0.40, low=0.10, high=0.70)  # inside the baseline's interval
    found = {(f.estimator, f.metric): f for f in compare(current, wide)}
    assert found[("exact", "pearson")].status == "regressed"
    assert "hard floor 0.1" in found[("exact", "pearson")].reason
    near = problems(pearson=0.70, low=0.30, high=0.85)  # drop 0.07, below the floor
    assert statuses(compare(near, wide))[("exact", "pearson")] == "ok"  # unpaired: inside


def test_a_paired_drop_fails_beyond_the_tolerance_only_when_its_interval_excludes_zero():
    base = problems(pearson=0.77, low=0.37, high=0.89)
    now = problems(pearson=0.70, low=0.30, high=0.85)
    key = ("p", "exact", "cold", "pearson")
    tight = {key: Interval(0.07, 0.05, 0.09)}
    loose = {key: Interval(0.07, -0.01, 0.15)}
    assert statuses(compare(now, base, drops=tight))[("exact", "pearson")] == "regressed"
    assert statuses(compare(now, base, drops=loose))[("exact", "pearson")] == "ok"
    (finding,) = [f for f in compare(now, base, drops=tight) if f.status != "ok"]
    assert finding.paired and "paired interval above zero" in finding.reason


def test_paired_difference_is_zero_for_identical_runs_and_brackets_a_real_drop():
    rng = np.random.default_rng(1)
    actual = rng.normal(size=(10, 40))
    predicted = actual + 0.5 * rng.normal(size=actual.shape)
    (same,) = paired_differences(
        (predicted, actual), (predicted, actual), ["pearson"], n_boot=200
    ).values()
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    worse = predicted + 1.0 * rng.normal(size=actual.shape)
    both = paired_differences(
        (predicted, actual), (worse, actual), ["spearman", "pearson"], n_boot=300
    )
    drop = both["spearman"]
    expected = METRICS["spearman"](predicted, actual) - METRICS["spearman"](worse, actual)
    assert drop.value == pytest.approx(expected, abs=1e-12)
    assert 0 < drop.low < drop.value < drop.high
    (repeat,) = paired_differences(
        (predicted, actual), (worse, actual), ["spearman"], n_boot=300
    ).values()
    assert repeat == drop  # seeded, whichever metrics share the replicates
    with pytest.raises(FidelityError, match="unknown metric"):
        paired_differences((predicted, actual), (worse, actual), ["nope"])
    with pytest.raises(FidelityError, match="one 2-d shape"):
        paired_differences((predicted, actual), (worse[:, :3], actual), ["pearson"])
