"""Rendering of typed run results; computes nothing, trains nothing.

``document.outline`` is the report's one outline; ``markdown`` and ``html`` render it,
``figures`` draws the figures from stored numbers and arrays, ``tables`` lays numbers out as
cells, ``format`` formats them.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from fidelity.core.errors import FidelityError
from fidelity.history import HistoryRun
from fidelity.reports import figures as draw
from fidelity.reports.document import outline
from fidelity.reports.html import render_html
from fidelity.reports.markdown import render_markdown
from fidelity.results import ProblemResults, RunResults


def safe_name(label: str) -> str:
    """A label as a file-name part."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def load_problem_arrays(run_dir: Path, problem: ProblemResults) -> dict[str, np.ndarray]:
    """The arrays a run stored for one problem, read only from inside ``run_dir`` and checked
    against the results: a missing, damaged or inconsistent file is a ``FidelityError``."""
    root = Path(run_dir).resolve()
    path = (root / problem.arrays_file).resolve()
    source = f"{problem.name}: arrays file {problem.arrays_file!r}"
    if not path.is_relative_to(root):
        raise FidelityError(f"{source} lies outside the run directory {str(run_dir)!r}")
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except FileNotFoundError:
        raise FidelityError(f"{source} is missing from {str(run_dir)!r}") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise FidelityError(f"{source} is damaged: {type(exc).__name__}: {detail}") from None
    check_problem_arrays(problem, arrays, source)
    return arrays


def check_problem_arrays(
    problem: ProblemResults, arrays: dict[str, np.ndarray], source: str
) -> None:
    """The arrays the report draws exist with the shapes the results imply: ``[n_test,
    n_removed]`` numbers per estimator and response, one reason per removed point."""
    needed = [f"estimator/{label}" for label in problem.metrics]
    needed += [f"response/{label}" for label in problem.responses]
    if not needed:
        return
    missing = [key for key in ("removed_reason", *needed) if key not in arrays]
    if missing:
        raise FidelityError(f"{source} lacks {', '.join(missing[:5])}")
    shape = arrays[needed[0]].shape
    for key in needed:
        value = arrays[key]
        if value.ndim != 2 or value.shape != shape or value.dtype.kind not in "fiu":
            raise FidelityError(
                f"{source}: {key} is {value.dtype} {value.shape}, expected numbers shaped {shape}"
            )
    reasons = arrays["removed_reason"]
    if reasons.shape != (shape[1],) or reasons.dtype.kind != "U":
        raise FidelityError(
            f"{source}: removed_reason is {reasons.dtype} {reasons.shape}, expected "
            f"{shape[1]} strings"
        )


def write_reports(
    run_dir: Path, results: RunResults, *, history: list[HistoryRun] | None = None
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/`` into ``run_dir`` from ``results``
    and the run's arrays. ``history`` (earlier runs of the suite, oldest first, as returned by
    ``fidelity.history.recent_runs``) adds trend tables and a trend figure."""
    run_dir = Path(run_dir)
    figures: dict[str, dict[str, str]] = {}
    # Every problem's arrays read and checked before anything is written.
    stored = {name: load_problem_arrays(run_dir, p) for name, p in results.problems.items()}
    for name, problem in results.problems.items():
        stem = "figures/" + Path(problem.arrays_file).stem
        shown = figures[name] = {}
        arrays = stored[name]
        if problem.metrics and problem.responses:
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
