"""Regression gating: a drop beyond tolerance and interval fails; noise and equality pass."""

import pytest

from fidelity.core.errors import FidelityError
from fidelity.gate import compare
from fidelity.results import Interval


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
    found = statuses(compare(current, problems(), tolerance=0.02))
    assert found[("cg", "pearson")] == "regressed"
    assert sum(status != "ok" for status in found.values()) == 1
    (failure,) = [f for f in compare(current, problems()) if f.status != "ok"]
    assert failure.drop == pytest.approx(0.10)
    assert "p cg vs cold pearson: 0.8000" in failure.describe()


def test_a_drop_inside_the_baseline_interval_or_tolerance_passes():
    current = problems(pearson=0.86)  # drop 0.04 > tolerance but above the baseline low 0.85
    assert all(f.status == "ok" for f in compare(current, problems(), tolerance=0.02))
    wide = problems(pearson=0.80)  # below the interval, but within a tolerance of 0.15
    assert all(f.status == "ok" for f in compare(wide, problems(), tolerance=0.15))
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
    only_kendall = compare(problems(), problems(), metrics=("kendall",))
    assert {f.metric for f in only_kendall} == {"kendall"}
    with pytest.raises(FidelityError, match="tolerance"):
        compare(problems(), problems(), tolerance=-1)
