"""Agreement metrics between predicted and actual deltas, with bootstrap intervals.

All functions are pure: numpy arrays in, numbers out. Arrays are ``[n_test, n_removed]``.
Intervals come from a two-way bootstrap that resamples test points (rows) and removed
training points (columns) independently, since both are samples and pairs sharing a row or a
column are not independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fidelity.core.errors import FidelityError
from fidelity.results import Conformance, Interval, NoiseCeiling, finite_or_none


def _scaled(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``values`` divided by their largest magnitude (along ``axis``). Correlations do not
    change under scaling, and values near the float maximum (a diverged estimator's ~1e307)
    would otherwise overflow the sums of squares and read as a correlation of 0."""
    with np.errstate(invalid="ignore", over="ignore"):
        peak = np.max(np.abs(values), axis=axis, keepdims=axis is not None) if values.size else 0
    peak = np.where(np.isfinite(peak) & (peak > 0), peak, 1.0)
    return values / peak


def _pearson_flat(x: np.ndarray, y: np.ndarray) -> float:
    x, y = _scaled(x), _scaled(y)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def pearson(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Pooled Pearson correlation over all (test, removed) pairs."""
    return _pearson_flat(np.ravel(predicted), np.ravel(actual))


def spearman(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Pooled Spearman rank correlation over all pairs (average ranks for ties)."""
    from scipy.stats import rankdata  # scipy.stats takes half a second to import: when used

    return _pearson_flat(rankdata(np.ravel(predicted)), rankdata(np.ravel(actual)))


def kendall(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Pooled Kendall tau-b over all pairs."""
    from scipy.stats import kendalltau

    value = kendalltau(np.ravel(predicted), np.ravel(actual)).statistic
    return float(value)


def row_pearson(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Pearson correlation within each test point (row), ``[n_test]``."""
    predicted, actual = _scaled(predicted, axis=1), _scaled(actual, axis=1)
    x = predicted - predicted.mean(axis=1, keepdims=True)
    y = actual - actual.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (x * y).sum(axis=1) / denominator, np.nan)


def row_spearman(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman rank correlation within each test point (row), ``[n_test]``."""
    from scipy.stats import rankdata

    return row_pearson(rankdata(predicted, axis=1), rankdata(actual, axis=1))


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def mean_row_pearson(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Mean over test points of the per-test-point Pearson correlation (undefined rows skipped)."""
    return _finite_mean(row_pearson(predicted, actual))


def mean_row_spearman(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Mean over test points of the per-test-point Spearman correlation (undefined rows skipped)."""
    return _finite_mean(row_spearman(predicted, actual))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "pearson": pearson,
    "spearman": spearman,
    "kendall": kendall,
    "mean_test_pearson": mean_row_pearson,
    "mean_test_spearman": mean_row_spearman,
}


def score(
    predicted: np.ndarray,
    actual: np.ndarray,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Every metric in ``METRICS`` with a percentile two-way bootstrap interval."""
    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    if predicted.shape != actual.shape or predicted.ndim != 2:
        raise FidelityError(
            f"predicted {predicted.shape} and actual {actual.shape} must be equal 2-d shapes"
        )
    if not (0 < confidence < 1):
        raise FidelityError(f"confidence must lie in (0, 1), got {confidence}")
    if n_boot < 0:
        raise FidelityError(f"bootstrap replicates must be >= 0, got {n_boot}")
    values = {name: fn(predicted, actual) for name, fn in METRICS.items()}
    rng = np.random.default_rng(seed)
    rows, cols = predicted.shape
    # The draws of the one-replicate-at-a-time loop this replaced (rows, then columns, per
    # replicate), so that a seed gives the same intervals; the metrics of all replicates are
    # then array operations (``replicate_metrics``).
    row_draws = np.empty((n_boot, rows), dtype=np.int64)
    col_draws = np.empty((n_boot, cols), dtype=np.int64)
    for b in range(n_boot):
        row_draws[b] = rng.integers(0, rows, rows)
        col_draws[b] = rng.integers(0, cols, cols)
    replicates = replicate_metrics(predicted, actual, row_draws, col_draws, tuple(METRICS))
    return {
        name: _percentile_interval(value, replicates[name], confidence)
        for name, value in values.items()
    }


def _counts(draws: np.ndarray, size: int) -> np.ndarray:
    """``[B, size]``: how often each of ``size`` items is drawn in each row of ``draws``."""
    offsets = draws + size * np.arange(len(draws))[:, None]
    counts = np.bincount(offsets.ravel(), minlength=len(draws) * size)
    return counts.reshape(len(draws), size).astype(float)


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis of values where each element counts ``w``
    times (the correlation of the data with every element repeated that often); undefined
    (NaN) where a side is constant."""
    counted = w > 0
    # A side whose counted values are all equal is constant (NaN, as for the repeated data),
    # although its weighted mean may differ from them by a rounding error.
    constant = np.zeros(np.broadcast_shapes(x.shape, w.shape)[:-1], bool)
    for values in (x, y):
        high = np.where(counted, values, -np.inf).max(axis=-1)
        constant |= high == np.where(counted, values, np.inf).min(axis=-1)
    total = w.sum(axis=-1, keepdims=True)
    x = x - (w * x).sum(axis=-1, keepdims=True) / total
    y = y - (w * y).sum(axis=-1, keepdims=True) / total
    xx, yy, xy = ((w * a * b).sum(axis=-1) for a, b in ((x, x), (y, y), (x, y)))
    denominator = np.sqrt(xx * yy)
    defined = ~constant & (denominator > 0)
    return np.where(defined, xy / np.where(defined, denominator, 1), np.nan)


def _weighted_ranks(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average ranks of ``values`` ``[..., n]`` (fixed) when each element counts ``w``
    ``[B, ..., n]`` times: the number of counted elements below it, plus (the number equal to
    it, itself included, + 1) / 2, as scipy's rankdata ranks the repeated data."""
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    n = values.shape[-1]
    position = np.broadcast_to(np.arange(n), ordered.shape)
    starts = np.concatenate(
        [np.ones((*ordered.shape[:-1], 1), bool), ordered[..., 1:] != ordered[..., :-1]], axis=-1
    )
    ends = np.concatenate(
        [ordered[..., 1:] != ordered[..., :-1], np.ones((*ordered.shape[:-1], 1), bool)], axis=-1
    )
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, position, n - 1), -1), -1), -1)
    weights = np.take_along_axis(w, np.broadcast_to(order, w.shape), axis=-1)
    running = np.cumsum(weights, axis=-1)
    first_b, last_b = (np.broadcast_to(i, weights.shape) for i in (first, last))
    below = np.take_along_axis(running, first_b, -1) - np.take_along_axis(weights, first_b, -1)
    equal = np.take_along_axis(running, last_b, -1) - below
    ranks = np.empty_like(weights)
    np.put_along_axis(ranks, np.broadcast_to(order, w.shape), below + (equal + 1) / 2, axis=-1)
    return ranks


def _finite_weighted_mean(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The mean over the last axis of the finite values, each counted ``w`` times."""
    finite = np.isfinite(values)
    total = np.where(finite, w, 0).sum(axis=-1)
    summed = np.where(finite, w * np.where(finite, values, 0), 0).sum(axis=-1)
    return np.where(total > 0, summed / np.where(total > 0, total, 1), np.nan)


def replicate_metrics(
    predicted: np.ndarray,
    actual: np.ndarray,
    row_draws: np.ndarray,
    col_draws: np.ndarray,
    names: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """Each metric of ``names`` on every two-way bootstrap replicate, ``[B]``: replicate b
    keeps rows ``row_draws[b]`` and columns ``col_draws[b]`` of the ``[rows, cols]`` arrays.

    A replicate is the data with each (row, column) cell repeated (row count x column count)
    times, so every metric but Kendall's is computed from those counts as weighted array
    operations, without forming the resampled arrays: Pearson as a weighted correlation,
    Spearman from the repeated data's average ranks (cumulative counts along each value's
    order), the per-test metrics per row weighted by the column counts and averaged with the
    row counts, Kendall's tau-b from the pair matrices as quadratic forms in the cell counts
    (replicate by replicate on the resampled arrays above ``KENDALL_PAIR_CELLS`` cells).
    The values equal the one-replicate-at-a-time metrics to round-off (tested)."""
    rows, cols = predicted.shape
    found = {name: np.empty(len(row_draws)) for name in names}
    scaled_p, scaled_a = _scaled(predicted), _scaled(actual)
    flat_p, flat_a = scaled_p.ravel(), scaled_a.ravel()
    ranks_needed = "spearman" in names
    pairs = None
    if "kendall" in names and rows * cols <= KENDALL_PAIR_CELLS:
        pairs = _kendall_pairs(predicted.ravel(), actual.ravel())
    block = max(1, _BLOCK_ELEMENTS // (rows * cols))
    with np.errstate(invalid="ignore", divide="ignore"):
        for start in range(0, len(row_draws), block):
            stop = min(start + block, len(row_draws))
            row_w = _counts(row_draws[start:stop], rows)
            col_w = _counts(col_draws[start:stop], cols)
            cell_w = (row_w[:, :, None] * col_w[:, None, :]).reshape(stop - start, -1)
            if "pearson" in names:
                found["pearson"][start:stop] = _weighted_pearson(flat_p, flat_a, cell_w)
            if ranks_needed:
                # Ranks of the values as given: scaling could merge two that differ by a bit.
                rank_p, rank_a = (_weighted_ranks(v.ravel(), cell_w) for v in (predicted, actual))
                found["spearman"][start:stop] = _weighted_pearson(rank_p, rank_a, cell_w)
            per_column = col_w[:, None, :]
            if "mean_test_pearson" in names:
                per_row = _weighted_pearson(scaled_p, scaled_a, per_column)
                found["mean_test_pearson"][start:stop] = _finite_weighted_mean(per_row, row_w)
            if "mean_test_spearman" in names:
                weights = np.broadcast_to(per_column, (stop - start, rows, cols))
                rank_p, rank_a = (_weighted_ranks(v, weights) for v in (predicted, actual))
                per_row = _weighted_pearson(rank_p, rank_a, per_column)
                found["mean_test_spearman"][start:stop] = _finite_weighted_mean(per_row, row_w)
            if "kendall" in names and pairs is not None:
                found["kendall"][start:stop] = _weighted_kendall(pairs, cell_w)
            elif "kendall" in names:
                for b in range(start, stop):
                    keep = np.ix_(row_draws[b], col_draws[b])
                    found["kendall"][b] = kendall(predicted[keep], actual[keep])
    return found


#: Up to this many cells, Kendall's replicates use the pair matrices (n x n); above, the
#: replicate-by-replicate tau-b is cheaper than the matrix products.
KENDALL_PAIR_CELLS = 1000


def _kendall_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pair matrices of Kendall's tau-b over the cells: sign(x_i - x_j) sign(y_i - y_j),
    and whether x (y) ties, off the diagonal."""
    concordance = np.sign(x[:, None] - x[None, :]) * np.sign(y[:, None] - y[None, :])
    off_diagonal = ~np.eye(len(x), dtype=bool)
    x_ties = ((x[:, None] == x[None, :]) & off_diagonal).astype(float)
    y_ties = ((y[:, None] == y[None, :]) & off_diagonal).astype(float)
    return concordance, x_ties, y_ties


def _weighted_kendall(
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray], w: np.ndarray
) -> np.ndarray:
    """Kendall's tau-b of the data with cell i repeated ``w[b, i]`` times, ``[B]``: a pair of
    distinct cells counts w_i w_j times; copies of one cell tie in both x and y."""
    concordance, x_ties, y_ties = pairs
    total = w.sum(axis=-1)
    all_pairs = total * (total - 1) / 2
    copies = (w * (w - 1) / 2).sum(axis=-1)

    def quadratic(matrix: np.ndarray) -> np.ndarray:
        return ((w @ matrix) * w).sum(axis=-1) / 2

    difference = quadratic(concordance)
    x_tied = copies + quadratic(x_ties)
    y_tied = copies + quadratic(y_ties)
    denominator = np.sqrt((all_pairs - x_tied) * (all_pairs - y_tied))
    defined = denominator > 0
    return np.where(defined, difference / np.where(defined, denominator, 1), np.nan)


#: Elements gathered per block of bootstrap replicates (bounds the paired bootstrap's memory).
_BLOCK_ELEMENTS = 2_000_000


def paired_differences(
    baseline: tuple[np.ndarray, np.ndarray],
    current: tuple[np.ndarray, np.ndarray],
    metrics: Sequence[str],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """The drop ``metric(baseline) - metric(current)`` of each of ``metrics`` for two
    (predicted, actual) pairs of ``[n_test, n_removed]`` arrays on the same test and removed
    points, with a paired two-way percentile bootstrap interval: every replicate resamples the
    same rows and columns in both runs, so the noise the two runs share (the same test points,
    the same removals) cancels and only their difference is left. All metrics share the
    replicates."""
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown:
        raise FidelityError(f"unknown metric {unknown[0]!r}; valid: {', '.join(METRICS)}")
    arrays = [np.asarray(a, float) for a in (*baseline, *current)]
    shape = arrays[0].shape
    if len(shape) != 2 or any(a.shape != shape for a in arrays):
        shapes = [a.shape for a in arrays]
        raise FidelityError(f"paired arrays must share one 2-d shape, got {shapes}")
    if n_boot < 0:
        raise FidelityError(f"bootstrap replicates must be >= 0, got {n_boot}")
    if not (0 < confidence < 1):
        raise FidelityError(f"confidence must lie in (0, 1), got {confidence}")
    with np.errstate(invalid="ignore", divide="ignore"):
        drops = {
            metric: METRICS[metric](arrays[0], arrays[1]) - METRICS[metric](arrays[2], arrays[3])
            for metric in metrics
        }
    if not n_boot:
        return {metric: Interval.of(drop) for metric, drop in drops.items()}
    rows, cols = shape
    rng = np.random.default_rng(seed)
    row_draws = rng.integers(0, rows, (n_boot, rows))
    col_draws = rng.integers(0, cols, (n_boot, cols))
    names = tuple(metrics)
    base = replicate_metrics(arrays[0], arrays[1], row_draws, col_draws, names)
    now = replicate_metrics(arrays[2], arrays[3], row_draws, col_draws, names)
    return {
        metric: _percentile_interval(drop, base[metric] - now[metric], confidence)
        for metric, drop in drops.items()
    }


def _percentile_interval(value: float, replicates: np.ndarray, confidence: float) -> Interval:
    """``value`` with the percentile interval of its finite bootstrap ``replicates`` (none
    where no replicate is finite)."""
    samples = replicates[np.isfinite(replicates)]
    if not samples.size:
        return Interval.of(value)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval.of(value, float(low), float(high))


def mean_interval(
    values: np.ndarray, *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """The mean of ``values`` (one per test point) with a percentile bootstrap interval."""
    values = np.asarray(values, float)
    if values.size == 0:
        return Interval(None)
    if not n_boot:
        return Interval.of(float(values.mean()))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (n_boot, values.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval.of(float(values.mean()), float(low), float(high))


def subset_predictions(scores: np.ndarray, masks: np.ndarray, target: str = "loss") -> np.ndarray:
    """``[n_subsets, n_test]``: an estimator's additive prediction for each subset, the sum of its
    deltas ``scores`` ``[n_test, N]`` over the dropped points weighted by the dropped weight
    ``1 - mask`` (DESIGN.md: the first-order change for w_j 1 -> mask_j).

    Scores predict the change of the test LOSS. For the ``log-probability`` target (the negated
    loss) the prediction is negated, which is exact. For ``margin`` it is negated too: for bce
    the loss is softplus(-margin), so the first-order changes differ by the positive factor
    sigmoid(-margin) per test point, which leaves the per-test-point correlations of an LDS
    unchanged; for softmax the margin's gradient is not a multiple of the loss's and the
    negated loss prediction is a proxy (an estimator's ``group_effects``, where it has one,
    measures the target itself).
    """
    sign = 1.0 if target == "loss" else -1.0
    return sign * ((1.0 - np.asarray(masks, float)) @ np.asarray(scores, float).T)


def lds(
    predicted: np.ndarray,
    measured: np.ndarray,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """The linear datamodeling score of predictions ``[n_subsets, n_test]`` against measured
    changes of the same shape: per test point the Spearman (``lds``, the field's LDS) and the
    Pearson (``lds_pearson``) correlation over subsets, averaged over test points, with a
    two-way bootstrap interval (test points and subsets resampled)."""
    found = score(
        np.asarray(predicted, float).T,
        np.asarray(measured, float).T,
        n_boot=n_boot,
        confidence=confidence,
        seed=seed,
    )
    return {"lds": found["mean_test_spearman"], "lds_pearson": found["mean_test_pearson"]}


#: Bootstrap replicates and split-halves per replicate of the noise bound's interval.
CEILING_BOOTSTRAP = 200
CEILING_BOOTSTRAP_SPLITS = 10


def split_half_reliability(
    per_seed: np.ndarray,
    *,
    max_splits: int = 100,
    seed: int = 0,
    per_row: bool = False,
    n_boot: int = CEILING_BOOTSTRAP,
    confidence: float = 0.95,
) -> NoiseCeiling:
    """Reliability of the seed-averaged deltas from ``per_seed`` ``[n_seeds, ...]``.

    ``per_row``: the halves are compared row by row (``per_seed`` ``[n_seeds, rows, cols]``,
    the mean over rows of the correlation over columns), the reliability of a per-row score such
    as LDS (rows: test points, columns: subsets) instead of a pooled one.

    Two disjoint halves of h = floor(S / 2) seeds are drawn; the correlation r between the
    halves' means is corrected to all S seeds by the Spearman-Brown formula k r / (1 + (k - 1) r),
    k = S / h (2 r / (1 + r) for an even S), and averaged over up to ``max_splits`` random
    splits. Reported for Pearson and Spearman. ``max_correlation`` = sqrt(Pearson reliability)
    bounds the Pearson correlation a noise-free predictor can reach against the seed mean.

    The bound gets a percentile interval from ``n_boot`` two-way bootstrap replicates (the
    measured points resampled along both axes after the seed axis, as the metrics' intervals
    resample them; up to ``CEILING_BOOTSTRAP_SPLITS`` split-halves per replicate): with two
    seeds there is one split, and the interval is what says how little that one split knows.
    """
    per_seed = np.asarray(per_seed, float)
    n_seeds = per_seed.shape[0]
    if n_seeds < 2:
        raise FidelityError("a noise ceiling needs at least two seeds")
    rng = np.random.default_rng(seed)
    half = n_seeds // 2
    k = n_seeds / half
    splits: set[tuple[tuple[int, ...], ...]] = set()
    for _ in range(max_splits * 4):
        order = rng.permutation(n_seeds)
        halves = (
            tuple(sorted(order[:half].tolist())),
            tuple(sorted(order[half : 2 * half].tolist())),
        )
        splits.add(tuple(sorted(halves)))
        if len(splits) >= max_splits:
            break
    values: dict[str, list[float]] = {"pearson": [], "spearman": []}
    correlations: tuple[tuple[str, Callable[[np.ndarray, np.ndarray], float]], ...] = (
        (("pearson", mean_row_pearson), ("spearman", mean_row_spearman))
        if per_row
        else (("pearson", pearson), ("spearman", spearman))
    )
    ordered = sorted(splits)
    for name, fn in correlations:
        values[name] = _split_half(per_seed, ordered, k, fn)
    reliability = {name: _finite_mean(np.array(v)) for name, v in values.items()}
    low = high = float("nan")
    if n_boot and per_seed.ndim == 3:
        pearson_fn = correlations[0][1]
        bounds = np.empty(n_boot)
        few = ordered[:CEILING_BOOTSTRAP_SPLITS]
        for b in range(n_boot):
            rows = rng.integers(0, per_seed.shape[1], per_seed.shape[1])
            cols = rng.integers(0, per_seed.shape[2], per_seed.shape[2])
            resampled = per_seed[:, rows][:, :, cols]
            replicate = _finite_mean(np.array(_split_half(resampled, few, k, pearson_fn)))
            bounds[b] = np.sqrt(max(replicate, 0.0)) if np.isfinite(replicate) else np.nan
        finite = bounds[np.isfinite(bounds)]
        if finite.size:
            tail = 100 * (1 - confidence) / 2
            low, high = (float(v) for v in np.percentile(finite, [tail, 100 - tail]))
    return NoiseCeiling(
        pearson=finite_or_none(reliability["pearson"]),
        spearman=finite_or_none(reliability["spearman"]),
        max_correlation=finite_or_none(np.sqrt(max(reliability["pearson"], 0.0))),
        seeds=n_seeds,
        splits=len(splits),
        max_correlation_low=finite_or_none(low),
        max_correlation_high=finite_or_none(high),
    )


def _split_half(
    per_seed: np.ndarray,
    splits: list[tuple[tuple[int, ...], ...]],
    k: float,
    correlation: Callable[[np.ndarray, np.ndarray], float],
) -> list[float]:
    """The Spearman-Brown corrected correlation between the halves' means of every split."""
    found = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for one, other in splits:
            r = correlation(per_seed[list(one)].mean(0), per_seed[list(other)].mean(0))
            found.append(k * r / (1 + (k - 1) * r) if r > -1 / (k - 1) else float("nan"))
    return found


#: Pearson below which an estimator is flagged as not computing the estimand it claims.
CONFORMANCE_THRESHOLD = 0.999


def crashed_conformance(
    reference_label: str,
    reason: str,
    tolerance: float | None = None,
    threshold: float = CONFORMANCE_THRESHOLD,
) -> Conformance:
    """The conformance of an estimator whose library raised instead of returning scores: no
    numbers, flagged, the exception as the reason."""
    return Conformance(
        reference=reference_label,
        pearson=None,
        max_relative_difference=None,
        finite=False,
        flagged=True,
        reason=f"crashed: {reason}",
        threshold=threshold,
        tolerance=tolerance,
    )


def conformance(
    candidate: np.ndarray,
    reference: np.ndarray,
    *,
    reference_label: str,
    threshold: float = CONFORMANCE_THRESHOLD,
    tolerance: float | None = None,
) -> Conformance:
    """Agreement of an estimator with the reference whose estimand it claims to compute: pooled
    Pearson, max |candidate - reference| / max |reference|, whether every value is finite, and
    ``flagged`` (Pearson below ``threshold``, a non-finite value, or, where a ``tolerance`` is
    given for an estimator that claims the same numbers rather than the same ranking, a max
    relative difference above it: a probable defect)."""
    candidate, reference = np.asarray(candidate, float), np.asarray(reference, float)
    finite = bool(np.isfinite(candidate).all())
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    if finite:
        r = pearson(candidate, reference)
        difference = float(np.abs(candidate - reference).max() / scale) if scale > 0 else None
    else:
        r, difference = float("nan"), None
    reason = None
    if not finite:
        reason = f"{int((~np.isfinite(candidate)).sum())} NaN or infinite value(s)"
    elif not r >= threshold:
        reason = f"Pearson {r:.6f} < {threshold}"
    elif tolerance is not None and difference is not None and difference > tolerance:
        reason = f"max relative difference {difference:.2e} > {tolerance:g}"
    return Conformance(
        reference=reference_label,
        pearson=finite_or_none(r),
        max_relative_difference=difference,
        finite=finite,
        flagged=reason is not None,
        reason=reason,
        threshold=threshold,
        tolerance=tolerance,
    )
