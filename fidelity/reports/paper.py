"""Paper figures at publication size: PNG (300 dpi) and PDF, each with its data as CSV.

Drawing only: every function takes rows of data (dicts) that ``fidelity.paper`` gathered from
run directories, and writes ``NAME.png``, ``NAME.pdf`` and ``NAME.csv`` into a folder.
"""

from __future__ import annotations

import csv
import itertools
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fidelity.reports.format import interval_bars, literal_text, log_axis

#: Gaps below this are float64 round-off of converged solves, drawn at the floor, not as bars.
ROUND_OFF = 1e-10

#: Full text width of a two-column paper (inches); fonts sized to be read at 100%.
TEXT_WIDTH = 6.75
FONT = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
}


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The figure's data, one row per plotted value, columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", rc=FONT)
    return plt, sns


def _save(plt, figure, out: Path, name: str, rows: Sequence[dict[str, Any]]) -> list[Path]:
    # Laid out by constrained layout and saved with a tight box
    # (``fidelity.reports.format.PRINT_READY``).
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    figure.savefig(paths[0], dpi=300)
    figure.savefig(paths[1])
    plt.close(figure)
    return [*paths, write_csv(rows, out / f"{name}.csv")]


@literal_text
def koh2017_fig2(panels: Sequence[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """Predicted vs actual change in test loss of one test point for its top-|influence|
    removals, one panel per model (Koh & Liang 2017, Fig. 2).

    Each panel: ``{"title", "estimator", "response", "predicted", "actual", "pearson"}``.
    """
    import numpy as np

    plt, _ = _figure()
    figure, axes = plt.subplots(1, len(panels), figsize=(TEXT_WIDTH, 2.6), squeeze=False)
    rows = []
    for axis, panel in zip(axes[0], panels, strict=True):
        raw_actual, raw_predicted = np.asarray(panel["actual"]), np.asarray(panel["predicted"])
        # One power of ten for both axes, written into the labels (matplotlib's offset text
        # would collide with the x label at this size); the CSV keeps the raw values.
        largest = float(max(np.abs(raw_actual).max(), np.abs(raw_predicted).max(), 1e-300))
        exponent = int(np.floor(np.log10(largest)))
        unit = "" if -1 <= exponent <= 1 else f" (×1e{exponent})"
        factor = 1.0 if not unit else 10.0**-exponent
        actual, predicted = raw_actual * factor, raw_predicted * factor
        axis.scatter(actual, predicted, s=9, alpha=0.75, color="#2f4b7c", linewidth=0)
        low = float(min(actual.min(), predicted.min()))
        high = float(max(actual.max(), predicted.max()))
        pad = 0.05 * (high - low or 1.0)
        axis.plot([low - pad, high + pad], [low - pad, high + pad], "--", color="0.4", lw=0.8)
        axis.set_xlim(low - pad, high + pad)
        axis.set_ylim(low - pad, high + pad)
        axis.set_aspect("equal")
        axis.set_title(f"{panel['title']}\nPearson r = {panel['pearson']:.3f}")
        axis.set_xlabel(f"actual change in test loss{unit}\n({panel['response']})")
        axis.set_ylabel(f"predicted change{unit}\n({panel['estimator']})")
        for position, (a, p) in enumerate(zip(raw_actual, raw_predicted, strict=True)):
            rows.append(
                {
                    "panel": panel["title"],
                    "problem": panel["problem"],
                    "test_index": panel["test_index"],
                    "train_index": int(panel["train_index"][position]),
                    "estimator": panel["estimator"],
                    "response": panel["response"],
                    "predicted": float(p),
                    "actual": float(a),
                }
            )
    return _save(plt, figure, out, name, rows)


@literal_text
def bae2022_decomposition(rows: Sequence[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """Bars of the five gaps per model (Bae et al. 2022): output-space RMS and relative MAE on
    the measurement. ``rows``: {problem, gap, output_rms, relative_mae, ...}; gaps without an
    output-space value (a ranking score such as grad-cos) are written to the CSV, not drawn.
    Both axes are logarithmic; a gap below ``ROUND_OFF`` (the stages agree to float64
    round-off, as on a convex model: 1e-16 there is noise, not a gap) is drawn at the axis floor
    and labelled "< 1e-10" instead of as a bar of its own size."""
    import numpy as np

    plt, sns = _figure()
    drawn = [row for row in rows if row["output_rms"] is not None]
    gaps = list(dict.fromkeys(row["gap"] for row in drawn))
    problems = list(dict.fromkeys(row["problem"] for row in drawn))
    height = 0.22 * len(gaps) * max(len(problems), 2) + 1.3
    figure, axes = plt.subplots(1, 2, figsize=(TEXT_WIDTH, height), squeeze=False, sharey=True)
    for axis, key, label in (
        (axes[0, 0], "output_rms", "output-space RMS difference"),
        (axes[0, 1], "relative_mae", "mean |Δa − Δb| / mean |Δ cold|"),
    ):
        values = np.array([np.nan if row[key] is None else row[key] for row in drawn], float)
        # the axis reaches down to the round-off floor only when some gap is round-off
        finite = values[np.isfinite(values)]
        if finite.size and bool((finite < ROUND_OFF).any()):
            floor = ROUND_OFF / 10
        else:
            floor = 10 ** np.floor(np.log10(finite.min() / 2)) if finite.size else ROUND_OFF / 10
        sns.barplot(
            x=np.where(values >= ROUND_OFF, values, floor),
            y=[row["gap"] for row in drawn],
            hue=[row["problem"] for row in drawn],
            hue_order=problems,
            order=gaps,
            ax=axis,
            orient="h",
            legend=axis is axes[0, 0],
        )
        log_axis(axis, ticks=5)
        axis.set_xlim(left=floor)
        for container in axis.containers:
            labels = [
                f"< {ROUND_OFF:.0e}" if bar.get_width() <= floor else f"{bar.get_width():.2g}"
                for bar in container
            ]
            axis.bar_label(container, labels=labels, fontsize=6, padding=1.5)
        axis.set_xlabel(label)
        axis.set_ylabel("")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].get_legend().remove()
    figure.legend(handles, labels, title="model", loc="outside lower center", ncol=len(labels))
    return _save(plt, figure, out, name, rows)


@literal_text
def estimator_ladder(rows: Sequence[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """Pooled Pearson of each estimator against each response stage (ladder order on x), one
    panel per problem, with the bootstrap interval as error bars."""
    import numpy as np

    plt, _ = _figure()
    problems = list(dict.fromkeys(row["problem"] for row in rows))
    columns = min(len(problems), 3)
    lines = -(-len(problems) // columns)
    figure, axes = plt.subplots(
        lines, columns, figsize=(TEXT_WIDTH, 2.3 * lines + 0.3), squeeze=False, sharey=True
    )
    for axis in axes.ravel()[len(problems) :]:
        axis.set_visible(False)
    every_estimator = list(dict.fromkeys(row["estimator"] for row in rows))
    markers = dict(zip(every_estimator, "osD^vP*Xh<>p" * 3, strict=False))
    # Estimators often coincide (exact, gnh and cg on a convex model): each is shifted a little
    # along x and has its own marker, so that overlapping series stay visible.
    width = 0.5 / max(len(every_estimator), 1)
    for axis, problem in zip(axes.ravel(), problems, strict=False):
        mine = [row for row in rows if row["problem"] == problem]
        stages = list(dict.fromkeys(row["stage"] for row in mine))
        for estimator in dict.fromkeys(row["estimator"] for row in mine):
            points = {row["stage"]: row for row in mine if row["estimator"] == estimator}
            shift = (every_estimator.index(estimator) - (len(every_estimator) - 1) / 2) * width
            x = np.arange(len(stages)) + shift
            y = np.array([_value(points.get(s), "pearson") for s in stages])
            low = np.array([_value(points.get(s), "low") for s in stages])
            high = np.array([_value(points.get(s), "high") for s in stages])
            (line,) = axis.plot(
                x, y, marker=markers[estimator], markersize=3.5, linewidth=1, label=estimator
            )
            interval_bars(axis, x, low, high, line.get_color(), capsize=2, linewidth=1)
        axis.set_xticks(np.arange(len(stages)), stages, rotation=30, ha="right")
        axis.set_title(problem)
        axis.set_ylabel("pooled Pearson r")
    finite = [v for row in rows for v in (row["pearson"], row["low"]) if v is not None]
    bottom = min(finite, default=0.0)
    axes.ravel()[0].set_ylim(bottom - 0.05 * (1.02 - bottom), 1.02)  # shared: every value shows
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    figure.legend(
        handles, labels, title="estimator", loc="outside lower center", ncol=min(len(labels), 6)
    )
    return _save(plt, figure, out, name, rows)


def _value(row: dict[str, Any] | None, key: str) -> float:
    import numpy as np

    return np.nan if row is None or row[key] is None else row[key]


@literal_text
def lds_loo_table(rows: Sequence[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """dattri's benchmark table as a figure: estimators in rows, (problem, measure) in
    columns, each cell the value with its interval, shaded by the value (0 to 1).

    Each row: ``{"problem", "estimator", "measure", "value", "low", "high"}``.
    """
    import numpy as np

    plt, _ = _figure()
    columns = list(dict.fromkeys((row["problem"], row["measure"]) for row in rows))
    estimators = [e for e in dict.fromkeys(row["estimator"] for row in rows) if e != "noise bound"]
    if any(row["estimator"] == "noise bound" for row in rows):
        estimators.append("noise bound")
    cells = {(row["estimator"], row["problem"], row["measure"]): row for row in rows}
    values = np.full((len(estimators), len(columns)), np.nan)
    for i, estimator in enumerate(estimators):
        for j, (problem, measure) in enumerate(columns):
            cell = cells.get((estimator, problem, measure))
            if cell is not None and cell["value"] is not None:
                values[i, j] = cell["value"]
    height = 0.32 * len(estimators) + 1.1
    figure, axis = plt.subplots(figsize=(TEXT_WIDTH, height))
    axis.imshow(np.clip(values, 0, 1), cmap="Blues", vmin=0, vmax=1.4, aspect="auto")
    for i, estimator in enumerate(estimators):
        for j, (problem, measure) in enumerate(columns):
            cell = cells.get((estimator, problem, measure))
            if cell is None or cell["value"] is None:
                text = "-"
            elif cell["low"] is None or cell["high"] is None:
                text = f"{cell['value']:.3f}"
            else:
                text = f"{cell['value']:.3f} [{cell['low']:.2f}, {cell['high']:.2f}]"
            style = "italic" if estimator == "noise bound" else "normal"
            axis.text(j, i, text, ha="center", va="center", fontsize=6.5, style=style)
    # A long problem name is broken at its hyphens so that neighbouring headers do not collide.
    headers = [
        "\n".join(textwrap.wrap(p, 16, break_on_hyphens=True)) + f"\n{m}" for p, m in columns
    ]
    axis.set_xticks(range(len(columns)), headers)
    axis.xaxis.tick_top()
    axis.set_yticks(range(len(estimators)), estimators)
    axis.tick_params(length=0)
    axis.grid(False)
    for j in range(1, len(columns)):
        axis.axvline(j - 0.5, color="white", linewidth=1.5)
    return _save(plt, figure, out, name, rows)


@literal_text
def koh2019_groups(panels: Sequence[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """Predicted against actual group effects, one panel per (problem, estimator), each
    (group, test point) pair coloured by the kind of group, y = x dashed, each kind's slope in
    the legend (Koh et al. 2019, Fig. 1).

    Each panel: ``{"problem", "estimator", "target", "kinds", "sizes", "actual" [groups,
    n_test], "predicted" [groups, n_test], "slopes", "pearson"}``.
    """
    import numpy as np

    plt, sns = _figure()
    columns = min(len(panels), 3)
    lines = -(-len(panels) // columns)
    figure, axes = plt.subplots(
        lines, columns, figsize=(TEXT_WIDTH, 2.35 * lines + 0.2), squeeze=False
    )
    for axis in axes.ravel()[len(panels) :]:
        axis.set_visible(False)
    colours = dict(
        zip(("random", "class", "neighbours"), sns.color_palette("deep", 3), strict=True)
    )
    rows = []
    for axis, panel in zip(axes.ravel(), panels, strict=False):
        actual, predicted = np.asarray(panel["actual"]), np.asarray(panel["predicted"])
        kinds = np.asarray(panel["kinds"])
        for kind in dict.fromkeys(kinds.tolist()):
            chosen = kinds == kind
            slope = panel["slopes"].get(kind)
            label = kind if slope is None else f"{kind} (slope {slope:.2f})"
            axis.scatter(
                actual[chosen].ravel(),
                predicted[chosen].ravel(),
                s=4,
                alpha=0.6,
                linewidth=0,
                color=colours.get(kind),
                label=label,
            )
        low = float(min(actual.min(), predicted.min()))
        high = float(max(actual.max(), predicted.max()))
        axis.plot([low, high], [low, high], "--", color="0.4", lw=0.8)
        title = f"{panel['problem']}: {panel['estimator']}"
        axis.set_title(textwrap.fill(title, 30, break_on_hyphens=False))
        axis.set_xlabel(f"actual change of test {panel['target']}")
        axis.set_ylabel("predicted change")
        axis.legend(fontsize=5.5, loc="upper left", handletextpad=0.2, borderpad=0.3)
        sizes = np.asarray(panel["sizes"])
        for g in range(actual.shape[0]):
            for t in range(actual.shape[1]):
                rows.append(
                    {
                        "problem": panel["problem"],
                        "estimator": panel["estimator"],
                        "kind": str(kinds[g]),
                        "size": int(sizes[g]),
                        "group": g,
                        "test_point": t,
                        "actual": float(actual[g, t]),
                        "predicted": float(predicted[g, t]),
                    }
                )
    return _save(plt, figure, out, name, rows)


@literal_text
def curvature_ladder(rows: Sequence[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """The curvature ladder (Hong et al. 2025): each rung's LDS and leave-one-out Pearson
    (rungs in ladder order on x, one panel per problem, intervals as error bars), and beside the
    figure a Markdown table with the gap each rung adds (the value of the rung above minus its
    own).

    Each row: ``{"problem", "estimator", "measure", "value", "low", "high"}``, the estimators
    already in ladder order."""
    import numpy as np

    plt, _ = _figure()
    problems = list(dict.fromkeys(row["problem"] for row in rows))
    measures = list(dict.fromkeys(row["measure"] for row in rows))
    figure, axes = plt.subplots(
        1, len(problems), figsize=(TEXT_WIDTH, 2.6), squeeze=False, sharey=True
    )
    for axis, problem in zip(axes[0], problems, strict=True):
        mine = [row for row in rows if row["problem"] == problem]
        rungs = list(dict.fromkeys(row["estimator"] for row in mine))
        for number, measure in enumerate(measures):
            points = {row["estimator"]: row for row in mine if row["measure"] == measure}
            x = np.arange(len(rungs)) + (number - (len(measures) - 1) / 2) * 0.12
            y = np.array([_value(points.get(rung), "value") for rung in rungs])
            low = np.array([_value(points.get(rung), "low") for rung in rungs])
            high = np.array([_value(points.get(rung), "high") for rung in rungs])
            (line,) = axis.plot(
                x, y, marker="os"[number % 2], markersize=3.5, linewidth=1, label=measure
            )
            interval_bars(axis, x, low, high, line.get_color(), capsize=2, linewidth=1)
        axis.set_xticks(np.arange(len(rungs)), rungs, rotation=30, ha="right")
        axis.set_title(problem)
    axes[0, 0].set_ylabel("correlation with retraining")
    finite = [row["low"] for row in rows if row["low"] is not None]
    axes[0, 0].set_ylim(min(0.0, *finite) - 0.02, 1.02)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    paths = _save(plt, figure, out, name, rows)
    return [*paths, _ladder_table(rows, problems, measures, out / f"{name}.md")]


def _ladder_table(
    rows: Sequence[dict[str, Any]], problems: list[str], measures: list[str], path: Path
) -> Path:
    """Per problem and measure: each rung's value [interval] and the gap it adds below the
    rung above it."""

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        "| problem | rung | " + " | ".join(f"{m} | gap to the rung above" for m in measures) + " |",
        "|---|---|" + "---:|---:|" * len(measures),
    ]
    for problem in problems:
        mine = [row for row in rows if row["problem"] == problem]
        rungs = list(dict.fromkeys(row["estimator"] for row in mine))
        for index, rung in enumerate(rungs):
            cells = []
            for measure in measures:
                found = {row["estimator"]: row for row in mine if row["measure"] == measure}
                row = found.get(rung)
                above = found.get(rungs[index - 1]) if index else None
                if row is None or row["value"] is None:
                    cells += ["n/a", ""]
                    continue
                interval = (
                    "" if row["low"] is None else f" [{shown(row['low'])}, {shown(row['high'])}]"
                )
                gap = (
                    ""
                    if above is None or above["value"] is None
                    else f"{above['value'] - row['value']:+.3f}"
                )
                cells += [f"{shown(row['value'])}{interval}", gap]
            lines.append(f"| {problem} | {rung} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@literal_text
def basu_fragility(rows: Sequence[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """Basu et al. (2021): leave-one-out Pearson (top) and Spearman (bottom) of influence
    against retraining as the network grows deeper (left; width 32) and wider (right; one
    hidden layer), one colour per weight decay and one line style per estimator, intervals as
    error bars and each weight decay's noise bound dotted.

    Each row: ``{"problem", "estimator", "width", "depth", "weight_decay", "measure", "value",
    "low", "high", "noise_bound"}``."""
    import numpy as np

    plt, _ = _figure()
    measures = [m for m in ("pearson", "spearman") if any(r["measure"] == m for r in rows)]
    sweeps = (
        ("depth", "hidden layers (width 32)", 32, "width"),
        ("width", "hidden units (one layer)", 1, "depth"),
    )
    figure, axes = plt.subplots(
        len(measures),
        2,
        figsize=(TEXT_WIDTH, 2.3 * len(measures) + 0.6),
        squeeze=False,
        sharey="row",
    )
    decays = sorted({row["weight_decay"] for row in rows}, reverse=True)
    estimators = list(dict.fromkeys(row["estimator"] for row in rows))
    colors = {decay: f"C{index}" for index, decay in enumerate(decays)}
    for line, measure in enumerate(measures):
        for column, (swept, label, fixed, other) in enumerate(sweeps):
            axis = axes[line, column]
            for decay, (number, estimator) in itertools.product(decays, enumerate(estimators)):
                chosen = sorted(
                    (
                        row
                        for row in rows
                        if row["measure"] == measure
                        and row["estimator"] == estimator
                        and row["weight_decay"] == decay
                        and row[other] == fixed
                    ),
                    key=lambda row: row[swept],
                )
                if not chosen:
                    continue
                x = np.array([row[swept] for row in chosen], dtype=float)
                # estimators side by side at each x, so that their intervals stay apart
                shifted = x * (1 + 0.04 * (number - (len(estimators) - 1) / 2))
                y = np.array([_value(row, "value") for row in chosen])
                low = np.array([_value(row, "low") for row in chosen])
                high = np.array([_value(row, "high") for row in chosen])
                color = colors[decay]
                axis.plot(
                    shifted,
                    y,
                    ("-", "--")[number % 2],
                    color=color,
                    marker="os"[number % 2],
                    markersize=3.5,
                    linewidth=1,
                    label=f"{estimator}, weight decay {decay:g}",
                )
                interval_bars(axis, shifted, low, high, color, capsize=2, linewidth=1)
                if number == 0:
                    bounds = np.array([_value(row, "noise_bound") for row in chosen])
                    if np.isfinite(bounds).any():
                        axis.plot(
                            x,
                            bounds,
                            ":",
                            color=color,
                            marker="x",
                            markersize=3,
                            linewidth=1,
                            label=f"noise bound, weight decay {decay:g}",
                        )
            axis.set_xscale("log" if swept == "width" else "linear")
            ticks = sorted({row[swept] for row in rows if row[other] == fixed})
            axis.set_xticks(ticks, [str(tick) for tick in ticks])
            axis.minorticks_off()
            axis.set_xlabel(label)
            axis.set_title(f"{measure.capitalize()} vs {swept}", fontsize=8)
        axes[line, 0].set_ylabel(f"LOO {measure.capitalize()}")
    finite = [row["low"] for row in rows if row["low"] is not None]
    for axis in axes[:, 0]:
        axis.set_ylim(min(0.0, *finite) - 0.05, 1.02)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=3)
    return _save(plt, figure, out, name, rows)
