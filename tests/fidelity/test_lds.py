"""LDS in a run: subset stages in a suite, the score in results, history rows, the report."""

import csv
import json

import jsonschema
import numpy as np
import pytest

from fidelity.core.errors import FidelityError
from fidelity.history import append_run, recent_runs
from fidelity.metrics import subset_predictions
from fidelity.results import RunResults, schema
from fidelity.runner import RunOptions, run_suite
from fidelity.suite import parse_suite

LDS_SUITE = {
    "name": "lds-ridge",
    "problems": ["diabetes-ridge"],
    "selection": {"test_points": 8, "top": 5, "random": 5},
    "metrics": {"bootstrap": 100},
    "estimators": [{"kind": "exact"}, {"kind": "grad-dot"}],
    "responses": [{"kind": "cold"}],
    "subsets": [{"kind": "subsets", "alphas": [0.99, 0.5], "subsets": 30}],
}


@pytest.fixture(scope="module")
def lds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lds") / "run"
    return run_suite(parse_suite(LDS_SUITE), RunOptions(out=out)), out


def test_exact_influence_on_ridge_has_lds_near_one_at_small_drops(lds_run):
    results, _ = lds_run
    (problem,) = results.problems.values()
    by_alpha = {entry.alpha: entry for entry in problem.lds}
    assert set(by_alpha) == {0.99, 0.5}
    near = by_alpha[0.99]
    assert near.subsets == 30 and near.seeds == 1 and near.noise_ceiling is None
    assert near.metrics["exact"]["lds"].value >= 0.99
    assert near.metrics["exact"]["lds"].low <= near.metrics["exact"]["lds"].value
    # grad-dot ignores the curvature: a worse additive model of the same refits
    assert near.metrics["grad-dot"]["lds"].value < near.metrics["exact"]["lds"].value


def test_the_run_stores_what_the_lds_was_computed_from(lds_run):
    results, out = lds_run
    (problem,) = results.problems.values()
    document = json.loads((out / "results.json").read_text())
    jsonschema.validate(document, schema())
    assert RunResults.from_json(document) == results
    arrays = np.load(out / problem.arrays_file)
    masks, alphas = arrays["subsets/subsets/masks"], arrays["subsets/subsets/alphas"]
    assert masks.shape == (60, problem.n_train) and list(np.unique(alphas)) == [0.5, 0.99]
    assert arrays["subsets/subsets/seeds"].shape == (1, 60, problem.n_test_points)
    assert arrays["scores/exact"].shape == (problem.n_test_points, problem.n_train)
    # the stored numbers give the stored LDS back
    from fidelity.metrics import lds

    rows = alphas == 0.99
    again = lds(
        subset_predictions(arrays["scores/exact"], masks[rows]),
        arrays["subsets/subsets/seeds"][0, rows],
        n_boot=100,
    )
    entry = next(e for e in problem.lds if e.alpha == 0.99)
    assert again["lds"] == entry.metrics["exact"]["lds"]


def test_history_check_and_reports_carry_the_lds(lds_run, tmp_path):
    results, out = lds_run
    table = results.metric_table()["diabetes-ridge"]
    assert table["exact"]["subsets@0.99"]["lds"].value >= 0.99
    append_run(tmp_path / "h.db", results, out)
    (run,) = recent_runs(tmp_path / "h.db")
    assert run.metrics["diabetes-ridge", "exact", "subsets@0.99", "lds"].value >= 0.99
    report = (out / "report.md").read_text()
    assert "Linear datamodeling score" in report and "subsets@0.99" in report
    assert "Linear datamodeling score" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"subsets": [{"kind": "subsets", "alphas": [1.2]}]}, r"alphas must lie in \(0, 1\)"),
        ({"subsets": [{"kind": "subsets", "label": "cold"}]}, "name more than one response"),
        ({"subsets": [{"kind": "subsets", "problems": ["digits-mlp"]}]}, "does not run"),
        ({"subsets": [{"kind": "subsets", "fraction": 0.5}]}, "unknown key"),
    ],
)
def test_bad_subset_stages_name_the_problem(change, message):
    with pytest.raises(FidelityError, match=message):
        parse_suite({**LDS_SUITE, **change})


COUNTERFACTUAL_SUITE = {
    "name": "topk",
    "problems": ["cancer-logreg"],
    "selection": {"test_points": 6, "top": 4, "random": 4},
    "metrics": {"bootstrap": 100},
    "estimators": [{"kind": "exact"}, {"kind": "grad-dot"}],
    "responses": [{"kind": "cold"}],
    "counterfactuals": [{"kind": "counterfactual", "ks": [5, 20]}],
}


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("topk") / "run"
    return run_suite(parse_suite(COUNTERFACTUAL_SUITE), RunOptions(out=out)), out


def test_influence_finds_the_points_whose_removal_hurts_most(topk_run):
    results, out = topk_run
    (problem,) = results.problems.values()
    (found,) = problem.counterfactuals
    assert set(found.curves) == {"exact", "grad-dot", "random", "highest loss"}
    assert found.ks == (5, 20) and found.seeds == 1 and found.target == "loss"
    exact = {point.k: point for point in found.curves["exact"]}
    random = {point.k: point for point in found.curves["random"]}
    # removing the most helpful points raises the test loss, far more than random removals
    assert exact[20].change.value > 0
    assert exact[20].change.value > 5 * abs(random[20].change.value)
    assert exact[20].change.value >= exact[5].change.value
    for point in found.curves["exact"]:
        assert point.flipped is not None and 0 <= point.flipped <= 1
    assert found.brittleness["exact"].correct >= 1
    arrays = np.load(out / problem.arrays_file)
    assert arrays["counterfactual/counterfactual/change"].shape == (1, 4, 6, 2)
    table = results.metric_table()["cancer-logreg"]
    assert table["exact"]["counterfactual@k20"]["change"] == exact[20].change
    report = (out / "report.md").read_text()
    assert "Top-k counterfactual removal" in report and "Brittleness" in report
    assert "cancer-logreg-counterfactual.png" in report
    assert (out / "figures" / "cancer-logreg-counterfactual.png").stat().st_size > 10_000
    document = json.loads((out / "results.json").read_text())
    jsonschema.validate(document, schema())
    assert RunResults.from_json(document) == results


GROUP_SUITE = {
    **COUNTERFACTUAL_SUITE,
    "name": "groups",
    "counterfactuals": [],
    "groups": [{"kind": "groups", "sizes": [5, 40], "groups": 4}],
}
del GROUP_SUITE["counterfactuals"]


def test_group_effects_are_scored_per_kind(tmp_path):
    results = run_suite(parse_suite(GROUP_SUITE), RunOptions(out=tmp_path / "run"))
    (problem,) = results.problems.values()
    (effects,) = problem.groups
    assert set(effects.fits) == {"exact", "grad-dot"}
    assert set(effects.fits["exact"]) == {"random", "class", "neighbours"}
    random = effects.fits["exact"]["random"]
    # random groups on a converged convex model: the additive prediction tracks the refit
    assert random.pearson > 0.9 and 0.5 < random.slope < 1.5
    assert [entry.size for entry in random.sizes] == [5, 40]
    table = results.metric_table()["cancer-logreg"]
    assert table["exact"]["groups:random"]["pearson"].value == random.pearson
    assert "Group effects" in (tmp_path / "run" / "report.md").read_text()
    arrays = np.load(tmp_path / "run" / problem.arrays_file)
    assert arrays["groups/groups/members"].shape == (24, problem.n_train)


NEWTON_SUITE = {
    "name": "newton-ridge",
    "problems": ["diabetes-ridge"],
    "selection": {"test_points": 6, "top": 3, "random": 3},
    "metrics": {"bootstrap": 50},
    "estimators": [{"kind": "exact"}, {"kind": "newton-step"}, {"kind": "rif"}],
    "responses": [{"kind": "cold"}],
    "subsets": [{"kind": "subsets", "alphas": [0.5], "subsets": 12}],
    "groups": [{"kind": "groups", "sizes": [5, 60], "groups": 3}],
}


def test_the_newton_step_predicts_ridge_groups_and_subsets_exactly(tmp_path):
    """Its prediction for a group is its own step (not a sum of deltas), and on ridge that step
    is the refit: Pearson 1 and slope 1 for every kind of group, LDS 1 at alpha 0.5, where
    the additive first-order prediction misses the scale of a half-removed training set."""
    results = run_suite(parse_suite(NEWTON_SUITE), RunOptions(out=tmp_path / "run"))
    (problem,) = results.problems.values()
    (effects,) = problem.groups
    for kind, fit in effects.fits["newton-step"].items():
        assert fit.pearson == pytest.approx(1.0, abs=1e-9), kind
        assert fit.slope == pytest.approx(1.0, abs=1e-7), kind
        for size in fit.sizes:
            assert size.mean_predicted == pytest.approx(size.mean_actual, rel=1e-7)
    (found,) = problem.lds
    assert found.metrics["newton-step"]["lds"].value == pytest.approx(1.0)
    assert found.metrics["newton-step"]["lds_pearson"].value == pytest.approx(1.0, abs=1e-9)
    assert effects.fits["exact"]["random"].slope < effects.fits["newton-step"]["random"].slope

    # what was scored is stored, drawn in the report, and read back by the paper figures
    run_dir = tmp_path / "run"
    arrays = np.load(run_dir / problem.arrays_file)
    actual = arrays["groups/groups/seeds"].mean(0)
    stored = arrays["groups/groups/predicted/newton-step"]
    assert np.allclose(stored, actual, rtol=1e-7, atol=1e-12)
    additive = subset_predictions(arrays["scores/exact"], 1.0 - arrays["groups/groups/members"])
    assert np.array_equal(arrays["groups/groups/predicted/exact"], additive)
    assert arrays["subsets/subsets/predicted/rif"].shape == (12, 6)
    for figure in ("lds", "groups"):
        assert (run_dir / "figures" / f"diabetes-ridge-{figure}.png").stat().st_size > 10_000
    report = (run_dir / "report.md").read_text()
    assert "diabetes-ridge-lds.png" in report and "diabetes-ridge-groups.png" in report

    from fidelity.paper import PAPER_FIGURES, FigureContext

    out = tmp_path / "figures"
    context = FigureContext(out=out, runs=(run_dir,))
    for name in ("koh2019-groups", "lds-loo-table"):
        written = PAPER_FIGURES.get(name)(context)
        assert sorted(p.suffix for p in written) == [".csv", ".pdf", ".png"]
    with (out / "lds-loo-table.csv").open() as handle:
        cells = {(row["estimator"], row["measure"]): row for row in csv.DictReader(handle)}
    assert float(cells["newton-step", "LDS (alpha 0.5)"]["value"]) == pytest.approx(
        found.metrics["newton-step"]["lds"].value
    )
    assert float(cells["exact", "LOO (Pearson)"]["value"]) == pytest.approx(
        problem.metric("exact", "cold", "pearson").value
    )
    with (out / "koh2019-groups.csv").open() as handle:
        points = list(csv.DictReader(handle))
    assert len(points) == 3 * stored.size  # three estimators, every (group, test point)


def test_a_margin_lds_compares_the_negated_loss_prediction(tmp_path):
    """Removing helpful points raises the loss and lowers the margin: against a margin or
    log-probability target an estimator's loss deltas are negated, so a good estimator keeps a
    high LDS instead of a negative one."""
    suite = {
        "name": "margin",
        "problems": ["cancer-logreg"],
        "selection": {"test_points": 6, "top": 3, "random": 3},
        "metrics": {"bootstrap": 50},
        "estimators": [{"kind": "exact"}, {"kind": "newton-step"}],
        "responses": [{"kind": "cold"}],
        "subsets": [
            {"kind": "subsets", "label": target, "alphas": [0.95], "subsets": 15, "target": target}
            for target in ("margin", "log-probability")
        ],
    }
    results = run_suite(parse_suite(suite), RunOptions(out=tmp_path / "run"))
    (problem,) = results.problems.values()
    for found in problem.lds:
        assert found.metrics["exact"]["lds"].value > 0.8, found.response
        assert found.metrics["newton-step"]["lds"].value > 0.8, found.response
