import json

from reports.markdown import md_escape, render_markdown
from reports.tables import estimator_warnings, format_interval


def test_markup_from_data_is_escaped():
    text = '<script>alert(1)</script><img src=x onerror="alert(2)"> | `x`'
    escaped = md_escape(text)
    assert "<" not in escaped and ">" not in escaped
    assert "\\|" in escaped and "\\`" in escaped
    assert '"' not in escaped


def test_interval_formatting():
    assert format_interval({"value": 0.5, "low": 0.4, "high": 0.6}) == "0.5000 [0.4000, 0.6000]"
    assert format_interval({"value": None, "low": None, "high": None}) == "n/a"


def test_report_escapes_names_from_configuration():
    metric = {"value": 0.9, "low": 0.8, "high": 0.95}
    problem = {
        "n_train": 10,
        "n_test": 5,
        "n_params": 3,
        "loss": "mse",
        "weight_decay": 0.1,
        "training": {"grad_norm": 1e-12, "iterations": 2, "cached": False},
        "n_test_points": 5,
        "n_removed": {"top": 2, "random": 2},
        "top_by": "<b>x</b>",
        "metrics": {
            "<i>est</i>": {
                "cold": {
                    k: metric
                    for k in (
                        "pearson",
                        "spearman",
                        "kendall",
                        "mean_test_pearson",
                        "mean_test_spearman",
                    )
                }
            }
        },
        "timings": {"train_seconds": 0.1},
        "estimators": {"<i>est</i>": {"fit_seconds": 0.1, "scores_seconds": 0.1}},
        "responses": {"cold": {"seconds": 0.2, "info": {"refits": 4, "cached": 0}}},
    }
    results = {
        "suite": {"name": "<script>s</script>", "metrics": {"confidence": 0.95, "bootstrap": 10}},
        "created": "now",
        "fidelity_version": "0",
        "git_revision": None,
        "timings": {"total_seconds": 1.0},
        "problems": {"p<img onerror=x>": problem},
    }
    json.dumps(results)
    text = render_markdown(results, {})
    for raw in ("<script>", "<i>", "<b>", "<img"):
        assert raw not in text
    assert "| &lt;i&gt;est&lt;/i&gt; | cold | 0.9000 [0.8000, 0.9500]" in text


def test_solver_warnings_are_listed():
    problem = {
        "estimators": {
            "cg": {
                "diagnostics": {
                    "negative_curvature_columns": 2,
                    "unconverged_columns": 1,
                    "max_relative_residual": 0.3,
                }
            }
        }
    }
    found = estimator_warnings(problem)
    assert len(found) == 2 and "non-positive curvature" in found[0] and "3.00e-01" in found[1]
    assert estimator_warnings({"estimators": {"exact": {"diagnostics": {}}}}) == []
