"""fidelity.testing: a solver's own tests assert fidelity, reusing cached ground truth."""

import pytest

from fidelity.core.errors import FidelityError
from fidelity.testing import assert_fidelity, measure_fidelity

TINY = "tests.fidelity.user_problems:tiny"


def test_a_faithful_estimator_passes_and_ground_truth_is_cached(tmp_path):
    first = assert_fidelity(
        "exact", problem=TINY, at_least=0.9, top=6, random=6, test_points=4, cache_dir=tmp_path
    )
    assert 0.9 <= first.value <= 1 and first.low <= first.value <= first.high
    assert first.results.responses["cold"].info["refits"] == 12
    again = measure_fidelity(
        "fidelity.estimators.exact:ExactEstimator",
        problem=TINY,
        top=6,
        random=6,
        test_points=4,
        cache_dir=tmp_path,
    )
    assert again.results.responses["cold"].info["cached"] == 12
    assert again.value == pytest.approx(first.value, rel=1e-12)


def test_an_unfaithful_requirement_fails_with_the_numbers(tmp_path):
    with pytest.raises(AssertionError, match=r"grad-dot.*pearson -?\d\.\d{4} \[") as failure:
        assert_fidelity(
            "grad-dot", problem=TINY, at_least=0.999, top=4, random=4, cache_dir=tmp_path
        )
    assert "below the required 0.999" in str(failure.value)
    with pytest.raises(AssertionError, match="its low is below"):
        assert_fidelity(
            "exact",
            problem=TINY,
            at_least=0.99999,
            bound="low",
            top=4,
            random=4,
            cache_dir=tmp_path,
        )


def test_bad_requests_are_errors(tmp_path):
    with pytest.raises(FidelityError, match="unknown metric"):
        measure_fidelity("exact", problem=TINY, metric="r2", top=4, random=4, cache_dir=tmp_path)
    with pytest.raises(FidelityError, match="bound"):
        assert_fidelity("exact", problem=TINY, at_least=0.5, bound="high", cache_dir=tmp_path)
    with pytest.raises(FidelityError, match="unknown estimator"):
        measure_fidelity("no-such", problem=TINY, cache_dir=tmp_path)


def test_removals_are_chosen_by_the_reference_so_solver_versions_share_retrains(tmp_path):
    options = {"problem": TINY, "top": 5, "random": 3, "test_points": 4, "cache_dir": tmp_path}
    first = measure_fidelity("exact", **options)
    assert first.results.top_by == "reference"
    assert first.results.responses["cold"].info["refits"] == 8
    # Another solver version (here: another damping) is measured on the same removals: every
    # retrain comes from the cache.
    other = measure_fidelity("exact", settings={"damping": 0.5}, **options)
    assert other.results.responses["cold"].info["cached"] == 8
    assert other.value != first.value
    own = measure_fidelity("exact", top_by=None, **options)
    assert own.results.top_by == "candidate"
