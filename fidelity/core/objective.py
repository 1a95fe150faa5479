"""The training objective J of DESIGN.md and the per-example losses it is built from.

    J(theta) = (1/N) sum_i w_i L(f(theta, x_i), y_i) + (wd/2) ||theta||^2

N is the number of training points, whatever the weights: removing j is w_j = 0 with the same
1/N. Losses: ``cross_entropy`` (softmax over classes), ``bce`` (logit output), ``mse`` (half the
squared error summed over outputs, so its output-space Hessian is the identity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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


def objective_hessian(
    model: FunctionalModel,
    problem: Problem,
    theta: Tensor,
    weights: Tensor | None = None,
    anchor: Tensor | None = None,
    damping: float = 0.0,
) -> Tensor:
    """Dense Hessian of J (with the optional proximal term) at theta, ``[p, p]``."""
    hessian = torch.func.jacrev(torch.func.grad(objective, argnums=2), argnums=2)(
        model, problem, theta, weights, anchor, damping
    )
    return 0.5 * (hessian + hessian.T)


def per_example_grads(
    model: FunctionalModel, loss: str, theta: Tensor, data: Examples, batch_size: int = 512
) -> Tensor:
    """Gradients of each example's loss (no regulariser), ``[n, p]``, by vmap over examples."""

    def single(x: Tensor, y: Tensor) -> Tensor:
        return torch.func.grad(
            lambda t: loss_from_outputs(loss, model(t, x.unsqueeze(0)), y.unsqueeze(0)).sum()
        )(theta)

    batched = torch.func.vmap(single)
    parts = [
        batched(data.x[start : start + batch_size], data.y[start : start + batch_size])
        for start in range(0, len(data), batch_size)
    ]
    return torch.cat(parts) if parts else theta.new_zeros((0, theta.numel()))


def output_hessian_factor(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """R with R R^T = d^2 L / d f^2 for each example, ``[n, k, k]`` (PSD for our losses)."""

    def single(out: Tensor, target: Tensor) -> Tensor:
        def value(o: Tensor) -> Tensor:
            return loss_from_outputs(loss, o.unsqueeze(0), target.unsqueeze(0)).sum()

        return torch.func.jacrev(torch.func.grad(value))(out)

    hessians = torch.func.vmap(single)(outputs, targets)
    eigenvalues, eigenvectors = torch.linalg.eigh(hessians)
    return eigenvectors * eigenvalues.clamp_min(0).sqrt().unsqueeze(-2)
