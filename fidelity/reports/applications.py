"""Markdown sections and figures for the applications (explain, poison, mislabel, prefilter).

Every string that comes from data (training and test sentences, problem and estimator names)
goes through ``escape``: ``md_escape`` for the Markdown files (a review can hold markup),
``terminal_escape`` for what the CLI prints."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fidelity.reports.format import literal_text, log_axis
from fidelity.reports.markdown import md_escape

Escape = Callable[[object], str]


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _interval(entry: dict[str, Any]) -> str:
    if entry["low"] is None:
        return f"{entry['mean']:.3f}"
    return f"{entry['mean']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _paired(entry: dict[str, Any] | None) -> str:
    """A paired difference against random: mean [interval], p-value of the paired t-test."""
    if entry is None:
        return "-"
    p = entry.get("p_value")
    return _interval(entry) + ("" if p is None else f", p = {p:.2g}")


def render_explain(result: dict[str, Any], *, escape: Escape = md_escape) -> str:
    test = result["test"]
    lines = [
        f"## Explanation on {escape(result['problem'])}",
        "",
        f"Test point: {escape(test.get('text') or test.get('index'))} "
        f"(label {test['label']}, predicted {test['predicted']}). "
        f"Helpful: removing the training point would raise this test loss (delta > 0); "
        f"harmful: removing it would lower the loss. Actual: leave-one-out retraining "
        f"({escape(result['loo'])}).",
    ]
    for name, lists in result["estimators"].items():
        for kind in ("helpful", "harmful"):
            lines += [
                "",
                f"### {escape(name)}: {result['top']} most {kind}",
                "",
                "| rank | index | label | predicted | actual | sentence |",
                "|---:|---:|---:|---:|---:|---|",
            ]
            for rank, row in enumerate(lists[kind], 1):
                lines.append(
                    f"| {rank} | {row['index']} | {row['label']} | {_number(row['predicted'])} "
                    f"| {_number(row['actual'])} | {escape(row['text'] or '')} |"
                )
    for kind, table in result["overlap"].items():
        names = list(table)
        lines += [
            "",
            f"Overlap of the top-{result['top']} {kind} lists (fraction shared):",
            "",
            "| | " + " | ".join(escape(n) for n in names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for a in names:
            lines.append(
                f"| {escape(a)} | " + " | ".join(f"{table[a][b]:.2f}" for b in names) + " |"
            )
    return "\n".join(lines) + "\n"


def render_poison(result: dict[str, Any], *, escape: Escape = md_escape) -> str:
    lines = [
        f"## Label-flip poisoning on {escape(result['problem'])}",
        "",
        f"{result['budget']} labels flipped ({100 * result['fraction']:.1f}% of the training "
        f"set), model retrained; test accuracy (mean [95% interval] over seeds "
        f"{', '.join(map(str, result['seeds']))}).",
        "",
        f"Before: {_interval(result['accuracy_before'])}",
    ]
    if result["deterministic_training"]:
        lines.append(
            "Training is convex and converged, so only the random choice varies with the seed; "
            "a choice that does not is retrained once (no interval)."
        )
    lines += [
        "",
        "| points chosen by | accuracy after | change | drop beyond random (paired by seed) |",
        "|---|---:|---:|---:|",
    ]
    before = result["accuracy_before"]["mean"]
    beyond = result.get("drop_beyond_random", {})
    for name, entry in result["accuracy_after"].items():
        lines.append(
            f"| {escape(name)} | {_interval(entry)} | {entry['mean'] - before:+.3f} | "
            f"{_paired(beyond.get(name))} |"
        )
    lines += [
        "",
        "Drop beyond random: the random flips' accuracy minus the choice's, seed by seed (the same "
        "training seed and draw), mean [95% Student-t interval], p-value of the paired t-test.",
    ]
    return "\n".join(lines) + "\n"


def render_mislabel(
    result: dict[str, Any], figure: str | None = None, *, escape: Escape = md_escape
) -> str:
    fractions = result["check_fractions"]
    lines = [
        f"## Mislabel detection on {escape(result['problem'])}",
        "",
        f"{result['flipped_count']} training labels flipped ({100 * result['flip']:.0f}%), "
        f"seeds {', '.join(map(str, result['seeds']))}. Test accuracy: clean "
        f"{result['accuracy_clean']:.3f}, corrupted {_interval(result['accuracy_corrupted'])}.",
        "",
        "| ranking | AUC | "
        + " | ".join(f"found @{100 * f:.0f}%" for f in fractions)
        + " | "
        + " | ".join(f"accuracy fixed @{100 * f:.0f}%" for f in fractions)
        + " | AUC beyond random (paired) |",
        "|---|---:|" + "---:|" * (2 * len(fractions) + 1),
    ]
    for name, entry in result["rankings"].items():
        found = [f"{entry['found_at'][str(f)]:.3f}" for f in fractions]
        fixed = [_interval(entry["accuracy_after_fixing"][str(f)]) for f in fractions]
        lines.append(
            f"| {escape(name)} | {_interval(entry['auc'])} | "
            + " | ".join(found)
            + " | "
            + " | ".join(fixed)
            + f" | {_paired(entry.get('auc_beyond_random'))} |"
        )
    lines += [
        "",
        "AUC beyond random: the ranking's AUC minus random's, seed by seed (the same flips), mean "
        "[95% Student-t interval], p-value of the paired t-test; per checked fraction the same "
        "comparison of the repaired accuracy is in mislabel.json (accuracy_beyond_random).",
    ]
    if figure:
        lines += ["", f"![fraction of flipped labels found]({escape(figure)})"]
    return "\n".join(lines) + "\n"


def render_prefilter(
    result: dict[str, Any], figure: str | None = None, *, escape: Escape = md_escape
) -> str:
    ks = result["candidates"]
    lines = [
        f"## Retrieval prefiltering on {escape(result['problem'])}",
        "",
        f"Recall of the top {result['top']} training sentences by |delta| under "
        f"{escape(result['reference'])} among the K sentences retrieved for each of "
        f"{len(result['test_points'])} test sentences.",
        "",
        "| retriever | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|" + "---:|" * len(ks),
    ]
    for method, recall in result["recall"].items():
        lines.append(
            f"| {escape(method)} | " + " | ".join(f"{recall[str(k)]:.3f}" for k in ks) + " |"
        )
    if figure:
        lines += ["", f"![recall against candidates]({escape(figure)})"]
    return "\n".join(lines) + "\n"


@literal_text
def mislabel_figure(result: dict[str, Any], path: Path, *, dpi: int = 150) -> Path:
    """Fraction of flipped labels found against fraction of training data checked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 3.6), constrained_layout=True)
    for name, entry in result["rankings"].items():
        curve = entry["curve"]
        style = "--" if name == "random" else "-"
        axis.plot(curve["checked"], curve["found"], style, label=name)
    axis.set_xlabel("fraction of training data checked")
    axis.set_ylabel("fraction of flipped labels found")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_title(f"{result['problem']}: {100 * result['flip']:.0f}% labels flipped", fontsize=9)
    axis.legend(fontsize=7, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


@literal_text
def prefilter_figure(result: dict[str, Any], path: Path, *, dpi: int = 150) -> Path:
    """Recall of the influential sentences against the number of retrieved candidates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 3.6), constrained_layout=True)
    ks = result["candidates"]
    for method, recall in result["recall"].items():
        style = "--" if method == "random" else "-o"
        axis.plot(ks, [recall[str(k)] for k in ks], style, label=method, markersize=3)
    log_axis(axis, at=ks)
    axis.set_xlabel("candidates retrieved K")
    axis.set_ylabel(f"recall of top-{result['top']} influential")
    axis.set_ylim(0, 1.02)
    axis.set_title(f"{result['problem']} (reference {result['reference']})", fontsize=9)
    axis.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def render_perturb(result: dict[str, Any], *, escape: Escape = md_escape) -> str:
    lines = [
        f"## Perturbation influence against retraining on {escape(result['problem'])}",
        "",
        f"Estimator {escape(result['estimator'])}; inputs: {escape(result['input_space'])}. "
        f"{len(result['test_index'])} test points, the {len(result['train_index'])} training "
        "points whose inputs move those test losses most; each training input moved by eps v "
        "with v of unit L2 norm (random, or the predicted worst: the gradient of the summed "
        "test losses) and retrained. Predicted: eps <d loss_t / d x_j, v>; actual: the test "
        "loss after retraining minus before.",
        "",
        "| direction | eps | Pearson | slope (actual on predicted) | relative error | mean "
        "\\|actual\\| |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['direction']} | {row['eps']:g} | {row['pearson']:.5f} | "
            f"{row['slope']:.4f} | {_number(row['relative_error'], 3)} | "
            f"{row['mean_abs_actual']:.3g} |"
        )
    breaks = {
        row["direction"]: row.get("breaks_down_at")
        for row in result["rows"]
        if "breaks_down_at" in row
    }
    lines += [
        "",
        "Breaks down (Pearson < 0.9 or slope off by more than 10%) at eps: "
        + ", ".join(
            f"{kind} {'beyond the grid' if at is None else f'{at:g}'}"
            for kind, at in breaks.items()
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def render_attack(
    result: dict[str, Any], figure: str | None = None, *, escape: Escape = md_escape
) -> str:
    low, high = result["value_range"]
    lines = [
        f"## Training-set attack on {escape(result['problem'])}",
        "",
        f"Estimator {escape(result['estimator'])}; inputs: {escape(result['input_space'])}. For "
        f"each of {len(result['test_index'])} correctly classified test points one training "
        f"input is moved within an L-infinity budget of {result['budget']:g} (inside "
        f"[{low:g}, {high:g}]) by {result['steps']} projected signed-gradient steps of the "
        "perturbation influence"
        + (
            ", retraining exactly and refitting the estimator after each step"
            if result["refit_per_step"]
            else ", with the gradient at theta_s (a network is retrained once, at the end)"
        )
        + "; then the model is retrained with the moved input.",
        "",
        "| perturbation | flipped | flip rate [95% Wilson] | test loss change [95% t] |",
        "|---|---:|---:|---:|",
    ]
    for name, outcome in result["outcomes"].items():
        rate = outcome["flip_rate"]
        lines.append(
            f"| {escape(name)} | {outcome['flipped']} of {len(result['test_index'])} | "
            f"{_number(rate['value'], 3)} [{_number(rate['low'], 3)}, {_number(rate['high'], 3)}] "
            f"| {_interval(outcome['loss_change'])} |"
        )
    if figure is not None:
        lines += ["", f"![perturbed training inputs]({escape(figure)})"]
    return "\n".join(lines) + "\n"


def attack_figure(result: dict[str, Any], path: Path, *, dpi: int = 150) -> Path | None:
    """For image inputs (a square number of pixels, or one channel): per shown attack the
    training image before and after, the change, and the attacked test image. None for other
    inputs."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    size = math.prod(result["input_shape"])
    side = math.isqrt(size)
    if side * side != size or not result["shown"]:
        return None
    low, high = result["value_range"]
    rows = result["shown"]
    figure, axes = plt.subplots(
        len(rows), 4, figsize=(5.6, 1.5 * len(rows) + 0.4), squeeze=False, constrained_layout=True
    )
    titles = (
        "training input",
        "perturbed",
        f"change (±{result['budget']:g})",
        "attacked test point",
    )
    for row, shown in zip(axes, rows, strict=True):
        original = np.array(shown["original"]).reshape(side, side)
        moved = np.array(shown["perturbed"]).reshape(side, side)
        change = moved - original
        # One colour scale for every row: the budget, so a saturated pixel used all of it.
        limit = float(result["budget"])
        images = (
            (original, "gray_r", low, high),
            (moved, "gray_r", low, high),
            (change, "RdBu_r", -limit, limit),
            (np.array(shown["test_input"]).reshape(side, side), "gray_r", low, high),
        )
        for axis, (image, cmap, vmin, vmax) in zip(row, images, strict=True):
            axis.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax)
            axis.set_xticks([])
            axis.set_yticks([])
        row[0].set_ylabel(f"train {shown['train_index']}\nlabel {shown['train_label']}", fontsize=7)
        verdict = "flipped" if shown["flipped"] else "kept"
        row[3].set_xlabel(
            f"test {shown['test_index']}, label {shown['test_label']}\n"
            f"{verdict}, loss {shown['loss_change']:+.3f}",
            fontsize=6,
        )
    for axis, title in zip(axes[0], titles, strict=True):
        axis.set_title(title, fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def _lds(entry: dict[str, Any] | None) -> str:
    if entry is None or entry.get("value") is None:
        return "n/a"
    if entry.get("low") is None:
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _damping_value(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def render_damping(
    result: dict[str, Any], figure: str | None = None, *, escape: Escape = md_escape
) -> str:
    subsets = result["subsets_per_half"]
    lines = [
        f"## Damping protocol on {escape(result['problem'])}",
        "",
        f"Each estimator's damping swept over {', '.join(f'{g:g}' for g in result['grid'])}; "
        f"{2 * subsets} subsets keeping {result['alpha']:g} of the training set retrained "
        f"({result['seeds']} seed{'s' if result['seeds'] != 1 else ''} per subset), "
        f"{len(result['test_index'])} test points. The damping is chosen on the first "
        f"{subsets} subsets (held out) and every choice is scored (LDS, 95% bootstrap "
        f"interval) on the other {subsets}. The best in hindsight is chosen on the subsets it is "
        "scored on: reporting the best of a grid that way, as some benchmarks do, flatters a "
        "method by the last column (the held-out choice is what tuning on one's own retrains "
        "delivers).",
        "",
        "| estimator | default: damping, LDS | held-out choice: damping, LDS | best in hindsight: "
        "damping, LDS | hindsight minus held-out |",
        "|---|---|---|---|---:|",
    ]
    for row in result["rows"]:
        default = row["default"]
        if "refused" in default:
            default_text = f"refused: {escape(default['refused'])}"
        else:
            setting = default["setting"]
            shown = (
                _damping_value(setting.get("damping"))
                if not setting.get("damping_ratio")
                else f"{setting['damping_ratio']:g} x mean eigenvalue"
                + (f" + {setting['damping']:g}" if setting.get("damping") else "")
            )
            default_text = f"{escape(shown)}, {_lds(default['scoring'])}"
        if "held_out" in row:
            held, best = row["held_out"], row["hindsight"]
            lines.append(
                f"| {escape(row['estimator'])} | {default_text} | {held['damping']:g}, "
                f"{_lds(held['scoring'])} | {best['damping']:g}, {_lds(best['scoring'])} | "
                f"{row['optimism']:.3f} |"
            )
        else:
            lines.append(
                f"| {escape(row['estimator'])} | {default_text} | every damping refused | - | - |"
            )
    refused = [
        f"{escape(row['estimator'])} at {entry['damping']:g}: {escape(entry['refused'])}"
        for row in result["rows"]
        for entry in row["grid"]
        if "refused" in entry
    ]
    if refused:
        lines += ["", "Refused: " + "; ".join(refused) + "."]
    if figure:
        lines += ["", f"![LDS against damping]({figure})"]
    return "\n".join(lines) + "\n"


@literal_text
def damping_figure(result: dict[str, Any], path: Path, *, dpi: int = 150) -> Path:
    """Per estimator: the scoring half's LDS against damping (the selection half dashed), the
    held-out choice (circle), the best in hindsight (star) and the default (a dotted line)."""
    import matplotlib.pyplot as plt

    rows = result["rows"]
    columns = min(4, len(rows))
    lines = math.ceil(len(rows) / columns)
    figure, axes = plt.subplots(
        lines, columns, figsize=(2.6 * columns, 2.3 * lines + 0.3), squeeze=False, sharey=True
    )
    for axis, row in zip(axes.flat, rows, strict=False):
        scored = [entry for entry in row["grid"] if "refused" not in entry]
        dampings = [entry["damping"] for entry in scored]
        for half, style, label in (
            ("scoring", "-o", "LDS on the scoring subsets (95% interval shaded)"),
            ("selection", "--", "on the held-out selection subsets"),
        ):
            values = [entry[half]["value"] for entry in scored]
            axis.plot(dampings, values, style, markersize=3, color="C0", label=label)
        lows = [entry["scoring"]["low"] for entry in scored]
        highs = [entry["scoring"]["high"] for entry in scored]
        if scored and None not in lows and None not in highs:
            axis.fill_between(dampings, lows, highs, color="C0", alpha=0.15, linewidth=0)
        if "held_out" in row:
            held, best = row["held_out"], row["hindsight"]
            axis.plot(
                held["damping"],
                held["scoring"]["value"],
                "o",
                color="C2",
                markersize=7,
                fillstyle="none",
                label="held-out choice",
            )
            axis.plot(
                best["damping"],
                best["scoring"]["value"],
                "*",
                color="C3",
                markersize=8,
                label="best in hindsight",
            )
        default = row["default"]
        if "refused" not in default and default["scoring"]["value"] is not None:
            axis.axhline(
                default["scoring"]["value"],
                color="0.4",
                linestyle=":",
                linewidth=1,
                label="default",
            )
        axis.set_xscale("log")
        log_axis(axis, at=result["grid"])
        axis.set_title(row["estimator"], fontsize=8)
        axis.set_xlabel("damping", fontsize=7)
        axis.tick_params(labelsize=6)
    for axis in axes.flat[len(rows) :]:
        axis.set_visible(False)
    for axis in axes[:, 0]:
        axis.set_ylabel("LDS (Spearman)", fontsize=7)
    # every kind of mark once, whichever panel drew it (a refused default draws no line)
    legend: dict[str, Any] = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    figure.legend(
        list(legend.values()), list(legend), loc="outside lower center", ncols=3, fontsize=7
    )
    figure.suptitle(f"{result['problem']}: damping chosen on held-out subsets", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
