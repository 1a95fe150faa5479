"""The Markdown report: one table of metrics per problem, timings and provenance."""

from __future__ import annotations

import html
from typing import Any

METRIC_COLUMNS = (
    ("pearson", "Pearson"),
    ("spearman", "Spearman"),
    ("kendall", "Kendall tau"),
    ("mean_test_pearson", "mean per-test Pearson"),
    ("mean_test_spearman", "mean per-test Spearman"),
)


def md_escape(text: object) -> str:
    """Escape a string from data or configuration for a Markdown table cell."""
    escaped = html.escape(str(text), quote=True)
    for char in "\\|`*_[]":
        escaped = escaped.replace(char, "\\" + char)
    return escaped.replace("\n", " ")


def format_interval(entry: dict[str, float | None]) -> str:
    value, low, high = entry.get("value"), entry.get("low"), entry.get("high")
    if value is None:
        return "n/a"
    if low is None or high is None:
        return f"{value:.4f}"
    return f"{value:.4f} [{low:.4f}, {high:.4f}]"


def estimator_warnings(problem: dict[str, Any]) -> list[str]:
    """Diagnostics that say a solver did not compute what it claims (shown in every report)."""
    found = []
    for label, info in problem.get("estimators", {}).items():
        diagnostics = info.get("diagnostics", {})
        if diagnostics.get("negative_curvature_columns"):
            found.append(
                f"{label}: {diagnostics['negative_curvature_columns']} test point(s) met a "
                "direction of non-positive curvature and stopped early (add damping)"
            )
        if diagnostics.get("unconverged_columns"):
            found.append(
                f"{label}: {diagnostics['unconverged_columns']} test point(s) did not reach the "
                f"tolerance (largest relative residual {diagnostics['max_relative_residual']:.2e})"
            )
    return found


def format_ceiling(ceiling: dict[str, float] | None) -> str:
    """Split-half reliability of a multi-seed response, or '-' for a single seed."""
    if not ceiling:
        return "-"
    return (
        f"{_number(ceiling['pearson'])} / {_number(ceiling['spearman'])} ({ceiling['seeds']} seeds)"
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def decomposition_lines(decomposition: dict[str, Any] | None) -> list[str]:
    """The five-component table (Bae et al. 2022) of one problem; empty without a ladder."""
    if not decomposition:
        return []
    lines = [
        "",
        "Gap decomposition along the response ladder (output RMS: root mean square difference "
        "of the outputs over the training inputs, mean over removals; relative MAE: mean "
        f"|delta_a - delta_b| / mean |delta of {md_escape(decomposition['reference'])}|):",
        "",
        "| from | to | component(s) | output RMS | relative MAE | 1 - Pearson |",
        "|---|---|---|---|---|---|",
    ]
    rows = list(decomposition["gaps"]) + list(decomposition["estimators"].values())
    for gap in rows:
        lines.append(
            f"| {md_escape(gap['from'])} | {md_escape(gap['to'])} | "
            f"{md_escape(', '.join(gap['components']))} | {_significant(gap['output_rms'])} | "
            f"{_significant(gap['relative_mae'])} | {_significant(gap['one_minus_pearson'])} |"
        )
    return lines


def _significant(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def render_markdown(
    results: dict[str, Any],
    figures: dict[str, str],
    decomposition_figures: dict[str, str] | None = None,
) -> str:
    suite = results["suite"]
    confidence = suite["metrics"]["confidence"]
    lines = [
        f"# fidelity report: {md_escape(suite['name'])}",
        "",
        f"Created {md_escape(results['created'])}"
        f" · fidelity {md_escape(results['fidelity_version'])}"
        f" · git {md_escape(results.get('git_revision') or 'n/a')}"
        f" · total {results['timings']['total_seconds']:.1f} s",
        "",
        "delta[t, j] = change of test loss t when training point j is removed (positive: j "
        f"helped). Intervals: {confidence:.0%} two-way bootstrap over test and removed points "
        f"({suite['metrics']['bootstrap']} replicates). Noise ceiling: split-half reliability of "
        "a multi-seed response (Spearman-Brown corrected); '-' for one seed.",
    ]
    for name, problem in results["problems"].items():
        training = problem["training"]
        removed = problem["n_removed"]
        lines += [
            "",
            f"## {md_escape(name)}",
            "",
            f"{problem['n_train']} training / {problem['n_test']} test points, "
            f"{problem['n_params']} parameters, loss {md_escape(problem['loss'])}, weight decay "
            f"{problem['weight_decay']:g}; theta_s gradient norm {training['grad_norm']:.2e} "
            f"after {training['iterations']} Newton steps. {problem['n_test_points']} test points"
            f" x {removed['top'] + removed['random']} removed ({removed['top']} top by "
            f"|{md_escape(problem['top_by'] or '-')}|, {removed['random']} random).",
            "",
            "| estimator | response | "
            + " | ".join(title for _, title in METRIC_COLUMNS)
            + " | noise ceiling (Pearson / Spearman) |",
            "|---|---|" + "---|" * (len(METRIC_COLUMNS) + 1),
        ]
        for estimator, by_response in problem["metrics"].items():
            for response, metrics in by_response.items():
                cells = [format_interval(metrics[key]) for key, _ in METRIC_COLUMNS]
                cells.append(format_ceiling(problem["responses"][response].get("noise_ceiling")))
                lines.append(
                    f"| {md_escape(estimator)} | {md_escape(response)} | "
                    + " | ".join(cells)
                    + " |"
                )
        warnings = estimator_warnings(problem)
        if warnings:
            lines += ["", "Warnings:", ""] + [f"- {md_escape(w)}" for w in warnings]
        agreement = problem.get("agreement", {})
        if len(agreement) > 1:
            labels = list(agreement)
            lines += [
                "",
                "Pooled Pearson between estimators (same test points and removals):",
                "",
                "| | " + " | ".join(md_escape(label) for label in labels) + " |",
                "|---|" + "---|" * len(labels),
            ]
            for row in labels:
                cells = [_number(agreement[row][col]) for col in labels]
                lines.append(f"| {md_escape(row)} | " + " | ".join(cells) + " |")
        lines += decomposition_lines(problem.get("decomposition"))
        if decomposition_figures and name in decomposition_figures:
            lines += [
                "",
                f"![gap decomposition for {md_escape(name)}]({decomposition_figures[name]})",
            ]
        lines += ["", "| step | seconds | notes |", "|---|---|---|"]
        lines.append(
            f"| train theta_s | {problem['timings']['train_seconds']:.2f} | "
            f"{'cached' if training.get('cached') else 'computed'} |"
        )
        for label, info in problem["estimators"].items():
            lines.append(
                f"| estimator {md_escape(label)} | "
                f"{info['fit_seconds'] + info['scores_seconds']:.2f} | fit + scores |"
            )
        for label, info in problem["responses"].items():
            detail = info["info"]
            lines.append(
                f"| response {md_escape(label)} | {info['seconds']:.2f} | "
                f"{detail.get('refits', 0)} retrained, {detail.get('cached', 0)} cached |"
            )
        if name in figures:
            lines += ["", f"![predicted vs actual for {md_escape(name)}]({figures[name]})"]
    return "\n".join(lines) + "\n"
