"""Training theta_s for a problem, cached by the problem's fingerprint."""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial

import numpy as np
import torch

from fidelity.core.cache import ArtifactCache, cache_key
from fidelity.core.errors import FidelityError
from fidelity.core.objective import objective
from fidelity.core.problem import (
    FunctionalModel,
    MinibatchRecipe,
    ModelCheck,
    NewtonRecipe,
    OptimizerState,
    Problem,
    TrainedProblem,
    Trajectory,
    check_model,
)
from fidelity.core.resources import check_memory, dense_matrix_bytes
from fidelity.core.training import (
    check_minibatch,
    record_trajectory,
    steps_per_epoch,
    train_minibatch,
)
from fidelity.retrain.newton import newton_minimize


def train(problem: Problem, *, cache: ArtifactCache | None = None) -> TrainedProblem:
    """Train theta_s on J (all weights 1) with the problem's recipe.

    A Newton recipe must converge (gradient norm <= gtol) or this raises; a minibatch recipe
    runs its fixed epochs and the final full-batch gradient norm is reported, not enforced.
    """
    check_training(problem)
    model = FunctionalModel.of(problem.build_model())
    recipe = problem.recipe
    key = cache_key(kind="theta_s", problem=problem.fingerprint())
    minibatch = isinstance(recipe, MinibatchRecipe)
    stored = cache.load("theta_s", key) if cache is not None else None
    # An entry from before optimizer states were stored is retrained (training is deterministic).
    if stored is not None and (not minibatch or "optimizer_step" in stored):
        as_tensor = partial(torch.as_tensor, dtype=problem.dtype, device=problem.device)
        info = {
            "iterations": int(stored["iterations"]),
            "grad_norm": float(stored["grad_norm"]),
            "seconds": float(stored["seconds"]),
            "cached": True,
        }
        state = None
        if minibatch:
            state = OptimizerState(
                as_tensor(stored["optimizer_first"]),
                as_tensor(stored["optimizer_second"]),
                int(stored["optimizer_step"]),
            )
        return TrainedProblem(problem, model, as_tensor(stored["theta"]), info, state)
    start = time.perf_counter()
    if isinstance(recipe, MinibatchRecipe):
        weights = torch.ones(1, problem.n_train, dtype=problem.dtype, device=problem.device)
        run = train_minibatch(model, problem, recipe, model.initial_theta(), weights)
        theta = run.thetas[0]
        gradient = torch.func.grad(lambda t: objective(model, problem, t))(theta)
        info = {
            "iterations": recipe.epochs,
            "grad_norm": float(gradient.norm()),
            "seconds": time.perf_counter() - start,
            "cached": False,
        }
        _store(cache, key, theta, info, run.state)
        return TrainedProblem(problem, model, theta.detach(), info, run.state)
    result = newton_minimize(
        model, problem, model.initial_theta(), gtol=recipe.gtol, max_iter=recipe.max_iter
    )
    seconds = time.perf_counter() - start
    if not result.converged:
        raise FidelityError(
            f"training {problem.name!r} did not converge: gradient norm {result.grad_norm:.3g} > "
            f"gtol {recipe.gtol:g} after {result.iterations} Newton steps; raise the recipe's "
            "max_iter, or add weight decay if the objective is not strictly convex"
        )
    info = {
        "iterations": result.iterations,
        "grad_norm": result.grad_norm,
        "seconds": seconds,
        "cached": False,
    }
    _store(cache, key, result.theta, info)
    return TrainedProblem(problem, model, result.theta.detach(), info)


def check_training(problem: Problem) -> ModelCheck:
    """Validate the problem before any training: one forward pass of its model against the loss
    (``check_model``) and, for a Newton recipe, the dense Hessian that every Newton step and
    exact refit forms, against the memory available."""
    checked = check_model(problem)
    if isinstance(problem.recipe, NewtonRecipe):
        itemsize = torch.empty((), dtype=problem.dtype).element_size()
        check_memory(
            dense_matrix_bytes(checked.n_params, itemsize, copies=3),
            f"Newton training of {problem.name!r} ({checked.n_params} parameters, a dense "
            "Hessian per step)",
            fix="use a MinibatchRecipe for a model this size",
            device=problem.device,
        )
    return checked


def _store(
    cache: ArtifactCache | None,
    key: str,
    theta: torch.Tensor,
    info: dict,
    state: OptimizerState | None = None,
) -> None:
    if cache is None:
        return
    arrays: dict[str, np.ndarray | np.generic] = {
        "theta": theta.detach().cpu().numpy(),
        "iterations": np.int64(info["iterations"]),
        "grad_norm": np.float64(info["grad_norm"]),
        "seconds": np.float64(info["seconds"]),
    }
    if state is not None:
        arrays["optimizer_first"] = state.first.detach().cpu().numpy()
        arrays["optimizer_second"] = state.second.detach().cpu().numpy()
        arrays["optimizer_step"] = np.int64(state.step)
    cache.save("theta_s", key, arrays)


def theta_digest(trained: TrainedProblem) -> str:
    """Content hash of theta_s, part of every cache key derived from it."""
    return cache_key(theta=trained.theta.detach().cpu().numpy().tobytes().hex())


def with_trajectory(
    trained: TrainedProblem, every: int | None = None, *, cache: ArtifactCache | None = None
) -> TrainedProblem:
    """``trained`` with theta_s's recorded run (checkpoints every ``every`` steps, default one
    epoch's), from the cache when it holds it; cached like theta_s, keyed by the problem's
    fingerprint and the spacing. The recording must end at theta_s."""
    problem = trained.problem
    recipe = check_minibatch(problem, "recording the training run")
    every = every or steps_per_epoch(recipe, problem.n_train)
    key = cache_key(kind="trajectory", problem=problem.fingerprint(), every=every)
    stored = cache.load("trajectory", key) if cache is not None else None
    as_tensor = partial(torch.as_tensor, dtype=problem.dtype, device=problem.device)
    if stored is not None:
        trajectory = Trajectory(
            every=int(stored["every"]),
            total_steps=int(stored["total_steps"]),
            steps=tuple(int(s) for s in stored["steps"]),
            thetas=as_tensor(stored["thetas"]),
            first=as_tensor(stored["first"]),
            second=as_tensor(stored["second"]),
        )
    else:
        trajectory = record_trajectory(trained.model, problem, every)
        if cache is not None:
            cache.save(
                "trajectory",
                key,
                {
                    "every": np.int64(every),
                    "total_steps": np.int64(trajectory.total_steps),
                    "steps": np.asarray(trajectory.steps, dtype=np.int64),
                    "thetas": trajectory.thetas.detach().cpu().numpy(),
                    "first": trajectory.first.detach().cpu().numpy(),
                    "second": trajectory.second.detach().cpu().numpy(),
                },
            )
    if not torch.equal(trajectory.thetas[-1], trained.theta):
        raise FidelityError(
            f"the recorded run of {problem.name!r} does not end at its theta_s; retrain it "
            "without the cache (the cached theta_s came from other code)"
        )
    return replace(trained, trajectory=trajectory)
