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


def write_reports(run_dir: Path, results: dict[str, Any]) -> None:
    """Write ``report.md``, ``figures/<problem>.png`` and, where the suite has ladder stages,
    ``figures/<problem>-decomposition.png`` into ``run_dir``."""
    from reports.figures import decomposition_bars, scatter_grid

    figures, decomposition_figures = {}, {}
    for name, problem in results["problems"].items():
        stem = "figures/" + Path(problem["arrays_file"]).stem
        scatter_grid(problem, load_problem_arrays(run_dir, problem), Path(run_dir) / f"{stem}.png")
        figures[name] = f"{stem}.png"
        if problem.get("decomposition"):
            relative = f"{stem}-decomposition.png"
            decomposition_bars(problem, Path(run_dir) / relative)
            decomposition_figures[name] = relative
    report = render_markdown(results, figures, decomposition_figures)
    (Path(run_dir) / "report.md").write_text(report, encoding="utf-8")


__all__ = ["load_problem_arrays", "render_markdown", "write_reports"]
