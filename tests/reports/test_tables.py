"""The report's first screen: the estimator x response matrix, sorted, the best marked, each
value against the noise bound; and the console summary saying the same."""

import dataclasses

from fidelity.reports.tables import BEST, summary_lines, verdict_matrix
from fidelity.results import Interval, NoiseCeiling
from tests.fakes import fake_problem, fake_results


def problem_with_ceiling():
    metrics = {
        "grad-dot": {"cold": {"pearson": Interval(0.40, 0.20, 0.60)}},
        "exact": {
            "cold": {"pearson": Interval(0.90, 0.85, 0.93)},
            "pbrf": {"pearson": Interval(0.70, 0.60, 0.80)},
        },
        "cg": {
            "cold": {"pearson": Interval(0.85, 0.80, 0.90)},
            "pbrf": {"pearson": Interval(0.95, 0.90, 0.97)},
        },
        "broken": {"cold": {"pearson": Interval(None)}},
    }
    problem = fake_problem("p", metrics)
    ceiling = NoiseCeiling(
        0.81, 0.8, 0.9, seeds=2, splits=1, max_correlation_low=0.85, max_correlation_high=0.94
    )
    cold = dataclasses.replace(problem.responses["cold"], noise_ceiling=ceiling)
    return dataclasses.replace(problem, responses={**problem.responses, "cold": cold})


def test_the_matrix_is_sorted_marks_the_best_and_divides_by_the_bound():
    table = verdict_matrix(problem_with_ceiling())
    assert table.header == ("estimator", "cold", "pbrf")
    assert [row[0] for row in table.rows] == ["exact", "cg", "grad-dot", "broken", "noise bound"]
    exact, cg, grad_dot, broken, bound = table.rows
    assert exact[1] == f"0.9000 [0.8500, 0.9300] {BEST} \u00b7 100% of bound"
    assert cg[2] == f"0.9500 [0.9000, 0.9700] {BEST}"  # pbrf has no bound: no fraction
    assert grad_dot[1].endswith("44% of bound") and grad_dot[2] == ""
    assert broken[1] == "n/a"
    assert bound[1] == "0.9000 [0.8500, 0.9400] (2 seeds)" and bound[2] == "-"


def test_the_console_summary_says_the_same_in_a_line_per_response():
    results = fake_results()
    problem = problem_with_ceiling()
    results = dataclasses.replace(results, problems={"p": problem})
    lines = summary_lines(results)
    assert lines[0] == (
        "p vs cold, pearson (noise bound 0.9000 [0.8500, 0.9400]): exact 0.9000 [0.8500, 0.9300], "
        "100% of bound, cg 0.8500 [0.8000, 0.9000], grad-dot 0.4000 [0.2000, 0.6000], broken n/a"
    )
    assert lines[1].startswith("p vs pbrf, pearson: cg 0.9500 [0.9000, 0.9700], exact 0.7000")
