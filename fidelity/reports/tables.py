"""The report's tables as plain cells, shared by the Markdown and the HTML renderer.

Cells are unescaped strings; each renderer escapes every cell for its own format, so a
training text or a label holding markup is shown, never interpreted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fidelity.history import HistoryRun
from fidelity.reports.format import format_bytes, format_interval, number, significant
from fidelity.results import NoiseCeiling, ProblemResults, RunResults

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
    rows: Sequence[tuple[str, ...]] = field(default_factory=list)
    note: str = ""
    #: right-align cells that are numbers (off where a column mixes numbers and words)
    align_numbers: bool = True


def format_reliability(ceiling: NoiseCeiling | None) -> str:
    """Split-half reliability of a multi-seed response, or '-' for a single seed."""
    if ceiling is None:
        return "-"
    return f"{number(ceiling.pearson)} / {number(ceiling.spearman)} ({ceiling.seeds} seeds)"


def format_bound(ceiling: NoiseCeiling | None) -> str:
    """The noise bound on the Pearson correlation with its interval, or '-' for one seed."""
    if ceiling is None:
        return "-"
    return f"{format_interval(ceiling.bound)} ({ceiling.seeds} seeds)"


#: Marks the best estimator against a response in the verdict matrix.
BEST = "\u2605"


def ranked(problem: ProblemResults, response: str, metric: str = "pearson") -> list[str]:
    """The estimators scored against ``response``, best ``metric`` first (undefined last)."""
    scored = [e for e, by_response in problem.metrics.items() if response in by_response]

    def key(estimator: str) -> float:
        entry = problem.metric(estimator, response, metric)
        return -entry.value if entry is not None and entry.value is not None else np.inf

    return sorted(scored, key=key)


def scored_responses(problem: ProblemResults) -> list[str]:
    """The responses some estimator was scored against, in the suite's order."""
    return [r for r in problem.responses if any(r in m for m in problem.metrics.values())]


def _fraction_of_bound(value: float | None, ceiling: NoiseCeiling | None, separator: str) -> str:
    """``separator`` and "N% of bound" where a value has a noise bound, else nothing."""
    if value is None or ceiling is None or not ceiling.max_correlation:
        return ""
    return f"{separator}{value / ceiling.max_correlation:.0%} of bound"


def verdict_matrix(
    problem: ProblemResults, metric: str = "pearson", *, explain: bool = True
) -> Table | None:
    """The report's first screen for one problem: every estimator (rows, sorted by ``metric``
    against the first response) against every response (columns), the best in each column
    marked, each value with its interval and the fraction of the response's noise bound it
    reaches; a last row holds each response's bound with its interval. ``explain``: with the
    note that says how to read it (the first problem's matrix carries it)."""
    responses = scored_responses(problem)
    if not responses:
        return None
    best: dict[str, float | None] = {}
    for response in responses:
        leader = ranked(problem, response, metric)[:1]
        entry = problem.metric(leader[0], response, metric) if leader else None
        best[response] = None if entry is None else entry.value
    rows = []
    for estimator in ranked(problem, responses[0], metric) + [
        e for e in problem.metrics if responses[0] not in problem.metrics[e]
    ]:
        cells = []
        for response in responses:
            entry = problem.metric(estimator, response, metric)
            if entry is None:
                cells.append("")
                continue
            ceiling = problem.responses[response].noise_ceiling
            top = best[response]
            # Ties at the shown precision are all best (exact, gnh and cg on a convex model).
            tied = top is not None and entry.value is not None and top - entry.value < 5e-5
            mark = f" {BEST}" if tied else ""
            share = _fraction_of_bound(entry.value, ceiling, " \u00b7 ")
            cells.append(format_interval(entry) + mark + share)
        rows.append((estimator, *cells))
    bounds = [format_bound(problem.responses[r].noise_ceiling) for r in responses]
    if any(bound != "-" for bound in bounds):
        rows.append(("noise bound", *bounds))
    note = (
        ""
        if not explain
        else (
            f"{BEST}: the best estimator against that response; sorted by {metric} against "
            f"{responses[0]}; intervals: two-way bootstrap over test and removed points. The noise "
            "bound of a multi-seed response is sqrt(split-half reliability), the highest Pearson a "
            "noise-free estimator can reach against the seed mean, with its bootstrap interval; "
            "'% of bound' divides the value by it."
        )
    )
    title = f"{problem.name}: {metric} against each response"
    return Table(title, ("estimator", *responses), rows, note, align_numbers=False)


def summary_lines(results: RunResults, metric: str = "pearson") -> list[str]:
    """The verdict matrices in a few console lines: per problem and response, the estimators
    best first, the best with its interval and the share of the noise bound."""
    lines = []
    for name, problem in results.problems.items():
        for response in scored_responses(problem):
            ceiling = problem.responses[response].noise_ceiling
            order = ranked(problem, response, metric)
            entries = [problem.metric(e, response, metric) for e in order]
            parts = []
            for position, (estimator, entry) in enumerate(zip(order, entries, strict=True)):
                if position == 0 and entry is not None and entry.value is not None:
                    share = _fraction_of_bound(entry.value, ceiling, ", ")
                    parts.append(f"{estimator} {format_interval(entry)}{share}")
                else:
                    parts.append(f"{estimator} {format_interval(entry)}")
            bound = "" if ceiling is None else f" (noise bound {format_interval(ceiling.bound)})"
            lines.append(f"{name} vs {response}, {metric}{bound}: {', '.join(parts)}")
    return lines


def metrics_table(problem: ProblemResults) -> Table:
    """Every estimator x response of one problem, each metric with its interval."""
    rows = []
    for estimator, by_response in problem.metrics.items():
        for response, metrics in by_response.items():
            cells = [format_interval(metrics.get(key)) for key, _ in METRIC_COLUMNS]
            ceiling = problem.responses[response].noise_ceiling
            rows.append(
                (estimator, response, *cells, format_bound(ceiling), format_reliability(ceiling))
            )
    header = (
        "estimator",
        "response",
        *(t for _, t in METRIC_COLUMNS),
        "noise bound (Pearson)",
        "split-half reliability (P / S)",
    )
    return Table("Fidelity", header, rows)


def lds_table(problem: ProblemResults) -> Table | None:
    """The linear datamodeling score of every estimator against every subset stage and alpha."""
    if not problem.lds:
        return None
    rows = [
        (
            estimator,
            entry.label,
            entry.target,
            f"{entry.subsets} x {entry.seeds}",
            format_interval(metrics.get("lds")),
            format_interval(metrics.get("lds_pearson")),
            format_bound(entry.noise_ceiling),
        )
        for entry in problem.lds
        for estimator, metrics in entry.metrics.items()
    ]
    header = (
        "estimator",
        "subsets@alpha",
        "target",
        "subsets x seeds",
        "LDS (Spearman)",
        "LDS (Pearson)",
        "noise bound (per-test Pearson)",
    )
    note = (
        "per test point, the correlation over subsets between the estimator's additive "
        "prediction (the sum of its deltas over the dropped points; newton-step: its own step "
        "for the subset) and the retrained change, averaged over test points; intervals "
        "resample test points and subsets"
    )
    return Table("Linear datamodeling score", header, rows, note)


def counterfactual_table(problem: ProblemResults) -> Table | None:
    """Top-k removal per ranking and budget: mean change of the target, fraction flipped."""
    if not problem.counterfactuals:
        return None
    rows = [
        (
            method,
            found.response,
            found.target,
            str(point.k),
            format_interval(point.change),
            "-" if point.flipped is None else f"{point.flipped:.3f}",
        )
        for found in problem.counterfactuals
        for method, curve in found.curves.items()
        for point in curve
    ]
    header = ("ranking", "stage", "target", "k removed", "mean change", "flipped")
    note = (
        "per test point, its k most helpful training points (largest delta) removed and the "
        "model retrained; mean change of the target on that test point (interval over test "
        "points); flipped: fraction of correctly classified test points predicted wrong after"
    )
    return Table("Top-k counterfactual removal", header, rows, note)


def brittleness_table(problem: ProblemResults) -> Table | None:
    """dattri's brittleness per ranking."""
    rows = [
        (
            method,
            found.response,
            str(entry.correct),
            number(entry.flipped_within_budget, ".3f"),
            number(entry.median_k, ".0f"),
            str(max(found.ks)),
        )
        for found in problem.counterfactuals
        for method, entry in found.brittleness.items()
    ]
    if not rows:
        return None
    header = (
        "ranking",
        "stage",
        "correct (test point x seed)",
        "flipped within budget",
        "median smallest k",
        "budget",
    )
    note = "the smallest k of the grid whose top-k removal flips a correctly classified point"
    return Table("Brittleness", header, rows, note)


def group_table(problem: ProblemResults) -> Table | None:
    """Predicted against actual group effects per estimator and group kind."""
    rows = []
    for effects in problem.groups:
        for estimator, by_kind in effects.fits.items():
            for kind, fit in by_kind.items():
                means = "; ".join(
                    f"{entry.size}: {significant(entry.mean_actual)} / "
                    f"{significant(entry.mean_predicted)}"
                    for entry in fit.sizes
                )
                rows.append(
                    (
                        estimator,
                        f"{effects.response}:{kind}",
                        number(fit.pearson),
                        number(fit.spearman),
                        number(fit.slope, ".3f"),
                        means,
                    )
                )
    if not rows:
        return None
    header = (
        "estimator",
        "groups",
        "Pearson",
        "Spearman",
        "slope predicted / actual",
        "size: mean actual / mean predicted",
    )
    note = (
        "over every (group, test point) pair: the measured change of the target when the group "
        "is removed against the sum of the estimator's deltas over the group (newton-step: its "
        "own step for the group); slope through the origin, below 1 where the prediction "
        "underestimates (Koh et al. 2019)"
    )
    return Table("Group effects", header, rows, note)


def agreement_table(problem: ProblemResults) -> Table | None:
    """The estimators' block of the correlation matrix."""
    labels = list(problem.estimators)
    if len(labels) < 2:
        return None

    def pooled(row: str, col: str) -> str:
        return number(problem.correlations.get(f"estimator/{row}", f"estimator/{col}"))

    rows = [(row, *(pooled(row, col) for col in labels)) for row in labels]
    return Table(
        "Pooled Pearson between estimators (same test points and removals)", ("", *labels), rows
    )


def decomposition_table(problem: ProblemResults) -> Table | None:
    """The five-component table (Bae et al. 2022) of one problem; None without a ladder."""
    decomposition = problem.decomposition
    if decomposition is None:
        return None
    rows = [
        (
            gap.source,
            gap.target,
            ", ".join(gap.components),
            significant(gap.output_rms),
            significant(gap.relative_mae),
            significant(gap.one_minus_pearson),
        )
        for gap in (*decomposition.gaps, *decomposition.estimators.values(), *decomposition.path)
    ]
    note = (
        "output RMS: root mean square difference of the outputs over the training inputs, mean "
        "over removals; relative MAE: mean |delta_a - delta_b| / mean |delta of "
        f"{decomposition.reference}|"
    )
    if decomposition.path:
        note += (
            "; training path: cold -> replay is how far retraining lies from the exact "
            "first-order effect through the recorded run (its nonlinearity), replay -> an "
            "estimator what that estimator's optimum assumption and approximations cost"
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


def diagnostics_table(problem: ProblemResults) -> Table:
    """Per estimator: time, peak memory, solver iterations and residuals, other scalars."""
    rows = []
    for label, info in problem.estimators.items():
        diagnostics = info.diagnostics
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
                info.kind,
                f"{info.fit_seconds:.2f}",
                f"{info.scores_seconds:.2f}",
                format_bytes(info.fit_peak_memory_bytes),
                format_bytes(info.scores_peak_memory_bytes),
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


def timing_table(problem: ProblemResults) -> Table:
    rows = [
        (
            "train theta_s",
            f"{problem.timings['train_seconds']:.2f}",
            "cached" if problem.training.get("cached") else "computed",
        )
    ]
    for label, info in problem.estimators.items():
        seconds = info.fit_seconds + info.scores_seconds
        rows.append((f"estimator {label}", f"{seconds:.2f}", "fit + scores"))
    for label, response in problem.responses.items():
        detail = response.info
        rows.append(
            (
                f"response {label}",
                f"{response.seconds:.2f}",
                f"{detail.get('refits', 0)} retrained, {detail.get('cached', 0)} cached",
            )
        )
    if "subsets_seconds" in problem.timings:
        retrained = sum(entry.subsets * entry.seeds for entry in problem.lds)
        rows.append(
            ("subsets", f"{problem.timings['subsets_seconds']:.2f}", f"{retrained} subset models")
        )
    if "metrics_seconds" in problem.timings:
        rows.append(
            (
                "metrics",
                f"{problem.timings['metrics_seconds']:.2f}",
                f"{len(problem.pairs())} pair(s): bootstrap intervals (vectorised), noise bounds, "
                "LDS, conformance",
            )
        )
    if "decomposition_seconds" in problem.timings:
        rows.append(("decomposition", f"{problem.timings['decomposition_seconds']:.2f}", ""))
    return Table("Timings", ("step", "seconds", "notes"), rows)


def per_test_table(problem: ProblemResults) -> Table:
    """Quartiles of the per-test-point correlations (undefined rows left out)."""
    rows = []
    for entry in problem.per_test:
        cells = []
        for values in (entry.pearson, entry.spearman):
            finite = [value for value in values if value is not None]
            if finite:
                q1, median, q3 = np.percentile(finite, [25, 50, 75])
                cells.append(f"{median:.3f} [{q1:.3f}, {q3:.3f}]")
            else:
                cells.append("n/a")
        count = sum(value is not None for value in entry.pearson)
        rows.append((entry.estimator, entry.response, *cells, str(count)))
    header = (
        "estimator",
        "response",
        "per-test Pearson: median [quartiles]",
        "per-test Spearman: median [quartiles]",
        "test points",
    )
    return Table("Per-test-point correlations", header, rows)


def trend_table(results: RunResults, history: list[HistoryRun], metric: str = "pearson") -> Table:
    """``metric`` of every (problem, estimator, response) over the recorded runs of the suite
    and this one (last column)."""
    runs = [*history, None]
    header = ("problem", "estimator", "response", *(_run_label(r, results) for r in runs))
    rows = []
    for name, problem in results.problems.items():
        for estimator, by_response in problem.metrics.items():
            for response, metrics in by_response.items():
                cells = []
                for run in history:
                    entry = run.metrics.get((name, estimator, response, metric))
                    cells.append(number(entry.value if entry else None))
                current = metrics.get(metric)
                cells.append(number(current.value if current else None))
                rows.append((name, estimator, response, *cells))
    return Table(f"Trend of pooled {metric} over the suite's recorded runs", header, rows)


def _run_label(run: HistoryRun | None, results: RunResults) -> str:
    created = results.created if run is None else run.created
    revision = results.git_revision if run is None else run.git_revision
    label = created.replace("T", " ")[:16]
    if revision:
        label += f" ({revision[:7]})"
    return label + (" this run" if run is None else "")


def configuration_table(results: RunResults) -> Table:
    """Provenance: suite, git revision, versions, machine, execution settings."""
    environment = results.environment
    rows = [
        ("suite", results.suite_name),
        ("suite source", str(results.suite.get("source") or "-")),
        ("run id", results.run_id),
        ("created", results.created),
        ("git revision", results.git_revision or "n/a"),
        ("fidelity", results.fidelity_version),
    ]
    for key in ("python", "platform", "cpu_count", "torch_threads", "cuda_available"):
        if key in environment:
            rows.append((key, str(environment[key])))
    for package, version in environment.get("packages", {}).items():
        rows.append((f"package {package}", str(version)))
    for key, value in results.execution.items():
        rows.append((f"execution {key}", str(value)))
    rows.append(("total seconds", f"{results.timings['total_seconds']:.1f}"))
    return Table("Configuration and environment", ("key", "value"), rows)


def influential_table(problem: ProblemResults) -> Table | None:
    """The removed training points that moved the test loss most, with their texts."""
    entries = problem.most_influential
    if not entries:
        return None
    estimators = list(entries[0].mean_predicted)
    has_text = any(entry.text is not None for entry in entries)
    header = (
        "train index",
        "chosen as",
        "label",
        *(("text",) if has_text else ()),
        f"mean actual delta ({entries[0].response})",
        *(f"mean predicted ({label})" for label in estimators),
    )
    rows = [
        (
            str(entry.train_index),
            entry.reason,
            str(entry.label),
            *((entry.text or "",) if has_text else ()),
            number(entry.mean_actual, ".3e"),
            *(number(entry.mean_predicted[label], ".3e") for label in estimators),
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


def conformance_table(problem: ProblemResults) -> Table | None:
    """Each estimator against the reference whose estimand it claims to compute."""
    found = problem.conformance
    if not found:
        return None
    rows = []
    for label, entry in found.items():
        pearson, difference = entry.pearson, entry.max_relative_difference
        rows.append(
            (
                label,
                problem.estimators[label].kind if label in problem.estimators else "-",
                entry.reference,
                "n/a" if pearson is None else f"{pearson:.6f}",
                "n/a" if difference is None else f"{difference:.2e}",
                "-" if entry.tolerance is None else f"{entry.tolerance:g}",
                "yes" if entry.finite else "no",
                f"PROBABLE DEFECT: {entry.reason}" if entry.flagged else "ok",
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
    threshold = next(iter(found.values())).threshold
    note = (
        f"flagged: Pearson below {threshold}, any NaN/inf, or a max relative difference above "
        "the entry's tolerance where it has one; max relative difference = "
        "max |estimator - reference| / max |reference|"
    )
    return Table("Conformance", header, rows, note)


def estimator_warnings(problem: ProblemResults) -> list[str]:
    """Diagnostics that say a solver did not compute what it claims (shown in every report)."""
    found = []
    for label, info in problem.estimators.items():
        diagnostics = info.diagnostics
        if diagnostics.get("negative_curvature_columns"):
            found.append(
                f"{label}: {diagnostics['negative_curvature_columns']} test point(s) met a "
                "direction of non-positive curvature and stopped early (add damping)"
            )
        if diagnostics.get("indefinite"):
            found.append(
                f"{label}: the damped curvature has a negative eigenvalue (about "
                f"{diagnostics['smallest_eigenvalue_estimate']:.3g}); the recursion approaches "
                "no inverse, whatever it returns (add damping)"
            )
        if diagnostics.get("unconverged_columns"):
            found.append(
                f"{label}: {diagnostics['unconverged_columns']} test point(s) did not reach the "
                f"tolerance (largest relative residual {diagnostics['max_relative_residual']:.2e})"
            )
    for estimator, response in problem.undefined_pairs():
        found.append(
            f"{estimator} vs {response}: the correlations are undefined (n/a): the "
            "predictions or the responses are constant, or their values overflow"
        )
    for label, reason in problem.skipped_estimators.items():
        found.append(f"{label}: skipped ({reason})")
    for label, entry in problem.conformance.items():
        if entry.flagged:
            found.append(
                f"{label}: probable implementation defect against {entry.reference} "
                f"({entry.reason})"
            )
    return found


def problem_header(problem: ProblemResults) -> str:
    training = problem.training
    removed = problem.n_removed
    steps = training.get("iterations", training.get("epochs", "?"))
    grad = training.get("grad_norm")
    grad_text = "" if grad is None else f"; theta_s gradient norm {grad:.2e} after {steps} steps"
    return (
        f"{problem.n_train} training / {problem.n_test} test points, "
        f"{problem.n_params} parameters, loss {problem.loss}, weight decay "
        f"{problem.weight_decay:g}{grad_text}. {problem.n_test_points} test points x "
        f"{removed.total} removed ({removed.top} top by "
        f"|{problem.top_by or '-'}|, {removed.random} random)."
    )
