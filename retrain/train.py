"""Training theta_s for a problem, cached by the problem's fingerprint."""

from __future__ import annotations

import time

import numpy as np
import torch

from fidelity.cache import ArtifactCache, cache_key
from fidelity.errors import FidelityError
from fidelity.problem import FunctionalModel, Problem, TrainedProblem
from retrain.newton import newton_minimize


def train(problem: Problem, *, cache: ArtifactCache | None = None) -> TrainedProblem:
    """Minimise the problem's objective J (all weights 1) with its recipe; return theta_s."""
    model = FunctionalModel.of(problem.build_model())
    recipe = problem.recipe
    key = cache_key(kind="theta_s", problem=problem.fingerprint())
    stored = cache.load("theta_s", key) if cache is not None else None
    if stored is not None:
        theta = torch.as_tensor(stored["theta"], dtype=problem.dtype, device=problem.device)
        info = {
            "iterations": int(stored["iterations"]),
            "grad_norm": float(stored["grad_norm"]),
            "seconds": float(stored["seconds"]),
            "cached": True,
        }
        return TrainedProblem(problem, model, theta, info)
    start = time.perf_counter()
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
    if cache is not None:
        cache.save(
            "theta_s",
            key,
            {
                "theta": result.theta.cpu().numpy(),
                "iterations": np.int64(result.iterations),
                "grad_norm": np.float64(result.grad_norm),
                "seconds": np.float64(seconds),
            },
        )
    return TrainedProblem(problem, model, result.theta.detach(), info)


def theta_digest(trained: TrainedProblem) -> str:
    """Content hash of theta_s, part of every cache key derived from it."""
    return cache_key(theta=trained.theta.detach().cpu().numpy().tobytes().hex())
