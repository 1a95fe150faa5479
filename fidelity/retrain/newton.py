"""Full-batch Newton training of the weighted objective J, and exact leave-one-out refits.

Both run to the floating-point floor: they iterate until the gradient norm is at most ``gtol``
and then while each step still at least halves it, so the returned parameters are as accurate as
the arithmetic allows (deltas are differences of nearby optima and need that accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from fidelity.core.errors import FidelityError
from fidelity.core.objective import objective, objective_gradients, output_hessian_factor
from fidelity.core.problem import FunctionalModel, Problem


@dataclass(frozen=True)
class NewtonResult:
    theta: Tensor
    iterations: int
    grad_norm: float
    converged: bool


def _keeps_improving(norm: float, previous: float, gtol: float) -> bool:
    """Whether to take another step: not yet at tolerance, or still halving the gradient."""
    return norm > gtol or (norm > 0 and norm <= 0.5 * previous)


def newton_minimize(
    model: FunctionalModel,
    problem: Problem,
    theta0: Tensor,
    weights: Tensor | None = None,
    *,
    gtol: float = 1e-10,
    max_iter: int = 100,
    anchor: Tensor | None = None,
    damping: float = 0.0,
) -> NewtonResult:
    """Minimise J(theta; weights) (plus the optional proximal term) from ``theta0`` by
    ``minimize_newton``."""

    def value(theta: Tensor) -> Tensor:
        return objective(model, problem, theta, weights, anchor, damping)

    return minimize_newton(value, theta0, gtol=gtol, max_iter=max_iter)


def minimize_newton(
    value: Callable[[Tensor], Tensor], theta0: Tensor, *, gtol: float, max_iter: int
) -> NewtonResult:
    """Minimise a smooth function of a parameter vector by Newton's method with backtracking.

    The Newton system uses the dense Hessian, solved by Cholesky; where it is not positive
    definite (a non-convex model) a multiple of the identity is added until it is (Levenberg
    damping).
    """
    grad_fn = torch.func.grad(value)
    hessian_fn = torch.func.jacrev(grad_fn)
    theta = theta0.detach().clone()
    grad = grad_fn(theta)
    norm, previous = float(grad.norm()), math.inf
    current = float(value(theta))
    iterations = 0
    while iterations < max_iter and _keeps_improving(norm, previous, gtol):
        hessian = hessian_fn(theta)
        direction = -_damped_solve(0.5 * (hessian + hessian.T), grad)
        step, accepted = 1.0, False
        slope = float(grad @ direction)
        for _ in range(40):
            candidate = theta + step * direction
            trial = float(value(candidate))
            # Near the optimum the value changes by less than its rounding error; accept full
            # steps then.
            if trial <= current + 1e-4 * step * slope + 1e-13 * abs(current):
                accepted = True
                break
            step *= 0.5
        if not accepted:
            break
        theta, current = candidate, trial
        grad = grad_fn(theta)
        norm, previous = float(grad.norm()), norm
        iterations += 1
    return NewtonResult(theta, iterations, norm, norm <= gtol)


def _damped_solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    shift = 0.0
    scale = float(matrix.diagonal().abs().mean()) or 1.0
    for _ in range(30):
        factor, info = torch.linalg.cholesky_ex(matrix + shift * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
        shift = max(shift * 10, 1e-10 * scale)
    raise FidelityError("Newton step failed: the Hessian could not be made positive definite")


@dataclass(frozen=True)
class RefitResult:
    thetas: Tensor  # [B, p]
    iterations: Tensor  # [B]
    grad_norms: Tensor  # [B]


def removal_weights(n_train: int, removed: Tensor, like: Tensor) -> Tensor:
    """``[B, N]`` weights: ones, with a zero at each model's removed point."""
    weights = torch.ones(removed.numel(), n_train, dtype=like.dtype, device=like.device)
    weights[torch.arange(removed.numel(), device=like.device), removed] = 0.0
    return weights


def removal_preconditioner(
    model: FunctionalModel,
    problem: Problem,
    theta: Tensor,
    removed: Tensor,
    solve: Callable[[Tensor], Tensor],
    *,
    removal_weight: float = 1.0,
) -> Callable[..., Tensor]:
    """P_j^{-1} for every removed j, as one function of stacked vectors ``[B, p]`` (row b is
    multiplied by P_{removed[b]}^{-1}), or of vectors for a subset ``rows`` of the removals.

    P_j = P - (removal_weight/N) J_j^T H_out,j J_j: a base matrix P, given through ``solve``
    (rows ``[m, p]`` -> rows of P^{-1} v), minus the removed point's Gauss-Newton term at
    ``theta``, applied by the Woodbury identity with one k x k capacitance per removal. With P
    the Hessian of J at theta_s this is the Hessian of J without j for models linear in their
    parameters.
    """
    n = problem.n_train
    x_removed, y_removed = problem.x_train[removed], problem.y_train[removed]

    def single_output(point: Tensor, x: Tensor) -> Tensor:
        return model(point, x.unsqueeze(0)).squeeze(0)

    jacobians = torch.func.vmap(torch.func.jacrev(single_output), in_dims=(None, 0))(
        theta, x_removed
    )  # [B, k, p]
    outputs = model(theta, x_removed)
    factors = output_hessian_factor(problem.loss, outputs, y_removed)  # [B, k, k]
    low_rank = factors.transpose(1, 2) @ jacobians  # U_j^T, [B, k, p]
    batch, k, p = low_rank.shape
    solved = solve(low_rank.reshape(batch * k, p)).reshape(batch, k, p)  # (P^{-1} U_j)^T
    eye_k = torch.eye(k, dtype=low_rank.dtype, device=low_rank.device)
    # N/w I - U^T P^{-1} U
    capacitance = (n / removal_weight) * eye_k - low_rank @ solved.transpose(1, 2)
    capacitance_factor, info = torch.linalg.cholesky_ex(capacitance)
    if bool((info != 0).any()):
        bad = removed[info != 0].tolist()
        raise FidelityError(
            f"problem {problem.name!r}: removing training point(s) {bad[:10]} leaves a Hessian "
            "that is not positive definite (a direction only those points constrain); add "
            "weight decay or damping"
        )

    def precondition(vectors: Tensor, rows: Tensor | None = None) -> Tensor:
        # rows: which removals the vectors belong to (default: all, in order)
        low, capacitance = solved, capacitance_factor
        if rows is not None:
            low, capacitance = solved[rows], capacitance_factor[rows]
        base = solve(vectors)  # P^{-1} v
        inner = torch.cholesky_solve(low @ vectors.unsqueeze(-1), capacitance)
        return base + (low.transpose(1, 2) @ inner).squeeze(-1)

    return precondition


class SecantMemory:
    """The last ``size`` secant pairs (s, y) of each of ``n_models`` iterations, for the
    two-loop recursion of limited-memory BFGS on top of a given inverse (the initial matrix).

    Pairs are kept in a ring per model; an empty slot, or a pair without positive curvature
    (y^T s <= 0, which BFGS cannot use), has rho = 0 and leaves the recursion unchanged, so all
    models are processed by the same array operations whatever their history.
    """

    def __init__(self, n_models: int, n_params: int, size: int, like: Tensor) -> None:
        if size < 0:
            raise FidelityError(f"memory_size must be >= 0, got {size}")
        self.size = size
        self.s = like.new_zeros(n_models, size, n_params)
        self.y = like.new_zeros(n_models, size, n_params)
        self.rho = like.new_zeros(n_models, size)
        self.count = torch.zeros(n_models, dtype=torch.long, device=like.device)

    def direction(
        self, grads: Tensor, rows: Tensor, initial: Callable[[Tensor, Tensor], Tensor]
    ) -> Tensor:
        """B^{-1} g for the models ``rows``; ``initial(vectors, rows)`` applies B_0^{-1}."""
        if self.size == 0:
            return initial(grads, rows)
        s, y, rho = self.s[rows], self.y[rows], self.rho[rows]
        newest = self.count[rows]
        # slot order from newest to oldest, per model
        order = (newest.unsqueeze(1) - 1 - torch.arange(self.size, device=rows.device)) % self.size
        pick = order.unsqueeze(-1).expand(-1, -1, s.shape[-1])
        s, y = s.gather(1, pick), y.gather(1, pick)
        rho = rho.gather(1, order)
        q = grads.clone()
        alphas = []
        for slot in range(self.size):
            alpha = rho[:, slot] * (s[:, slot] * q).sum(dim=1)
            q -= alpha.unsqueeze(1) * y[:, slot]
            alphas.append(alpha)
        r = initial(q, rows)
        for slot in reversed(range(self.size)):
            beta = rho[:, slot] * (y[:, slot] * r).sum(dim=1)
            r += (alphas[slot] - beta).unsqueeze(1) * s[:, slot]
        return r

    def remember(self, rows: Tensor, s: Tensor, y: Tensor, keep: Tensor) -> None:
        """Store the pairs (s, y) of the models ``rows`` where ``keep``."""
        if self.size == 0:
            return
        rows = rows[keep]
        s, y = s[keep], y[keep]
        curvature = (s * y).sum(dim=1)
        slot = self.count[rows] % self.size
        self.s[rows, slot] = s
        self.y[rows, slot] = y
        self.rho[rows, slot] = torch.where(
            curvature > 0, 1.0 / curvature.clamp_min(torch.finfo(s.dtype).tiny), 0.0
        )
        self.count[rows] += 1


def refit_removals(
    model: FunctionalModel,
    problem: Problem,
    theta_start: Tensor,
    hessian_cholesky: Tensor,
    removed: Tensor,
    *,
    gtol: float = 1e-10,
    max_iter: int = 100,
    anchor: Tensor | None = None,
    damping: float = 0.0,
    memory_size: int = 4,
) -> RefitResult:
    """Exact minimisers of J with w_j = 0, one model per entry of ``removed``, all at once
    (plus (damping/2) ||theta - anchor||^2 when an anchor is given; ``hessian_cholesky`` must
    then factor H + damping I).

    Each model iterates theta <- theta - B_j^{-1} grad J_{-j}(theta), vmapped over models, with
    B_j^{-1} the limited-memory BFGS update (``memory_size`` secant pairs) of P_j^{-1}. P_j is
    the Hessian at theta_s (its Cholesky factor is given) minus the removed point's Gauss-Newton
    term (1/N) J_j^T H_out,j J_j, applied by the Woodbury identity: the exact Hessian of J_{-j} at
    theta_s for models linear in their parameters, so convergence is quadratic-like; for other
    models it is still a convergent preconditioner, and the fixed point is the exact minimiser
    because the iteration uses the exact gradient. P_j is the Hessian at theta_s, not at the
    iterate, so alone it converges linearly (by about 1/150 per step on digits-logreg); the
    secant pairs correct it along the directions the iterates move in, which cuts the steps.
    Only models still above tolerance are stepped and re-evaluated. A model whose gradient
    norm grows or stops being finite leaves the loop at once; every model not at tolerance is
    then solved by the line-searched ``newton_minimize``, restarted from ``theta_start``.
    """
    n = problem.n_train
    removed = removed.to(device=theta_start.device, dtype=torch.long)
    weights = removal_weights(n, removed, theta_start)
    precondition = removal_preconditioner(
        model,
        problem,
        theta_start,
        removed,
        # P^{-1} as a dense inverse: one matrix product per use instead of two triangular
        # solves (several times slower); its rounding only slows convergence, never moves the
        # fixed point
        partial(torch.matmul, other=torch.cholesky_inverse(hessian_cholesky)),
    )

    batched_grad = objective_gradients(model, problem, anchor, damping)
    thetas = theta_start.detach().unsqueeze(0).repeat(removed.numel(), 1)
    iterations = torch.zeros(removed.numel(), dtype=torch.long)
    previous = torch.full((removed.numel(),), math.inf, dtype=torch.float64)
    active = torch.ones(removed.numel(), dtype=torch.bool)
    grads = batched_grad(thetas, weights)
    norms = grads.norm(dim=1).double().cpu()
    memory = SecantMemory(removed.numel(), thetas.shape[1], memory_size, thetas)
    for _ in range(max_iter):
        diverging = ~torch.isfinite(norms) | (norms > previous)
        active &= ~diverging & ((norms > gtol) | ((norms > 0) & (norms <= 0.5 * previous)))
        if not bool(active.any()):
            break
        # only the models still iterating are stepped and re-evaluated: the few slow ones
        # (high-leverage removals) do not keep the whole batch in the loop
        rows = torch.nonzero(active).flatten().to(thetas.device)
        step = memory.direction(grads[rows], rows, precondition)
        thetas[rows] = thetas[rows] - step
        new_grads = batched_grad(thetas[rows], weights[rows])
        new_norms = new_grads.norm(dim=1).double().cpu()
        # Pairs near the floating-point floor are rounding noise: only those taken while the
        # gradient is still above tolerance enter the memory.
        memory.remember(rows, -step, new_grads - grads[rows], (new_norms > gtol).to(rows.device))
        grads[rows] = new_grads
        previous[active] = norms[active]
        norms[active] = new_norms
        iterations += active.long()
    for index in torch.nonzero(~(norms <= gtol)).flatten().tolist():
        finished = newton_minimize(
            model,
            problem,
            theta_start,
            weights[index],
            gtol=gtol,
            max_iter=max_iter,
            anchor=anchor,
            damping=damping,
        )
        thetas[index] = finished.theta
        norms[index] = finished.grad_norm
        iterations[index] += finished.iterations
    return RefitResult(thetas, iterations, norms)
