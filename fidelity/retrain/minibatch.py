"""Minibatch training, vmapped over models that differ only in their example weights.

Every model starts from the same parameters and sees the same recorded batches; model b weights
example i by ``weights[b, i]``. Training theta_s is the case of one model with all weights 1, a
leave-one-out retrain sets one weight to 0, so the two are paired step for step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs, regulariser
from fidelity.core.problem import FunctionalModel, MinibatchRecipe, OptimizerState, Problem


@dataclass(frozen=True)
class MinibatchRun:
    """The parameters ``[n_models, p]`` a minibatch run reached and its optimizer's final state."""

    thetas: Tensor
    state: OptimizerState


def batch_order(recipe: MinibatchRecipe, n_train: int) -> Tensor:
    """``[epochs, n_train]``: the order in which each epoch visits the training set."""
    generator = torch.Generator().manual_seed(recipe.order_seed)
    return torch.stack([torch.randperm(n_train, generator=generator) for _ in range(recipe.epochs)])


def train_minibatch(
    model: FunctionalModel,
    problem: Problem,
    recipe: MinibatchRecipe,
    theta0: Tensor,
    weights: Tensor,
    *,
    epochs: int | None = None,
    anchor: Tensor | None = None,
    damping: float = 0.0,
    state: OptimizerState | None = None,
) -> MinibatchRun:
    """Train ``weights.shape[0]`` models from ``theta0`` for ``epochs`` (default: the recipe's)
    epochs, adding (damping/2) ||theta - anchor||^2 when an anchor is given, with the
    optimizer starting from ``state`` (default: fresh, zero moments at step 0)."""
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    n_models = weights.shape[0]
    order = batch_order(recipe, problem.n_train).to(theta0.device)

    def minibatch_objective(theta: Tensor, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        losses = loss_from_outputs(problem.loss, model(theta, x), y)
        return (w * losses).sum() / x.shape[0] + regulariser(problem, theta, anchor, damping)

    gradients = torch.func.vmap(torch.func.grad(minibatch_objective), in_dims=(0, 0, None, None))
    thetas = theta0.detach().unsqueeze(0).repeat(n_models, 1)
    state = state if state is not None else OptimizerState.fresh(thetas)
    if state.first.shape != thetas.shape or state.second.shape != thetas.shape:
        raise FidelityError(
            f"optimizer state of shape {tuple(state.first.shape)} does not fit "
            f"{n_models} models of {thetas.shape[1]} parameters"
        )
    first, second, step = state.first.to(thetas), state.second.to(thetas), state.step
    for epoch in range(recipe.epochs):
        for start in range(0, problem.n_train, recipe.batch_size):
            index = order[epoch, start : start + recipe.batch_size]
            grad = gradients(
                thetas, weights[:, index], problem.x_train[index], problem.y_train[index]
            )
            step += 1
            if recipe.optimizer == "sgd":
                first = recipe.momentum * first + grad
                thetas = thetas - recipe.learning_rate * first
            else:
                first = recipe.momentum * first + (1 - recipe.momentum) * grad
                second = recipe.beta2 * second + (1 - recipe.beta2) * grad.square()
                corrected_first = first / (1 - recipe.momentum**step)
                corrected_second = second / (1 - recipe.beta2**step)
                thetas = thetas - recipe.learning_rate * corrected_first / (
                    corrected_second.sqrt() + recipe.eps
                )
    return MinibatchRun(thetas, OptimizerState(first, second, step))
