"""Figures: predicted vs actual deltas (Koh & Liang 2017, Fig. 2 style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # reports render files; never open a window

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns


def scatter_grid(
    problem: dict[str, Any], arrays: dict[str, np.ndarray], path: Path, *, dpi: int = 150
) -> Path:
    """One panel per (response row, estimator column): actual on x, predicted on y, y = x line,
    Pearson r in the title, removed points coloured by how they were chosen."""
    estimators = list(problem["metrics"])
    responses = list(next(iter(problem["metrics"].values())))
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
            r = problem["metrics"][estimator][response]["pearson"]["value"]
            r_text = "n/a" if r is None else f"{r:.3f}"
            axis.set_title(f"{problem['name']}: {estimator} vs {response}, r = {r_text}")
            axis.set_xlabel(f"actual change in test loss ({response})")
            axis.set_ylabel(f"predicted change in test loss ({estimator})")
            axis.ticklabel_format(style="sci", scilimits=(-3, 3))
    if axes[0, 0].get_legend() is not None:
        axes[0, 0].legend(title="removed point", loc="upper left", fontsize=7, title_fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def decomposition_bars(problem: dict[str, Any], path: Path, *, dpi: int = 150) -> Path:
    """Bars of each ladder gap and each estimator's solver gap, measured in output space and on
    the measurement (one panel per measure)."""
    decomposition = problem["decomposition"]
    rows = list(decomposition["gaps"]) + list(decomposition["estimators"].values())
    names = [f"{gap['from']} -> {gap['to']}" for gap in rows]
    measures = [
        ("output_rms", "output RMS difference"),
        ("relative_mae", "mean |delta_a - delta_b| / mean |delta_ref|"),
        ("one_minus_pearson", "1 - Pearson"),
    ]
    sns.set_theme(style="whitegrid", context="paper")
    figure, axes = plt.subplots(
        1, len(measures), figsize=(4.2 * len(measures), 0.35 * len(rows) + 1.6), squeeze=False
    )
    ladder_rows = len(decomposition["gaps"])
    colours = ["#4c72b0"] * ladder_rows + ["#dd8452"] * (len(rows) - ladder_rows)
    for axis, (key, title) in zip(axes[0], measures, strict=True):
        values = [np.nan if gap[key] is None else gap[key] for gap in rows]
        sns.barplot(x=values, y=names, hue=names, palette=colours, legend=False, ax=axis)
        axis.set_title(f"{problem['name']}: {title}")
        axis.set_xlabel(title)
        axis.set_ylabel("")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
