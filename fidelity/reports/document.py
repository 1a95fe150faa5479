"""The one outline of a run's report, which the Markdown and the HTML renderer both render.

``outline`` turns typed results into a flat list of blocks (headings, paragraphs, warnings,
tables, figures); each renderer only maps blocks to its format and escapes every string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fidelity.history import HistoryRun
from fidelity.reports import tables
from fidelity.reports.tables import Table
from fidelity.results import RunResults


@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    anchor: str | None = None


@dataclass(frozen=True)
class Paragraph:
    text: str
    note: bool = False  # secondary text (a description, a caption)


@dataclass(frozen=True)
class Warnings:
    items: tuple[str, ...]


@dataclass(frozen=True)
class TableBlock:
    table: Table | None


@dataclass(frozen=True)
class Figure:
    path: str  # relative to the run directory
    caption: str


@dataclass(frozen=True)
class Contents:
    """Links to the problems' sections (HTML only: Markdown viewers make their own)."""

    links: tuple[tuple[str, str], ...]  # (anchor, text)


@dataclass(frozen=True)
class Preformatted:
    text: str
    caption: str  # what stands in its place where preformatted text is not shown


Block = Heading | Paragraph | Warnings | TableBlock | Figure | Contents | Preformatted

FIGURE_CAPTIONS = {
    "scatter": "Predicted vs actual change in test loss for every removed point (Koh & Liang "
    "2017, Fig. 2); dashed: y = x",
    "heatmap": "Pooled Pearson correlation between every estimator and response stage",
    "per-test": "Per-test-point correlations over the removed points (one dot per test point)",
    "decomposition": "Gap decomposition along the response ladder (Bae et al. 2022)",
    "trends": "Pooled Pearson over recent runs",
    "lds": "LDS against the kept fraction alpha, with bootstrap intervals; grey: above the noise "
    "bound (sqrt of the Spearman split-half reliability) of the seed-mean measurements",
    "counterfactual": "Top-k counterfactual removal: mean change of the target (band: interval "
    "over test points) and fraction of correct predictions flipped, per ranking",
    "groups": "Predicted against actual group effects per (group, test point), coloured by the "
    "kind of group; dashed: y = x (Koh et al. 2019)",
}


def anchor(name: str) -> str:
    return "p-" + "".join(c if c.isalnum() else "-" for c in name)


def outline(
    results: RunResults,
    figures: dict[str, dict[str, str]],
    history: list[HistoryRun] | None = None,
    trend_figure: str | None = None,
) -> list[Block]:
    """The report's blocks in order; ``figures`` maps problem -> figure kind -> path."""
    metrics = results.suite["metrics"]
    blocks: list[Block] = [
        Heading(1, f"fidelity report: {results.suite_name}"),
        Paragraph(
            f"Created {results.created} · fidelity {results.fidelity_version} · git "
            f"{results.git_revision or 'n/a'} · total {results.timings['total_seconds']:.1f} s"
        ),
    ]
    # The first screen: per problem, which estimator tracks which response, and how close to
    # what the noise allows.
    every_warning = [
        f"{name}: {warning}"
        for name, problem in results.problems.items()
        for warning in tables.estimator_warnings(problem)
    ]
    if every_warning:
        blocks.append(Warnings(tuple(every_warning)))
    blocks += [
        TableBlock(tables.verdict_matrix(problem, explain=position == 0))
        for position, problem in enumerate(results.problems.values())
    ]
    blocks += [
        Paragraph(
            "delta[t, j] = change of test loss t when training point j is removed (positive: j "
            f"helped). Intervals: {metrics['confidence']:.0%} two-way bootstrap over test and "
            f"removed points ({metrics['bootstrap']} replicates). Noise bound: sqrt of the "
            "split-half reliability of a multi-seed response (Spearman-Brown corrected), with a "
            "bootstrap interval; '-' for one seed."
        ),
        Contents(
            (
                *((anchor(name), name) for name in results.problems),
                ("configuration", "configuration"),
            )
        ),
    ]
    if history:
        blocks.append(Heading(2, "Trends"))
        if trend_figure:
            blocks.append(Figure(trend_figure, FIGURE_CAPTIONS["trends"]))
        blocks.append(TableBlock(tables.trend_table(results, history)))
    for name, problem in results.problems.items():
        shown = figures.get(name, {})
        blocks += [Heading(2, name, anchor(name)), Paragraph(tables.problem_header(problem))]
        if problem.description:
            blocks.append(Paragraph(" ".join(problem.description.split()), note=True))
        warnings = tables.estimator_warnings(problem)
        if warnings:
            blocks.append(Warnings(tuple(warnings)))
        blocks.append(TableBlock(tables.metrics_table(problem)))
        blocks.append(TableBlock(tables.lds_table(problem)))
        if "lds" in shown:
            blocks.append(Figure(shown["lds"], FIGURE_CAPTIONS["lds"]))
        blocks.append(TableBlock(tables.counterfactual_table(problem)))
        blocks.append(TableBlock(tables.brittleness_table(problem)))
        if "counterfactual" in shown:
            blocks.append(Figure(shown["counterfactual"], FIGURE_CAPTIONS["counterfactual"]))
        blocks.append(TableBlock(tables.group_table(problem)))
        blocks += [
            Figure(path, FIGURE_CAPTIONS["groups"])
            for kind, path in shown.items()
            if kind.startswith("groups-")
        ]
        blocks += [
            Figure(shown[kind], FIGURE_CAPTIONS[kind])
            for kind in ("scatter", "heatmap", "per-test")
            if kind in shown
        ]
        blocks += [
            TableBlock(tables.per_test_table(problem)),
            TableBlock(tables.conformance_table(problem)),
            TableBlock(tables.agreement_table(problem)),
            TableBlock(tables.influential_table(problem)),
        ]
        if "decomposition" in shown:
            blocks.append(Figure(shown["decomposition"], FIGURE_CAPTIONS["decomposition"]))
        blocks += [
            TableBlock(tables.decomposition_table(problem)),
            TableBlock(tables.diagnostics_table(problem)),
            TableBlock(tables.timing_table(problem)),
        ]
    blocks += [
        Heading(2, "Configuration and environment", "configuration"),
        TableBlock(tables.configuration_table(results)),
        Heading(3, "Suite"),
        Preformatted(
            json.dumps(results.suite, indent=2, default=str),
            "The suite as run is in results.json (key suite).",
        ),
    ]
    return blocks
