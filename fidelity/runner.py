"""Run a suite: train each problem, score every estimator against every response, write a run
directory (results.json, arrays/<problem>.npz, report.md, figures/)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fidelity import __version__
from fidelity.cache import ArtifactCache, atomic_write_bytes
from fidelity.decomposition import LADDER, Stage, decompose
from fidelity.environment import environment, git_revision
from fidelity.errors import FidelityError
from fidelity.metrics import conformance, pearson, score, split_half_reliability
from fidelity.problems import load_problem
from fidelity.resources import PeakMemory
from fidelity.selection import choose_removals, choose_test_points
from fidelity.suite import Suite, build_component

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RunOptions:
    """Where a run writes and how it executes; none of it changes a number."""

    out: Path
    cache_dir: Path | None = None
    workers: int = 1
    backend: str = "loky"
    scheduler: str | None = None
    progress: bool = True
    history: Path | None = None
    trend_runs: int = 20
    reports: bool = True  # render report.md, report.html and figures/ (a data-only run: False)
    decomposition: bool = True  # decompose the gaps when the suite has ladder stages


@dataclass
class ProblemOutcome:
    summary: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "problem"


def problem_seed(suite_seed: int, problem_name: str) -> np.random.Generator:
    """Per-problem generator: independent of the order and number of problems in a suite."""
    return np.random.default_rng([suite_seed, zlib.crc32(problem_name.encode())])


def evaluate_problem(
    problem_name: str, suite: Suite, execution: Any, *, decomposition: bool = True
) -> ProblemOutcome:
    """Train one problem, choose points, run all estimators and responses, score them (and,
    with ladder stages and ``decomposition``, decompose the gaps)."""
    from estimators import ESTIMATORS
    from retrain import RESPONSES, train

    timings: dict[str, Any] = {}
    start = time.perf_counter()
    problem = load_problem(problem_name)
    trained = train(problem, cache=execution.cache)
    timings["train_seconds"] = time.perf_counter() - start
    names = (problem_name, problem.name)
    selection = suite.selection_for(*names)
    rng = problem_seed(suite.seed, problem.name)
    test_index = choose_test_points(problem.n_test, selection.test_points, rng)
    test = problem.test.subset(torch.as_tensor(test_index, device=problem.device))

    fitted, estimator_info, checked, skipped = {}, {}, {}, {}
    for spec in (spec for spec in suite.estimators if spec.runs_on(*names)):
        missing = spec.missing_modules()
        if missing:
            skipped[spec.label] = f"not importable here: {', '.join(missing)}"
            continue
        if spec.reference is not None:
            checked[spec.label] = spec
        estimator = build_component(
            ESTIMATORS, spec.kind, spec.settings_for(*names), where=spec.label
        )
        tick = time.perf_counter()
        with PeakMemory() as memory:
            fitted[spec.label] = estimator.fit(trained)
        estimator_info[spec.label] = {
            "kind": spec.kind,
            "fit_seconds": time.perf_counter() - tick,
            "fit_peak_memory_bytes": memory.peak_increase,
        }
        if memory.cuda_peak_bytes is not None:
            estimator_info[spec.label]["fit_cuda_peak_bytes"] = memory.cuda_peak_bytes

    if not fitted:
        raise FidelityError(f"no estimator of the suite can run on {problem.name!r}: {skipped}")
    selector = selection.top_by or next(iter(fitted))
    if selector in skipped:
        raise FidelityError(
            f"selection.top_by {selector!r} was skipped on {problem.name!r} "
            f"({skipped[selector]}); rank by an estimator that runs here"
        )
    ranking = None
    if selection.top:
        ranking = fitted[selector].scores(test, problem.train).detach().cpu().numpy()
    removed_index, reasons = choose_removals(
        ranking, problem.n_train, top=selection.top, random=selection.random, rng=rng
    )
    removed = torch.as_tensor(removed_index, device=problem.device)
    removed_train = problem.train.subset(removed)

    arrays: dict[str, np.ndarray] = {
        "test_index": test_index,
        "removed_index": removed_index,
        "removed_reason": reasons,
    }
    for label, estimator in fitted.items():
        tick = time.perf_counter()
        with PeakMemory() as memory:
            if ranking is not None and label == selector:
                predicted = ranking[:, removed_index]
            else:
                predicted = estimator.scores(test, removed_train).detach().cpu().numpy()
        if label not in checked:
            # An estimator checked against a reference reports non-finite values as a
            # conformance finding (with the numbers) instead of ending the run.
            _check_finite(predicted, f"estimator {label!r} on {problem.name!r}")
        arrays[f"estimator/{label}"] = predicted
        estimator_info[label]["scores_seconds"] = time.perf_counter() - tick
        estimator_info[label]["scores_peak_memory_bytes"] = memory.peak_increase
        if memory.cuda_peak_bytes is not None:
            estimator_info[label]["scores_cuda_peak_bytes"] = memory.cuda_peak_bytes
        estimator_info[label]["settings"] = estimator.get_params()
        estimator_info[label]["diagnostics"] = estimator.diagnostics

    response_info = {}
    stages: list[Stage] = []
    for spec in (spec for spec in suite.responses if spec.runs_on(*names)):
        response = build_component(
            RESPONSES, spec.kind, spec.settings_for(*names), where=spec.label
        )
        tick = time.perf_counter()
        result = response.compute(trained, test, removed, execution)
        actual = result.deltas.detach().cpu().numpy()
        _check_finite(actual, f"response {spec.label!r} on {problem.name!r}")
        arrays[f"response/{spec.label}"] = actual
        stages.append(Stage(spec.label, spec.kind, actual, result.thetas))
        response_info[spec.label] = {
            "kind": spec.kind,
            "settings": response.get_params(),
            "seconds": time.perf_counter() - tick,
            "info": result.info,
            "noise_ceiling": None,
        }
        if result.per_seed is not None:
            per_seed = result.per_seed.detach().cpu().numpy()
            arrays[f"response/{spec.label}/seeds"] = per_seed
            response_info[spec.label]["noise_ceiling"] = split_half_reliability(
                per_seed, seed=suite.seed
            )

    conformance_found = {
        label: {
            "reference": spec.reference,
            **conformance(
                arrays[f"estimator/{label}"],
                arrays[f"estimator/{spec.reference}"],
                tolerance=spec.tolerance,
            ),
        }
        for label, spec in checked.items()
        if spec.reference in fitted  # a skipped reference leaves nothing to compare with
    }
    labels = list(fitted)
    agreement = {
        a: {b: pearson(arrays[f"estimator/{a}"], arrays[f"estimator/{b}"]) for b in labels}
        for a in labels
    }
    metrics: dict[str, dict[str, Any]] = {}
    for estimator_label in fitted:
        metrics[estimator_label] = {}
        for response_label in response_info:
            intervals = score(
                arrays[f"estimator/{estimator_label}"],
                arrays[f"response/{response_label}"],
                n_boot=suite.metrics.bootstrap,
                confidence=suite.metrics.confidence,
                seed=suite.seed,
            )
            metrics[estimator_label][response_label] = {
                name: interval.to_dict() for name, interval in intervals.items()
            }
    gaps = None
    if decomposition and any(stage.kind in LADDER for stage in stages):
        tick = time.perf_counter()
        predictions = {}
        for label, estimator in fitted.items():
            changes = estimator.parameter_changes(removed_train)
            predictions[label] = (arrays[f"estimator/{label}"], changes)
        gaps = decompose(trained, stages, predictions)
        timings["decomposition_seconds"] = time.perf_counter() - tick
    timings["total_seconds"] = time.perf_counter() - start
    summary = {
        "name": problem.name,
        "requested_as": problem_name,
        "description": problem.description.strip(),
        "fingerprint": problem.fingerprint(),
        "loss": problem.loss,
        "weight_decay": problem.weight_decay,
        "dtype": str(problem.dtype),
        "device": str(problem.device),
        "n_train": problem.n_train,
        "n_test": problem.n_test,
        "n_params": trained.n_params,
        "training": dict(trained.info),
        "n_test_points": len(test_index),
        "n_removed": {
            "top": int((reasons == "top").sum()),
            "random": int((reasons == "random").sum()),
        },
        "top_by": selector if selection.top else None,
        "estimators": estimator_info,
        "skipped_estimators": skipped,
        "responses": response_info,
        "metrics": metrics,
        "agreement": agreement,
        "decomposition": gaps,
        "conformance": conformance_found,
        "most_influential": most_influential(problem, arrays, next(iter(response_info))),
        "timings": timings,
    }
    return ProblemOutcome(summary, arrays)


def most_influential(
    problem: Any, arrays: dict[str, np.ndarray], response: str, *, count: int = 10
) -> list[dict[str, Any]]:
    """The removed training points with the largest mean |actual delta| (under ``response``)
    over the test points, with label, text (text problems) and every estimator's mean delta."""
    actual = arrays[f"response/{response}"]
    order = np.argsort(-np.abs(actual).mean(axis=0), kind="stable")[:count]
    estimators = [key for key in arrays if key.startswith("estimator/")]
    found = []
    for column in order:
        index = int(arrays["removed_index"][column])
        label = problem.y_train[index]
        found.append(
            {
                "train_index": index,
                "reason": str(arrays["removed_reason"][column]),
                "label": label.tolist() if label.numel() > 1 else label.item(),
                "text": None if problem.train_texts is None else problem.train_texts[index],
                "response": response,
                "mean_actual": float(actual[:, column].mean()),
                "mean_predicted": {
                    key.split("/", 1)[1]: float(arrays[key][:, column].mean()) for key in estimators
                },
            }
        )
    return found


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise FidelityError(f"{what} produced NaN or infinite deltas")


def _json_ready(value: Any) -> Any:
    """Recursively convert to JSON types; non-finite floats become null."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


def run_suite(suite: Suite, options: RunOptions) -> dict[str, Any]:
    """Evaluate every problem of ``suite`` and write the run directory ``options.out``.

    The directory is assembled under a temporary name and renamed when complete, so a failed or
    interrupted run never leaves a directory that looks finished. With ``options.history`` the
    run is then appended to that run history (one transaction), and the HTML report shows the
    trend of the suite's last ``options.trend_runs`` runs.
    """
    from fidelity.history import recent_runs
    from reports import write_reports
    from retrain import Execution

    out = Path(options.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FidelityError(f"output directory {str(out)!r} exists and is not empty; choose --out")
    blocking = next((a for a in (out, *out.parents) if a.exists() and not a.is_dir()), None)
    if blocking is not None and blocking != out:
        raise FidelityError(f"cannot create {str(out)!r}: {str(blocking)!r} is a file")
    cache_dir = None if options.cache_dir is None else Path(options.cache_dir)
    if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
        raise FidelityError(f"cache directory {str(cache_dir)!r} is a file")
    execution = Execution(
        cache=ArtifactCache(options.cache_dir),
        workers=options.workers,
        backend=options.backend,
        progress=options.progress,
        scheduler=options.scheduler,
    )
    started = datetime.now(UTC)
    tick = time.perf_counter()
    outcomes: dict[str, ProblemOutcome] = {}
    for problem_name in suite.problems:
        outcome = evaluate_problem(
            problem_name, suite, execution, decomposition=options.decomposition
        )
        name = outcome.summary["name"]
        if name in outcomes:
            raise FidelityError(f"two problems of suite {suite.name!r} are both named {name!r}")
        outcome.summary["arrays_file"] = f"arrays/{safe_filename(name)}.npz"
        clash = [
            n
            for n, o in outcomes.items()
            if o.summary["arrays_file"] == outcome.summary["arrays_file"]
        ]
        if clash:
            raise FidelityError(
                f"problems {clash[0]!r} and {name!r} map to the same file name; rename one"
            )
        outcomes[name] = outcome
    results = _json_ready(
        {
            "schema_version": SCHEMA_VERSION,
            "run_id": uuid.uuid4().hex,
            "fidelity_version": __version__,
            "created": started.isoformat(timespec="seconds"),
            "suite": suite.to_dict(),
            "git_revision": git_revision(),
            "environment": environment(),
            "execution": {
                "workers": options.workers,
                "backend": options.backend,
                "scheduler": options.scheduler,
                "cache_dir": None if options.cache_dir is None else str(options.cache_dir),
            },
            "timings": {"total_seconds": time.perf_counter() - tick},
            "problems": {name: outcome.summary for name, outcome in outcomes.items()},
        }
    )
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "arrays").mkdir(parents=True)
        for outcome in outcomes.values():
            np.savez(staging / outcome.summary["arrays_file"], **outcome.arrays)
        atomic_write_bytes(staging / "results.json", json.dumps(results, indent=2).encode())
        if options.reports:
            history = []
            if options.history is not None:
                history = recent_runs(
                    options.history, suite=suite.name, last=max(options.trend_runs - 1, 0)
                )
            write_reports(staging, results, history=history)
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if options.history is not None:
        _record(options.history, results, out)
    return results


def _record(history: Path, results: dict[str, Any], out: Path) -> None:
    from fidelity.history import append_run

    try:
        append_run(history, results, out)
    except FidelityError as exc:
        raise FidelityError(
            f"the run directory {str(out)!r} is complete, but it was not recorded in the run "
            f"history: {exc}"
        ) from exc
