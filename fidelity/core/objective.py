"""The training objective J of DESIGN.md and the per-example losses it is built from.

    J(theta) = (1/N) sum_i w_i L(f(theta, x_i), y_i) + (wd/2) ||theta||^2

N is the number of training points, whatever the weights: removing j is w_j = 0 with the same
1/N. Losses: ``cross_entropy`` (softmax over classes), ``bce`` (logit output), ``mse`` (half the
squared error summed over outputs, so its output-space Hessian is the identity).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from fidelity.core.affine import affine_form, affine_gradient_function, affine_hessian
from fidelity.core.errors import FidelityError
from fidelity.core.problem import Examples, FunctionalModel, Problem


def loss_from_outputs(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example loss ``[n]`` from model outputs ``[n, k]``."""
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, targets, reduction="none")
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").sum(-1)
    if loss == "mse":
        return 0.5 * (outputs - targets).pow(2).sum(-1)
    raise ValueError(f"unknown loss {loss!r}")


Target = Literal["loss", "margin", "log-probability"]
TARGETS: tuple[str, ...] = ("loss", "margin", "log-probability")


def check_target(target: object, owner: str) -> Target:
    """``target`` if it names a measurement, else a FidelityError naming ``owner``."""
    if target in TARGETS:
        return cast(Target, target)
    raise FidelityError(f"{owner}.target must be one of {', '.join(TARGETS)}, got {target!r}")


def target_values(
    model: FunctionalModel, loss: str, theta: Tensor, data: Examples, target: str
) -> Tensor:
    """``[n]``: the measurement ``target`` of ``theta`` on every example.

    ``loss``: the loss (our convention, dattri's and bergson's). ``margin``: log(p / (1 - p)) of
    the true class, the correct class's logit minus the logsumexp of the others (bce: the logit
    signed by the label), TRAK's and kronfluence's model output. ``log-probability``: log p(true
    class), the negated cross-entropy (bce: the negated bce), quanda's.
    """
    return target_from_outputs(loss, model(theta, data.x), data.y, target)


def target_from_outputs(loss: str, outputs: Tensor, targets: Tensor, target: str) -> Tensor:
    """``[n]``: the measurement ``target`` (see ``target_values``) from model outputs
    ``[n, k]``, for code that evaluates the model itself (a library's functional call)."""
    check_target(target, "measurement")
    if target != "loss" and loss == "mse":
        raise FidelityError(f"target {target!r} needs a classification loss, not mse")
    if target == "loss":
        return loss_from_outputs(loss, outputs, targets)
    if target == "log-probability":
        return -loss_from_outputs(loss, outputs, targets)
    if loss == "bce":
        return (2 * targets[:, 0] - 1) * outputs[:, 0]
    correct = outputs.gather(1, targets.unsqueeze(1))[:, 0]
    others = outputs.scatter(1, targets.unsqueeze(1), float("-inf"))
    return correct - others.logsumexp(dim=1)


def per_example_loss(model: FunctionalModel, loss: str, theta: Tensor, data: Examples) -> Tensor:
    """L(f(theta, x_i), y_i) for every example, shape ``[n]``."""
    return loss_from_outputs(loss, model(theta, data.x), data.y)


def objective(
    model: FunctionalModel,
    problem: Problem,
    theta: Tensor,
    weights: Tensor | None = None,
    anchor: Tensor | None = None,
    damping: float = 0.0,
) -> Tensor:
    """J(theta) with per-example weights (all ones when ``weights`` is None), plus the proximal
    term (damping/2) ||theta - anchor||^2 when an ``anchor`` is given."""
    losses = per_example_loss(model, problem.loss, theta, problem.train)
    total = losses.sum() if weights is None else (weights * losses).sum()
    return total / problem.n_train + regulariser(problem, theta, anchor, damping)


def regulariser(
    problem: Problem, theta: Tensor, anchor: Tensor | None = None, damping: float = 0.0
) -> Tensor:
    """(wd/2) ||theta||^2, plus (damping/2) ||theta - anchor||^2 when an anchor is given."""
    value = 0.5 * problem.weight_decay * theta.pow(2).sum()
    if anchor is not None and damping:
        value = value + 0.5 * damping * (theta - anchor).pow(2).sum()
    return value


def objective_gradients(
    model: FunctionalModel,
    problem: Problem,
    anchor: Tensor | None = None,
    damping: float = 0.0,
) -> Callable[[Tensor, Tensor], Tensor]:
    """grad J of many models at once: a function of parameters ``[B, p]`` and weights
    ``[B, N]`` returning ``[B, p]``. Closed form (two matrix products) for models affine in
    theta (``fidelity.core.affine``), vmapped autograd otherwise; the same numbers either way."""
    form = affine_form(model)
    if form is None:
        return torch.func.vmap(
            torch.func.grad(
                lambda theta, weights: objective(model, problem, theta, weights, anchor, damping)
            )
        )

    data_gradients = affine_gradient_function(
        form, problem.loss, problem.x_train, problem.y_train, problem.n_train
    )

    def gradients(thetas: Tensor, weights: Tensor) -> Tensor:
        result = data_gradients(thetas, weights).add_(thetas, alpha=problem.weight_decay)
        if anchor is not None and damping:
            result.add_(thetas - anchor, alpha=damping)
        return result

    return gradients


def objective_hessian(
    model: FunctionalModel,
    problem: Problem,
    theta: Tensor,
    weights: Tensor | None = None,
    anchor: Tensor | None = None,
    damping: float = 0.0,
) -> Tensor:
    """Dense Hessian of J (with the optional proximal term) at theta, ``[p, p]``: the closed
    form for models affine in theta, autograd otherwise."""
    form = affine_form(model)
    if form is not None:
        hessian = affine_hessian(
            form, problem.loss, problem.x_train, theta, weights, problem.n_train
        )
        shift = problem.weight_decay + (damping if anchor is not None else 0.0)
        hessian.diagonal().add_(shift)
        return 0.5 * (hessian + hessian.T)
    hessian = torch.func.jacrev(torch.func.grad(objective, argnums=2), argnums=2)(
        model, problem, theta, weights, anchor, damping
    )
    return 0.5 * (hessian + hessian.T)


def per_example_grads(
    model: FunctionalModel,
    loss: str,
    theta: Tensor,
    data: Examples,
    batch_size: int = 512,
    target: str = "loss",
) -> Tensor:
    """Gradients of each example's loss (no regulariser), or of another measurement
    ``target`` (see ``target_values``), ``[n, p]``, by vmap over examples."""

    def single(x: Tensor, y: Tensor) -> Tensor:
        one = Examples(x.unsqueeze(0), y.unsqueeze(0))
        if target == "loss":
            return torch.func.grad(lambda t: loss_from_outputs(loss, model(t, one.x), one.y).sum())(
                theta
            )
        return torch.func.grad(lambda t: target_values(model, loss, t, one, target).sum())(theta)

    batched = torch.func.vmap(single)
    parts = [
        batched(data.x[start : start + batch_size], data.y[start : start + batch_size])
        for start in range(0, len(data), batch_size)
    ]
    return torch.cat(parts) if parts else theta.new_zeros((0, theta.numel()))


def output_hessian_factor(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """R with R R^T = d^2 L / d f^2 for each example, ``[n, k, k]`` (PSD for our losses), in
    closed form: cross-entropy's diag(p) - p p^T = R R^T with R = diag(sqrt p) - p sqrt(p)^T
    (column c is sqrt(p_c) (e_c - p); the identity uses sum p = 1), bce's sqrt(s (1 - s)) on
    the diagonal, mse's identity. Every use sums over R's columns, so any factor gives the same
    curvature; this one needs no eigendecomposition."""
    del targets  # the output Hessians of these losses do not depend on the targets
    if loss == "cross_entropy":
        probabilities = torch.softmax(outputs, dim=-1)
        roots = probabilities.sqrt()
        return torch.diag_embed(roots) - probabilities.unsqueeze(-1) * roots.unsqueeze(-2)
    if loss == "bce":
        probabilities = torch.sigmoid(outputs)
        return torch.diag_embed((probabilities * (1 - probabilities)).sqrt())
    if loss == "mse":
        eye = torch.eye(outputs.shape[-1], dtype=outputs.dtype, device=outputs.device)
        return eye.expand(*outputs.shape[:-1], -1, -1).clone()
    raise ValueError(f"unknown loss {loss!r}")


def mixed_input_gradients(
    model: FunctionalModel,
    loss: str,
    theta: Tensor,
    directions: Tensor,
    data: Examples,
    batch_size: int = 256,
) -> Tensor:
    """``[m, n, *input_shape]``: d/dx_i (v_a^T grad_theta L(theta, x_i, y_i)) for every row v_a of
    ``directions`` ``[m, p]`` and every example i, the mixed second derivative of the loss in the
    parameters (along v_a) and the input, by forward mode over theta of the input gradient
    (torch.func), vmapped over directions and examples. Inputs must be floating point."""
    if not torch.is_floating_point(data.x):
        raise FidelityError(
            f"the inputs are {data.x.dtype}: a perturbation of an input needs floating-point "
            "inputs (for token ids, perturb an embedding or feature space instead)"
        )

    def input_gradient(point: Tensor, x: Tensor, y: Tensor) -> Tensor:
        def single(xx: Tensor) -> Tensor:
            return loss_from_outputs(loss, model(point, xx.unsqueeze(0)), y.unsqueeze(0)).sum()

        return torch.func.grad(single)(x)

    def along(direction: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return torch.func.jvp(lambda point: input_gradient(point, x, y), (theta,), (direction,))[1]

    per_example = torch.func.vmap(
        torch.func.vmap(along, in_dims=(0, None, None)), in_dims=(None, 0, 0)
    )
    parts = [
        per_example(
            directions, data.x[start : start + batch_size], data.y[start : start + batch_size]
        )
        for start in range(0, len(data), batch_size)
    ]
    if not parts:
        return directions.new_zeros((directions.shape[0], 0, *data.x.shape[1:]))
    return torch.cat(parts).transpose(0, 1)
