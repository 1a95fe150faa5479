"""Paper figures: gather each figure's data (running the suites it needs through the cached
runner, or reading given run directories) and hand it to ``fidelity.reports.paper`` to draw.

``fidelity figures NAME --out DIR`` calls the function registered as NAME with a
``FigureContext``; each returns the paths it wrote (PNG, PDF, CSV).
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fidelity.core.errors import FidelityError
from fidelity.core.registry import Registry, parse_spec
from fidelity.reports import load_problem_arrays
from fidelity.reports import paper as draw_paper
from fidelity.results import Gap, Interval, ProblemResults, RunResults
from fidelity.retrain import Execution
from fidelity.runner import RunOptions, run_suite
from fidelity.suite import Suite, load_suite, parse_suite

PAPER_FIGURES: Registry[Callable[[FigureContext], list[Path]]] = Registry("paper figure")


@dataclass(frozen=True)
class FigureContext:
    """Where a figure goes and where its data comes from.

    ``runs``: run directories to read instead of computing (for the figures drawn from ladder
    runs). ``problems``/``settings``: override the figure's default problems and per-figure
    settings (tests use small ones).
    """

    out: Path
    execution: Execution = field(default_factory=Execution)
    runs: tuple[Path, ...] = ()
    problems: tuple[str, ...] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@contextmanager
def _run(
    suite: Suite, context: FigureContext, *, decomposition: bool = True
) -> Iterator[tuple[RunResults, Path]]:
    """Run ``suite`` into a temporary directory (never into the run history, no reports);
    yields (results, run_dir), the directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fidelity-figure-") as folder:
        run_dir = Path(folder) / "run"
        options = RunOptions(
            out=run_dir,
            execution=context.execution,
            reports=False,
            decomposition=decomposition,
        )
        yield run_suite(suite, options), run_dir


KOH_PANELS = (
    # (problem, estimator settings, title)
    ("digits-logreg", {"kind": "exact", "damping": 0.0}, "Logistic regression (digits)"),
    (
        "digits-cnn",
        {"kind": "cg", "damping": 0.01, "tol": 1e-8, "max_iter": 1000},
        "Small CNN (digits)",
    ),
)


@PAPER_FIGURES.register(
    "koh2017-fig2",
    description="predicted vs actual change in test loss for the top-|influence| removals of "
    "one test point: logistic regression and a small CNN (Koh & Liang 2017, Fig. 2)",
)
def koh2017_fig2(context: FigureContext) -> list[Path]:
    """For each panel's problem: one test point (drawn by the suite seed), its ``top`` (default
    100) training points by |predicted delta|, each removed and retrained (``cold``)."""
    if context.runs:
        raise FidelityError(
            "koh2017-fig2 computes its own data (one test point's top-100 leave-one-out "
            "retrains, from the cache where they are) and reads no --run"
        )
    top = int(context.settings.get("top", 100))
    panels_spec: tuple[tuple[str, dict[str, object], str], ...] = KOH_PANELS
    if context.problems is not None:
        panels_spec = tuple(
            (name, dict(context.settings.get("estimator", {"kind": "exact"})), name)
            for name in context.problems
        )
    panels = []
    for problem_name, estimator, title in panels_spec:
        document = {
            "name": "koh2017-fig2",
            "problems": [problem_name],
            "seed": int(context.settings.get("seed", 0)),
            "selection": {"test_points": 1, "top": top, "random": 0},
            "metrics": {"bootstrap": 200},
            "estimators": [{**estimator, "label": "influence"}],
            "responses": [{"kind": "cold"}],
        }
        # Only the scatter is drawn: the per-removal parameter changes of a decomposition
        # (100 CG solves on the CNN) would dominate the figure's cost.
        suite = parse_suite(document, source="koh2017-fig2")
        with _run(suite, context, decomposition=False) as (results, run_dir):
            problem = next(iter(results.problems.values()))
            arrays = load_problem_arrays(run_dir, problem)
        pearson = problem.metric("influence", "cold", "pearson")
        panels.append(
            {
                "title": title,
                "problem": problem.name,
                "test_index": int(arrays["test_index"][0]),
                "train_index": arrays["removed_index"],
                "estimator": f"{estimator['kind']}, damping {estimator.get('damping', 0):g}",
                "response": "leave-one-out retraining",
                "predicted": arrays["estimator/influence"][0],
                "actual": arrays["response/cold"][0],
                "pearson": None if pearson is None else pearson.value,
            }
        )
    return draw_paper.koh2017_fig2(panels, Path(context.out), "koh2017-fig2")


#: Problems of the default ladder data: a convex model (where all stages agree) and two
#: networks, from the bundled nightly suite (10 test points x 60 removals).
LADDER_PROBLEMS = ("digits-logreg", "digits-mlp", "diabetes-mlp")


def ladder_results(
    context: FigureContext, accept: Callable[[ProblemResults], bool] | None = None
) -> list[RunResults]:
    """The results of the given runs, or of the nightly suite run on ``LADDER_PROBLEMS``; each
    given run must hold a problem that ``accept`` takes (default: a ladder)."""
    accept = accept or _is_ladder
    if context.runs:
        found = [RunResults.load(run) for run in context.runs]
    else:
        suite = load_suite("nightly").with_problems(context.problems or LADDER_PROBLEMS)
        with _run(suite, context) as (results, _):
            found = [results]
    for results, source in zip(found, context.runs or ("nightly",), strict=True):
        if not any(accept(problem) for problem in results.problems.values()):
            raise FidelityError(
                f"run {str(source)!r} has no problem with two or more ladder stages (cold, warm, "
                "proximal, pbrf, linear)"
                + (" or a training-path rung" if accept is _has_gaps else "")
                + "; run the ladder or nightly suite, or leave out --run"
            )
    return found


def _is_ladder(problem: ProblemResults) -> bool:
    decomposition = problem.decomposition
    return decomposition is not None and len(decomposition.stages) >= 2


def _has_gaps(problem: ProblemResults) -> bool:
    """A ladder, or the training-path rung (`cold` and `replay` alone give it)."""
    return _is_ladder(problem) or bool(problem.decomposition and problem.decomposition.path)


def ladder_problems(
    context: FigureContext, accept: Callable[[ProblemResults], bool] | None = None
) -> Iterator[tuple[str, ProblemResults]]:
    """(name, problem results) of every problem with a ladder (or what ``accept`` takes) in the
    figure's runs."""
    accept = accept or _is_ladder
    for results in ladder_results(context, accept):
        for name, problem in results.problems.items():
            if accept(problem):
                yield name, problem


@PAPER_FIGURES.register(
    "bae2022-decomposition",
    description="the five gaps between leave-one-out and influence per model, in output space "
    "and on the measurement (Bae et al. 2022), and the training-path rung where replay ran",
)
def bae2022_decomposition(context: FigureContext) -> list[Path]:
    rows = []
    for name, problem in ladder_problems(context, _has_gaps):
        decomposition = problem.decomposition
        if decomposition is None:
            continue
        for gap in decomposition.gaps:
            rows.append(_gap_row(name, gap, _components(gap)))
        for label, gap in decomposition.estimators.items():
            rows.append(_gap_row(name, gap, f"{_components(gap)} ({label})"))
        for gap in decomposition.path:
            rows.append(_gap_row(name, gap, f"{gap.components[0]} ({gap.source} -> {gap.target})"))
    return draw_paper.bae2022_decomposition(rows, Path(context.out), "bae2022-decomposition")


def _components(gap: Gap) -> str:
    """A gap's components as a label: up to two by name, more as the span they cover (a suite
    without the middle stages merges them into one gap)."""
    if len(gap.components) <= 2:
        return " + ".join(gap.components)
    return f"{gap.components[0]} ... {gap.components[-1]} ({len(gap.components)} components)"


def _gap_row(problem: str, gap: Gap, name: str) -> dict[str, Any]:
    return {
        "problem": problem,
        "gap": name,
        "from": gap.source,
        "to": gap.target,
        "output_rms": gap.output_rms,
        "relative_mae": gap.relative_mae,
        "one_minus_pearson": gap.one_minus_pearson,
    }


@PAPER_FIGURES.register(
    "estimator-ladder",
    description="pooled Pearson of each estimator against each response stage, per model",
)
def estimator_ladder(context: FigureContext) -> list[Path]:
    rows = []
    for name, problem in ladder_problems(context):
        stages = () if problem.decomposition is None else problem.decomposition.stages
        for estimator, by_response in problem.metrics.items():
            # The decomposition lists the run's ladder stages in ladder order.
            for stage in stages:
                entry = by_response[stage]["pearson"]
                rows.append(
                    {
                        "problem": name,
                        "estimator": estimator,
                        "stage": stage,
                        "pearson": entry.value,
                        "low": entry.low,
                        "high": entry.high,
                    }
                )
    return draw_paper.estimator_ladder(rows, Path(context.out), "estimator-ladder")


#: The problems of dattri's two MNIST columns, here: a convex model and a network.
DATAMODEL_PROBLEMS = ("digits-logreg", "digits-mlp")


def _given_runs(
    context: FigureContext, suite_name: str, wanted: str
) -> list[tuple[RunResults, Path]]:
    """(results, run directory) of the runs given with --run (none: the figure runs its
    suite), each of which must hold ``wanted`` results."""
    if context.runs:
        found = [(RunResults.load(run), Path(run)) for run in context.runs]
        for (results, _), source in zip(found, context.runs, strict=True):
            if not any(getattr(p, wanted) for p in results.problems.values()):
                raise FidelityError(
                    f"run {str(source)!r} has no {wanted} results; run the {suite_name} suite, "
                    "or leave out --run"
                )
        return found
    return []


def _given_or_run(
    context: FigureContext, suite_name: str, wanted: str, suite: Suite
) -> list[RunResults]:
    """The results of the runs given with --run (each must hold ``wanted`` results), or else
    of ``suite`` run now (without the decomposition, which these figures do not draw)."""
    given = _given_runs(context, suite_name, wanted)
    if given:
        return [results for results, _ in given]
    with _run(suite, context, decomposition=False) as (results, _):
        return [results]


@PAPER_FIGURES.register(
    "lds-loo-table",
    description="dattri's benchmark table, measured here: LDS (alpha 0.5) and leave-one-out "
    "correlation of every estimator on a convex model and a network, with intervals and "
    "noise ceilings",
)
def lds_loo_table(context: FigureContext) -> list[Path]:
    suite = load_suite("lds").with_problems(tuple(context.problems or DATAMODEL_PROBLEMS))
    found = _given_or_run(context, "lds", "lds", suite)
    return draw_paper.lds_loo_table(_lds_rows(found), Path(context.out), "lds-loo-table")


def _lds_rows(found: list[RunResults]) -> list[dict[str, Any]]:
    """One row per (problem, estimator, measure): the LDS at the smallest alpha of the first
    subset stage, and the pooled Pearson against `cold`; noise bounds as estimator
    'noise bound' (sqrt of the split-half reliability)."""
    rows: list[dict[str, Any]] = []
    for results in found:
        for name, problem in results.problems.items():
            if not problem.lds:
                continue
            first = min(
                (e for e in problem.lds if e.response == problem.lds[0].response),
                key=lambda e: e.alpha,
            )
            column = f"LDS (alpha {first.alpha:g})"
            for estimator, metrics in first.metrics.items():
                rows.append(_cell(name, estimator, column, metrics["lds"]))
            if first.noise_ceiling is not None and first.noise_ceiling.spearman is not None:
                bound = Interval(first.noise_ceiling.spearman_bound)
                rows.append(_cell(name, "noise bound", column, bound))
            if "cold" in problem.responses:
                for estimator in problem.metrics:
                    found_metric = problem.metric(estimator, "cold", "pearson")
                    if found_metric is not None:
                        rows.append(_cell(name, estimator, "LOO (Pearson)", found_metric))
                ceiling = problem.responses["cold"].noise_ceiling
                if ceiling is not None and ceiling.max_correlation is not None:
                    rows.append(_cell(name, "noise bound", "LOO (Pearson)", ceiling.bound))
    if not rows:
        raise FidelityError("no problem of these runs has an LDS")
    return rows


def _cell(problem: str, estimator: str, measure: str, value: Interval) -> dict[str, Any]:
    return {
        "problem": problem,
        "estimator": estimator,
        "measure": measure,
        "value": value.value,
        "low": value.low,
        "high": value.high,
    }


#: The curvature ladder, best approximation first (Hong et al. 2025, "Better Hessians matter").
CURVATURE_LADDER = ("exact", "gnh", "ekfac", "kfac", "diagonal", "grad-dot")


@PAPER_FIGURES.register(
    "curvature-ladder",
    description="LDS and leave-one-out correlation of exact Hessian, Gauss-Newton, EK-FAC, "
    "K-FAC, diagonal and identity curvature against the same retrains, with the gap each rung "
    "adds (Hong et al. 2025)",
)
def curvature_ladder(context: FigureContext) -> list[Path]:
    breadth = load_suite("breadth")
    ladder_only = dataclasses.replace(
        breadth.with_problems(tuple(context.problems or DATAMODEL_PROBLEMS)),
        estimators=tuple(e for e in breadth.estimators if e.label in CURVATURE_LADDER),
    )
    found = _given_or_run(context, "breadth", "lds", ladder_only)
    rows = [row for row in _lds_rows(found) if row["estimator"] in CURVATURE_LADDER]
    if not rows:
        raise FidelityError(
            f"these runs score none of the curvature ladder's estimators "
            f"({', '.join(CURVATURE_LADDER)})"
        )
    rows.sort(key=lambda row: (row["problem"], CURVATURE_LADDER.index(row["estimator"])))
    return draw_paper.curvature_ladder(rows, Path(context.out), "curvature-ladder")


#: The estimators of Basu et al.'s figure: the damped Hessian, and the Gauss-Newton matrix.
FRAGILITY_ESTIMATORS = ("exact", "gnh")


@PAPER_FIGURES.register(
    "basu2021-fragility",
    description="leave-one-out Pearson and Spearman of exact influence against retraining as "
    "the digits MLP grows deeper and wider, with and without weight decay, with noise bounds "
    "(Basu et al. 2021)",
)
def basu2021_fragility(context: FigureContext) -> list[Path]:
    found = _given_or_run(context, "basu", "metrics", load_suite("basu"))
    rows = []
    for results in found:
        for name, problem in results.problems.items():
            kind, options = parse_spec(name, kind="problem")
            if kind != "digits-mlp":
                continue
            ceiling = (
                problem.responses["cold"].noise_ceiling if "cold" in problem.responses else None
            )
            for estimator, measure in itertools.product(
                FRAGILITY_ESTIMATORS, ("pearson", "spearman")
            ):
                value = problem.metric(estimator, "cold", measure)
                if value is None:
                    continue
                bound = None
                if ceiling is not None:
                    bound = (
                        ceiling.max_correlation if measure == "pearson" else ceiling.spearman_bound
                    )
                rows.append(
                    {
                        "problem": name,
                        "estimator": estimator,
                        "width": int(str(options.get("width", 32))),
                        "depth": int(str(options.get("depth", 1))),
                        "weight_decay": float(str(options.get("weight_decay", 1e-3))),
                        "measure": measure,
                        "value": value.value,
                        "low": value.low,
                        "high": value.high,
                        "noise_bound": bound,
                    }
                )
    if not rows:
        raise FidelityError(
            "these runs hold no digits-mlp problem scored by exact or gnh against cold"
        )
    return draw_paper.basu_fragility(rows, Path(context.out), "basu2021-fragility")


@PAPER_FIGURES.register(
    "koh2019-groups",
    description="predicted against actual effects of removing random, one-class and "
    "nearest-neighbour groups, per estimator (Koh et al. 2019)",
)
def koh2019_groups(context: FigureContext) -> list[Path]:
    problems = tuple(context.problems or ("digits-logreg",))
    given = _given_runs(context, "groups", "groups")
    if given:
        panels = [panel for results, run_dir in given for panel in _group_panels(results, run_dir)]
        return draw_paper.koh2019_groups(panels, Path(context.out), "koh2019-groups")
    suite = load_suite("groups").with_problems(problems)
    with _run(suite, context, decomposition=False) as (results, run_dir):
        panels = _group_panels(results, run_dir)
    return draw_paper.koh2019_groups(panels, Path(context.out), "koh2019-groups")


def _group_panels(results: RunResults, run_dir: Path) -> list[dict[str, Any]]:
    panels = []
    for name, problem in results.problems.items():
        if not problem.groups:
            continue
        arrays = load_problem_arrays(run_dir, problem)
        for result in problem.groups:
            prefix = f"groups/{result.response}"
            actual = arrays[f"{prefix}/seeds"].mean(0)
            for estimator, fits in result.fits.items():
                key = f"{prefix}/predicted/{estimator}"
                if key not in arrays:
                    raise FidelityError(
                        f"run {str(run_dir)!r} stores no group predictions ({key}); it was "
                        "made before they were stored: run the groups suite again"
                    )
                panels.append(
                    {
                        "problem": name,
                        "estimator": estimator,
                        "target": result.target,
                        "kinds": arrays[f"{prefix}/kinds"],
                        "sizes": arrays[f"{prefix}/sizes"],
                        "actual": actual,
                        "predicted": arrays[key],
                        "slopes": {kind: fit.slope for kind, fit in fits.items()},
                        "pearson": {kind: fit.pearson for kind, fit in fits.items()},
                    }
                )
    if not panels:
        raise FidelityError("no problem of these runs has group effects")
    return panels
