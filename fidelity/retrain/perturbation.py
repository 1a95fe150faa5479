"""Retraining with perturbed training inputs: the ground truth of perturbation influence.

A perturbation moves one training input, x_j -> x_j + step (the rest of the training set and
the label y_j stay). The refit is the problem's own retraining with that input: for a Newton
recipe the exact minimiser (started at theta_s, unique), for a minibatch recipe cold-start
retraining from the same initialisation and batch order as theta_s (so the change is paired
with theta_s's own run), models vmapped over perturbations, each with its own inputs.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from torch import Tensor

from fidelity.core.cache import cache_key
from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_loss
from fidelity.core.problem import Examples, MinibatchRecipe, NewtonRecipe, TrainedProblem
from fidelity.core.training import train_minibatch
from fidelity.retrain.execution import Execution, retrain_indices
from fidelity.retrain.newton import newton_minimize
from fidelity.retrain.train import theta_digest

STAGE = "perturbed"


@dataclass(frozen=True)
class PerturbedResult:
    """``changes`` ``[n_perturbations, n_test]``: the test loss after retraining with each
    perturbed input minus theta_s's; ``thetas`` the refits ``[n_perturbations, p]``."""

    changes: Tensor
    thetas: Tensor
    info: dict


def check_steps(trained: TrainedProblem, index: Tensor, steps: Tensor) -> tuple[Tensor, Tensor]:
    """``index`` as training positions and ``steps`` as one finite input-shaped step each."""
    problem = trained.problem
    index = torch.as_tensor(index, dtype=torch.long).flatten()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= problem.n_train):
        raise FidelityError(
            f"perturbed training points must lie in [0, {problem.n_train}), got "
            f"{index.tolist()[:10]}"
        )
    expected = (index.numel(), *problem.x_train.shape[1:])
    if tuple(steps.shape) != expected:
        raise FidelityError(
            f"perturbation steps must be shaped {expected} (one input-shaped step per perturbed "
            f"point), got {tuple(steps.shape)}"
        )
    if not bool(torch.isfinite(steps).all()):
        raise FidelityError("perturbation steps must be finite")
    return index, steps.to(problem.x_train)


def retrain_perturbed(
    trained: TrainedProblem,
    test: Examples,
    index: Tensor,
    steps: Tensor,
    execution: Execution | None = None,
    *,
    group_size: int = 64,
) -> PerturbedResult:
    """Retrain with training input ``index[k]`` moved by ``steps[k]``, for every k; cached per
    (problem, theta_s, point, step)."""
    execution = execution or Execution()
    start = time.perf_counter()
    problem = trained.problem
    index, steps = check_steps(trained, index, steps)
    fingerprint, digest = problem.fingerprint(), theta_digest(trained)

    def key(item: int) -> str:
        step = hashlib.sha256(steps[item].detach().cpu().numpy().tobytes()).hexdigest()
        return cache_key(
            kind=STAGE, problem=fingerprint, theta_s=digest, point=int(index[item]), step=step
        )

    items = list(range(index.numel()))
    refits = retrain_indices(
        trained,
        items,
        key,
        STAGE,
        lambda: partial(_perturbed_group, trained, index, steps),
        execution,
        group_size,
        cache_below=problem.recipe.gtol if isinstance(problem.recipe, NewtonRecipe) else None,
    )
    failed = [i for i in items if not bool(torch.isfinite(refits.thetas[i]).all())]
    if isinstance(problem.recipe, NewtonRecipe):
        failed += [i for i in items if not refits.grad_norms[i] <= problem.recipe.gtol]
    if failed:
        raise FidelityError(
            f"retraining {problem.name!r} with perturbed inputs failed (diverged or did not "
            f"converge) for training points {index[failed].tolist()[:10]}"
        )
    thetas = torch.stack([refits.thetas[i] for i in items]) if items else trained.theta[:0]
    model, loss = trained.model, problem.loss
    before = per_example_loss(model, loss, trained.theta, test)
    after = torch.func.vmap(lambda theta: per_example_loss(model, loss, theta, test))(thetas)
    info = {
        "refits": refits.computed,
        "cached": len(items) - refits.computed,
        "seconds": time.perf_counter() - start,
    }
    return PerturbedResult((after - before).detach(), thetas.detach(), info)


def _perturbed_group(
    trained: TrainedProblem, index: Tensor, steps: Tensor, group: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    problem, recipe, model = trained.problem, trained.problem.recipe, trained.model
    inputs = []
    for item in group:
        x = problem.x_train.clone()
        x[int(index[item])] += steps[item]
        inputs.append(x)
    if isinstance(recipe, MinibatchRecipe):
        weights = torch.ones(
            len(group), problem.n_train, dtype=problem.dtype, device=problem.device
        )
        run = train_minibatch(
            model, problem, recipe, model.initial_theta(), weights, inputs=torch.stack(inputs)
        )
        norms = torch.full((len(group),), float("nan"), dtype=torch.float64)
        return run.thetas.detach().cpu(), torch.full((len(group),), recipe.epochs), norms
    finished = [
        newton_minimize(
            model,
            replace(problem, x_train=x),
            trained.theta,
            gtol=recipe.gtol,
            max_iter=recipe.max_iter,
        )
        for x in inputs
    ]
    return (
        torch.stack([f.theta for f in finished]).detach().cpu(),
        torch.tensor([f.iterations for f in finished]),
        torch.tensor([f.grad_norm for f in finished], dtype=torch.float64),
    )


def data_range(trained: TrainedProblem) -> tuple[float, float]:
    """The training inputs' smallest and largest value: the box a perturbation must stay in
    (for digits, the pixel range [0, 1])."""
    x = trained.problem.x_train
    return float(x.min()), float(x.max())


def unit_rows(vectors: Tensor) -> Tensor:
    """Each row scaled to unit L2 norm (a zero row stays zero)."""
    flat = vectors.reshape(vectors.shape[0], -1)
    norms = flat.norm(dim=1, keepdim=True)
    return (flat / torch.where(norms > 0, norms, 1.0)).reshape(vectors.shape)


def breakdown(eps: np.ndarray, pearson: np.ndarray, slope: np.ndarray) -> float | None:
    """The smallest eps at which the first-order prediction stops tracking retraining: Pearson
    below 0.9 or the slope of actual on predicted off by more than 10% (None: it never does)."""
    broken = (pearson < 0.9) | (np.abs(slope - 1) > 0.1)
    return float(eps[np.argmax(broken)]) if bool(broken.any()) else None
