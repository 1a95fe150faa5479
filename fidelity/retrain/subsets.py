"""Retraining under a weight mask, and the `subsets` response that the linear datamodeling score
(LDS) is measured against.

A mask is a weight vector over the training set: 1 keeps a point, 0 drops it (fractional
weights are allowed), with the same 1/N as in DESIGN.md. A subset response draws ``subsets``
random masks per ``alpha`` (each keeps round(alpha N) points, drawn without replacement by a
seeded generator), retrains the problem's recipe under each one and measures the change of a
target on the test points:

    measured[s, t] = m(z_t, theta_S) - m(z_t, theta_s)        (dropping the complement of S)

in the sign convention of every other array (positive: the dropped points helped). Convex
(Newton-recipe) problems refit to the float floor from theta_s (the minimiser is unique); a
minibatch recipe retrains from its initialisation with its recorded batch order, seed s pairing
its subsets with the full model trained from the same shifted seeds, as `cold` does.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fidelity.core.cache import cache_key
from fidelity.core.checks import check_int, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import check_target, objective, target_values
from fidelity.core.problem import (
    Examples,
    MinibatchRecipe,
    NewtonRecipe,
    TrainedProblem,
    seeded_variant,
)
from fidelity.core.registry import constructor_params
from fidelity.core.training import train_minibatch
from fidelity.retrain.execution import Execution, Refits, retrain_indices
from fidelity.retrain.newton import refit_weighted
from fidelity.retrain.train import theta_digest, train


def draw_masks(n_train: int, alphas: tuple[float, ...], count: int, seed: int) -> np.ndarray:
    """``[len(alphas) * count, n_train]`` 0/1 masks: for each alpha in turn, ``count`` subsets
    of round(alpha N) training points, drawn without replacement from a generator seeded by
    ``seed`` and alpha (so adding an alpha leaves the other draws as they were)."""
    masks = []
    for alpha in alphas:
        if not 0 < alpha < 1:
            raise FidelityError(f"subsets: alpha must lie in (0, 1), got {alpha!r}")
        kept = round(alpha * n_train)
        if not 0 < kept < n_train:
            raise FidelityError(
                f"subsets: alpha {alpha:g} keeps {kept} of {n_train} training points; it must "
                "keep at least one and drop at least one"
            )
        if count > math.comb(n_train, kept):
            raise FidelityError(
                f"subsets: {count} subsets of {kept} of {n_train} points are more than the "
                f"{math.comb(n_train, kept)} distinct ones; draw fewer"
            )
        rng = np.random.default_rng([seed, round(alpha * 1_000_000)])
        for _ in range(count):
            mask = np.zeros(n_train)
            mask[rng.choice(n_train, size=kept, replace=False)] = 1.0
            masks.append(mask)
    return np.stack(masks)


def mask_digest(mask: np.ndarray) -> str:
    """SHA-256 of a mask's float64 bytes: the part of a cache key that names the subset."""
    return hashlib.sha256(np.ascontiguousarray(mask, dtype=np.float64).tobytes()).hexdigest()


def retrain_masks(
    trained: TrainedProblem,
    masks: Tensor,
    execution: Execution,
    *,
    group_size: int = 64,
    stage: str = "subset",
) -> Refits:
    """Train the problem's recipe once per mask ``[m, N]`` (row i is the weight vector of model
    i), through the grouped cached engine (so results do not depend on the backend, the worker
    count or the group size). Newton recipes refit from theta_s to the float floor; minibatch
    recipes retrain from the initialisation with the recipe's batch order."""
    problem = trained.problem
    if masks.ndim != 2 or masks.shape[1] != problem.n_train:
        raise FidelityError(f"masks must be [n_masks, {problem.n_train}], got {tuple(masks.shape)}")
    if bool((masks < 0).any()) or not bool(torch.isfinite(masks).all()):
        raise FidelityError("mask weights must be finite and non-negative")
    masks = masks.to(trained.theta)
    identity = functools.cache(lambda: (problem.fingerprint(), theta_digest(trained)))

    def key(index: int) -> str:
        fingerprint, digest = identity()
        mask = mask_digest(masks[index].cpu().numpy())
        return cache_key(kind=stage, problem=fingerprint, theta_s=digest, mask=mask)

    indices = list(range(masks.shape[0]))
    newton = isinstance(problem.recipe, NewtonRecipe)
    refits = retrain_indices(
        trained,
        indices,
        key,
        stage,
        lambda: partial(_train_group, trained, masks),
        execution,
        group_size,
        cache_below=problem.recipe.gtol if isinstance(problem.recipe, NewtonRecipe) else None,
    )
    failed = [i for i in indices if not bool(torch.isfinite(refits.thetas[i]).all())]
    if newton:
        gtol = problem.recipe.gtol if isinstance(problem.recipe, NewtonRecipe) else 0.0
        failed += [i for i in indices if not refits.grad_norms[i] <= gtol]
    if failed:
        raise FidelityError(
            f"{stage} retraining of {problem.name!r} failed (diverged or did not converge) for "
            f"masks {sorted(set(failed))[:10]}; add weight decay or lower the learning rate"
        )
    return refits


@dataclass(frozen=True)
class SeedRefits:
    """One training seed's retrains under a set of masks: the seed's own full model
    (``trained``), the parameters it reached for each mask ``[n_masks, p]``, and how many were
    retrained rather than loaded from the cache."""

    trained: TrainedProblem
    thetas: Tensor
    computed: int

    def change(self, test: Examples, target: str) -> Tensor:
        """``[n_masks, n_test]``: m(z_t, theta_mask) - m(z_t, theta_s of this seed)."""
        full = self.trained.theta.unsqueeze(0)
        after = measurement(self.trained, self.thetas, test, target)
        return after - measurement(self.trained, full, test, target)


def retrain_masks_over_seeds(
    trained: TrainedProblem,
    masks: Tensor,
    execution: Execution,
    *,
    seeds: int,
    group_size: int,
) -> list[SeedRefits]:
    """``retrain_masks`` for ``seeds`` training seeds: seed s shifts the recipe's initialisation
    and batch-order seeds by s and is paired with the full model trained from them (as `cold`
    pairs its retrains). A Newton recipe's refit does not depend on the seed: one seed."""
    problem = trained.problem
    count = 1 if isinstance(problem.recipe, NewtonRecipe) else seeds
    runs = []
    for offset in range(count):
        seed_trained = trained
        if offset:
            seed_trained = train(seeded_variant(problem, offset), cache=execution.cache)
        refits = retrain_masks(seed_trained, masks, execution, group_size=group_size)
        thetas = torch.stack([refits.thetas[i] for i in range(masks.shape[0])])
        runs.append(SeedRefits(seed_trained, thetas, refits.computed))
    return runs


def _train_group(
    trained: TrainedProblem, masks: Tensor, group: list[int]
) -> tuple[Tensor, Tensor, Tensor]:
    problem, recipe, model = trained.problem, trained.problem.recipe, trained.model
    weights = masks[torch.tensor(group, device=masks.device)]
    if isinstance(recipe, MinibatchRecipe):
        thetas = train_minibatch(model, problem, recipe, model.initial_theta(), weights).thetas
        gradient = torch.func.vmap(
            torch.func.grad(lambda t, w: objective(model, problem, t, w)), in_dims=(0, 0)
        )
        norms = gradient(thetas, weights).norm(dim=1).double().cpu()
        return thetas.cpu(), torch.full((len(group),), recipe.epochs), norms
    # all the group's masks at once, from theta_s (see refit_weighted)
    finished = refit_weighted(
        model, problem, trained.theta, weights, gtol=recipe.gtol, max_iter=recipe.max_iter
    )
    return finished.thetas.cpu(), finished.iterations, finished.grad_norms


def measurement(trained: TrainedProblem, thetas: Tensor, test: Examples, target: str) -> Tensor:
    """``[n_models, n_test]``: the target of each parameter vector on each test point (see
    ``fidelity.core.objective.target_values``)."""
    model, loss = trained.model, trained.problem.loss
    return torch.func.vmap(lambda theta: target_values(model, loss, theta, test, target))(thetas)


@dataclass(frozen=True)
class SubsetResult:
    """``masks`` ``[m, N]`` (the subsets' weights, recorded in the run's arrays), ``alphas``
    ``[m]`` (each subset's kept fraction), ``per_seed`` ``[n_seeds, m, n_test]`` measured changes
    (each seed against its own full model) and ``measured`` their mean."""

    masks: Tensor
    alphas: Tensor
    per_seed: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> Tensor:
        return self.per_seed.mean(0)


class SubsetsResponse:
    """Retraining on random subsets, the ground truth of the linear datamodeling score.

    ``alphas``: the kept fractions, ``subsets`` masks per alpha, ``seeds`` training seeds per
    subset (seed s shifts the recipe's initialisation and batch-order seeds by s and is paired
    with the full model trained from them; a Newton recipe's refit does not depend on the seed,
    so it is measured once), ``target`` the measurement, ``seed`` the draw of the masks.
    """

    name: ClassVar[str] = "subsets"

    def __init__(
        self,
        *,
        alphas: tuple[float, ...] | list[float] = (0.5,),
        subsets: int = 100,
        seeds: int = 1,
        target: str = "loss",
        seed: int = 0,
        group_size: int = 64,
    ) -> None:
        if isinstance(alphas, int | float):
            alphas = (float(alphas),)
        if not isinstance(alphas, tuple | list) or not alphas:
            raise FidelityError("subsets.alphas must be a non-empty list of fractions")
        for alpha in alphas:
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
                raise FidelityError(f"subsets.alphas must lie in (0, 1), got {alpha!r}")
        if len(set(alphas)) != len(alphas):
            raise FidelityError(f"subsets.alphas names an alpha twice: {list(alphas)}")
        check_target(target, "subsets")
        self.alphas = tuple(float(alpha) for alpha in alphas)
        self.subsets = check_positive_int(subsets, "subsets.subsets")
        self.seeds = check_positive_int(seeds, "subsets.seeds")
        self.target = target
        self.seed = check_int(seed, "subsets.seed")
        self.group_size = check_positive_int(group_size, "subsets.group_size")

    def get_params(self) -> dict[str, Any]:
        return constructor_params(self)

    def compute(
        self, trained: TrainedProblem, test: Examples, execution: Execution | None = None
    ) -> SubsetResult:
        execution = execution or Execution()
        start = time.perf_counter()
        problem = trained.problem
        masks_np = draw_masks(problem.n_train, self.alphas, self.subsets, self.seed)
        masks = torch.as_tensor(masks_np, dtype=problem.dtype, device=problem.device)
        alphas = torch.tensor(np.repeat(self.alphas, self.subsets), dtype=torch.float64)
        runs = retrain_masks_over_seeds(
            trained, masks, execution, seeds=self.seeds, group_size=self.group_size
        )
        per_seed = [run.change(test, self.target) for run in runs]
        seeds, computed = len(runs), sum(run.computed for run in runs)
        info = {
            "subsets": int(masks.shape[0]),
            "seeds": seeds,
            "refits": computed,
            "cached": seeds * int(masks.shape[0]) - computed,
            "seconds": time.perf_counter() - start,
        }
        return SubsetResult(masks.cpu(), alphas, torch.stack(per_seed).detach().cpu(), info)
