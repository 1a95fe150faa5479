"""The minibatch training run as a pure function of the example weights.

A minibatch recipe visits the training set in an order that is a pure function of its seed
(``batch_order``); one step follows the gradient of the batch objective
(1/|B|) sum_{i in B} w_i L_i + (wd/2) ||theta||^2 (plus an optional proximal term) and the
recipe's optimizer (``optimizer_step``). Retraining (fidelity/retrain) runs many weightings at
once on these functions; the training-path estimators (fidelity/estimators) record the run of
theta_s (``record_trajectory``) and differentiate through the same steps. Both sides of the
comparison therefore take exactly the same steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs, regulariser
from fidelity.core.problem import (
    FunctionalModel,
    MinibatchRecipe,
    OptimizerState,
    Problem,
    Trajectory,
)


def batch_order(recipe: MinibatchRecipe, n_train: int) -> Tensor:
    """``[epochs, n_train]``: the order in which each epoch visits the training set."""
    generator = torch.Generator().manual_seed(recipe.order_seed)
    return torch.stack([torch.randperm(n_train, generator=generator) for _ in range(recipe.epochs)])


def step_batches(recipe: MinibatchRecipe, n_train: int) -> list[Tensor]:
    """The training indices of every step of the run, in order (the last batch of an epoch may
    be smaller)."""
    order = batch_order(recipe, n_train)
    return [
        order[epoch, start : start + recipe.batch_size]
        for epoch in range(recipe.epochs)
        for start in range(0, n_train, recipe.batch_size)
    ]


def steps_per_epoch(recipe: MinibatchRecipe, n_train: int) -> int:
    return -(-n_train // recipe.batch_size)


def batch_objective(
    model: FunctionalModel,
    problem: Problem,
    theta: Tensor,
    weights: Tensor,
    x: Tensor,
    y: Tensor,
    anchor: Tensor | None = None,
    damping: float = 0.0,
) -> Tensor:
    """(1/|B|) sum_{i in B} w_i L_i(theta) + (wd/2) ||theta||^2 (+ the proximal term): what one
    step descends. A removed point (w = 0) leaves the 1/|B| unchanged."""
    losses = loss_from_outputs(problem.loss, model(theta, x), y)
    return (weights * losses).sum() / x.shape[0] + regulariser(problem, theta, anchor, damping)


def optimizer_step(
    recipe: MinibatchRecipe,
    theta: Tensor,
    first: Tensor,
    second: Tensor,
    step: int,
    grad: Tensor,
    *,
    differentiable: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(theta, first, second) after one step of the recipe's optimizer with gradient ``grad``;
    ``step`` counts the steps including this one (Adam's bias correction). Shapes broadcast
    (one model or many).

    SGD with heavy-ball momentum: first <- momentum first + grad, theta <- theta - lr first.
    Adam: the moments' exponential averages, bias-corrected, theta <- theta - lr m / (sqrt(v) +
    eps). A coordinate whose gradient has always been exactly 0 has v = 0; with
    ``differentiable`` its square root is taken with a zero derivative there (the value is the
    same 0), so that differentiating the run does not meet sqrt's infinite slope: such a
    coordinate does not move with any weight. (Training leaves it off: the guard costs three
    more passes over the moments, 0.2 s a step for 20 models of 1.77M parameters.)
    """
    # Fused forms (lerp, addcmul, addcdiv): 7 passes over the parameters instead of 14, 2.6x
    # faster for 16 models of 1.77M parameters, where the step was a third of the training.
    # Changing this arithmetic changes trained models at rounding level, which a chaotic
    # minibatch run can amplify: bump OPTIMIZER_ARITHMETIC (in the problem's fingerprint).
    if recipe.optimizer == "sgd":
        first = torch.add(grad, first, alpha=recipe.momentum)
        return torch.add(theta, first, alpha=-recipe.learning_rate), first, second
    first = torch.lerp(grad, first, recipe.momentum)  # momentum first + (1 - momentum) grad
    second = torch.lerp(grad.square(), second, recipe.beta2)
    # sqrt(v / c2) + eps as sqrt(v) / sqrt(c2) + eps, and lr (m / c1) / (...) as one addcdiv;
    # both branches give the same values (sqrt(0) = 0)
    correction = math.sqrt(1 - recipe.beta2**step)
    if differentiable:
        positive = second > 0
        denominator = torch.where(positive, second, 1.0).sqrt() * positive / correction
        denominator = denominator + recipe.eps
    else:  # in place on the fresh square root: no autograd records it here
        denominator = second.sqrt().div_(correction).add_(recipe.eps)
    scale = -recipe.learning_rate / (1 - recipe.momentum**step)
    return torch.addcdiv(theta, first, denominator, value=scale), first, second


@dataclass(frozen=True)
class MinibatchRun:
    """The parameters ``[n_models, p]`` a minibatch run reached, its optimizer's final state,
    and, when asked for, the first model's recorded ``trajectory``."""

    thetas: Tensor
    state: OptimizerState
    trajectory: Trajectory | None = None


def check_minibatch(problem: Problem, owner: str) -> MinibatchRecipe:
    """The problem's minibatch recipe, or a one-line error naming ``owner``."""
    recipe = problem.recipe
    if not isinstance(recipe, MinibatchRecipe):
        raise FidelityError(
            f"{owner} needs a problem trained by minibatch steps; {problem.name!r} is trained by "
            "full-batch Newton (there is no training path to follow)"
        )
    return recipe


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
    keep_every: int | None = None,
    inputs: Tensor | None = None,
) -> MinibatchRun:
    """Train ``weights.shape[0]`` models from ``theta0`` for ``epochs`` (default: the recipe's)
    epochs, adding (damping/2) ||theta - anchor||^2 when an anchor is given, with the
    optimizer starting from ``state`` (default: fresh, zero moments at step 0). Every model
    starts from the same parameters and sees the same recorded batches; model b weights
    example i by ``weights[b, i]``. ``keep_every``: record the first model's trajectory, every
    that many steps. ``inputs``: training inputs per model, ``[n_models, N, *input_shape]``
    (default: the problem's for every model), for retraining with perturbed inputs."""
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    if keep_every is not None and keep_every < 1:
        raise FidelityError(f"checkpoint_every must be >= 1, got {keep_every}")
    n_models = weights.shape[0]

    def objective(theta: Tensor, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return batch_objective(model, problem, theta, w, x, y, anchor, damping)

    if inputs is not None and inputs.shape != (n_models, *problem.x_train.shape):
        raise FidelityError(
            f"per-model inputs must be shaped {(n_models, *problem.x_train.shape)}, got "
            f"{tuple(inputs.shape)}"
        )
    own_inputs = 0 if inputs is not None else None
    gradients = torch.func.vmap(torch.func.grad(objective), in_dims=(0, 0, own_inputs, None))
    thetas = theta0.detach().unsqueeze(0).repeat(n_models, 1)
    state = state if state is not None else OptimizerState.fresh(thetas)
    if state.first.shape != thetas.shape or state.second.shape != thetas.shape:
        raise FidelityError(
            f"optimizer state of shape {tuple(state.first.shape)} does not fit "
            f"{n_models} models of {thetas.shape[1]} parameters"
        )
    first, second, step = state.first.to(thetas), state.second.to(thetas), state.step
    batches = step_batches(recipe, problem.n_train)
    kept = [(step, thetas[0], first[0], second[0])] if keep_every else []
    for number, index in enumerate(batches, start=1):
        index = index.to(thetas.device)
        x = problem.x_train[index] if inputs is None else inputs[:, index]
        grad = gradients(thetas, weights[:, index], x, problem.y_train[index])
        step += 1
        thetas, first, second = optimizer_step(recipe, thetas, first, second, step, grad)
        if keep_every and (number % keep_every == 0 or number == len(batches)):
            kept.append((step, thetas[0], first[0], second[0]))
    trajectory = None
    if keep_every:
        trajectory = Trajectory(
            every=keep_every,
            total_steps=len(batches),
            steps=tuple(k[0] for k in kept),
            thetas=torch.stack([k[1] for k in kept]),
            first=torch.stack([k[2] for k in kept]),
            second=torch.stack([k[3] for k in kept]),
        )
    return MinibatchRun(thetas, OptimizerState(first, second, step), trajectory)


def record_trajectory(model: FunctionalModel, problem: Problem, every: int) -> Trajectory:
    """theta_s's run (the recipe from the model's initialisation, all weights 1) with its state
    kept at steps 0, ``every``, 2 ``every``, ... and the last: the same arithmetic as
    training theta_s, so the last checkpoint is theta_s."""
    recipe = check_minibatch(problem, "recording a trajectory")
    theta0 = model.initial_theta().detach()
    weights = torch.ones(1, problem.n_train, dtype=theta0.dtype, device=theta0.device)
    run = train_minibatch(model, problem, recipe, theta0, weights, keep_every=every)
    assert run.trajectory is not None  # keep_every was given
    return run.trajectory


def replay_states(
    trajectory: Trajectory, model: FunctionalModel, problem: Problem, start: int, stop: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The states (theta, first, second) after steps ``start`` .. ``stop`` - 1 of the recorded
    run (``start`` must be a checkpoint's step), recomputed from that checkpoint by the same
    steps: the stretch a reverse pass walks back through, rematerialised."""
    recipe = check_minibatch(problem, "replaying a trajectory")
    if start not in trajectory.steps:
        raise FidelityError(f"step {start} is not a checkpoint of the trajectory")
    theta, first, second = (t.unsqueeze(0) for t in trajectory.state(trajectory.steps.index(start)))
    weights = torch.ones(1, problem.n_train, dtype=theta.dtype, device=theta.device)

    def objective(t: Tensor, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return batch_objective(model, problem, t, w, x, y)

    gradients = torch.func.vmap(torch.func.grad(objective), in_dims=(0, 0, None, None))
    batches = step_batches(recipe, problem.n_train)
    states = [(theta[0], first[0], second[0])]
    for number in range(start + 1, stop):
        index = batches[number - 1].to(theta.device)
        grad = gradients(theta, weights[:, index], problem.x_train[index], problem.y_train[index])
        theta, first, second = optimizer_step(recipe, theta, first, second, number, grad)
        states.append((theta[0], first[0], second[0]))
    return states
