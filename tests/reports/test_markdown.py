from dataclasses import replace

from fidelity.results import EstimatorRecord, Interval
from reports.document import outline
from reports.format import format_interval
from reports.markdown import md_escape, render_markdown
from reports.tables import estimator_warnings
from tests.fakes import fake_problem, fake_results


def test_markup_from_data_is_escaped():
    text = '<script>alert(1)</script><img src=x onerror="alert(2)"> | `x`'
    escaped = md_escape(text)
    assert "<" not in escaped and ">" not in escaped
    assert "\\|" in escaped and "\\`" in escaped
    assert '"' not in escaped


def test_interval_formatting():
    assert format_interval(Interval(0.5, 0.4, 0.6)) == "0.5000 [0.4000, 0.6000]"
    assert format_interval(Interval(0.5)) == "0.5000"
    assert format_interval(Interval(None)) == "n/a"
    assert format_interval(None) == "n/a"


def test_report_escapes_names_from_configuration():
    metric = Interval(0.9, 0.8, 0.95)
    names = ("pearson", "spearman", "kendall", "mean_test_pearson", "mean_test_spearman")
    problem = fake_problem(
        "p<img onerror=x>", {"<i>est</i>": {"cold": dict.fromkeys(names, metric)}}
    )
    problem = replace(problem, top_by="<b>x</b>", description="<img src=y>")
    results = replace(
        fake_results(),
        suite={"name": "<script>s</script>", "metrics": {"confidence": 0.95, "bootstrap": 10}},
        problems={problem.name: problem},
    )
    text = render_markdown(outline(results, {}))
    for raw in ("<script>", "<i>", "<b>", "<img"):
        assert raw not in text
    assert "| &lt;i&gt;est&lt;/i&gt; | cold | 0.9000 [0.8000, 0.9500]" in text


def test_solver_warnings_are_listed():
    diagnostics = {
        "negative_curvature_columns": 2,
        "unconverged_columns": 1,
        "max_relative_residual": 0.3,
    }
    problem = fake_problem("p", {"cg": {"cold": {}}})
    warned = replace(problem, estimators={"cg": EstimatorRecord("cg", {}, diagnostics, 0.1, 0.1)})
    found = estimator_warnings(warned)
    assert len(found) == 2 and "non-positive curvature" in found[0] and "3.00e-01" in found[1]
    assert estimator_warnings(problem) == []
