import numpy as np
import pytest
from scipy import stats

from benchmarks.bootstrap import loop_score
from fidelity.core.errors import FidelityError
from fidelity.metrics import (
    kendall,
    mean_row_pearson,
    mean_row_spearman,
    pearson,
    row_pearson,
    row_spearman,
    score,
    spearman,
)


@pytest.fixture
def pair():
    rng = np.random.default_rng(3)
    actual = rng.standard_normal((6, 30))
    predicted = actual + 0.5 * rng.standard_normal((6, 30))
    predicted[2, 4] = predicted[2, 5]  # a tie, for rank handling
    return predicted, actual


def test_pooled_metrics_equal_scipy(pair):
    predicted, actual = pair
    assert pearson(predicted, actual) == pytest.approx(
        stats.pearsonr(predicted.ravel(), actual.ravel()).statistic, abs=1e-12
    )
    assert spearman(predicted, actual) == pytest.approx(
        stats.spearmanr(predicted.ravel(), actual.ravel()).statistic, abs=1e-12
    )
    assert kendall(predicted, actual) == pytest.approx(
        stats.kendalltau(predicted.ravel(), actual.ravel()).statistic, abs=1e-12
    )


def test_per_test_point_metrics_equal_a_loop_over_rows(pair):
    predicted, actual = pair
    expected_p = [stats.pearsonr(p, a).statistic for p, a in zip(predicted, actual, strict=True)]
    expected_s = [stats.spearmanr(p, a).statistic for p, a in zip(predicted, actual, strict=True)]
    np.testing.assert_allclose(row_pearson(predicted, actual), expected_p, atol=1e-12)
    np.testing.assert_allclose(row_spearman(predicted, actual), expected_s, atol=1e-12)
    assert mean_row_pearson(predicted, actual) == pytest.approx(np.mean(expected_p), abs=1e-12)
    assert mean_row_spearman(predicted, actual) == pytest.approx(np.mean(expected_s), abs=1e-12)


def test_sign_flip_negates_correlations(pair):
    predicted, actual = pair
    assert pearson(-predicted, actual) == pytest.approx(-pearson(predicted, actual))
    assert kendall(-predicted, actual) == pytest.approx(-kendall(predicted, actual))


def test_bootstrap_interval_brackets_value_and_is_reproducible(pair):
    predicted, actual = pair
    first = score(predicted, actual, n_boot=300, seed=5)
    again = score(predicted, actual, n_boot=300, seed=5)
    other = score(predicted, actual, n_boot=300, seed=6)
    assert first == again
    assert first["pearson"] != other["pearson"]
    for interval in first.values():
        assert interval.low <= interval.value <= interval.high
        assert interval.high - interval.low > 0.01


def test_interval_narrows_with_more_data():
    rng = np.random.default_rng(0)

    def width(rows, cols):
        actual = rng.standard_normal((rows, cols))
        result = score(actual + rng.standard_normal((rows, cols)), actual, n_boot=200)
        return result["pearson"].high - result["pearson"].low

    assert width(40, 200) < 0.5 * width(5, 20)


def test_perfect_agreement_and_constant_predictions():
    actual = np.arange(12.0).reshape(3, 4)
    perfect = score(2 * actual + 1, actual, n_boot=50)
    assert perfect["pearson"].value == pytest.approx(1.0)
    assert perfect["kendall"].low == pytest.approx(1.0)
    constant = score(np.ones_like(actual), actual, n_boot=20)
    assert constant["pearson"].value is None  # undefined, never NaN


def test_bad_shapes_are_rejected():
    with pytest.raises(FidelityError, match=r"equal 2-d shapes"):
        score(np.zeros((2, 3)), np.zeros((3, 2)))


@pytest.mark.parametrize("n_seeds", [2, 3, 4, 8])
def test_split_half_reliability_matches_the_closed_form(n_seeds):
    """Seeds = signal + independent noise: the reliability of their mean is
    var_signal / (var_signal + var_noise / S)."""
    from fidelity.metrics import split_half_reliability

    rng = np.random.default_rng(n_seeds)
    signal = rng.standard_normal((40, 300))
    per_seed = signal + 1.5 * rng.standard_normal((n_seeds, 40, 300))
    expected = 1 / (1 + 1.5**2 / n_seeds)
    result = split_half_reliability(per_seed)
    assert result.pearson == pytest.approx(expected, abs=0.03)
    assert result.spearman == pytest.approx(expected, abs=0.05)
    assert result.max_correlation == pytest.approx(np.sqrt(result.pearson))
    assert result.seeds == n_seeds


def test_the_noise_bound_has_an_interval_that_narrows_with_more_points():
    """Two seeds give one split; the bound's bootstrap interval says how little that knows."""
    from fidelity.metrics import split_half_reliability

    rng = np.random.default_rng(3)

    def ceiling(rows, cols):
        signal = rng.standard_normal((rows, cols))
        return split_half_reliability(signal + rng.standard_normal((2, rows, cols)))

    small, large = ceiling(5, 20), ceiling(40, 300)
    for found in (small, large):
        bound = found.bound
        assert found.splits == 1 and bound.low < bound.value < bound.high
    expected = np.sqrt(1 / (1 + 1 / 2))  # reliability of the mean of two unit-noise seeds
    assert large.bound.low < expected < large.bound.high
    assert (large.bound.high - large.bound.low) < (small.bound.high - small.bound.low) / 3
    unbounded = split_half_reliability(rng.standard_normal((2, 5, 20)), n_boot=0)
    assert unbounded.max_correlation_low is None and unbounded.max_correlation_high is None


def test_split_half_reliability_needs_two_seeds():
    from fidelity.metrics import split_half_reliability

    with pytest.raises(FidelityError, match="at least two seeds"):
        split_half_reliability(np.zeros((1, 3, 4)))


def test_conformance_flags_disagreement_and_non_finite_values():
    from fidelity.metrics import conformance

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4, 30))
    same = conformance(reference.copy(), reference, reference_label="r")
    assert same.pearson == pytest.approx(1.0) and same.max_relative_difference == 0
    assert not same.flagged and same.reason is None
    # correlated perfectly, off in scale
    scaled = conformance(1.002 * reference, reference, reference_label="r")
    assert not scaled.flagged
    assert scaled.max_relative_difference == pytest.approx(0.002)
    strict = conformance(1.002 * reference, reference, tolerance=1e-6, reference_label="r")
    assert strict.flagged and strict.reason == "max relative difference 2.00e-03 > 1e-06"
    assert not conformance(
        1.002 * reference, reference, tolerance=0.01, reference_label="r"
    ).flagged
    noisy = conformance(
        reference + 0.1 * rng.normal(size=reference.shape), reference, reference_label="r"
    )
    assert noisy.flagged and noisy.reason.startswith("Pearson 0.99")
    broken = reference.copy()
    broken[0, :3] = np.nan
    found = conformance(broken, reference, reference_label="r")
    assert found.flagged and not found.finite
    assert found.reason == "3 NaN or infinite value(s)"


def test_lds_equals_the_hand_computed_value_on_three_subsets():
    from fidelity.metrics import lds

    predicted = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 3.0]])  # [subsets, test points]
    measured = np.array([[0.1, 0.3], [0.2, 0.2], [0.3, 0.1]])
    # test point 0: perfectly ranked (1); test point 1: ranks (2, 1, 3) vs (3, 2, 1), sum of
    # squared rank differences 6, Spearman 1 - 6 * 6 / (3 * 8) = -0.5; Pearson also -0.5
    found = lds(predicted, measured, n_boot=50)
    assert found["lds"].value == pytest.approx(0.25)
    assert found["lds_pearson"].value == pytest.approx(0.25)
    assert found["lds"].low <= found["lds"].value <= found["lds"].high


def test_subset_predictions_sum_the_dropped_deltas():
    from fidelity.metrics import subset_predictions

    scores = np.array([[1.0, 10.0, 100.0], [2.0, 20.0, 200.0]])  # [test points, N]
    masks = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.5]])
    expected = np.array([[10.0, 20.0], [1.0 + 10.0 + 50.0, 2.0 + 20.0 + 100.0]])
    np.testing.assert_allclose(subset_predictions(scores, masks), expected)


@pytest.mark.parametrize("n_seeds", [2, 3, 4])
def test_per_row_reliability_matches_the_closed_form(n_seeds):
    """The LDS ceiling: per test point (row) the correlation over subsets (columns) of two half
    means; for seeds = signal + noise it is var_signal / (var_signal + var_noise / S)."""
    from fidelity.metrics import split_half_reliability

    rng = np.random.default_rng(n_seeds)
    signal = rng.standard_normal((30, 400))
    per_seed = signal + 1.5 * rng.standard_normal((n_seeds, 30, 400))
    expected = 1 / (1 + 1.5**2 / n_seeds)
    result = split_half_reliability(per_seed, per_row=True)
    assert result.pearson == pytest.approx(expected, abs=0.03)
    assert result.spearman == pytest.approx(expected, abs=0.05)
    # a signal shared by every column of a row is no signal over the columns
    shared = np.repeat(rng.standard_normal((30, 1)), 400, axis=1)
    flat = shared + 1.5 * rng.standard_normal((n_seeds, 30, 400))
    assert abs(split_half_reliability(flat, per_row=True).pearson) < 0.1


@pytest.mark.parametrize("scale", [1e-300, 1e300, 1.5e307])
def test_correlations_do_not_overflow_or_underflow_at_extreme_scales(pair, scale):
    # A diverged solver's finite ~1e307 estimates once read as "0.0000 [0.0000, 0.0000]".
    predicted, actual = pair
    assert pearson(predicted * scale, actual) == pytest.approx(pearson(predicted, actual), 1e-12)
    np.testing.assert_allclose(
        row_pearson(predicted * scale, actual), row_pearson(predicted, actual), rtol=1e-12
    )
    scored = score(predicted * scale, actual, n_boot=50)["pearson"]
    reference = score(predicted, actual, n_boot=50)["pearson"]
    assert scored.value == pytest.approx(reference.value, 1e-12)
    assert scored.low == pytest.approx(reference.low, 1e-9)


def test_a_metric_that_stays_undefined_is_none_not_zero(pair):
    _, actual = pair
    scored = score(np.full(actual.shape, 1e307), actual, n_boot=20)
    assert scored["pearson"].value is None and scored["mean_test_pearson"].value is None


@pytest.mark.parametrize("shape", [(6, 9), (2, 3), (12, 90)])
def test_the_vectorised_bootstrap_gives_the_loop_s_intervals_for_a_seed(shape, monkeypatch):
    from fidelity import metrics

    rng = np.random.default_rng(shape[1])
    actual = rng.normal(size=shape)
    predicted = actual + rng.normal(size=shape)
    predicted[0, :2] = predicted[0, -1]  # ties
    if shape[0] > 2:
        actual[1] = 0.25  # a constant row: undefined per-test correlations there
    # loop_score: the replicate-by-replicate loop the vectorised bootstrap replaced (kept in the
    # benchmark that compares them).
    expected = loop_score(predicted, actual, n_boot=150, seed=7)
    for pair_cells in (metrics.KENDALL_PAIR_CELLS, 0):  # Kendall from pair matrices, and looped
        monkeypatch.setattr(metrics, "KENDALL_PAIR_CELLS", pair_cells)
        found = metrics.score(predicted, actual, n_boot=150, seed=7)
        for name, (low, high) in expected.items():
            assert found[name].low == pytest.approx(low, abs=1e-12), name
            assert found[name].high == pytest.approx(high, abs=1e-12), name


def test_replicate_metrics_equal_the_metrics_of_the_resampled_arrays():
    from fidelity.metrics import METRICS, replicate_metrics

    rng = np.random.default_rng(11)
    actual = np.round(rng.normal(size=(5, 8)), 1)  # many ties
    predicted = actual + np.round(rng.normal(size=(5, 8)), 1)
    rows = rng.integers(0, 5, (40, 5))
    cols = rng.integers(0, 8, (40, 8))
    found = replicate_metrics(predicted, actual, rows, cols, tuple(METRICS))
    for name, function in METRICS.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            expected = [
                function(predicted[np.ix_(r, c)], actual[np.ix_(r, c)])
                for r, c in zip(rows, cols, strict=True)
            ]
        np.testing.assert_allclose(found[name], expected, rtol=0, atol=1e-12, err_msg=name)
