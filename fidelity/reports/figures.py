"""Report figures: predicted vs actual deltas (Koh & Liang 2017, Fig. 2 style), the gap
decomposition, correlation heatmaps, per-test-point distributions and trends."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from fidelity.history import HistoryRun
from fidelity.reports.format import interval_bars, literal_text, log_axis
from fidelity.results import (
    CorrelationMatrix,
    CounterfactualResults,
    Decomposition,
    GroupResults,
    LdsResults,
    PerTestCorrelations,
    ProblemResults,
    RunResults,
)


@literal_text
def scatter_grid(
    problem: ProblemResults, arrays: dict[str, np.ndarray], path: Path, *, dpi: int = 150
) -> Path:
    """One panel per (response row, estimator column): actual on x, predicted on y, y = x line,
    Pearson r in the title, removed points coloured by how they were chosen."""
    plt, sns = _plotting()
    estimators = list(problem.metrics)
    responses = list(problem.responses)
    sns.set_theme(style="whitegrid", context="paper")
    figure, axes = plt.subplots(
        len(responses),
        len(estimators),
        figsize=(3.4 * len(estimators), 3.2 * len(responses)),
        squeeze=False,
    )
    reasons = np.broadcast_to(arrays["removed_reason"], arrays[f"response/{responses[0]}"].shape)
    for row, response in enumerate(responses):
        actual = arrays[f"response/{response}"]
        for col, estimator in enumerate(estimators):
            predicted = arrays[f"estimator/{estimator}"]
            axis = axes[row, col]
            sns.scatterplot(
                x=actual.ravel(),
                y=predicted.ravel(),
                hue=reasons.ravel(),
                hue_order=["top", "random"],
                s=10,
                alpha=0.7,
                linewidth=0,
                ax=axis,
                legend=(row == 0 and col == 0),
            )
            low = float(min(actual.min(), predicted.min()))
            high = float(max(actual.max(), predicted.max()))
            axis.plot([low, high], [low, high], color="0.3", linewidth=0.8, linestyle="--")
            found = problem.metric(estimator, response, "pearson")
            r = None if found is None else found.value
            r_text = "n/a" if r is None else f"{r:.3f}"
            axis.set_title(f"{estimator} vs {response}\nPearson r = {r_text}")
            axis.set_xlabel(f"actual change in test loss ({response})")
            axis.set_ylabel(f"predicted change in test loss ({estimator})")
            axis.ticklabel_format(style="sci", scilimits=(-3, 3))
    if axes[0, 0].get_legend() is not None:
        axes[0, 0].legend(title="removed point", loc="upper left", fontsize=7, title_fontsize=7)
    figure.suptitle(f"{problem.name}: predicted vs actual change in test loss")
    # Constrained layout already fits its many panels into the figure: the tight box's second
    # draw would take 40% of the nightly's largest figure's time (4.2 s -> 2.5 s on digits-mlp)
    return _save(figure, path, dpi=dpi, tight=False)


@literal_text
def decomposition_bars(
    name: str, decomposition: Decomposition, path: Path, *, dpi: int = 150
) -> Path:
    """Bars of each ladder gap (blue), each estimator's solver gap (orange) and the
    training-path rung (green), measured in output space and on the measurement (one panel per
    measure)."""
    plt, sns = _plotting()
    rows = [*decomposition.gaps, *decomposition.estimators.values(), *decomposition.path]
    names = [f"{gap.source} -> {gap.target}" for gap in rows]
    path_start = len(rows) - len(decomposition.path)
    names[path_start:] = [f"{name} (path)" for name in names[path_start:]]
    measures = [
        ("output_rms", "output RMS difference"),
        ("relative_mae", "mean |delta_a - delta_b| / mean |delta_ref|"),
        ("one_minus_pearson", "1 - Pearson"),
    ]
    sns.set_theme(style="whitegrid", context="paper")
    figure, axes = plt.subplots(
        1, len(measures), figsize=(4.2 * len(measures), 0.35 * len(rows) + 1.6), squeeze=False
    )
    ladder_rows = len(decomposition.gaps)
    colours = (
        ["#4c72b0"] * ladder_rows
        + ["#dd8452"] * (path_start - ladder_rows)
        + ["#55a868"] * len(decomposition.path)
    )
    for axis, (key, title) in zip(axes[0], measures, strict=True):
        values = [_nan_for_none(getattr(gap, key)) for gap in rows]
        sns.barplot(x=values, y=names, hue=names, palette=colours, legend=False, ax=axis)
        axis.set_title(f"{name}: {title}")
        axis.set_xlabel(title)
        axis.set_ylabel("")
    return _save(figure, path, dpi=dpi)


@literal_text
def correlation_heatmap(name: str, correlations: CorrelationMatrix, path: Path) -> Path:
    """Pooled Pearson between every pair of estimators and response stages of one problem."""
    plt, sns = _plotting()
    labels = correlations.labels
    matrix = np.array([[_nan_for_none(v) for v in row] for row in correlations.values])
    names = [
        label.split("/", 1)[1] + (" (response)" if "response/" in label else "") for label in labels
    ]
    size = 1.2 + 0.55 * len(labels)
    sns.set_theme(style="white", context="paper")
    figure, axis = plt.subplots(figsize=(size + 1.6, size + 0.8))
    # A sequential map over the range the values span: correlations of 0.77 and 1.00 must not
    # share one colour, as they did on a -1..1 diverging map.
    finite = matrix[np.isfinite(matrix)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 1.0
    sns.heatmap(
        matrix,
        xticklabels=names,
        yticklabels=names,
        vmin=low if high > low else low - 0.01,
        vmax=high,
        cmap="viridis",
        annot=len(labels) <= 14,
        fmt=".2f" if high - low > 0.1 else ".3f",  # digits enough to tell the colours apart
        annot_kws={"fontsize": 7},
        square=True,
        cbar_kws={"label": "pooled Pearson r"},
        ax=axis,
    )
    axis.set_title(f"{name}: correlation between estimators and stages")
    axis.tick_params(axis="x", rotation=45)
    plt.setp(axis.get_xticklabels(), ha="right")
    return _save(figure, path)


@literal_text
def per_test_distributions(
    name: str, per_test: tuple[PerTestCorrelations, ...], path: Path
) -> Path:
    """Box and strip plots of the per-test-point Pearson and Spearman correlations (one point
    per test point, computed over the removed points), one row per estimator x response."""
    plt, sns = _plotting()
    names, pearsons, spearmans = [], [], []
    for entry in per_test:
        names.append(f"{entry.estimator} vs {entry.response}")
        pearsons.append(np.array([_nan_for_none(v) for v in entry.pearson]))
        spearmans.append(np.array([_nan_for_none(v) for v in entry.spearman]))
    sns.set_theme(style="whitegrid", context="paper")
    figure, axes = plt.subplots(
        1, 2, figsize=(9.0, 0.32 * len(names) + 1.4), squeeze=False, sharey=True
    )
    for axis, values, title in zip(
        axes[0], (pearsons, spearmans), ("Pearson", "Spearman"), strict=True
    ):
        x = np.concatenate(values)
        y = np.repeat(names, [len(v) for v in values])
        keep = np.isfinite(x)
        sns.boxplot(x=x[keep], y=y[keep], order=names, color="#c6d3e6", fliersize=0, ax=axis)
        # The strip's jitter is drawn from a seeded generator (seaborn's stripplot takes the
        # global one), so that the same results draw the same figure.
        rows = np.repeat(np.arange(len(names)), [len(v) for v in values])[keep]
        jitter = np.random.default_rng(0).uniform(-0.2, 0.2, rows.size)
        axis.scatter(x[keep], rows + jitter, s=6, color="#2f4b7c", linewidths=0, zorder=3)
        axis.set_ylim(len(names) - 0.5, -0.5)  # the categorical axis, top row first
        axis.set_xlim(*_correlation_limits(x[keep]))
        axis.set_xlabel(f"per-test-point {title} r (over removed points)")
        axis.set_title(f"{name}: per-test-point {title}")
    return _save(figure, path)


@literal_text
def trend_lines(
    results: RunResults, history: list[HistoryRun], path: Path, *, metric: str = "pearson"
) -> Path:
    """Pooled ``metric`` of every estimator x response over the suite's recorded runs (oldest
    left) and this run (rightmost), one panel per problem."""
    plt, sns = _plotting()
    problems = list(results.problems)
    runs = [*history, None]
    sns.set_theme(style="whitegrid", context="paper")
    figure, axes = plt.subplots(len(problems), 1, figsize=(7.0, 2.1 * len(problems)), squeeze=False)
    positions = np.arange(len(runs))
    labels = _unique_run_labels([run.created if run else results.created for run in runs])
    series = list(
        dict.fromkeys(
            f"{estimator} vs {response}"
            for problem in results.problems.values()
            for estimator, by_response in problem.metrics.items()
            for response in by_response
        )
    )
    # One look per series across panels (colour: response, marker: estimator), one legend for
    # the figure; each series shifted a little along x, so that coinciding ones stay visible.
    responses = list(dict.fromkeys(label.split(" vs ", 1)[1] for label in series))
    estimators = list(dict.fromkeys(label.split(" vs ", 1)[0] for label in series))
    palette = dict(zip(responses, sns.color_palette("tab10", max(len(responses), 1)), strict=False))
    markers = dict(zip(estimators, "osD^vP*Xh<>p" * 3, strict=False))
    width = 0.3 / max(len(series), 1)
    for axis, name in zip(axes[:, 0], problems, strict=True):
        for estimator, by_response in results.problems[name].metrics.items():
            for response, metrics in by_response.items():
                values = []
                for run in history:
                    entry = run.metrics.get((name, estimator, response, metric))
                    values.append(_nan_for_none(None if entry is None else entry.value))
                current = metrics.get(metric)
                values.append(_nan_for_none(None if current is None else current.value))
                label = f"{estimator} vs {response}"
                shift = (series.index(label) - (len(series) - 1) / 2) * width
                axis.plot(
                    positions + shift,
                    values,
                    marker=markers[estimator],
                    markersize=3.5,
                    color=palette[response],
                    label=label,
                )
        axis.set_xticks(positions, labels, rotation=30, ha="right")
        axis.set_ylabel(f"pooled {metric} r")
        axis.set_title(f"{name}: last {len(runs)} runs of suite {results.suite_name}")
    handles: dict[str, Any] = {}
    for axis in axes[:, 0]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    figure.legend(list(handles.values()), list(handles), fontsize=6, loc="outside right upper")
    return _save(figure, path)


@literal_text
def lds_by_alpha(name: str, found: tuple[LdsResults, ...], path: Path) -> Path:
    """LDS against the kept fraction alpha, one panel per subset stage: each estimator's mean
    over test points with its bootstrap interval, and the noise ceiling of the seed-mean
    measurements (grey: above it, where retraining noise leaves nothing to explain)."""
    plt, sns = _plotting()
    stages = list(dict.fromkeys(entry.response for entry in found))
    sns.set_theme(style="whitegrid", context="paper")
    figure, axes = plt.subplots(1, len(stages), figsize=(4.6 * len(stages), 3.4), squeeze=False)
    palette = dict(
        zip(
            dict.fromkeys(e for entry in found for e in entry.metrics),
            sns.color_palette("tab10", 10) * 3,
            strict=False,
        )
    )
    for axis, stage in zip(axes[0], stages, strict=True):
        entries = sorted((e for e in found if e.response == stage), key=lambda e: e.alpha)
        alphas = np.array([entry.alpha for entry in entries])
        positions = np.arange(len(alphas))
        ceilings = [entry.noise_ceiling for entry in entries]
        if any(c is not None and c.spearman is not None for c in ceilings):
            values = np.array([_nan_for_none(c.spearman_bound if c else None) for c in ceilings])
            # each alpha's bound spans its whole group of markers, [position - 0.5, + 0.5]
            edges = np.r_[positions - 0.5, positions[-1] + 0.5]
            levels = np.r_[values, values[-1]]
            axis.fill_between(
                edges, levels, 1.0, color="0.85", step="post", label="above the noise bound"
            )
            axis.step(edges, levels, where="post", color="0.45", linewidth=1.0)
        estimators = list(entries[0].metrics)
        width = 0.8 / max(len(estimators), 1)
        for number, estimator in enumerate(estimators):
            offsets = positions - 0.4 + width * (number + 0.5)
            cells = [entry.metrics.get(estimator, {}).get("lds") for entry in entries]
            value = np.array([_nan_for_none(c.value if c else None) for c in cells])
            low = np.array([_nan_for_none(c.low if c else None) for c in cells])
            high = np.array([_nan_for_none(c.high if c else None) for c in cells])
            axis.plot(
                offsets,
                value,
                "o",
                markersize=4,
                color=palette[estimator],
                label=estimator,
            )
            interval_bars(axis, offsets, low, high, palette[estimator], capsize=2, linewidth=0.9)
        axis.axhline(0.0, color="0.3", linewidth=0.6)
        axis.set_xticks(positions, [f"{alpha:g}" for alpha in alphas])
        axis.set_xlim(-0.5, len(alphas) - 0.5)
        axis.set_ylim(min(-0.1, axis.get_ylim()[0]), 1.0)
        axis.set_xlabel("alpha (fraction of the training set kept)")
        axis.set_ylabel(f"LDS (Spearman, {entries[0].target})")
        axis.set_title(
            f"{name}: {stage}, {entries[0].subsets} subsets x {_seeds(entries[0].seeds)}"
        )
    axes[0, -1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(figure, path)


@literal_text
def counterfactual_curves(name: str, found: tuple[CounterfactualResults, ...], path: Path) -> Path:
    """Per counterfactual stage: the mean change of the target when each ranking's top-k points
    are removed (band: bootstrap interval over test points) and the fraction flipped, against k."""
    plt, sns = _plotting()
    sns.set_theme(style="whitegrid", context="paper")
    flips = any(p.flipped is not None for r in found for c in r.curves.values() for p in c)
    columns = 2 if flips else 1
    figure, axes = plt.subplots(
        len(found), columns, figsize=(4.4 * columns, 3.2 * len(found)), squeeze=False
    )
    for row, result in enumerate(found):
        colours = sns.color_palette("tab10", max(len(result.curves), 1))
        # Rankings often coincide (exact and gnh on a convex model): each curve has its own
        # marker and is shifted by a few percent along the log k axis, so none hides another.
        count = len(result.curves)
        for number, (colour, (method, points)) in enumerate(
            zip(colours, result.curves.items(), strict=True)
        ):
            marker = "osD^vP*Xh<>p"[number % 12]
            ks = np.array([point.k for point in points]) * 1.04 ** (number - (count - 1) / 2)
            value = np.array([_nan_for_none(point.change.value) for point in points])
            low = np.array([_nan_for_none(point.change.low) for point in points])
            high = np.array([_nan_for_none(point.change.high) for point in points])
            style = "--" if method in ("random", "highest loss") else "-"
            axes[row, 0].plot(
                ks, value, style, marker=marker, markersize=3.5, color=colour, label=method
            )
            axes[row, 0].fill_between(ks, low, high, color=colour, alpha=0.15, linewidth=0)
            if flips:
                flipped = np.array([_nan_for_none(point.flipped) for point in points])
                axes[row, 1].plot(ks, flipped, style, marker=marker, markersize=3.5, color=colour)
        every_k = [point.k for points in result.curves.values() for point in points]
        log_axis(axes[row, 0], at=every_k)
        axes[row, 0].set_xlabel("k (top-ranked training points removed)")
        axes[row, 0].set_ylabel(f"mean change of test {result.target}")
        axes[row, 0].set_title(f"{name}: {result.response} ({_seeds(result.seeds)})")
        axes[row, 0].legend(fontsize=6)
        if flips:
            log_axis(axes[row, 1], at=every_k)
            axes[row, 1].set_ylim(-0.02, 1.02)
            axes[row, 1].set_xlabel("k")
            axes[row, 1].set_ylabel("fraction of correct predictions flipped")
            axes[row, 1].set_title(f"{name}: {result.response}, flipped")
    return _save(figure, path)


@literal_text
def group_scatter(
    name: str, result: GroupResults, arrays: dict[str, np.ndarray], path: Path
) -> Path:
    """Predicted against actual group effects (Koh et al. 2019, Fig. 1 style): one panel per
    estimator, every (group, test point) pair coloured by the kind of group, with y = x."""
    plt, sns = _plotting()
    prefix = f"groups/{result.response}"
    actual = arrays[f"{prefix}/seeds"].mean(0)  # [groups, n_test]
    kinds = np.broadcast_to(arrays[f"{prefix}/kinds"][:, None], actual.shape)
    estimators = [e for e in result.fits if f"{prefix}/predicted/{e}" in arrays]
    sns.set_theme(style="whitegrid", context="paper")
    columns = min(len(estimators), 4) or 1
    rows = -(-len(estimators) // columns) or 1
    figure, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.2 * rows), squeeze=False)
    order = list(dict.fromkeys(arrays[f"{prefix}/kinds"].tolist()))
    for number, estimator in enumerate(estimators):
        axis = axes[number // columns, number % columns]
        predicted = arrays[f"{prefix}/predicted/{estimator}"]
        sns.scatterplot(
            x=actual.ravel(),
            y=predicted.ravel(),
            hue=kinds.ravel(),
            hue_order=order,
            s=7,
            alpha=0.6,
            linewidth=0,
            ax=axis,
            legend=number == 0,
        )
        low = float(min(actual.min(), predicted.min()))
        high = float(max(actual.max(), predicted.max()))
        axis.plot([low, high], [low, high], "--", color="0.3", linewidth=0.8)
        slopes = ", ".join(
            f"{kind} {fit.slope:.2f}"
            for kind, fit in result.fits[estimator].items()
            if fit.slope is not None
        )
        # Wrapped to the panel: a long line would run past the figure's edge.
        title = textwrap.fill(f"{estimator}; slope: {slopes}", 38, break_on_hyphens=False)
        axis.set_title(title, fontsize=8)
        axis.set_xlabel(f"actual change of test {result.target}")
        axis.set_ylabel("predicted change")
        axis.ticklabel_format(style="sci", scilimits=(-3, 3))
    for number in range(len(estimators), rows * columns):
        axes[number // columns, number % columns].set_visible(False)
    if axes[0, 0].get_legend() is not None:
        axes[0, 0].legend(title="group", fontsize=6, title_fontsize=6)
    figure.suptitle(f"{name}: group effects, {result.response} ({_seeds(result.seeds)})")
    return _save(figure, path)


def _unique_run_labels(created: list[str]) -> list[str]:
    """``MM-DD HH:MM`` of each run, with the seconds where two share a minute and a count where
    they share a second, so that no two ticks read alike."""
    labels = [time[5:16].replace("T", " ") for time in created]
    if len(set(labels)) < len(labels):
        labels = [time[5:19].replace("T", " ") for time in created]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return unique


def _correlation_limits(values: np.ndarray) -> tuple[float, float]:
    """Axis limits around the correlations drawn (padded, never beyond [-1.05, 1.05]), so the
    data fill the panel instead of a sliver of a fixed -1..1 axis."""
    if not values.size:
        return -1.05, 1.05
    low, high = float(values.min()), float(values.max())
    pad = max(0.05 * (high - low), 0.02)
    return max(low - pad, -1.05), min(high + pad, 1.05)


def _seeds(count: int) -> str:
    return f"{count} seed" if count == 1 else f"{count} seeds"


def _nan_for_none(value: float | None) -> float:
    return np.nan if value is None else value


def _plotting() -> tuple[Any, Any]:
    """pyplot (on the file-only Agg backend: reports never open a window) and seaborn,
    imported when a figure is drawn: they take most of a second to import, which every
    command that draws nothing (check, history, list) would otherwise pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def _save(figure: Any, path: Path, *, dpi: int = 150, tight: bool = True) -> Path:
    # Laid out by constrained layout (``fidelity.reports.format.PRINT_READY``), saved with a
    # tight box (``tight``), which draws the figure once more to measure it.
    import matplotlib

    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({} if tight else {"savefig.bbox": "standard"}):
        figure.savefig(path, dpi=dpi)
    _plotting()[0].close(figure)
    return path
