"""The fourth rung of the response ladder: the proximal Bregman response function (PBRF).

Bae et al. (2022) show that an influence function, with damping lambda, estimates the minimiser
of

    Q_j(theta) = (1/N) sum_i D_L(f(theta, x_i), f(theta_s, x_i); y_i)
                 + ((wd + lambda)/2) ||theta - theta_s||^2 - (w/N) L(f(theta, x_j), y_j)

(D_L: the loss's Bregman divergence in output space, w = 1 for removal), not leave-one-out
retraining. Linearising the network and expanding D_L to second order gives the `linear` stage;
the gap between this stage and `linear` is the linearisation error alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor

from fidelity.core.cache import cache_key
from fidelity.core.checks import check_nonnegative, check_positive_int
from fidelity.core.curvature import (
    DENSE_LIMIT,
    CurvatureOperator,
    conjugate_gradient,
    gauss_newton_factor,
)
from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.retrain.execution import Execution, GroupSolver, Refits
from fidelity.retrain.newton import removal_preconditioner
from fidelity.retrain.refit import Refit, run_refits
from fidelity.retrain.response import Response, ResponseResult
from fidelity.retrain.train import theta_digest

CHORD_ITERATIONS = 30  # fixed-preconditioner steps before a removal not at gtol turns to Newton


class PbrfResponse(Response):
    """Minimiser of the PBRF objective for each removal, solved to the floating-point floor.

    The full-batch solver iterates theta <- theta - t P_j^{-1} grad Q_j(theta), vmapped over a
    group of removals, with P_j = G + (wd + damping) I - (w/N) J_j^T H_out,j J_j at theta_s
    (the exact Hessian of Q_j at theta_s for models linear in their parameters) and a
    backtracking step t; it stops once the gradient norm is at most ``gtol`` and no longer
    halving. A removal still above ``gtol`` after 30 such steps (its response moved far from
    theta_s) continues with line-searched truncated Newton steps (conjugate gradient on exact
    Hessian-vector products of Q_j, preconditioned by P_j). A removal that does not reach
    ``gtol`` within ``max_iter`` Newton steps is an error, not a number.
    The final gradient norms are reported (``max_grad_norm``).

    ``removal_weight`` w scales the removed point's weight change (epsilon = -w/N; 1 is
    removal). Deltas are divided by w, so that they estimate the removal delta to first order
    for every w, and converge to the `linear` stage's deltas as w -> 0 (the linear stage is the
    first-order response of the PBRF).
    """

    name = "pbrf"

    def __init__(
        self,
        *,
        damping: float = 0.0,
        removal_weight: float = 1.0,
        gtol: float = 1e-10,
        max_iter: int = 200,
        group_size: int = 128,
        batch_size: int = 512,
    ) -> None:
        self.damping = check_nonnegative(damping, "pbrf.damping")
        self.removal_weight = check_nonnegative(removal_weight, "pbrf.removal_weight")
        if self.removal_weight == 0:
            raise FidelityError("pbrf.removal_weight must be positive (1 is removal)")
        self.gtol = check_nonnegative(gtol, "pbrf.gtol")
        self.max_iter = check_positive_int(max_iter, "pbrf.max_iter")
        self.group_size = check_positive_int(group_size, "pbrf.group_size")
        self.batch_size = check_positive_int(batch_size, "pbrf.batch_size")

    def compute(
        self,
        trained: TrainedProblem,
        test: Examples,
        removed: Tensor,
        execution: Execution | None = None,
    ) -> ResponseResult:
        problem = trained.problem
        fingerprint, digest = problem.fingerprint(), theta_digest(trained)
        dense = trained.n_params <= DENSE_LIMIT

        def key(index: int) -> str:
            return cache_key(
                kind=self.name,
                problem=fingerprint,
                theta_s=digest,
                removed=index,
                damping=self.damping,
                removal_weight=self.removal_weight,
                gtol=self.gtol,
            )

        def solver() -> GroupSolver:
            factor = None
            if dense:
                factor = gauss_newton_factor(trained, self.damping, self.batch_size, self.name)
            return partial(
                solve_pbrf,
                trained,
                factor=factor,
                damping=self.damping,
                removal_weight=self.removal_weight,
                gtol=self.gtol,
                max_iter=self.max_iter,
                batch_size=self.batch_size,
            )

        def check(refits: Refits, indices: list[int]) -> None:
            unconverged = [i for i in indices if not refits.grad_norms[i] <= self.gtol]
            if unconverged:
                worst = max(refits.grad_norms[i] for i in unconverged)
                raise FidelityError(
                    f"pbrf on {problem.name!r} did not converge for training indices "
                    f"{unconverged[:10]} (gradient norm {worst:.3g} > gtol {self.gtol:g} after "
                    f"{self.max_iter} iterations); raise pbrf.max_iter or pbrf.damping"
                )

        refit = Refit(
            stage=self.name,
            key=key,
            solver=solver,
            group_size=self.group_size,
            check=check,
            cache_below=self.gtol,
            removal_weight=self.removal_weight,
        )
        result = run_refits(trained, test, removed, execution or Execution(), refit)
        return replace(result, info={**result.info, "solver": "dense" if dense else "cg"})


def pbrf_objective(trained: TrainedProblem, damping: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Q(theta, removal) for removal vectors ``[N]`` (w at the removed point, 0 elsewhere)."""
    problem, model, theta_s = trained.problem, trained.model, trained.theta
    x, y, n = problem.x_train, problem.y_train, problem.n_train
    outputs_s = model(theta_s, x)
    losses_s = loss_from_outputs(problem.loss, outputs_s, y)
    # Each example's loss depends only on its own output, so one gradient of the sum gives all.
    output_grads_s = torch.func.grad(lambda o: loss_from_outputs(problem.loss, o, y).sum())(
        outputs_s
    )
    stiffness = problem.weight_decay + damping

    def value(theta: Tensor, removal: Tensor) -> Tensor:
        outputs = model(theta, x)
        losses = loss_from_outputs(problem.loss, outputs, y)
        bregman = losses - losses_s - (output_grads_s * (outputs - outputs_s)).sum(-1)
        proximity = 0.5 * stiffness * (theta - theta_s).pow(2).sum()
        return (bregman.sum() - (removal * losses).sum()) / n + proximity

    return value


def solve_pbrf(
    trained: TrainedProblem,
    group: list[int],
    *,
    factor: Tensor | None,
    damping: float,
    removal_weight: float,
    gtol: float,
    max_iter: int,
    batch_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """PBRF minimisers for the removals in ``group``: ``(thetas [B, p], iterations [B],
    gradient norms [B])``. ``factor`` is the Cholesky factor of G + (wd + damping) I, or None
    to apply its inverse by conjugate gradient."""
    problem, theta_s = trained.problem, trained.theta
    removed = torch.tensor(group, dtype=torch.long, device=theta_s.device)
    count = removed.numel()
    removals = theta_s.new_zeros((count, problem.n_train))
    removals[torch.arange(count, device=theta_s.device), removed] = removal_weight
    if factor is not None:

        def solve(rows: Tensor) -> Tensor:
            return torch.cholesky_solve(rows.T, factor).T

    else:
        operator = CurvatureOperator(trained, "gnh", batch_size)

        def solve(rows: Tensor) -> Tensor:
            # An approximate preconditioner suffices: the fixed point uses the exact gradient.
            return conjugate_gradient(
                lambda v: operator.matvec(v) + damping * v, rows, tol=1e-8, max_iter=1000
            ).solution

    precondition = removal_preconditioner(
        trained.model, problem, theta_s, removed, solve, removal_weight=removal_weight
    )
    objective = pbrf_objective(trained, damping)
    value_and_grad = torch.func.vmap(torch.func.grad_and_value(objective), in_dims=(0, 0))
    gradient = torch.func.grad(objective)

    def hessian_products(points: Tensor, rows: Tensor, vectors: Tensor) -> Tensor:
        return torch.func.vmap(
            lambda point, removal, vector: torch.func.jvp(
                lambda t: gradient(t, removal), (point,), (vector,)
            )[1]
        )(points, rows, vectors)

    device = theta_s.device
    thetas = theta_s.detach().unsqueeze(0).repeat(count, 1)
    grads, values = value_and_grad(thetas, removals)
    norms = grads.norm(dim=1).double().cpu()
    previous = torch.full((count,), math.inf, dtype=torch.float64)
    step_sizes = torch.ones(count, dtype=theta_s.dtype, device=device)
    accepted_last = torch.ones(count, dtype=torch.bool)
    iterations = torch.zeros(count, dtype=torch.long)
    for iteration in range(CHORD_ITERATIONS + max_iter):
        # Past gtol, keep stepping only while each accepted step still halves the gradient.
        active = (norms > gtol) | (accepted_last & (norms > 0) & (norms <= 0.5 * previous))
        active &= torch.isfinite(norms) & (step_sizes.cpu() > 1e-12)
        if not bool(active.any()):
            break
        rows = torch.nonzero(active).flatten().to(device)

        precondition_rows = partial(precondition, rows=rows)
        directions = -precondition_rows(grads[rows])
        if iteration >= CHORD_ITERATIONS:
            # The fixed preconditioner converges slowly where the response moved far from
            # theta_s: switch to truncated Newton, conjugate gradient on the exact Hessian of
            # Q_j preconditioned by P_j (it stops before any direction of negative curvature).
            newton = conjugate_gradient(
                partial(hessian_products, thetas[rows], removals[rows]),
                -grads[rows],
                tol=1e-3,
                max_iter=200,
                precondition=precondition_rows,
            ).solution
            usable = (newton.abs().sum(1) > 0).unsqueeze(1)
            directions = torch.where(usable, newton, directions)
        steps = step_sizes[rows]
        slopes = (grads[rows] * directions).sum(1)
        candidates = thetas[rows] + steps.unsqueeze(1) * directions
        candidate_grads, candidate_values = value_and_grad(candidates, removals[rows])
        candidate_norms = candidate_grads.norm(dim=1).double().cpu()
        current = values[rows]
        sufficient = candidate_values <= current + 1e-4 * steps * slopes + 1e-13 * current.abs()
        # Near the optimum the decrease of Q is below its rounding error; a step that halves
        # the gradient norm is then the evidence of progress.
        sufficient |= (candidate_norms <= 0.5 * norms[rows.cpu()]).to(device)
        accept = sufficient & torch.isfinite(candidate_values)
        taken = rows[accept]
        thetas[taken] = candidates[accept]
        grads[taken] = candidate_grads[accept]
        values[taken] = candidate_values[accept]
        taken_cpu, accept_cpu = taken.cpu(), accept.cpu()
        previous[taken_cpu] = norms[taken_cpu]
        norms[taken_cpu] = candidate_norms[accept_cpu]
        step_sizes[taken] = 1.0
        step_sizes[rows[~accept]] /= 2
        accepted_last[rows.cpu()] = accept_cpu
        iterations[rows.cpu()] += 1
    return thetas.cpu(), iterations, norms
