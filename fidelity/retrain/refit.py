"""The retraining stages: one refit template, and the presets that fill it in.

Every retraining stage follows the same sequence: validate the removed indices, key each one
(and a no-removal control where drift is measured), load what the cache holds, retrain the rest
in groups, refuse refits that diverged or did not converge, and measure the test loss of each
result against theta_s (or the control). ``run_refits`` is that sequence; a stage gives it a
``Refit``: its cache key, its group solver and its checks. `cold`, `warm` and `proximal` are
presets of one ``RetrainPlan`` (where training starts, the proximal damping, the epoch budget,
whether the optimizer state resumes); `pbrf` (fidelity/retrain/pbrf.py) supplies its own solver.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from fidelity.core.cache import cache_key
from fidelity.core.checks import check_nonnegative, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import objective
from fidelity.core.problem import (
    Examples,
    MinibatchRecipe,
    NewtonRecipe,
    Problem,
    TrainedProblem,
    seeded_variant,
)
from fidelity.core.training import train_minibatch
from fidelity.retrain.execution import Execution, GroupSolver, Refits, retrain_indices
from fidelity.retrain.newton import (
    newton_minimize,
    refit_removals,
    removal_base_inverse,
    removal_weights,
)
from fidelity.retrain.response import (
    Response,
    ResponseResult,
    check_removed,
    measure,
    stack_removed,
)
from fidelity.retrain.train import theta_digest, train

CONTROL = -1  # the index of the no-removal control run


@dataclass(frozen=True)
class Refit:
    """What a retraining stage fills in to the template.

    ``solver()`` prepares and returns the group solver (called only when some refit is not in
    the cache). ``check(refits, indices)`` raises on refits that are not usable numbers.
    """

    stage: str
    key: Callable[[int], str]
    solver: Callable[[], GroupSolver]
    group_size: int
    check: Callable[[Refits, list[int]], None]
    cache_below: float | None = None  # never cache a refit whose gradient norm is above it
    control: bool = False  # pair deltas against a no-removal control trained the same way
    removal_weight: float = 1.0  # the removal is epsilon = -w/N; deltas are divided by w


def run_refits(
    trained: TrainedProblem,
    test: Examples,
    removed: Tensor,
    execution: Execution,
    refit: Refit,
) -> ResponseResult:
    """The template: deltas ``[n_test, n_removed]`` of one retraining stage for ``removed``."""
    start = time.perf_counter()
    problem = trained.problem
    removed = check_removed(removed, problem.n_train)
    unique = sorted(set(removed.tolist())) + ([CONTROL] if refit.control else [])
    refits = retrain_indices(
        trained,
        unique,
        refit.key,
        refit.stage,
        refit.solver,
        execution,
        refit.group_size,
        cache_below=refit.cache_below,
    )
    finite = torch.isfinite(torch.stack([refits.thetas[i] for i in unique])).all(dim=1)
    diverged = [i for i, ok in zip(unique, finite.tolist(), strict=True) if not ok]
    if diverged:
        raise FidelityError(
            f"{refit.stage} retraining of {problem.name!r} diverged for training indices "
            f"{diverged[:10]}; lower the learning rate or the damping"
        )
    refit.check(refits, unique)
    stacked = stack_removed(refits.thetas, removed, trained)
    after = measure(trained, stacked, test)
    before = measure(trained, trained.theta.unsqueeze(0), test)
    info: dict[str, object] = {}
    if refit.control:
        reference = measure(trained, refits.thetas[CONTROL].unsqueeze(0), test)
        info["drift_mean_abs"] = float((reference - before).abs().mean())
        before = reference
    change = after - before
    if refit.removal_weight != 1.0:
        change = change / refit.removal_weight
    iterations = list(refits.iterations.values())
    info.update(
        {
            "refits": refits.computed,
            "cached": len(unique) - refits.computed,
            "seconds": time.perf_counter() - start,
            "max_grad_norm": max(refits.grad_norms.values(), default=0.0),
            "mean_iterations": float(np.mean(iterations)) if iterations else 0.0,
        }
    )
    return ResponseResult(change.T.contiguous(), info, thetas=stacked)


@dataclass(frozen=True)
class RetrainPlan:
    """How a retraining stage runs on a problem's own recipe: where it starts, its proximal pull
    (damping/2) ||theta - theta_s||^2 and, for minibatch recipes, its epoch budget (None: the
    recipe's) and whether the optimizer resumes the state training ended in. Every field is
    part of the cache key."""

    stage: str
    start: str  # "init" | "trained"
    damping: float = 0.0
    epochs: int | None = None
    resume_optimizer: bool = False
    # Newton refits: stop at this gradient norm instead of the recipe's gtol and the float floor
    tolerance: float | None = None

    def gtol(self, recipe: NewtonRecipe) -> float:
        """The gradient norm a Newton refit of this plan must reach."""
        return recipe.gtol if self.tolerance is None else self.tolerance

    def key(self, fingerprint: str, theta_s: str, index: int) -> str:
        # group_size is left out on purpose: it does not change any result. The key names
        # "proximity" and, only when set, "resume_optimizer" are those of entries computed
        # before the rename to damping and before resuming existed, so those stay valid.
        resumed: dict[str, object] = {"resume_optimizer": True} if self.resume_optimizer else {}
        if self.tolerance is not None:
            resumed["tolerance"] = self.tolerance
        return cache_key(
            kind=self.stage,
            problem=fingerprint,
            theta_s=theta_s,
            removed=index,
            proximity=self.damping,
            epochs=self.epochs,
            start=self.start,
            **resumed,
        )


def cold_plan(problem: Problem, tolerance: float | None = None) -> RetrainPlan:
    """`cold`: the recipe from its own start (Newton recipes may start at theta_s: same unique
    minimiser); ``tolerance``: see ``ColdResponse``."""
    recipe = problem.recipe
    start = recipe.refit_start if isinstance(recipe, NewtonRecipe) else "init"
    return RetrainPlan("cold", start, tolerance=tolerance)


def continued_plan(
    stage: str, problem: Problem, *, damping: float, epochs: int | None, optimizer: str
) -> RetrainPlan:
    """`warm` (damping 0) and `proximal`: training continued from theta_s."""
    recipe = problem.recipe
    if damping and isinstance(recipe, MinibatchRecipe) and recipe.optimizer == "sgd":
        # Heavy-ball SGD on the proximal quadratic alone is stable only below this bound.
        limit = 2 * (1 + recipe.momentum)
        if recipe.learning_rate * damping >= limit:
            raise FidelityError(
                f"{stage}.damping {damping:g} is too stiff for SGD with learning rate "
                f"{recipe.learning_rate:g} on {problem.name!r}: learning_rate x damping must "
                f"stay below 2 (1 + momentum) = {limit:g}; lower the damping"
            )
    resume = isinstance(recipe, MinibatchRecipe) and optimizer == "resume"
    return RetrainPlan(stage, "trained", damping, epochs, resume)


def retrain_stage(
    trained: TrainedProblem,
    test: Examples,
    removed: Tensor,
    execution: Execution,
    plan: RetrainPlan,
    *,
    group_size: int,
    subtract_drift: bool,
) -> ResponseResult:
    """Fill the template in with ``plan`` on the problem's recipe."""
    problem = trained.problem
    newton = isinstance(problem.recipe, NewtonRecipe)

    @functools.cache
    def identity() -> tuple[str, str]:
        return problem.fingerprint(), theta_digest(trained)

    def key(index: int) -> str:
        return plan.key(*identity(), index)

    def solver() -> GroupSolver:
        hessian_inverse = None
        if newton and plan.start == "trained":
            hessian_inverse = removal_base_inverse(
                trained.model, problem, trained.theta, damping=plan.damping
            )
        return partial(_refit_group, trained, hessian_inverse, plan=plan)

    def check(refits: Refits, indices: list[int]) -> None:
        recipe = problem.recipe
        if not isinstance(recipe, NewtonRecipe):
            return
        gtol = plan.gtol(recipe)
        unconverged = [i for i in indices if not refits.grad_norms[i] <= gtol]
        if unconverged:
            raise FidelityError(
                f"{plan.stage} refits of {problem.name!r} did not converge for training "
                f"indices {unconverged[:10]} (gradient norm above gtol {gtol:g} after "
                "damped Newton); raise the recipe's max_iter, or add weight decay if the "
                "objective is not strictly convex"
            )

    refit = Refit(
        stage=plan.stage,
        key=key,
        solver=solver,
        group_size=group_size,
        check=check,
        # never cache a failed Newton refit; the check reports it
        cache_below=plan.gtol(problem.recipe) if isinstance(problem.recipe, NewtonRecipe) else None,
        control=subtract_drift and not newton,  # a Newton refit from theta_s has no drift
    )
    return run_refits(trained, test, removed, execution, refit)


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

    ``tolerance`` (Newton recipes only; default None, the floor): stop each refit once its
    gradient norm is at most this, instead of the recipe's gtol and then the floor;
    for comparisons with a solver run at its own tolerance (``benchmarks.retrain_throughput``
    compares at equal agreement with scikit-learn). Part of the cache key.
    """

    name = "cold"

    def __init__(
        self, *, group_size: int = 128, seeds: int = 1, tolerance: float | None = None
    ) -> None:
        self.group_size = check_positive_int(group_size, "cold.group_size")
        self.seeds = check_positive_int(seeds, "cold.seeds")
        if tolerance is not None and not (
            isinstance(tolerance, int | float)
            and not isinstance(tolerance, bool)
            and 0 < tolerance < math.inf
        ):
            raise FidelityError(f"cold.tolerance must be a positive number, got {tolerance!r}")
        self.tolerance = None if tolerance is None else float(tolerance)

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
        new full model, against which that seed's retrains are paired. A Newton recipe's refits
        do not depend on the seed (the minimiser is unique): they are computed once, recorded as
        ``seeds_computed: 1``, and no per-seed deltas (no noise ceiling) are returned.
        """
        execution = execution or Execution()
        if self.tolerance is not None and not isinstance(trained.problem.recipe, NewtonRecipe):
            raise FidelityError(
                f"cold.tolerance applies to Newton recipes; {trained.problem.name!r} is trained "
                "by minibatches for a fixed number of epochs"
            )
        if isinstance(trained.problem.recipe, NewtonRecipe):
            # A Newton recipe solves a strictly convex objective to its unique minimiser: every
            # seed gives the same refits (to 1e-12, tests/retrain/test_cold.py), so they are
            # computed once, and there is no seed noise to bound.
            result = retrain_stage(
                trained,
                test,
                removed,
                execution,
                cold_plan(trained.problem, self.tolerance),
                group_size=self.group_size,
                subtract_drift=False,
            )
            if self.seeds == 1:
                return result
            info = {**result.info, "seeds": self.seeds, "seeds_computed": 1}
            return ResponseResult(result.deltas, info, None, result.thetas)
        results = []
        for offset in range(self.seeds):
            seed_trained = trained
            if offset:
                seed_trained = train(seeded_variant(trained.problem, offset), cache=execution.cache)
            plan = cold_plan(seed_trained.problem)
            results.append(
                retrain_stage(
                    seed_trained,
                    test,
                    removed,
                    execution,
                    plan,
                    group_size=self.group_size,
                    subtract_drift=False,
                )
            )
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


def _check_continued(
    stage: str, epochs: int | None, subtract_drift: object, optimizer: str
) -> None:
    if epochs is not None:
        check_positive_int(epochs, f"{stage}.epochs")
    if not isinstance(subtract_drift, bool):
        raise FidelityError(f"{stage}.subtract_drift must be true or false")
    if optimizer not in ("resume", "fresh"):
        raise FidelityError(f"{stage}.optimizer must be 'resume' or 'fresh'")


class WarmResponse(Response):
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
        _check_continued(self.name, epochs, subtract_drift, optimizer)
        self.epochs = epochs
        self.subtract_drift = subtract_drift
        self.optimizer = optimizer
        self.group_size = check_positive_int(group_size, f"{self.name}.group_size")

    def compute(
        self,
        trained: TrainedProblem,
        test: Examples,
        removed: Tensor,
        execution: Execution | None = None,
    ) -> ResponseResult:
        return _continue_training(self, 0.0, trained, test, removed, execution)


class ProximalResponse(Response):
    """`warm` with the proximal term (damping/2) ||theta - theta_s||^2 added to J without j
    (DESIGN's `proximal` stage); with ``damping=0`` it is `warm`. Refused for SGD when
    learning_rate x damping >= 2 (1 + momentum), where the step is unstable."""

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
        _check_continued(self.name, epochs, subtract_drift, optimizer)
        self.damping = check_nonnegative(damping, f"{self.name}.damping")
        self.epochs = epochs
        self.subtract_drift = subtract_drift
        self.optimizer = optimizer
        self.group_size = check_positive_int(group_size, f"{self.name}.group_size")

    def compute(
        self,
        trained: TrainedProblem,
        test: Examples,
        removed: Tensor,
        execution: Execution | None = None,
    ) -> ResponseResult:
        return _continue_training(self, self.damping, trained, test, removed, execution)


def _continue_training(
    stage: WarmResponse | ProximalResponse,
    damping: float,
    trained: TrainedProblem,
    test: Examples,
    removed: Tensor,
    execution: Execution | None,
) -> ResponseResult:
    """`warm` (damping 0) and `proximal`: the template with a continued-training plan."""
    plan = continued_plan(
        stage.name, trained.problem, damping=damping, epochs=stage.epochs, optimizer=stage.optimizer
    )
    return retrain_stage(
        trained,
        test,
        removed,
        execution or Execution(),
        plan,
        group_size=stage.group_size,
        subtract_drift=stage.subtract_drift,
    )


def _refit_group(
    trained: TrainedProblem,
    hessian_inverse: Tensor | None,
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
                    "resume; train it with fidelity.retrain.train, or set optimizer = 'fresh'"
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
            damping=plan.damping,
            state=state,
        ).thetas
        value = torch.func.vmap(
            torch.func.grad(
                lambda t, w: objective(trained.model, problem, t, w, anchor, plan.damping)
            )
        )
        norms = value(thetas, weights).norm(dim=1).double().cpu()
        epochs = plan.epochs or recipe.epochs
        return thetas.cpu(), torch.full((len(group),), epochs), norms
    if hessian_inverse is not None:
        result = refit_removals(
            trained.model,
            problem,
            trained.theta,
            hessian_inverse,
            indices,
            gtol=plan.gtol(recipe),
            max_iter=recipe.max_iter,
            anchor=anchor,
            damping=plan.damping,
            to_floor=plan.tolerance is None,
        )
        return result.thetas.cpu(), result.iterations, result.grad_norms
    finished = [
        newton_minimize(
            trained.model,
            problem,
            start,
            weights[b],
            gtol=plan.gtol(recipe),
            max_iter=recipe.max_iter,
            anchor=anchor,
            damping=plan.damping,
            to_floor=plan.tolerance is None,
        )
        for b in range(len(group))
    ]
    return (
        torch.stack([f.theta for f in finished]).cpu(),
        torch.tensor([f.iterations for f in finished]),
        torch.tensor([f.grad_norm for f in finished], dtype=torch.float64),
    )
