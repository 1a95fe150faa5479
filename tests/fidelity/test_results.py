"""Typed results: the stored JSON Schema matches the dataclasses, a real run validates against it,
and results.json reads back into equal objects."""

import dataclasses
import json
import math

import jsonschema
import pytest

from fidelity.core.errors import FidelityError
from fidelity.results import (
    Interval,
    RunResults,
    derived_schema,
    schema,
)
from fidelity.runner import RunOptions, run_suite
from fidelity.suite import parse_suite
from tests.fakes import fake_results

TINY_SUITE = {
    "name": "tiny",
    "problems": ["tests.fidelity.user_problems:tiny"],
    "selection": {"test_points": 3, "top": 4, "random": 4},
    "metrics": {"bootstrap": 20},
    "estimators": [{"kind": "exact"}, {"kind": "grad-dot"}],
    "responses": [{"kind": "cold"}, {"kind": "linear"}],
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "run"
    results = run_suite(parse_suite(TINY_SUITE), RunOptions(out=out, reports=False))
    return results, out


def test_the_stored_schema_is_the_one_the_dataclasses_define():
    assert schema() == derived_schema(), "run python -m fidelity.results to rewrite it"


def test_a_real_results_json_validates_and_reads_back_equal(tiny_run):
    results, out = tiny_run
    document = json.loads((out / "results.json").read_text())
    jsonschema.validate(document, schema())
    again = RunResults.from_json(document)
    assert again == results
    assert again.to_json() == document
    problem = again.problems["tiny-logreg"]
    assert problem.metric("exact", "cold", "pearson").value > 0.9
    assert problem.decomposition is not None and problem.decomposition.stages == ("cold", "linear")


def test_the_schema_refuses_what_the_readers_would_misread(tiny_run):
    _, out = tiny_run
    document = json.loads((out / "results.json").read_text())
    broken = json.loads(json.dumps(document))
    broken["problems"]["tiny-logreg"]["metrics"]["exact"]["cold"]["pearson"]["value"] = "high"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema())
    with pytest.raises(FidelityError, match=r"pearson\.value: expected a number"):
        RunResults.from_json(broken)
    extra = json.loads(json.dumps(document))
    extra["problems"]["tiny-logreg"]["agreement"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(extra, schema())


def test_older_and_unknown_schema_versions_are_refused_with_the_fix():
    document = fake_results().to_json()
    for version in (1, 99, None):
        with pytest.raises(FidelityError, match="rerun the suite"):
            RunResults.from_json({**document, "schema_version": version})
    with pytest.raises(FidelityError, match="missing 'problems'"):
        RunResults.from_json({k: v for k, v in document.items() if k != "problems"})


def test_undefined_numbers_are_null_never_nan():
    assert Interval.of(math.nan, 0.1, math.inf) == Interval(None, 0.1, None)
    results = fake_results()
    problem = results.problems["digits-logreg"]
    odd = dataclasses.replace(problem, timings={"train_seconds": math.nan})
    document = dataclasses.replace(results, problems={"p": odd}).to_json()
    assert document["problems"]["p"]["timings"]["train_seconds"] is None
    json.dumps(document, allow_nan=False)


def test_results_are_frozen(tiny_run):
    results, _ = tiny_run
    with pytest.raises(dataclasses.FrozenInstanceError):
        results.run_id = "other"  # type: ignore[misc]


def test_undefined_pairs_are_the_computed_correlations_that_are_n_a():
    from fidelity.results import Interval
    from tests.fakes import fake_problem

    problem = fake_problem(
        "p",
        {
            "exact": {"cold": {"pearson": Interval(0.9, 0.8, 0.95)}, "warm": {}},
            "cg": {"cold": {"pearson": Interval(None)}},
        },
    )
    assert problem.undefined_pairs() == [("cg", "cold")]
