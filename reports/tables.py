"""The report's tables as plain cells, shared by the Markdown and the HTML renderer.

Cells are unescaped strings; each renderer escapes every cell for its own format, so a
training text or a label holding markup is shown, never interpreted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fidelity.metrics import format_interval, row_pearson, row_spearman

METRIC_COLUMNS = (
    ("pearson", "Pearson"),
    ("spearman", "Spearman"),
    ("kendall", "Kendall tau"),
    ("mean_test_pearson", "mean per-test Pearson"),
    ("mean_test_spearman", "mean per-test Spearman"),
)


_NUMBER = r"-?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?"
FORMATTED_NUMBER = re.compile(rf"^{_NUMBER}( \[{_NUMBER}, {_NUMBER}\])?$")


def is_formatted_number(cell: str) -> bool:
    """A number or ``value [low, high]`` as formatted here: safe in any format, right-aligned."""
    return FORMATTED_NUMBER.match(cell) is not None


@dataclass(frozen=True)
class Table:
    """A titled table: a header and rows of unescaped string cells."""

    title: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    note: str = ""


def number(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def significant(value: float | None) -> str:
    return number(value, ".3g")


def format_bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_ceiling(ceiling: dict[str, float] | None) -> str:
    """Split-half reliability of a multi-seed response, or '-' for a single seed."""
    if not ceiling:
        return "-"
    return (
        f"{number(ceiling['pearson'])} / {number(ceiling['spearman'])} ({ceiling['seeds']} seeds)"
    )


def metrics_table(problem: dict[str, Any]) -> Table:
    """Every estimator x response of one problem, each metric with its interval."""
    rows = []
    for estimator, by_response in problem["metrics"].items():
        for response, metrics in by_response.items():
            cells = [format_interval(metrics.get(key)) for key, _ in METRIC_COLUMNS]
            ceiling = format_ceiling(problem["responses"][response].get("noise_ceiling"))
            rows.append((estimator, response, *cells, ceiling))
    header = ("estimator", "response", *(t for _, t in METRIC_COLUMNS), "noise ceiling (P / S)")
    return Table("Fidelity", header, rows)


def summary_table(results: dict[str, Any]) -> Table:
    """Pooled Pearson and Spearman of every estimator x response of every problem."""
    rows = []
    for name, problem in results["problems"].items():
        for estimator, by_response in problem["metrics"].items():
            for response, metrics in by_response.items():
                ceiling = format_ceiling(problem["responses"][response].get("noise_ceiling"))
                rows.append(
                    (
                        name,
                        estimator,
                        response,
                        format_interval(metrics.get("pearson")),
                        format_interval(metrics.get("spearman")),
                        ceiling,
                    )
                )
    header = ("problem", "estimator", "response", "Pearson", "Spearman", "noise ceiling (P / S)")
    return Table("Summary", header, rows)


def agreement_table(problem: dict[str, Any]) -> Table | None:
    agreement = problem.get("agreement", {})
    if len(agreement) < 2:
        return None
    labels = list(agreement)
    rows = [(row, *(number(agreement[row][col]) for col in labels)) for row in labels]
    return Table(
        "Pooled Pearson between estimators (same test points and removals)", ("", *labels), rows
    )


def decomposition_table(problem: dict[str, Any]) -> Table | None:
    """The five-component table (Bae et al. 2022) of one problem; None without a ladder."""
    decomposition = problem.get("decomposition")
    if not decomposition:
        return None
    rows = [
        (
            gap["from"],
            gap["to"],
            ", ".join(gap["components"]),
            significant(gap["output_rms"]),
            significant(gap["relative_mae"]),
            significant(gap["one_minus_pearson"]),
        )
        for gap in (*decomposition["gaps"], *decomposition["estimators"].values())
    ]
    note = (
        "output RMS: root mean square difference of the outputs over the training inputs, mean "
        "over removals; relative MAE: mean |delta_a - delta_b| / mean |delta of "
        f"{decomposition['reference']}|"
    )
    header = ("from", "to", "component(s)", "output RMS", "relative MAE", "1 - Pearson")
    return Table("Gap decomposition along the response ladder", header, rows, note)


_SHOWN_DIAGNOSTICS = {
    "iterations",
    "relative_residual",
    "max_relative_residual",
    "fit_seconds",
    "uncovered_parameters",
    "layer_dampings",
    "layers",
}


def diagnostics_table(problem: dict[str, Any]) -> Table:
    """Per estimator: time, peak memory, solver iterations and residuals, other scalars."""
    rows = []
    for label, info in problem["estimators"].items():
        diagnostics = info.get("diagnostics", {})
        iterations = diagnostics.get("iterations")
        iteration_text = "-"
        if isinstance(iterations, list) and iterations:
            iteration_text = f"{np.mean(iterations):.1f} / {max(iterations)}"
        residual = diagnostics.get("max_relative_residual")
        other = [
            f"{key}={_scalar(value)}"
            for key, value in diagnostics.items()
            if key not in _SHOWN_DIAGNOSTICS and isinstance(value, int | float | str | bool)
        ]
        rows.append(
            (
                label,
                info.get("kind", "-"),
                f"{info['fit_seconds']:.2f}",
                f"{info['scores_seconds']:.2f}",
                format_bytes(info.get("fit_peak_memory_bytes")),
                format_bytes(info.get("scores_peak_memory_bytes")),
                iteration_text,
                "-" if residual is None else f"{residual:.2e}",
                ", ".join(other) or "-",
            )
        )
    header = (
        "estimator",
        "kind",
        "fit s",
        "scores s",
        "fit peak memory",
        "scores peak memory",
        "iterations (mean / max)",
        "max relative residual",
        "other diagnostics",
    )
    return Table(
        "Estimator diagnostics",
        header,
        rows,
        "peak memory: largest increase of the process's resident memory during the step",
    )


def _scalar(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def timing_table(problem: dict[str, Any]) -> Table:
    training = problem["training"]
    rows = [
        (
            "train theta_s",
            f"{problem['timings']['train_seconds']:.2f}",
            "cached" if training.get("cached") else "computed",
        )
    ]
    for label, info in problem["estimators"].items():
        seconds = info["fit_seconds"] + info["scores_seconds"]
        rows.append((f"estimator {label}", f"{seconds:.2f}", "fit + scores"))
    for label, info in problem["responses"].items():
        detail = info["info"]
        rows.append(
            (
                f"response {label}",
                f"{info['seconds']:.2f}",
                f"{detail.get('refits', 0)} retrained, {detail.get('cached', 0)} cached",
            )
        )
    if "decomposition_seconds" in problem["timings"]:
        rows.append(("decomposition", f"{problem['timings']['decomposition_seconds']:.2f}", ""))
    return Table("Timings", ("step", "seconds", "notes"), rows)


def per_test_correlations(
    problem: dict[str, Any], arrays: dict[str, np.ndarray]
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Per-test-point Pearson and Spearman (over the removed points) of every estimator x
    response: {(estimator, response): {"pearson": [n_test], "spearman": [n_test]}}."""
    found = {}
    for estimator, by_response in problem["metrics"].items():
        for response in by_response:
            predicted = arrays[f"estimator/{estimator}"]
            actual = arrays[f"response/{response}"]
            found[estimator, response] = {
                "pearson": row_pearson(predicted, actual),
                "spearman": row_spearman(predicted, actual),
            }
    return found


def per_test_table(per_test: dict[tuple[str, str], dict[str, np.ndarray]]) -> Table:
    """Quartiles of the per-test-point correlations (undefined rows left out)."""
    rows = []
    for (estimator, response), values in per_test.items():
        cells = []
        for name in ("pearson", "spearman"):
            finite = values[name][np.isfinite(values[name])]
            if finite.size:
                q1, median, q3 = np.percentile(finite, [25, 50, 75])
                cells.append(f"{median:.3f} [{q1:.3f}, {q3:.3f}]")
            else:
                cells.append("n/a")
        count = int(np.isfinite(values["pearson"]).sum())
        rows.append((estimator, response, *cells, str(count)))
    header = (
        "estimator",
        "response",
        "per-test Pearson: median [quartiles]",
        "per-test Spearman: median [quartiles]",
        "test points",
    )
    return Table("Per-test-point correlations", header, rows)


def trend_table(results: dict[str, Any], history: list[Any], metric: str = "pearson") -> Table:
    """``metric`` of every (problem, estimator, response) over the recorded runs of the suite
    and this one (last column)."""
    runs = [*history, None]
    header = ("problem", "estimator", "response", *(_run_label(r, results) for r in runs))
    rows = []
    for name, problem in results["problems"].items():
        for estimator, by_response in problem["metrics"].items():
            for response, metrics in by_response.items():
                cells = []
                for run in history:
                    entry = run.metrics.get((name, estimator, response, metric))
                    cells.append(number(entry["value"] if entry else None))
                cells.append(number(metrics.get(metric, {}).get("value")))
                rows.append((name, estimator, response, *cells))
    return Table(f"Trend of pooled {metric} over the suite's recorded runs", header, rows)


def _run_label(run: Any, results: dict[str, Any]) -> str:
    created = results["created"] if run is None else run.created
    revision = results.get("git_revision") if run is None else run.git_revision
    label = created.replace("T", " ")[:16]
    if revision:
        label += f" ({revision[:7]})"
    return label + (" this run" if run is None else "")


def configuration_table(results: dict[str, Any]) -> Table:
    """Provenance: suite, git revision, versions, machine, execution settings."""
    environment = results.get("environment", {})
    rows = [
        ("suite", str(results["suite"]["name"])),
        ("suite source", str(results["suite"].get("source") or "-")),
        ("run id", str(results.get("run_id", "-"))),
        ("created", str(results["created"])),
        ("git revision", str(results.get("git_revision") or "n/a")),
        ("fidelity", str(results.get("fidelity_version"))),
    ]
    for key in ("python", "platform", "cpu_count", "torch_threads", "cuda_available"):
        if key in environment:
            rows.append((key, str(environment[key])))
    for package, version in environment.get("packages", {}).items():
        rows.append((f"package {package}", str(version)))
    for key, value in results.get("execution", {}).items():
        rows.append((f"execution {key}", str(value)))
    rows.append(("total seconds", f"{results['timings']['total_seconds']:.1f}"))
    return Table("Configuration and environment", ("key", "value"), rows)


def influential_table(problem: dict[str, Any]) -> Table | None:
    """The removed training points that moved the test loss most, with their texts."""
    entries = problem.get("most_influential")
    if not entries:
        return None
    estimators = list(entries[0]["mean_predicted"])
    has_text = any(entry.get("text") is not None for entry in entries)
    header = (
        "train index",
        "chosen as",
        "label",
        *(("text",) if has_text else ()),
        f"mean actual delta ({entries[0]['response']})",
        *(f"mean predicted ({label})" for label in estimators),
    )
    rows = [
        (
            str(entry["train_index"]),
            entry["reason"],
            str(entry["label"]),
            *((entry.get("text") or "",) if has_text else ()),
            number(entry["mean_actual"], ".3e"),
            *(number(entry["mean_predicted"][label], ".3e") for label in estimators),
        )
        for entry in entries
    ]
    return Table(
        "Most influential removals",
        header,
        rows,
        "largest mean |actual delta| over the test points; positive: removing it raises the "
        "test loss (it helped)",
    )


def conformance_table(problem: dict[str, Any]) -> Table | None:
    """Each estimator against the reference whose estimand it claims to compute."""
    found = problem.get("conformance")
    if not found:
        return None
    rows = []
    for label, entry in found.items():
        pearson = entry["pearson"]
        difference = entry["max_relative_difference"]
        rows.append(
            (
                label,
                problem["estimators"][label]["kind"],
                entry["reference"],
                "n/a" if pearson is None else f"{pearson:.6f}",
                "n/a" if difference is None else f"{difference:.2e}",
                "-" if entry.get("tolerance") is None else f"{entry['tolerance']:g}",
                "yes" if entry["finite"] else "no",
                f"PROBABLE DEFECT: {entry['reason']}" if entry["flagged"] else "ok",
            )
        )
    header = (
        "estimator",
        "kind",
        "claims the estimand of",
        "Pearson",
        "max relative difference",
        "tolerance",
        "finite",
        "verdict",
    )
    threshold = next(iter(found.values()))["threshold"]
    note = (
        f"flagged: Pearson below {threshold}, any NaN/inf, or a max relative difference above "
        "the entry's tolerance where it has one; max relative difference = "
        "max |estimator - reference| / max |reference|"
    )
    return Table("Conformance", header, rows, note)


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
    for label, reason in (problem.get("skipped_estimators") or {}).items():
        found.append(f"{label}: skipped ({reason})")
    for label, entry in (problem.get("conformance") or {}).items():
        if entry["flagged"]:
            found.append(
                f"{label}: probable implementation defect against {entry['reference']} "
                f"({entry['reason']})"
            )
    return found


def problem_header(problem: dict[str, Any]) -> str:
    training = problem["training"]
    removed = problem["n_removed"]
    steps = training.get("iterations", training.get("epochs", "?"))
    grad = training.get("grad_norm")
    grad_text = "" if grad is None else f"; theta_s gradient norm {grad:.2e} after {steps} steps"
    return (
        f"{problem['n_train']} training / {problem['n_test']} test points, "
        f"{problem['n_params']} parameters, loss {problem['loss']}, weight decay "
        f"{problem['weight_decay']:g}{grad_text}. {problem['n_test_points']} test points x "
        f"{removed['top'] + removed['random']} removed ({removed['top']} top by "
        f"|{problem['top_by'] or '-'}|, {removed['random']} random)."
    )
