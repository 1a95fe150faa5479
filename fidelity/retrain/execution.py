"""How retrains run: the backends that spread groups of refits over workers, and the grouped,
cached engine that every retraining stage uses.

Groups are formed before any worker sees them and each is computed the same way wherever it
runs, so no number depends on the backend, the worker count or the group size.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from joblib import Parallel, delayed
from torch import Tensor
from tqdm.auto import tqdm

from fidelity.core.cache import ArtifactCache
from fidelity.core.errors import FidelityError
from fidelity.core.logs import stage_logger
from fidelity.core.problem import TrainedProblem

BACKENDS = ("loky", "threading", "sequential", "dask")
log = stage_logger("retrain")
SCALARS = (bool, int, float, str, type(None))  # settings sent with each task, not shared


class ClusterSession:
    """An execution's connection to its dask scheduler and the objects it has scattered there.

    Opened by ``Execution.connected`` (a run holds it open across all its stages); every object
    given to ``Execution.share`` is scattered once per session and travels in tasks as a
    reference, so a trained problem used by every stage, or a stage's curvature factor used by
    every group, is sent once instead of once per task. Objects are held here until the session
    closes, so that their ids stay theirs.
    """

    def __init__(self) -> None:
        self.client: Any = None
        self.depth = 0
        self.scattered: dict[int, tuple[object, Any]] = {}


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
    session: ClusterSession = field(
        default_factory=ClusterSession, compare=False, repr=False, hash=False
    )

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
    def connected(self) -> Iterator[None]:
        """Hold the dask scheduler connection (and what was scattered) open for the block;
        nested blocks share it. Does nothing for the other backends."""
        if self.backend != "dask":
            yield
            return
        session = self.session
        if session.depth == 0:
            session.client = _connect(self.scheduler)
        session.depth += 1
        try:
            yield
        finally:
            session.depth -= 1
            if session.depth == 0:
                client, session.client = session.client, None
                session.scattered.clear()
                client.close()

    def share(self, value: object) -> object:
        """``value`` as a task argument: on dask, a reference to its one scattered copy (call
        inside ``connected``); elsewhere ``value`` itself."""
        session = self.session
        if self.backend != "dask" or session.client is None or value is None:
            return value
        found = session.scattered.get(id(value))
        if found is None:
            future = session.client.scatter(value, broadcast=True, hash=False)
            found = session.scattered[id(value)] = (value, future)
        return found[1]

    @contextmanager
    def parallel(self) -> Iterator[Callable[[list[Any]], Iterator[Any]]]:
        """A runner of ``joblib.delayed`` jobs that yields their results in submission order
        (as a generator): joblib's ``Parallel``, or, with the dask backend, ``DaskRunner`` on
        the session's scheduler connection (opened for the block when no ``connected`` block
        holds one); dask.distributed is an optional extra
        (``pip install influence-fidelity[dask]``).
        """
        if self.workers == 1 and self.backend != "dask":
            yield Parallel(n_jobs=1, backend="sequential", return_as="generator")
            return
        if self.backend != "dask":
            yield Parallel(n_jobs=self.workers, backend=self.backend, return_as="generator")
            return
        with self.connected():
            yield DaskRunner(self.session.client)


class DaskRunner:
    """Jobs (``joblib.delayed`` triples) submitted to a dask client as they are, one task each,
    their results yielded in submission order; a job's exception is raised where its result
    is reached, and tasks not yet reached are cancelled when the generator is closed.

    joblib's own dask backend was used before: its results reach the caller through a
    coroutine on the client's event loop that a polling loop waits on, and a CI run of the dask
    test waited there forever, at pbrf's groups, with both workers idle (an earlier session saw
    the same test hang once). Plain futures leave the waiting to dask.distributed
    (``Future.result``). Futures nested in a job's arguments (what ``Execution.share``
    scattered) are resolved by dask on the worker."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __call__(self, jobs: list[Any]) -> Iterator[Any]:
        futures = [
            self.client.submit(function, *args, pure=False, **kwargs)
            for function, args, kwargs in jobs
        ]
        try:
            for future in futures:
                yield future.result()
        finally:
            self.client.cancel(futures)


def _connect(scheduler: str | None) -> Any:
    try:
        from distributed import Client
    except ImportError as error:
        raise FidelityError(
            "the dask backend needs dask.distributed: pip install 'influence-fidelity[dask]'"
        ) from error
    try:
        return Client(scheduler, set_as_default=False, timeout=10)
    except OSError as error:
        raise FidelityError(f"cannot reach the dask scheduler at {scheduler!r}: {error}") from None


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
    start, done = time.perf_counter(), 0
    bar = tqdm(
        total=len(missing),
        desc=f"{stage} {trained.problem.name}",
        unit="refit",
        disable=not execution.progress or not missing,
        leave=False,
    )
    with bar, execution.connected(), execution.parallel() as parallel:
        jobs = []
        if missing:
            function, shared, settings = _parts(make_solver())
            # the solver's data (the trained problem, a curvature factor) travels once
            shared = [execution.share(value) for value in shared]
            settings = {
                name: value if isinstance(value, SCALARS) else execution.share(value)
                for name, value in settings.items()
            }
            jobs = [
                delayed(_run_group)(function, shared, settings, g, execution.workers, os.getpid())
                for g in groups
            ]
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
    # A lone refit (an attack's step) is routine; announcing each would drown the log.
    log.log(
        logging.INFO if len(indices) > 1 else logging.DEBUG,
        "%s %s: %d refits (%d from the cache) in %.1f s",
        stage,
        trained.problem.name,
        len(indices),
        len(indices) - len(missing),
        time.perf_counter() - start,
    )
    return Refits(thetas, iterations, grad_norms, len(missing))


def _parts(solver: GroupSolver) -> tuple[Callable[..., Any], list[object], dict[str, Any]]:
    """(function, positional data, keyword settings) of a solver: for a ``functools.partial``
    its parts, so that its data can be shared once; for any other callable the callable
    itself."""
    if isinstance(solver, partial):
        return solver.func, list(solver.args), dict(solver.keywords)
    return solver, [], {}


def _run_group(
    function: Callable[..., tuple[Tensor, Tensor, Tensor]],
    shared: list[object],
    settings: dict[str, Any],
    group: list[int],
    workers: int,
    parent_pid: int,
) -> tuple[Tensor, Tensor, Tensor]:
    if workers > 1 and os.getpid() != parent_pid:
        # Worker processes share the cores; fewer BLAS threads each avoid oversubscription
        # (never in the parent process, where the threading backend runs groups).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    return function(*shared, group, **settings)
