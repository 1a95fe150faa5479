"""Run a suite: for each problem, a short sequence of stages that pass frozen artefacts on.

    prepare  -> Setup        train theta_s, draw the test points
    predict  -> Predictions  fit every estimator, choose the removals, score them
    respond  -> Responses    every response stage's actual deltas (and noise ceilings)
    retrain_subsets -> Datamodels  subset retraining and every estimator's scores on the whole
                             training set (when the suite has subset stages)
    score    -> Scores       metrics with intervals, correlations, per-test correlations,
                             conformance, LDS
    decompose_gaps           the ladder's gaps (when the suite has ladder stages)
    assemble -> ProblemResults and the arrays of arrays/<problem>.npz

``run_suite`` runs them for every problem and writes the run directory (results.json,
arrays/, report.md, report.html, figures/).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
import torch

from fidelity import __version__
from fidelity.contract import check_estimator
from fidelity.core.cache import atomic_write_bytes, pid_alive
from fidelity.core.errors import FidelityError
from fidelity.core.locations import check_writable, claimed
from fidelity.core.logs import stage_logger
from fidelity.core.problem import Examples, MinibatchRecipe, Problem, TrainedProblem
from fidelity.decomposition import LADDER, Stage, decompose
from fidelity.environment import environment, git_revision
from fidelity.estimators import ESTIMATORS, Estimator, GroupEffects
from fidelity.history import append_run, check_history, recent_runs
from fidelity.memory import PeakMemory
from fidelity.metrics import (
    conformance,
    crashed_conformance,
    lds,
    mean_interval,
    pearson,
    row_pearson,
    row_spearman,
    score,
    spearman,
    subset_predictions,
)
from fidelity.metrics import split_half_reliability as noise_ceiling
from fidelity.problems import load_problem
from fidelity.reports import write_reports
from fidelity.results import (
    SCHEMA_VERSION,
    Brittleness,
    Conformance,
    CorrelationMatrix,
    CounterfactualPoint,
    CounterfactualResults,
    Decomposition,
    EstimatorRecord,
    GroupFit,
    GroupResults,
    GroupSize,
    InfluentialRemoval,
    Interval,
    LdsResults,
    NoiseCeiling,
    PerTestCorrelations,
    ProblemResults,
    RemovedCounts,
    ResponseRecord,
    RunResults,
    finite_or_none,
    json_ready,
)
from fidelity.retrain import (
    COUNTERFACTUAL_RESPONSES,
    GROUP_RESPONSES,
    RESPONSES,
    SUBSET_RESPONSES,
    CounterfactualResult,
    Execution,
    GroupResult,
    ImportedSubsets,
    SubsetResult,
    SubsetsResponse,
    train,
)
from fidelity.retrain.train import check_training, with_trajectory
from fidelity.selection import choose_removals, choose_test_points
from fidelity.suite import ComponentSpec, SelectionSpec, Suite, build_component

log = stage_logger("runner")


@dataclass(frozen=True)
class RunOptions:
    """Where a run writes and how it executes; none of it changes a number."""

    out: Path
    execution: Execution = field(default_factory=Execution)
    history: Path | None = None
    trend_runs: int = 20
    reports: bool = True  # render report.md, report.html and figures/ (a data-only run: False)
    decomposition: bool = True  # decompose the gaps when the suite has ladder stages


@dataclass(frozen=True)
class Setup:
    """A problem trained and its test points drawn. ``rng`` (the problem's generator) has drawn
    the test points; ``predict`` draws the random removals from it next."""

    requested_as: str
    problem: Problem
    trained: TrainedProblem
    selection: SelectionSpec
    rng: np.random.Generator
    test_index: np.ndarray
    test: Examples
    train_seconds: float

    @property
    def names(self) -> tuple[str, str]:
        """The names the suite may use for this problem: as requested, and its own."""
        return (self.requested_as, self.problem.name)


@dataclass(frozen=True)
class Predictions:
    """Every estimator fitted and scored on the removed points ``[n_test, n_removed]``."""

    estimators: dict[str, Estimator]
    records: dict[str, EstimatorRecord]
    deltas: dict[str, np.ndarray]
    skipped: dict[str, str]
    checked: dict[str, ComponentSpec]  # estimators with a reference, by label
    top_by: str | None
    removed_index: np.ndarray
    removed_reason: np.ndarray
    # deltas for every training point [n_test, N] where they were computed (the ranking)
    full_scores: dict[str, np.ndarray] = field(default_factory=dict)
    # checked estimators whose library raised, by label: what it raised (a conformance finding)
    crashed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Responses:
    records: dict[str, ResponseRecord]
    deltas: dict[str, np.ndarray]
    per_seed: dict[str, np.ndarray]
    stages: tuple[Stage, ...]


@dataclass(frozen=True)
class Datamodels:
    """Subset retraining and top-k counterfactual removal (by stage label), and every
    estimator's deltas for every training point ``[n_test, N]`` (by estimator label), from which
    its additive subset predictions and its top-k rankings follow."""

    subsets: dict[str, SubsetResult]
    settings: dict[str, SubsetsResponse | ImportedSubsets]
    full_scores: dict[str, np.ndarray]
    counterfactuals: dict[str, CounterfactualResult] = field(default_factory=dict)
    groups: dict[str, GroupResult] = field(default_factory=dict)
    # stage label -> estimator label -> [n_masks, n_test]: the prediction scored against each
    # subset or group stage (an estimator's own ``group_effects`` where it has one, else the
    # additive sum of its deltas), computed once for scoring and the arrays
    predictions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class Scores:
    metrics: dict[str, dict[str, dict[str, Interval]]]
    correlations: CorrelationMatrix
    per_test: tuple[PerTestCorrelations, ...]
    conformance: dict[str, Conformance]
    lds: tuple[LdsResults, ...] = ()
    counterfactuals: tuple[CounterfactualResults, ...] = ()
    groups: tuple[GroupResults, ...] = ()


@dataclass(frozen=True)
class ProblemOutcome:
    results: ProblemResults
    arrays: dict[str, np.ndarray]


def remove_stale_staging(out: Path) -> None:
    """Remove the staging directories a killed run left beside ``out`` (their PID is gone)."""
    if not out.parent.is_dir():
        return
    for staging in out.parent.glob(f".{glob_escape(out.name)}.partial-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "problem"


def problem_seed(suite_seed: int, problem_name: str) -> np.random.Generator:
    """Per-problem generator: independent of the order and number of problems in a suite."""
    return np.random.default_rng([suite_seed, zlib.crc32(problem_name.encode())])


def preflight(suite: Suite, execution: Execution) -> dict[str, Problem]:
    """Every problem of the suite built and checked before any training: its model against its
    loss, the memory Newton training needs (``check_training``) and the selection against the
    splits' sizes, so that a bad input is refused in seconds, not after the first problem's
    compute. Returns the problems by their suite name."""
    for spec in suite.estimators:
        check_user_estimator(spec, suite)
    problems = {}
    for problem_name in suite.problems:
        problem = load_problem(problem_name, cache=execution.cache)
        check_training(problem)
        check_selection(suite.selection_for(problem_name, problem.name), problem)
        for spec in suite.estimators:
            if spec.runs_on(problem_name, problem.name) and not spec.missing_modules():
                estimator = build_component(
                    ESTIMATORS,
                    spec.kind,
                    suite.settings_for(spec, problem_name, problem.name),
                    where=spec.label,
                )
                try:
                    estimator.check_problem(problem)
                except FidelityError as exc:
                    raise FidelityError(f"estimator {spec.label!r}: {exc}") from None
        problems[problem_name] = problem
    return problems


#: Estimator classes of these packages are fidelity's own, tested by its own suite.
OWN_PACKAGES = ("fidelity.",)


def check_user_estimator(spec: ComponentSpec, suite: Suite) -> None:
    """The estimator contract (``fidelity.contract``) for a class the suite names by import
    path and fidelity does not ship, with the entry's settings; before any compute."""
    if ":" not in spec.kind or spec.missing_modules():
        return
    cls = ESTIMATORS.get(spec.kind)
    if cls.__module__.startswith(OWN_PACKAGES):
        return
    # An entry with a reference is under conformance: its numbers (NaN included) are what the
    # conformance table reports, so only the class rules are checked up front.
    numeric = spec.contract and spec.reference is None
    try:
        check_estimator(cls, suite.settings_for(spec), numeric=numeric)
    except FidelityError as exc:
        hint = "" if not numeric else " (contract = false in the entry skips the numeric rules)"
        raise FidelityError(f"estimator {spec.label!r}: {exc}{hint}") from exc


def check_selection(selection: SelectionSpec, problem: Problem) -> None:
    """The selection fits the problem's splits."""
    if selection.test_index and max(selection.test_index) >= problem.n_test:
        raise FidelityError(
            f"selection.test_index names test point {max(selection.test_index)}, but "
            f"{problem.name!r} has {problem.n_test}"
        )
    if selection.top + selection.random > problem.n_train:
        raise FidelityError(
            f"selection: cannot remove {selection.top} top + {selection.random} random points "
            f"from the {problem.n_train} training points of {problem.name!r}"
        )


def prepare(
    problem_name: str, suite: Suite, execution: Execution, problem: Problem | None = None
) -> Setup:
    """Build (unless given) and train the problem (theta_s from the cache where it is there),
    draw test points."""
    start = time.perf_counter()
    if problem is None:
        problem = load_problem(problem_name, cache=execution.cache)
    trained = train(problem, cache=execution.cache)
    path = [
        spec.label
        for spec in suite.estimators
        if spec.runs_on(problem_name, problem.name)
        and not spec.missing_modules()
        and ESTIMATORS.get(spec.kind).training_path
    ]
    if path and isinstance(problem.recipe, MinibatchRecipe):
        # estimators that follow the training run share its recording, cached like theta_s
        trained = with_trajectory(trained, cache=execution.cache)
    train_seconds = time.perf_counter() - start
    log.info(
        "%s: trained (%d parameters, %d training points) in %.1f s",
        problem.name,
        trained.n_params,
        problem.n_train,
        train_seconds,
    )
    selection = suite.selection_for(problem_name, problem.name)
    check_selection(selection, problem)
    rng = problem_seed(suite.seed, problem.name)
    if selection.test_index:
        test_index = np.array(sorted(selection.test_index), dtype=np.int64)
    else:
        test_index = choose_test_points(problem.n_test, selection.test_points, rng)
    test = problem.test.subset(torch.as_tensor(test_index, device=problem.device))
    return Setup(problem_name, problem, trained, selection, rng, test_index, test, train_seconds)


def predict(setup: Setup, suite: Suite) -> Predictions:
    """Fit every estimator that runs here, choose the removed points (the top ones by the
    selection's estimator), and score every estimator on them."""
    problem, names = setup.problem, setup.names
    fitted: dict[str, Estimator] = {}
    timing: dict[str, dict[str, int | float | None]] = {}
    checked, skipped = {}, {}
    crashed: dict[str, str] = {}
    for spec in (spec for spec in suite.estimators if spec.runs_on(*names)):
        missing = spec.missing_modules()
        if missing:
            skipped[spec.label] = f"not importable here: {', '.join(missing)}"
            continue
        if spec.reference is not None:
            checked[spec.label] = spec
        estimator = build_component(
            ESTIMATORS, spec.kind, suite.settings_for(spec, *names), where=spec.label
        )
        tick = time.perf_counter()
        with PeakMemory() as memory, _crash_recorded(spec, "fit", crashed, problem.name):
            fitted[spec.label] = estimator.fit(setup.trained)
        if spec.label in crashed:
            continue
        timing[spec.label] = {
            "fit_seconds": time.perf_counter() - tick,
            "fit_peak_memory_bytes": memory.peak_increase,
            "fit_cuda_peak_bytes": memory.cuda_peak_bytes,
        }
    if not fitted:
        raise FidelityError(
            f"no estimator of the suite can run on {problem.name!r}: {skipped | crashed}"
        )
    selection = setup.selection
    selector = selection.top_by or next(iter(fitted))
    if selector in crashed:
        raise FidelityError(
            f"selection.top_by {selector!r} crashed on {problem.name!r} ({crashed[selector]}); "
            "rank by an estimator that runs here"
        )
    if selector in skipped:
        raise FidelityError(
            f"selection.top_by {selector!r} was skipped on {problem.name!r} "
            f"({skipped[selector]}); rank by an estimator that runs here"
        )
    ranking = None
    if selection.top:
        ranking = fitted[selector].scores(setup.test, problem.train).detach().cpu().numpy()
    removed_index, reasons = choose_removals(
        ranking, problem.n_train, top=selection.top, random=selection.random, rng=setup.rng
    )
    removed_train = problem.train.subset(torch.as_tensor(removed_index, device=problem.device))
    deltas, records = {}, {}
    for label, estimator in fitted.items():
        tick = time.perf_counter()
        spec = next(spec for spec in suite.estimators if spec.label == label)
        with PeakMemory() as memory, _crash_recorded(spec, "scores", crashed, problem.name):
            if ranking is not None and label == selector:
                predicted = ranking[:, removed_index]
            else:
                predicted = estimator.scores(setup.test, removed_train).detach().cpu().numpy()
        if label in crashed:
            continue
        if label not in checked:
            # An estimator checked against a reference reports non-finite values as a
            # conformance finding (with the numbers) instead of ending the run.
            _check_finite(predicted, f"estimator {label!r} on {problem.name!r}")
        deltas[label] = predicted
        log.info(
            "%s: estimator %s fitted in %.1f s, scored %d x %d in %.1f s",
            problem.name,
            label,
            timing[label]["fit_seconds"],
            *predicted.shape,
            time.perf_counter() - tick,
        )
        records[label] = EstimatorRecord(
            kind=spec.kind,
            settings=json_ready(estimator.get_params()),
            diagnostics=json_ready(estimator.diagnostics),
            fit_seconds=float(timing[label]["fit_seconds"] or 0.0),
            scores_seconds=time.perf_counter() - tick,
            fit_peak_memory_bytes=_optional_int(timing[label]["fit_peak_memory_bytes"]),
            scores_peak_memory_bytes=memory.peak_increase,
            fit_cuda_peak_bytes=_optional_int(timing[label]["fit_cuda_peak_bytes"]),
            scores_cuda_peak_bytes=memory.cuda_peak_bytes,
        )
    return Predictions(
        {label: estimator for label, estimator in fitted.items() if label not in crashed},
        records,
        deltas,
        skipped,
        checked,
        selector if selection.top else None,
        removed_index,
        reasons,
        {} if ranking is None else {selector: ranking},
        crashed,
    )


@contextlib.contextmanager
def _crash_recorded(
    spec: ComponentSpec, step: str, crashed: dict[str, str], problem: str
) -> Iterator[None]:
    """For an estimator checked against a reference (in the bundled suites, another library
    behind an adapter), an exception from its ``step`` is recorded in ``crashed`` as a
    conformance finding and the run goes on. Propagated: a FidelityError (the adapter refusing
    a setting or the problem), running out of memory (the machine's limit, not a defect), and
    any exception of an estimator without a reference."""
    if spec.reference is None:
        yield
        return
    try:
        yield
    except (FidelityError, MemoryError, torch.OutOfMemoryError):
        raise  # a configuration error, or the machine's memory
    except Exception as error:  # the library's own failure, whatever its type
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        crashed[spec.label] = f"{step} raised {type(error).__name__}: {first_line}"
        log.warning("%s: estimator %s crashed (%s)", problem, spec.label, crashed[spec.label])
        log.debug("traceback of %s", spec.label, exc_info=True)


def respond(
    setup: Setup, predictions: Predictions, suite: Suite, execution: Execution
) -> Responses:
    """Every response stage's actual deltas for the removed points; a multi-seed response also
    keeps its per-seed deltas and its noise ceiling."""
    problem = setup.problem
    removed = torch.as_tensor(predictions.removed_index, device=problem.device)
    records, deltas, per_seed, stages = {}, {}, {}, []
    for spec in (spec for spec in suite.responses if spec.runs_on(*setup.names)):
        response = build_component(
            RESPONSES, spec.kind, suite.settings_for(spec, *setup.names), where=spec.label
        )
        tick = time.perf_counter()
        result = response.compute(setup.trained, setup.test, removed, execution)
        actual = result.deltas.detach().cpu().numpy()
        _check_finite(actual, f"response {spec.label!r} on {problem.name!r}")
        deltas[spec.label] = actual
        log.info(
            "%s: response %s (%s) for %d removals in %.1f s",
            problem.name,
            spec.label,
            spec.kind,
            actual.shape[1],
            time.perf_counter() - tick,
        )
        first_seed = None if result.per_seed is None else result.per_seed[0].detach().cpu().numpy()
        stages.append(Stage(spec.label, spec.kind, actual, result.thetas, first_seed))
        ceiling: NoiseCeiling | None = None
        if result.per_seed is not None:
            per_seed[spec.label] = result.per_seed.detach().cpu().numpy()
            ceiling = noise_ceiling(per_seed[spec.label], seed=suite.seed)
        records[spec.label] = ResponseRecord(
            kind=spec.kind,
            settings=json_ready(response.get_params()),
            seconds=time.perf_counter() - tick,
            info=json_ready(result.info),
            noise_ceiling=ceiling,
        )
    return Responses(records, deltas, per_seed, tuple(stages))


def retrain_subsets(
    setup: Setup, predictions: Predictions, suite: Suite, execution: Execution
) -> Datamodels:
    """Every subset and counterfactual stage that runs here, and the deltas of every estimator
    for every training point (an LDS and a top-k ranking need them all; the ranking estimator's
    are reused)."""
    found, settings = {}, {}
    for spec in (spec for spec in suite.subsets if spec.runs_on(*setup.names)):
        stage = build_component(
            SUBSET_RESPONSES, spec.kind, suite.settings_for(spec, *setup.names), where=spec.label
        )
        result = stage.compute(setup.trained, setup.test, execution)
        _check_finite(result.per_seed.numpy(), f"subsets {spec.label!r} on {setup.problem.name!r}")
        found[spec.label], settings[spec.label] = result, stage
    counterfactual_specs = [s for s in suite.counterfactuals if s.runs_on(*setup.names)]
    group_specs = [s for s in suite.groups if s.runs_on(*setup.names)]
    full_scores = {}
    if found or counterfactual_specs or group_specs:
        train = setup.problem.train
        for label, estimator in predictions.estimators.items():
            scores = predictions.full_scores.get(label)
            if scores is None:
                scores = estimator.scores(setup.test, train).detach().cpu().numpy()
            full_scores[label] = scores
    counterfactuals = {}
    for spec in counterfactual_specs:
        stage = build_component(
            COUNTERFACTUAL_RESPONSES,
            spec.kind,
            suite.settings_for(spec, *setup.names),
            where=spec.label,
        )
        counterfactuals[spec.label] = stage.compute(
            setup.trained, setup.test, full_scores, execution
        )
    groups = {}
    for spec in group_specs:
        stage = build_component(
            GROUP_RESPONSES, spec.kind, suite.settings_for(spec, *setup.names), where=spec.label
        )
        groups[spec.label] = stage.compute(setup.trained, setup.test, execution)
    weights = {label: (result.masks, settings[label].target) for label, result in found.items()}
    weights.update(
        {label: (1.0 - result.members, result.target) for label, result in groups.items()}
    )
    stage_predictions = {
        label: {
            name: _prediction(estimator, full_scores[name], setup, kept, target)
            for name, estimator in predictions.estimators.items()
        }
        for label, (kept, target) in weights.items()
    }
    return Datamodels(found, settings, full_scores, counterfactuals, groups, stage_predictions)


def _prediction(
    estimator: Estimator, scores: np.ndarray, setup: Setup, kept: torch.Tensor, target: str
) -> np.ndarray:
    """``[n_masks, n_test]`` for the training weights ``kept``: the estimator's own prediction
    (``group_effects``) where it has one, else the additive sum of its deltas over the dropped
    weight."""
    if not isinstance(estimator, GroupEffects):
        return subset_predictions(scores, kept.numpy(), target)
    problem = setup.problem
    weights = kept.to(dtype=problem.dtype, device=problem.device)
    predicted = estimator.group_effects(setup.test, weights, target).detach().cpu().numpy()
    _check_finite(predicted, f"group effects of {estimator.name!r} on {problem.name!r}")
    return predicted


def score_groups(datamodels: Datamodels) -> tuple[GroupResults, ...]:
    """Per estimator and group kind: predicted (the sum of its deltas over the group) against
    the measured change over every (group, test point) pair, and the means per size."""
    found = []
    for label, result in datamodels.groups.items():
        actual = result.per_seed.numpy().mean(0)  # [groups, n_test]
        kinds, sizes = np.array(result.kinds), np.array(result.sizes)
        fits: dict[str, dict[str, GroupFit]] = {}
        for estimator, predicted in datamodels.predictions[label].items():
            fits[estimator] = {}
            for kind in dict.fromkeys(result.kinds):
                rows = kinds == kind
                p, a = predicted[rows], actual[rows]
                denominator = float((a * a).sum())
                per_size = tuple(
                    GroupSize(
                        size=int(size),
                        groups=int((rows & (sizes == size)).sum()),
                        mean_actual=finite_or_none(actual[rows & (sizes == size)].mean()),
                        mean_predicted=finite_or_none(predicted[rows & (sizes == size)].mean()),
                    )
                    for size in dict.fromkeys(result.sizes)
                )
                fits[estimator][kind] = GroupFit(
                    pearson=finite_or_none(pearson(p, a)),
                    spearman=finite_or_none(spearman(p, a)),
                    slope=finite_or_none((p * a).sum() / denominator) if denominator else None,
                    sizes=per_size,
                )
        seeds = int(result.per_seed.shape[0])
        found.append(GroupResults(label, result.target, seeds, fits))
    return tuple(found)


def score_counterfactuals(
    datamodels: Datamodels, suite: Suite
) -> tuple[CounterfactualResults, ...]:
    """Per ranking and budget: the mean change on the test point (bootstrap over test points)
    and the fraction of correctly classified test points flipped; and brittleness."""
    found = []
    for label, result in datamodels.counterfactuals.items():
        change = result.change.numpy()  # [seeds, methods, test, ks]
        before = None if result.correct_before is None else result.correct_before.numpy()
        after = None if result.correct_after is None else result.correct_after.numpy()
        curves, brittleness = {}, {}
        for m, method in enumerate(result.methods):
            points = []
            for kk, k in enumerate(result.ks):
                flipped = None
                if before is not None and after is not None and before.any():
                    flipped = float((~after[:, m, :, kk])[before].mean())
                interval = mean_interval(
                    change[:, m, :, kk].mean(0),
                    n_boot=suite.metrics.bootstrap,
                    confidence=suite.metrics.confidence,
                    seed=suite.seed,
                )
                points.append(CounterfactualPoint(k, interval, flipped))
            curves[method] = tuple(points)
            if before is not None and after is not None:
                flips = ~after[:, m]  # [seeds, test, ks]
                smallest = [
                    result.ks[int(np.argmax(flips[s, t]))]
                    for s, t in zip(*np.nonzero(before), strict=True)
                    if flips[s, t].any()
                ]
                correct = int(before.sum())
                brittleness[method] = Brittleness(
                    correct=correct,
                    flipped_within_budget=len(smallest) / correct if correct else None,
                    median_k=float(np.median(smallest)) if smallest else None,
                )
        found.append(
            CounterfactualResults(
                response=label,
                target=result.target,
                seeds=int(change.shape[0]),
                ks=result.ks,
                curves=curves,
                brittleness=brittleness,
            )
        )
    return tuple(found)


def score_lds(datamodels: Datamodels, suite: Suite) -> tuple[LdsResults, ...]:
    """LDS of every estimator against every subset stage, per alpha, with the noise ceiling of
    the seed-mean measurements (two or more seeds)."""
    found = []
    for label, result in datamodels.subsets.items():
        stage = datamodels.settings[label]
        predicted = datamodels.predictions[label]
        for alpha in dict.fromkeys(result.alphas.tolist()):
            rows = np.flatnonzero(np.isclose(result.alphas.numpy(), alpha))
            per_seed = result.per_seed.numpy()[:, rows]  # [seeds, subsets, n_test]
            measured = per_seed.mean(0)
            metrics = {
                estimator: lds(
                    values[rows],
                    measured,
                    n_boot=suite.metrics.bootstrap,
                    confidence=suite.metrics.confidence,
                    seed=suite.seed,
                )
                for estimator, values in predicted.items()
            }
            ceiling = None
            if per_seed.shape[0] > 1:
                ceiling = noise_ceiling(per_seed.transpose(0, 2, 1), seed=suite.seed, per_row=True)
            found.append(
                LdsResults(
                    response=label,
                    alpha=alpha,
                    subsets=len(rows),
                    seeds=int(per_seed.shape[0]),
                    target=stage.target,
                    metrics=metrics,
                    noise_ceiling=ceiling,
                )
            )
    return tuple(found)


def score_all(
    predictions: Predictions,
    responses: Responses,
    suite: Suite,
    datamodels: Datamodels | None = None,
) -> Scores:
    """Every number the reports show about agreement: the metrics of every estimator x response
    with bootstrap intervals, the pooled Pearson between every pair of arrays, per-test-point
    correlations, and each checked estimator against its reference."""
    metrics: dict[str, dict[str, dict[str, Interval]]] = {}
    per_test = []
    for estimator, predicted in predictions.deltas.items():
        metrics[estimator] = {}
        for response, actual in responses.deltas.items():
            metrics[estimator][response] = score(
                predicted,
                actual,
                n_boot=suite.metrics.bootstrap,
                confidence=suite.metrics.confidence,
                seed=suite.seed,
            )
            per_test.append(
                PerTestCorrelations(
                    estimator,
                    response,
                    tuple(map(finite_or_none, row_pearson(predicted, actual))),
                    tuple(map(finite_or_none, row_spearman(predicted, actual))),
                )
            )
    arrays = {f"estimator/{k}": v for k, v in predictions.deltas.items()}
    arrays.update({f"response/{k}": v for k, v in responses.deltas.items()})
    labels = tuple(arrays)
    correlations = CorrelationMatrix(
        labels,
        tuple(tuple(finite_or_none(pearson(arrays[a], arrays[b])) for b in labels) for a in labels),
    )
    found = {
        label: conformance(
            predictions.deltas[label],
            predictions.deltas[spec.reference],
            reference_label=spec.reference,
            tolerance=spec.tolerance,
        )
        for label, spec in predictions.checked.items()
        # a skipped reference leaves nothing to compare with
        if spec.reference is not None
        and spec.reference in predictions.deltas
        and label in predictions.deltas
    }
    for label, reason in predictions.crashed.items():
        spec = predictions.checked[label]
        found[label] = crashed_conformance(str(spec.reference), reason, spec.tolerance)
    lds_found = () if datamodels is None else score_lds(datamodels, suite)
    counterfactuals = () if datamodels is None else score_counterfactuals(datamodels, suite)
    groups = () if datamodels is None else score_groups(datamodels)
    return Scores(metrics, correlations, tuple(per_test), found, lds_found, counterfactuals, groups)


def decompose_gaps(
    setup: Setup, predictions: Predictions, responses: Responses
) -> Decomposition | None:
    """The ladder's gaps and each estimator's gap to the last stage (None without a ladder)."""
    if not any(stage.kind in LADDER for stage in responses.stages):
        return None
    removed_train = setup.problem.train.subset(
        torch.as_tensor(predictions.removed_index, device=setup.problem.device)
    )
    changes = {
        label: (predictions.deltas[label], estimator.parameter_changes(removed_train))
        for label, estimator in predictions.estimators.items()
    }
    replay = next(
        (label for label, e in predictions.estimators.items() if e.name == "replay"), None
    )
    return decompose(setup.trained, list(responses.stages), changes, path=replay)


def most_influential(
    problem: Problem,
    predictions: Predictions,
    response: str,
    actual: np.ndarray,
    *,
    count: int = 10,
) -> tuple[InfluentialRemoval, ...]:
    """The removed training points with the largest mean |actual delta| (under ``response``)
    over the test points, with label, text (text problems) and every estimator's mean delta."""
    order = np.argsort(-np.abs(actual).mean(axis=0), kind="stable")[:count]
    found = []
    for column in order:
        index = int(predictions.removed_index[column])
        label = problem.y_train[index]
        found.append(
            InfluentialRemoval(
                train_index=index,
                reason=str(predictions.removed_reason[column]),
                label=json_ready(label.tolist() if label.numel() > 1 else label.item()),
                text=None if problem.train_texts is None else problem.train_texts[index],
                response=response,
                mean_actual=finite_or_none(actual[:, column].mean()),
                mean_predicted={
                    key: finite_or_none(values[:, column].mean())
                    for key, values in predictions.deltas.items()
                },
            )
        )
    return tuple(found)


def assemble(
    setup: Setup,
    predictions: Predictions,
    responses: Responses,
    scores: Scores,
    decomposition: Decomposition | None,
    timings: dict[str, float],
    datamodels: Datamodels | None = None,
) -> ProblemOutcome:
    """The problem's typed results and the arrays stored beside them."""
    problem, trained = setup.problem, setup.trained
    first_response = next(iter(responses.deltas))
    reasons = predictions.removed_reason
    results = ProblemResults(
        name=problem.name,
        requested_as=setup.requested_as,
        description=problem.description.strip(),
        fingerprint=problem.fingerprint(),
        loss=problem.loss,
        weight_decay=problem.weight_decay,
        dtype=str(problem.dtype),
        device=str(problem.device),
        n_train=problem.n_train,
        n_test=problem.n_test,
        n_params=trained.n_params,
        training=json_ready(trained.info),
        n_test_points=len(setup.test_index),
        n_removed=RemovedCounts(int((reasons == "top").sum()), int((reasons == "random").sum())),
        top_by=predictions.top_by,
        estimators=predictions.records,
        skipped_estimators=predictions.skipped,
        responses=responses.records,
        metrics=scores.metrics,
        correlations=scores.correlations,
        per_test=scores.per_test,
        decomposition=decomposition,
        conformance=scores.conformance,
        most_influential=most_influential(
            problem, predictions, first_response, responses.deltas[first_response]
        ),
        timings=timings,
        arrays_file=f"arrays/{safe_filename(problem.name)}.npz",
        lds=scores.lds,
        counterfactuals=scores.counterfactuals,
        groups=scores.groups,
    )
    arrays: dict[str, np.ndarray] = {
        "test_index": setup.test_index,
        "removed_index": predictions.removed_index,
        "removed_reason": reasons,
    }
    arrays.update({f"estimator/{k}": v for k, v in predictions.deltas.items()})
    for label, actual in responses.deltas.items():
        arrays[f"response/{label}"] = actual
        if label in responses.per_seed:
            arrays[f"response/{label}/seeds"] = responses.per_seed[label]
    if datamodels is not None and datamodels.subsets:
        for label, result in datamodels.subsets.items():
            arrays[f"subsets/{label}/masks"] = result.masks.numpy()
            arrays[f"subsets/{label}/alphas"] = result.alphas.numpy()
            arrays[f"subsets/{label}/seeds"] = result.per_seed.numpy()
            for name, values in datamodels.predictions[label].items():
                arrays[f"subsets/{label}/predicted/{name}"] = values
    if datamodels is not None:
        for label, full in datamodels.full_scores.items():
            arrays[f"scores/{label}"] = full
        for label, found in datamodels.counterfactuals.items():
            arrays[f"counterfactual/{label}/change"] = found.change.numpy()
            arrays[f"counterfactual/{label}/methods"] = np.array(found.methods)
            arrays[f"counterfactual/{label}/ks"] = np.array(found.ks)
            if found.correct_after is not None and found.correct_before is not None:
                arrays[f"counterfactual/{label}/correct_after"] = found.correct_after.numpy()
                arrays[f"counterfactual/{label}/correct_before"] = found.correct_before.numpy()
        for label, effects in datamodels.groups.items():
            arrays[f"groups/{label}/members"] = effects.members.numpy()
            arrays[f"groups/{label}/kinds"] = np.array(effects.kinds)
            arrays[f"groups/{label}/sizes"] = np.array(effects.sizes)
            arrays[f"groups/{label}/seeds"] = effects.per_seed.numpy()
            for name, values in datamodels.predictions[label].items():
                arrays[f"groups/{label}/predicted/{name}"] = values
    return ProblemOutcome(results, arrays)


def evaluate_problem(
    problem_name: str,
    suite: Suite,
    execution: Execution,
    *,
    decomposition: bool = True,
    problem: Problem | None = None,
) -> ProblemOutcome:
    """The stages for one problem (``decomposition=False`` skips the gap decomposition);
    ``problem`` is the problem already built from ``problem_name``, where it was."""
    start = time.perf_counter()
    setup = prepare(problem_name, suite, execution, problem)
    predictions = predict(setup, suite)
    responses = respond(setup, predictions, suite, execution)
    tick = time.perf_counter()
    datamodels = retrain_subsets(setup, predictions, suite, execution)
    subsets_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    scores = score_all(predictions, responses, suite, datamodels)
    timings = {"train_seconds": setup.train_seconds, "metrics_seconds": time.perf_counter() - tick}
    if datamodels.subsets or datamodels.counterfactuals or datamodels.groups:
        timings["subsets_seconds"] = subsets_seconds
    gaps = None
    if decomposition:
        tick = time.perf_counter()
        gaps = decompose_gaps(setup, predictions, responses)
        if gaps is not None:
            timings["decomposition_seconds"] = time.perf_counter() - tick
    timings["total_seconds"] = time.perf_counter() - start
    log.info("%s: done in %.1f s", setup.problem.name, timings["total_seconds"])
    return assemble(setup, predictions, responses, scores, gaps, timings, datamodels)


def _optional_int(value: float | int | None) -> int | None:
    return None if value is None else int(value)


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise FidelityError(f"{what} produced NaN or infinite deltas")


def run_suite(suite: Suite, options: RunOptions) -> RunResults:
    """Evaluate every problem of ``suite`` and write the run directory ``options.out``.

    Before any compute, every output location (run directory, cache, history) is checked
    writable and the run directory is claimed, so that a second run given the same ``--out``
    is refused at once. The directory is assembled under a temporary name and renamed when
    complete, so a failed or interrupted run never leaves a directory that looks finished. With
    ``options.history`` the run is then appended to that run history (one transaction), and the
    HTML report shows the trend of the suite's last ``options.trend_runs`` runs.
    """
    out = Path(options.out)
    check_run_directory(out)
    execution = options.execution
    cache_dir = execution.cache.root
    if cache_dir is not None:
        check_writable(cache_dir, "cache directory", directory=True)
    if options.history is not None:
        check_history(options.history)
    problems = preflight(suite, execution)  # writes only to the cache: a bad problem leaves no run
    with claimed(out):
        check_run_directory(out)  # a run that held the claim before may have written it
        remove_stale_staging(out)
        results, staging = _compute_run(suite, options, out, problems)
        try:
            if out.exists():
                out.rmdir()
            os.replace(staging, out)
        except OSError as exc:
            raise FidelityError(
                f"cannot move the finished run into {str(out)!r} ({exc.strerror}); it is "
                f"complete in {str(staging)!r}"
            ) from None
    if options.history is not None:
        try:
            append_run(options.history, results, out)
        except FidelityError as exc:
            raise FidelityError(
                f"the run directory {str(out)!r} is complete, but it was not recorded in the "
                f"run history: {exc}; record it later with: fidelity record {str(out)!r} "
                f"--history {str(options.history)!r}"
            ) from exc
    return results


def check_run_directory(out: Path) -> None:
    """``out`` can become a new run directory: absent or empty, creatable, writable."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FidelityError(f"output directory {str(out)!r} exists and is not empty; choose --out")
    check_writable(out, "run directory", directory=True)


def _compute_run(
    suite: Suite, options: RunOptions, out: Path, problems: dict[str, Problem]
) -> tuple[RunResults, Path]:
    """Every problem evaluated and the run written to a staging directory beside ``out``."""
    execution = options.execution
    cache_dir = execution.cache.root
    started = datetime.now(UTC)
    tick = time.perf_counter()
    outcomes: dict[str, ProblemOutcome] = {}
    for problem_name, problem in problems.items():
        # one scheduler connection per problem (dask): what its stages share is sent once
        with execution.connected():
            outcome = evaluate_problem(
                problem_name,
                suite,
                execution,
                decomposition=options.decomposition,
                problem=problem,
            )
        name = outcome.results.name
        if name in outcomes:
            raise FidelityError(f"two problems of suite {suite.name!r} are both named {name!r}")
        clash = [
            n for n, o in outcomes.items() if o.results.arrays_file == outcome.results.arrays_file
        ]
        if clash:
            raise FidelityError(
                f"problems {clash[0]!r} and {name!r} map to the same file name; rename one"
            )
        outcomes[name] = outcome
    results = RunResults(
        schema_version=SCHEMA_VERSION,
        run_id=uuid.uuid4().hex,
        fidelity_version=__version__,
        created=started.isoformat(timespec="seconds"),
        suite=json_ready(suite.to_dict()),
        git_revision=git_revision(),
        environment=json_ready(environment()),
        execution={
            "workers": execution.workers,
            "backend": execution.backend,
            "scheduler": execution.scheduler,
            "cache_dir": None if cache_dir is None else str(cache_dir),
        },
        timings={"total_seconds": time.perf_counter() - tick},
        problems={name: outcome.results for name, outcome in outcomes.items()},
    )
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "arrays").mkdir(parents=True)
        for outcome in outcomes.values():
            np.savez(staging / outcome.results.arrays_file, **outcome.arrays)  # type: ignore[arg-type]
        document = json.dumps(results.to_json(), indent=2)
        atomic_write_bytes(staging / "results.json", document.encode())
        if options.reports:
            history = []
            if options.history is not None:
                history = recent_runs(
                    options.history, suite=suite.name, last=max(options.trend_runs - 1, 0)
                )
            write_reports(staging, results, history=history)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return results, staging
