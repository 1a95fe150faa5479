"""Paper figures at publication size: PNG (300 dpi) and PDF, each with its data as CSV.

Drawing only: every function takes rows of data (dicts) that ``fidelity.paper`` gathered from
run directories, and writes ``NAME.png``, ``NAME.pdf`` and ``NAME.csv`` into a folder.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def _save(
    plt, figure, out: Path, name: str, rows: Sequence[dict[str, Any]], *, layout: bool = True
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    if layout:
        figure.tight_layout()
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    figure.savefig(paths[0], dpi=300)
    figure.savefig(paths[1])
    plt.close(figure)
    return [*paths, write_csv(rows, out / f"{name}.csv")]


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


def bae2022_decomposition(rows: Sequence[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """Bars of the five gaps per model (Bae et al. 2022): output-space RMS and relative MAE on
    the measurement. ``rows``: {problem, gap, output_rms, relative_mae, ...}; gaps without an
    output-space value (a ranking score such as grad-cos) are written to the CSV, not drawn.
    Both axes are logarithmic; a gap of exactly 0 (the stages agree to the last bit) is drawn
    at the axis floor and labelled 0."""
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
        positive = values[np.isfinite(values) & (values > 0)]
        floor = 10 ** np.floor(np.log10(positive.min())) / 10 if positive.size else 1e-16
        sns.barplot(
            x=np.where(values > 0, values, floor),
            y=[row["gap"] for row in drawn],
            hue=[row["problem"] for row in drawn],
            hue_order=problems,
            order=gaps,
            ax=axis,
            orient="h",
            legend=axis is axes[0, 0],
        )
        axis.set_xscale("log")
        axis.set_xlim(left=floor)
        for container in axis.containers:
            labels = [
                "0" if bar.get_width() <= floor else f"{bar.get_width():.2g}" for bar in container
            ]
            axis.bar_label(container, labels=labels, fontsize=6, padding=1.5)
        axis.set_xlabel(label)
        axis.set_ylabel("")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].get_legend().remove()
    figure.legend(handles, labels, title="model", loc="lower center", ncol=len(labels))
    figure.tight_layout(rect=(0, 0.55 / height, 1, 1))
    return _save(plt, figure, out, name, rows, layout=False)


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
    for axis, problem in zip(axes.ravel(), problems, strict=False):
        mine = [row for row in rows if row["problem"] == problem]
        stages = list(dict.fromkeys(row["stage"] for row in mine))
        for estimator in dict.fromkeys(row["estimator"] for row in mine):
            points = {row["stage"]: row for row in mine if row["estimator"] == estimator}
            x = np.arange(len(stages))
            y = np.array([_value(points.get(s), "pearson") for s in stages])
            low = np.array([_value(points.get(s), "low") for s in stages])
            high = np.array([_value(points.get(s), "high") for s in stages])
            axis.errorbar(
                x,
                y,
                yerr=[np.nan_to_num(y - low), np.nan_to_num(high - y)],
                marker="o",
                markersize=3,
                capsize=2,
                linewidth=1,
                label=estimator,
            )
        axis.set_xticks(np.arange(len(stages)), stages, rotation=30, ha="right")
        axis.set_title(problem)
        axis.set_ylabel("pooled Pearson r")
    finite = [v for row in rows for v in (row["pearson"], row["low"]) if v is not None]
    bottom = min(finite, default=0.0)
    axes.ravel()[0].set_ylim(bottom - 0.05 * (1.02 - bottom), 1.02)  # shared: every value shows
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        title="estimator",
        loc="lower center",
        ncol=len(labels),
        bbox_to_anchor=(0.5, -0.02),
    )
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(plt, figure, out, name, rows, layout=False)


def _value(row: dict[str, Any] | None, key: str) -> float:
    import numpy as np

    return np.nan if row is None or row[key] is None else row[key]
