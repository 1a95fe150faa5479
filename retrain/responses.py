"""Response functions: what retraining actually does to the measurement when j is removed.

Every response returns ``delta[t, j] = m(z_t, theta_without_j) - m(z_t, theta_s)`` with m the
test loss (no regulariser), shaped ``[n_test, n_removed]`` (DESIGN.md's sign convention).
"""

from __future__ import annotations

import os
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
from joblib import Parallel, delayed, parallel_config
from torch import Tensor
from tqdm.auto import tqdm

from fidelity.cache import ArtifactCache, cache_key
from fidelity.errors import FidelityError
from fidelity.objective import objective, objective_hessian, per_example_loss
from fidelity.problem import Examples, MinibatchRecipe, NewtonRecipe, Problem, TrainedProblem
from fidelity.registry import constructor_params
from fidelity.validation import check_nonnegative, check_positive_int
from retrain.minibatch import train_minibatch
from retrain.newton import newton_minimize, refit_removals, removal_weights
from retrain.train import theta_digest, train

BACKENDS = ("loky", "threading", "sequential", "dask")


@dataclass(frozen=True)
class ResponseResult:
    """Deltas ``[n_test, n_removed]``; ``per_seed`` ``[n_seeds, n_test, n_removed]`` when the
    response averages independent training seeds (``deltas`` is then their mean); ``thetas``
    ``[n_removed, p]``, the parameters the stage reached for each removal (seed 0's for a
    multi-seed response), which the decomposition compares in output space."""

    deltas: Tensor
    info: dict[str, Any] = field(default_factory=dict)
    per_seed: Tensor | None = None
    thetas: Tensor | None = None


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


class Response(ABC):
    """A stage of the response ladder; configured in ``__init__``, computed by ``compute``."""

    name: ClassVar[str]

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, as configured (recorded in results)."""
        return constructor_params(self)

    @abstractmethod
    def compute(
        self,
        trained: TrainedProblem,
        test: Examples,
        removed: Tensor,
        execution: Execution | None = None,
    ) -> ResponseResult:
        """Actual deltas ``[n_test, n_removed]`` for removing each training index in ``removed``."""


def check_removed(removed: Tensor, n_train: int) -> Tensor:
    """The removed training indices as a flat long tensor, validated against ``n_train``."""
    removed = torch.as_tensor(removed, dtype=torch.long).flatten()
    if removed.numel() and (int(removed.min()) < 0 or int(removed.max()) >= n_train):
        raise FidelityError(f"removed indices must lie in [0, {n_train})")
    return removed


def stack_removed(thetas: dict[int, Tensor], removed: Tensor, trained: TrainedProblem) -> Tensor:
    """``[n_removed, p]``: the retrained parameters in the order of ``removed``."""
    if not removed.numel():
        return trained.theta.new_zeros((0, trained.n_params))
    return torch.stack([thetas[index] for index in removed.tolist()])


def measure(trained: TrainedProblem, thetas: Tensor, test: Examples) -> Tensor:
    """Test loss of each parameter vector, ``[n_models, n_test]``."""
    model, loss = trained.model, trained.problem.loss
    return torch.func.vmap(lambda theta: per_example_loss(model, loss, theta, test))(thetas)


@dataclass(frozen=True)
class RetrainPlan:
    """How a retraining stage runs: where it starts, its proximal pull toward theta_s and, for
    minibatch recipes, its epoch budget (None: the recipe's). Part of every cache key."""

    stage: str
    start: str  # "init" | "trained"
    proximity: float = 0.0
    epochs: int | None = None
    resume_optimizer: bool = False  # minibatch: continue from the recipe's final optimizer state


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
    keys: dict[int, str],
    stage: str,
    solver: GroupSolver,
    execution: Execution,
    group_size: int,
    *,
    cache_below: float | None = None,
) -> Refits:
    """Load what the cache holds, retrain the rest ``group_size`` indices per ``solver`` call
    (``solver(group) -> (thetas [B, p], iterations [B], grad_norms [B])``, picklable so that
    joblib can ship it to a worker), and cache each result, except, when ``cache_below`` is
    given, one whose gradient norm is above it (a failed solve). Groups are formed before any
    worker is involved, so results do not depend on the worker count or the backend.
    """
    thetas: dict[int, Tensor] = {}
    iterations: dict[int, int] = {}
    grad_norms: dict[int, float] = {}
    for index in indices:
        stored = execution.cache.load(stage, keys[index])
        if stored is not None:
            thetas[index] = torch.as_tensor(stored["theta"]).to(trained.theta)
            iterations[index] = int(stored["iterations"])
            grad_norms[index] = float(stored["grad_norm"])
    missing = [index for index in indices if index not in thetas]
    groups = [missing[i : i + group_size] for i in range(0, len(missing), group_size)]
    jobs = (delayed(_run_group)(solver, group, execution.workers, os.getpid()) for group in groups)
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
                if cache_below is not None and not grad_norms[index] <= cache_below:
                    continue
                execution.cache.save(
                    stage,
                    keys[index],
                    {
                        "theta": theta.cpu().numpy(),
                        "iterations": np.int64(iterations[index]),
                        "grad_norm": np.float64(grad_norms[index]),
                    },
                )
            bar.update(len(group))
    return Refits(thetas, iterations, grad_norms, len(missing))


def _run_group(
    solver: GroupSolver, group: list[int], workers: int, parent_pid: int
) -> tuple[Tensor, Tensor, Tensor]:
    if workers > 1 and os.getpid() != parent_pid:
        # Worker processes share the cores; fewer BLAS threads each avoid oversubscription
        # (never in the parent process, where the threading backend runs groups).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    return solver(group)


class ColdResponse(Response):
    """Leave-one-out retraining: minimise J with w_j = 0 (same 1/N) with the problem's recipe.

    For the full-batch Newton recipe (convex models) this is the exact refit: each removal is
    solved to the floating-point floor, started from theta_s when ``refit_start="trained"``
    (same unique minimiser, fewer steps) or from the original initialisation otherwise. For a
    minibatch recipe it is cold-start retraining from the same initialisation with the same
    batch order as theta_s, so delta is paired against the full model trained from that seed.
    Removals are trained ``group_size`` at a time in one vmapped computation. Retrained
    parameters are cached per removed point, so an interrupted run resumes and a repeated run
    retrains nothing.
    """

    name = "cold"

    def __init__(self, *, group_size: int = 128, seeds: int = 1) -> None:
        self.group_size = check_positive_int(group_size, "cold.group_size")
        self.seeds = check_positive_int(seeds, "cold.seeds")

    def compute(
        self,
        trained: TrainedProblem,
        test: Examples,
        removed: Tensor,
        execution: Execution | None = None,
    ) -> ResponseResult:
        """Deltas averaged over ``seeds`` training seeds, each paired with its own full model.

        Seed 0 is the problem as given (its theta_s is ``trained``); seed s shifts the recipe's
        initialisation seed (and, for minibatch recipes, its batch-order seed) by s and trains a
        new full model, against which that seed's retrains are paired.
        """
        execution = execution or Execution()
        results = [self._compute_seed(trained, test, removed, execution)]
        for offset in range(1, self.seeds):
            shifted = seeded_variant(trained.problem, offset)
            seed_trained = train(shifted, cache=execution.cache)
            results.append(self._compute_seed(seed_trained, test, removed, execution))
        if self.seeds == 1:
            return results[0]
        per_seed = torch.stack([result.deltas for result in results])
        info = {
            "seeds": self.seeds,
            "refits": sum(r.info["refits"] for r in results),
            "cached": sum(r.info["cached"] for r in results),
            "seconds": sum(r.info["seconds"] for r in results),
            "max_grad_norm": max(r.info["max_grad_norm"] for r in results),
            "mean_iterations": float(np.mean([r.info["mean_iterations"] for r in results])),
        }
        return ResponseResult(per_seed.mean(0), info, per_seed, results[0].thetas)

    subtract_drift = False

    def _plan(self, problem: Problem) -> RetrainPlan:
        recipe = problem.recipe
        start = recipe.refit_start if isinstance(recipe, NewtonRecipe) else "init"
        return RetrainPlan("cold", start)

    @staticmethod
    def _key(fingerprint: str, theta_s: str, plan: RetrainPlan, index: int) -> str:
        # group_size is left out on purpose: it does not change any result. index -1 is the
        # no-removal control run.
        # Named only when set, so entries computed before resuming existed keep their keys.
        resumed = {"resume_optimizer": True} if plan.resume_optimizer else {}
        return cache_key(
            kind=plan.stage,
            problem=fingerprint,
            theta_s=theta_s,
            removed=index,
            proximity=plan.proximity,
            epochs=plan.epochs,
            start=plan.start,
            **resumed,
        )

    def _compute_seed(
        self, trained: TrainedProblem, test: Examples, removed: Tensor, execution: Execution
    ) -> ResponseResult:
        problem = trained.problem
        start = time.perf_counter()
        removed = check_removed(removed, problem.n_train)
        fingerprint, digest = problem.fingerprint(), theta_digest(trained)
        plan = self._plan(problem)
        newton = isinstance(problem.recipe, NewtonRecipe)
        control = self.subtract_drift and not newton  # a Newton refit from theta_s has no drift
        unique = sorted(set(removed.tolist())) + ([-1] if control else [])
        keys = {index: self._key(fingerprint, digest, plan, index) for index in unique}
        hessian_factor = None
        cached = execution.cache.has_all(plan.stage, keys.values())
        if newton and plan.start == "trained" and not cached:
            hessian = objective_hessian(trained.model, problem, trained.theta)
            hessian.diagonal().add_(plan.proximity)
            hessian_factor, info = torch.linalg.cholesky_ex(hessian)
            if int(info) != 0:
                raise FidelityError(
                    f"problem {problem.name!r}: the Hessian at theta_s is not positive definite, "
                    "so exact leave-one-out refits are ill-posed; add weight decay"
                )
        refits = retrain_indices(
            trained,
            unique,
            keys,
            plan.stage,
            partial(_refit_group, trained, hessian_factor, plan=plan),
            execution,
            self.group_size,
            # never cache a failed refit; the error below reports it
            cache_below=problem.recipe.gtol if newton else None,
        )
        thetas, iterations, grad_norms = refits.thetas, refits.iterations, refits.grad_norms
        diverged = [index for index in unique if not bool(torch.isfinite(thetas[index]).all())]
        if diverged:
            raise FidelityError(
                f"{plan.stage} retraining of {problem.name!r} diverged for training indices "
                f"{diverged[:10]}; lower the learning rate or the damping"
            )
        if newton:
            gtol = problem.recipe.gtol
            unconverged = [index for index in unique if not grad_norms[index] <= gtol]
            if unconverged:
                raise FidelityError(
                    f"{plan.stage} refits of {problem.name!r} did not converge for training "
                    f"indices {unconverged[:10]} (gradient norm above gtol {gtol:g} after "
                    "damped Newton); raise the recipe's max_iter, or add weight decay if the "
                    "objective is not strictly convex"
                )
        stacked = stack_removed(thetas, removed, trained)
        after = measure(trained, stacked, test)
        before = measure(trained, trained.theta.unsqueeze(0), test)
        drift_info = {}
        if control:
            reference = measure(trained, thetas[-1].unsqueeze(0), test)
            drift_info = {"drift_mean_abs": float((reference - before).abs().mean())}
            before = reference
        deltas = (after - before).T.contiguous()
        info = {
            **drift_info,
            "refits": refits.computed,
            "cached": len(unique) - refits.computed,
            "seconds": time.perf_counter() - start,
            "max_grad_norm": max(grad_norms.values(), default=0.0),
            "mean_iterations": float(np.mean(list(iterations.values()))) if iterations else 0.0,
        }
        return ResponseResult(deltas, info, thetas=stacked)


class WarmResponse(ColdResponse):
    """Retraining without j started at theta_s (DESIGN's `warm` stage).

    For a minibatch recipe: ``epochs`` epochs (default: the recipe's) of the recipe's optimizer,
    batches in the recipe's seeded order, the optimizer resuming the state training ended in
    (``optimizer = "resume"``, default: momentum buffer or Adam moments and step count) or
    restarted (``"fresh"``: a restarted Adam's first steps move every parameter by about the
    learning rate whatever its gradient, a drift that can swamp the effect of one removal). A
    no-removal control trained the same way measures the drift of continued training; with
    ``subtract_drift`` (default) delta is paired against the control, m(theta_j) -
    m(theta_control), and the mean |drift| of the test losses is reported. For a Newton recipe
    it is the exact refit (no drift; ``optimizer`` does not apply).
    """

    name = "warm"

    def __init__(
        self,
        *,
        epochs: int | None = None,
        subtract_drift: bool = True,
        optimizer: str = "resume",
        group_size: int = 128,
    ) -> None:
        super().__init__(group_size=group_size)
        if epochs is not None:
            check_positive_int(epochs, f"{self.name}.epochs")
        if not isinstance(subtract_drift, bool):
            raise FidelityError(f"{self.name}.subtract_drift must be true or false")
        if optimizer not in ("resume", "fresh"):
            raise FidelityError(f"{self.name}.optimizer must be 'resume' or 'fresh'")
        self.epochs = epochs
        self.subtract_drift = subtract_drift
        self.optimizer = optimizer

    def _plan(self, problem: Problem) -> RetrainPlan:
        return RetrainPlan(self.name, "trained", 0.0, self.epochs, self._resumes(problem))

    def _resumes(self, problem: Problem) -> bool:
        return isinstance(problem.recipe, MinibatchRecipe) and self.optimizer == "resume"


class ProximalResponse(WarmResponse):
    """`warm` with the proximal term (damping/2) ||theta - theta_s||^2 added to J without j
    (DESIGN's `proximal` stage); with ``damping=0`` it is `warm`."""

    name = "proximal"

    def __init__(
        self,
        *,
        damping: float = 0.0,
        epochs: int | None = None,
        subtract_drift: bool = True,
        optimizer: str = "resume",
        group_size: int = 128,
    ) -> None:
        super().__init__(
            epochs=epochs,
            subtract_drift=subtract_drift,
            optimizer=optimizer,
            group_size=group_size,
        )
        self.damping = check_nonnegative(damping, "proximal.damping")

    def _plan(self, problem: Problem) -> RetrainPlan:
        recipe = problem.recipe
        if isinstance(recipe, MinibatchRecipe) and recipe.optimizer == "sgd":
            # Heavy-ball SGD on the proximal quadratic alone is stable only below this bound.
            limit = 2 * (1 + recipe.momentum)
            if recipe.learning_rate * self.damping >= limit:
                raise FidelityError(
                    f"proximal.damping {self.damping:g} is too stiff for SGD with learning rate "
                    f"{recipe.learning_rate:g} on {problem.name!r}: learning_rate x damping must "
                    f"stay below 2 (1 + momentum) = {limit:g}; lower the damping"
                )
        return RetrainPlan(self.name, "trained", self.damping, self.epochs, self._resumes(problem))


def seeded_variant(problem: Problem, offset: int) -> Problem:
    """The problem with its recipe's initialisation (and batch-order) seed shifted by ``offset``."""
    recipe = problem.recipe
    changes: dict[str, int] = {"init_seed": recipe.init_seed + offset}
    if isinstance(recipe, MinibatchRecipe):
        changes["order_seed"] = recipe.order_seed + offset
    return replace(problem, recipe=replace(recipe, **changes))


def _refit_group(
    trained: TrainedProblem,
    hessian_factor: Tensor | None,
    group: list[int],
    *,
    plan: RetrainPlan,
) -> tuple[Tensor, Tensor, Tensor]:
    """Retrain one group of removals (index -1: no removal, the drift control)."""
    problem = trained.problem
    recipe = problem.recipe
    indices = torch.tensor(group, dtype=torch.long, device=trained.theta.device)
    weights = removal_weights(problem.n_train, indices.clamp_min(0), trained.theta)
    weights[indices < 0] = 1.0
    anchor = trained.theta
    start = trained.theta if plan.start == "trained" else trained.model.initial_theta()
    if isinstance(recipe, MinibatchRecipe):
        state = None
        if plan.resume_optimizer:
            if trained.optimizer_state is None:
                raise FidelityError(
                    f"{plan.stage}: theta_s of {problem.name!r} carries no optimizer state to "
                    "resume; train it with retrain.train, or set optimizer = 'fresh'"
                )
            state = trained.optimizer_state.repeat(len(group))
        thetas = train_minibatch(
            trained.model,
            problem,
            recipe,
            start,
            weights,
            epochs=plan.epochs,
            anchor=anchor,
            proximity=plan.proximity,
            state=state,
        ).thetas
        value = torch.func.vmap(
            torch.func.grad(
                lambda t, w: objective(trained.model, problem, t, w, anchor, plan.proximity)
            )
        )
        norms = value(thetas, weights).norm(dim=1).double().cpu()
        epochs = plan.epochs or recipe.epochs
        return thetas.cpu(), torch.full((len(group),), epochs), norms
    if hessian_factor is not None:
        result = refit_removals(
            trained.model,
            problem,
            trained.theta,
            hessian_factor,
            indices,
            gtol=recipe.gtol,
            max_iter=recipe.max_iter,
            anchor=anchor,
            proximity=plan.proximity,
        )
        return result.thetas.cpu(), result.iterations, result.grad_norms
    finished = [
        newton_minimize(
            trained.model,
            problem,
            start,
            weights[b],
            gtol=recipe.gtol,
            max_iter=recipe.max_iter,
            anchor=anchor,
            proximity=plan.proximity,
        )
        for b in range(len(group))
    ]
    return (
        torch.stack([f.theta for f in finished]).cpu(),
        torch.tensor([f.iterations for f in finished]),
        torch.tensor([f.grad_norm for f in finished], dtype=torch.float64),
    )
