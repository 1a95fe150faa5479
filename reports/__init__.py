"""Rendering of run results; reads a run directory, never trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reports.markdown import render_markdown


def load_problem_arrays(run_dir: Path, problem: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays a run stored for one problem (``results["problems"][name]``)."""
    with np.load(Path(run_dir) / problem["arrays_file"], allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


def write_reports(
    run_dir: Path, results: dict[str, Any], *, history: list[Any] | None = None
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/`` into ``run_dir`` from ``results``
    and the run's arrays. ``history`` (earlier runs of the suite, oldest first, as returned by
    ``fidelity.history.recent_runs``) adds trend tables and a trend figure."""
    from reports import figures as draw
    from reports.html import render_html
    from reports.tables import per_test_correlations, per_test_table

    run_dir = Path(run_dir)
    figures: dict[str, dict[str, str]] = {}
    per_test_tables = {}
    for name, problem in results["problems"].items():
        arrays = load_problem_arrays(run_dir, problem)
        stem = "figures/" + Path(problem["arrays_file"]).stem
        shown = figures[name] = {}
        shown["scatter"] = f"{stem}.png"
        draw.scatter_grid(problem, arrays, run_dir / shown["scatter"])
        shown["heatmap"] = f"{stem}-correlations.png"
        draw.correlation_heatmap(problem, arrays, run_dir / shown["heatmap"])
        per_test = per_test_correlations(problem, arrays)
        per_test_tables[name] = per_test_table(per_test)
        shown["per-test"] = f"{stem}-per-test.png"
        draw.per_test_distributions(problem, per_test, run_dir / shown["per-test"])
        if problem.get("decomposition"):
            shown["decomposition"] = f"{stem}-decomposition.png"
            draw.decomposition_bars(problem, run_dir / shown["decomposition"])
    trend_figure = None
    if history:
        trend_figure = "figures/trends.png"
        draw.trend_lines(results, history, run_dir / trend_figure)
    markdown = render_markdown(results, figures, per_test_tables, history)
    page = render_html(results, run_dir, figures, per_test_tables, history, trend_figure)
    written = {"markdown": run_dir / "report.md", "html": run_dir / "report.html"}
    written["markdown"].write_text(markdown, encoding="utf-8")
    written["html"].write_text(page, encoding="utf-8")
    return written


__all__ = ["load_problem_arrays", "render_markdown", "write_reports"]
