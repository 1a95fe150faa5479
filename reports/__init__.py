"""Rendering of typed run results; computes nothing, trains nothing.

``document.outline`` is the report's one outline; ``markdown`` and ``html`` render it,
``figures`` draws the figures from stored numbers and arrays, ``tables`` lays numbers out as
cells, ``format`` formats them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fidelity.history import HistoryRun
from fidelity.results import ProblemResults, RunResults
from reports import figures as draw
from reports.document import outline
from reports.html import render_html
from reports.markdown import render_markdown


def safe_name(label: str) -> str:
    """A label as a file-name part."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def load_problem_arrays(run_dir: Path, problem: ProblemResults) -> dict[str, np.ndarray]:
    """The arrays a run stored for one problem."""
    with np.load(Path(run_dir) / problem.arrays_file, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


def write_reports(
    run_dir: Path, results: RunResults, *, history: list[HistoryRun] | None = None
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/`` into ``run_dir`` from ``results``
    and the run's arrays. ``history`` (earlier runs of the suite, oldest first, as returned by
    ``fidelity.history.recent_runs``) adds trend tables and a trend figure."""
    run_dir = Path(run_dir)
    figures: dict[str, dict[str, str]] = {}
    for name, problem in results.problems.items():
        stem = "figures/" + Path(problem.arrays_file).stem
        shown = figures[name] = {}
        arrays = load_problem_arrays(run_dir, problem)
        shown["scatter"] = f"{stem}.png"
        draw.scatter_grid(problem, arrays, run_dir / shown["scatter"])
        if problem.lds:
            shown["lds"] = f"{stem}-lds.png"
            draw.lds_by_alpha(name, problem.lds, run_dir / shown["lds"])
        if problem.counterfactuals:
            shown["counterfactual"] = f"{stem}-counterfactual.png"
            draw.counterfactual_curves(
                name, problem.counterfactuals, run_dir / shown["counterfactual"]
            )
        for result in problem.groups:
            if f"groups/{result.response}/predicted/{next(iter(result.fits), '')}" in arrays:
                kind = f"groups-{result.response}"
                shown[kind] = f"{stem}-{safe_name(result.response)}.png"
                draw.group_scatter(name, result, arrays, run_dir / shown[kind])
        shown["heatmap"] = f"{stem}-correlations.png"
        draw.correlation_heatmap(name, problem.correlations, run_dir / shown["heatmap"])
        shown["per-test"] = f"{stem}-per-test.png"
        draw.per_test_distributions(name, problem.per_test, run_dir / shown["per-test"])
        if problem.decomposition is not None:
            shown["decomposition"] = f"{stem}-decomposition.png"
            draw.decomposition_bars(name, problem.decomposition, run_dir / shown["decomposition"])
    trend_figure = None
    if history:
        trend_figure = "figures/trends.png"
        draw.trend_lines(results, history, run_dir / trend_figure)
    blocks = outline(results, figures, history, trend_figure)
    written = {"markdown": run_dir / "report.md", "html": run_dir / "report.html"}
    written["markdown"].write_text(render_markdown(blocks), encoding="utf-8")
    written["html"].write_text(render_html(blocks, run_dir), encoding="utf-8")
    return written


__all__ = ["load_problem_arrays", "render_markdown", "write_reports"]
