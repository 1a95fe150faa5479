"""How retrains run: the backends that spread groups of refits over workers, and the grouped,
cached engine that every retraining stage uses.

Groups are formed before any worker sees them and each is computed the same way wherever it
runs, so no number depends on the backend, the worker count or the group size.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from joblib import Parallel, delayed, parallel_config
from torch import Tensor
from tqdm.auto import tqdm

from fidelity.core.cache import ArtifactCache
from fidelity.core.errors import FidelityError
from fidelity.core.logs import stage_logger
from fidelity.core.problem import TrainedProblem

BACKENDS = ("loky", "threading", "sequential", "dask")
log = stage_logger("retrain")


@dataclass(frozen=True)
class Execution:
    """How retrains are spread out: worker processes, joblib backend, cache, progress bar.

    None of these change a result: groups of removals are formed independently of the worker
    count, and every group is computed the same way wherever it runs.
    """

    cache: ArtifactCache = field(default_factory=lambda: ArtifactCache(None))
    workers: int = 1
    backend: str = "loky"
    progress: bool = False
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise FidelityError(f"workers must be >= 1, got {self.workers}")
        if self.backend not in BACKENDS:
            raise FidelityError(
                f"unknown joblib backend {self.backend!r}; valid: {', '.join(BACKENDS)}"
            )
        if self.backend == "dask" and not self.scheduler:
            raise FidelityError(
                "the dask backend needs a scheduler address (--scheduler tcp://host:port)"
            )
        if self.scheduler and self.backend != "dask":
            raise FidelityError("a scheduler address is only used by the dask backend")

    @contextmanager
    def parallel(self) -> Iterator[Parallel]:
        """A joblib ``Parallel`` that yields results in submission order (as a generator).

        With the dask backend it connects to the scheduler for the duration of the block;
        dask.distributed is an optional extra (``pip install influence-fidelity[dask]``).
        """
        if self.workers == 1 and self.backend != "dask":
            yield Parallel(n_jobs=1, backend="sequential", return_as="generator")
            return
        if self.backend != "dask":
            yield Parallel(n_jobs=self.workers, backend=self.backend, return_as="generator")
            return
        try:
            from distributed import Client
        except ImportError as error:
            raise FidelityError(
                "the dask backend needs dask.distributed: pip install 'influence-fidelity[dask]'"
            ) from error
        try:
            client = Client(self.scheduler, set_as_default=False, timeout=10)
        except OSError as error:
            raise FidelityError(
                f"cannot reach the dask scheduler at {self.scheduler!r}: {error}"
            ) from error
        try:
            with parallel_config(backend="dask", client=client), warnings.catch_warnings():
                # Each task carries the trained problem (and a curvature factor) by design.
                warnings.filterwarnings("ignore", message="Sending large graph")
                yield Parallel(n_jobs=self.workers, return_as="generator")
        finally:
            client.close()


@dataclass(frozen=True)
class Refits:
    """What a retraining stage reached for each training index (-1: the no-removal control)."""

    thetas: dict[int, Tensor]
    iterations: dict[int, int]
    grad_norms: dict[int, float]
    computed: int  # how many were retrained rather than loaded from the cache


GroupSolver = Callable[[list[int]], tuple[Tensor, Tensor, Tensor]]


def retrain_indices(
    trained: TrainedProblem,
    indices: list[int],
    key: Callable[[int], str],
    stage: str,
    make_solver: Callable[[], GroupSolver],
    execution: Execution,
    group_size: int,
    *,
    cache_below: float | None = None,
) -> Refits:
    """Load what the cache holds (entries named by ``key(index)``, called only when the cache is
    enabled: hashing a problem is not free), retrain the rest ``group_size`` indices per
    ``solver`` call
    (``solver(group) -> (thetas [B, p], iterations [B], grad_norms [B])``, picklable so that
    joblib can ship it to a worker; ``make_solver()`` builds it, and is called only when
    something is missing, so a stage's expensive preparation (a Hessian factor) is skipped
    when the cache holds every result), and cache each result, except, when ``cache_below`` is
    given, one whose gradient norm is above it (a failed solve). Groups are formed before any
    worker is involved, so results do not depend on the worker count or the backend.
    """
    thetas: dict[int, Tensor] = {}
    iterations: dict[int, int] = {}
    grad_norms: dict[int, float] = {}
    for index in indices if execution.cache.enabled else []:
        stored = execution.cache.load(stage, key(index))
        if stored is not None:
            thetas[index] = torch.as_tensor(stored["theta"]).to(trained.theta)
            iterations[index] = int(stored["iterations"])
            grad_norms[index] = float(stored["grad_norm"])
    missing = [index for index in indices if index not in thetas]
    groups = [missing[i : i + group_size] for i in range(0, len(missing), group_size)]
    jobs = []
    if missing:
        solver = make_solver()
        jobs = [delayed(_run_group)(solver, g, execution.workers, os.getpid()) for g in groups]
    start, done = time.perf_counter(), 0
    bar = tqdm(
        total=len(missing),
        desc=f"{stage} {trained.problem.name}",
        unit="refit",
        disable=not execution.progress or not missing,
        leave=False,
    )
    with bar, execution.parallel() as parallel:
        for group, (group_thetas, group_iters, group_norms) in zip(
            groups, parallel(jobs), strict=True
        ):
            for position, index in enumerate(group):
                theta = group_thetas[position].to(trained.theta)
                thetas[index] = theta
                iterations[index] = int(group_iters[position])
                grad_norms[index] = float(group_norms[position])
                if not execution.cache.enabled or (
                    cache_below is not None and not grad_norms[index] <= cache_below
                ):
                    continue
                execution.cache.save(
                    stage,
                    key(index),
                    {
                        "theta": theta.cpu().numpy(),
                        "iterations": np.int64(iterations[index]),
                        "grad_norm": np.float64(grad_norms[index]),
                    },
                )
            bar.update(len(group))
            done += len(group)
            log.debug(
                "%s %s: %d of %d refits done", stage, trained.problem.name, done, len(missing)
            )
    log.info(
        "%s %s: %d refits (%d from the cache) in %.1f s",
        stage,
        trained.problem.name,
        len(indices),
        len(indices) - len(missing),
        time.perf_counter() - start,
    )
    return Refits(thetas, iterations, grad_norms, len(missing))


def _run_group(
    solver: GroupSolver, group: list[int], workers: int, parent_pid: int
) -> tuple[Tensor, Tensor, Tensor]:
    if workers > 1 and os.getpid() != parent_pid:
        # Worker processes share the cores; fewer BLAS threads each avoid oversubscription
        # (never in the parent process, where the threading backend runs groups).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    return solver(group)
