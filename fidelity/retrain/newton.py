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

from fidelity.core.affine import (
    AffineForm,
    affine_example_gradients,
    affine_form,
    affine_hessian,
)
from fidelity.core.errors import FidelityError
from fidelity.core.objective import (
    objective,
    objective_gradients,
    objective_hessian,
    output_hessian_factor,
    per_example_grads,
)
from fidelity.core.problem import Examples, FunctionalModel, Problem


@dataclass(frozen=True)
class NewtonResult:
    theta: Tensor
    iterations: int
    grad_norm: float
    converged: bool


def _keeps_improving(norm: float, previous: float, gtol: float, to_floor: bool = True) -> bool:
    """Whether to take another step: not yet at tolerance, or (``to_floor``) still halving the
    gradient."""
    return norm > gtol or (to_floor and norm > 0 and norm <= 0.5 * previous)


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
    to_floor: bool = True,
) -> NewtonResult:
    """Minimise J(theta; weights) (plus the optional proximal term) from ``theta0`` by
    ``minimize_newton``."""

    def value(theta: Tensor) -> Tensor:
        return objective(model, problem, theta, weights, anchor, damping)

    def hessian(theta: Tensor) -> Tensor:  # closed form for affine models, autograd otherwise
        return objective_hessian(model, problem, theta, weights, anchor, damping)

    return minimize_newton(
        value, theta0, gtol=gtol, max_iter=max_iter, hessian=hessian, to_floor=to_floor
    )


def minimize_newton(
    value: Callable[[Tensor], Tensor],
    theta0: Tensor,
    *,
    gtol: float,
    max_iter: int,
    hessian: Callable[[Tensor], Tensor] | None = None,
    to_floor: bool = True,
) -> NewtonResult:
    """Minimise a smooth function of a parameter vector by Newton's method with backtracking,
    until the gradient norm is at most ``gtol`` and then, with ``to_floor``, for as long as it
    keeps halving (the floating-point floor).

    The Newton system uses the dense Hessian (``hessian``, or autograd's of ``value``), solved
    by Cholesky; where it is not positive definite (a non-convex model) a multiple of the
    identity is added until it is (Levenberg damping).
    """
    grad_fn = torch.func.grad(value)
    hessian_fn = hessian or torch.func.jacrev(grad_fn)
    theta = theta0.detach().clone()
    grad = grad_fn(theta)
    norm, previous = float(grad.norm()), math.inf
    current = float(value(theta))
    iterations = 0
    while iterations < max_iter and _keeps_improving(norm, previous, gtol, to_floor):
        curvature = hessian_fn(theta)
        direction = -_damped_solve(0.5 * (curvature + curvature.T), grad)
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


#: Indexes every model, in order, as a view: what the chord iteration passes as ``rows`` while
#: all its models still iterate (indexing with a tensor of row numbers copies).
ALL_ROWS = slice(None)

#: A float32 preconditioner is used where its rounding can slow the chord iteration by at most
#: about 1e-3 per step: condition number (bounded above) times float32's rounding unit.
FLOAT32_PRECONDITIONER_CONDITION = 1e-3 / torch.finfo(torch.float32).eps


def removal_base_inverse(
    model: FunctionalModel, problem: Problem, theta: Tensor, *, damping: float = 0.0
) -> Tensor:
    """P^{-1} = (H + damping I)^{-1}, H the Hessian of J at ``theta``: the base matrix of every
    removal's preconditioner in ``refit_removals``, ``[p, p]``, float32 or theta's dtype.

    P only preconditions: the refits' fixed point is set by their exact float64 gradients, and
    an error E in P^{-1} changes the contraction per step by at most about ||P E||. So for a
    float64 model affine in theta it is formed in float32 (Hessian GEMMs, Cholesky factor and
    inverse each about twice as fast) wherever that error is small: the data curvature is
    positive semidefinite for every loss we have, so lambda_min(P) >= wd + damping, and with
    lambda_max <= the largest absolute row sum the condition number is bounded; float32 is used
    only when that bound times float32's rounding unit is at most 1e-3 (measured on
    digits-logreg, condition 460: the same number of steps as float64, to the floor). The
    matrix is then returned in float32, and the preconditioner is applied in float32 too (its
    products cost half). Every other case, and a float32 factorisation that fails, is float64.
    Raises FidelityError when the float64 matrix is not positive definite (exact refits from
    theta_s are then ill-posed).
    """
    shift = problem.weight_decay + damping
    form = affine_form(model)
    if form is not None and theta.dtype == torch.float64 and shift > 0:
        single = affine_hessian(
            form, problem.loss, problem.x_train.float(), theta.float(), None, problem.n_train
        )
        bound = (float(single.abs().sum(dim=1).max()) + shift) / shift
        if bound <= FLOAT32_PRECONDITIONER_CONDITION:
            single.diagonal().add_(shift)
            factor, info = torch.linalg.cholesky_ex(single)
            if int(info) == 0:
                return torch.cholesky_inverse(factor)
    hessian = objective_hessian(model, problem, theta)
    hessian.diagonal().add_(damping)
    factor, info = torch.linalg.cholesky_ex(hessian)
    if int(info) != 0:
        raise FidelityError(
            f"problem {problem.name!r}: the Hessian at theta_s is not positive definite, "
            "so exact leave-one-out refits are ill-posed; add weight decay"
        )
    return torch.cholesky_inverse(factor)


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
    inverse: Tensor | None = None,
) -> Callable[..., Tensor]:
    """P_j^{-1} for every removed j, as one function of stacked vectors ``[B, p]`` (row b is
    multiplied by P_{removed[b]}^{-1}), or of vectors for a subset ``rows`` of the removals.

    P_j = P - (removal_weight/N) J_j^T H_out,j J_j: a base matrix P, given through ``solve``
    (rows ``[m, p]`` -> rows of P^{-1} v), minus the removed point's Gauss-Newton term at
    ``theta``, applied by the Woodbury identity with one k x k capacitance per removal. With P
    the Hessian of J at theta_s this is the Hessian of J without j for models linear in their
    parameters.

    ``inverse``: P^{-1} itself, where the caller holds it. For a model affine in theta
    (``fidelity.core.affine``) J_j = I_k (x) x~_j^T, so P^{-1} U_j is then formed from P^{-1}'s
    blocks contracted with x~_j (one product of ``[B, c]`` by ``[c, k p]``, a tenth of the work of
    ``solve`` on the ``B k`` rows of U^T), and the Jacobians need no autograd.
    """
    n = problem.n_train
    x_removed, y_removed = problem.x_train[removed], problem.y_train[removed]
    outputs = model(theta, x_removed)
    factors = output_hessian_factor(problem.loss, outputs, y_removed)  # [B, k, k]
    form = affine_form(model) if inverse is not None else None
    if form is not None and inverse is not None:
        k = form.out_features
        # J_j P^{-1} (output a's row: sum over [W, b]'s row a of x~_j times P^{-1}'s rows),
        # from contiguous views of P^{-1}: W's rows then the bias rows
        # in P^{-1}'s dtype (float32 where ``removal_base_inverse`` formed it so)
        x_work, factors_work = x_removed.to(inverse.dtype), factors.to(inverse.dtype)
        weight_rows = _weight_rows(form, inverse)  # [k, d, p]
        contracted = torch.matmul(x_work, weight_rows)  # [k, B, p]
        if form.bias_offset is not None:
            contracted += _bias_rows(form, inverse).unsqueeze(1)
        solved = factors_work.transpose(1, 2) @ contracted.transpose(0, 1)  # (P^{-1} U_j)^T
        # U_j^T P^{-1} U_j = (P^{-1} U_j)^T J_j^T R_j, J_j^T read off the same views
        inner = torch.einsum("bakd,bd->bak", _weight_rows(form, solved, dim=2), x_work)
        if form.bias_offset is not None:
            inner += _bias_rows(form, solved, dim=2)
        gram = (inner @ factors_work).to(factors.dtype)  # [B, k, k]
    else:

        def single_output(point: Tensor, x: Tensor) -> Tensor:
            return model(point, x.unsqueeze(0)).squeeze(0)

        jacobians = torch.func.vmap(torch.func.jacrev(single_output), in_dims=(None, 0))(
            theta, x_removed
        )  # [B, k, p]
        batch, k, p = jacobians.shape
        low_rank = factors.transpose(1, 2) @ jacobians  # U_j^T, [B, k, p]
        solved = solve(low_rank.reshape(batch * k, p)).reshape(batch, k, p)  # (P^{-1} U_j)^T
        gram = low_rank @ solved.transpose(1, 2).to(low_rank.dtype)
    eye_k = torch.eye(k, dtype=gram.dtype, device=gram.device)
    # N/w I - U^T P^{-1} U
    capacitance = (n / removal_weight) * eye_k - gram
    capacitance = 0.5 * (capacitance + capacitance.transpose(1, 2))
    capacitance_factor, info = torch.linalg.cholesky_ex(capacitance)
    if bool((info != 0).any()):
        bad = removed[info != 0].tolist()
        raise FidelityError(
            f"problem {problem.name!r}: removing training point(s) {bad[:10]} leaves a Hessian "
            "that is not positive definite (a direction only those points constrain); add "
            "weight decay or damping"
        )

    # C^{-1} explicitly: k x k, applied at every step, where a batched triangular solve of so
    # small systems costs more than the product
    capacitance_inverse = torch.cholesky_inverse(capacitance_factor).to(solved.dtype)

    def precondition(vectors: Tensor, rows: Tensor | slice = ALL_ROWS) -> Tensor:
        # rows: which removals the vectors belong to (default: all, in order; a slice indexes
        # views, not gathered copies); the products are in the dtype of P^{-1} U_j, the result
        # in the vectors' own
        low, middle = solved[rows], capacitance_inverse[rows]
        given = vectors.to(solved.dtype)
        base = solve(given)  # P^{-1} v
        inner = middle @ (low @ given.unsqueeze(-1))
        return (base + (low.transpose(1, 2) @ inner).squeeze(-1)).to(vectors.dtype)

    return precondition


def _weight_rows(form: AffineForm, matrix: Tensor, dim: int = 0) -> Tensor:
    """The entries of ``matrix`` along ``dim`` (of size p, in theta's layout) that hold W, as a
    view ``[..., k, d, ...]``."""
    k, d = form.out_features, form.in_features
    rows = matrix.narrow(dim, form.weight_offset, k * d)
    return rows.unflatten(dim, (k, d))


def _bias_rows(form: AffineForm, matrix: Tensor, dim: int = 0) -> Tensor:
    """The entries of ``matrix`` along ``dim`` that hold b (``[..., k, ...]``)."""
    if form.bias_offset is None:
        raise ValueError("the affine model has no bias")
    return matrix.narrow(dim, form.bias_offset, form.out_features)


class SecantMemory:
    """The secant pairs (s, y) of the last ``size`` steps of ``n_models`` iterations, for the
    two-loop recursion of limited-memory BFGS on top of a given inverse (the initial matrix).

    The models step together (a model that stops iterating never resumes), so one ring of
    ``size`` slots, written in step order, serves them all: a slot holds every model's pair of
    one step, and the newest-to-oldest order is the same for every model, so the recursion
    reads each slot without gathering a per-model order. A model that took no usable pair in a
    step (not stepped, or a pair without positive curvature, y^T s <= 0, which BFGS cannot use)
    has rho = 0 in that slot, which leaves the recursion unchanged, so all models are processed
    by the same array operations whatever their history.
    """

    def __init__(self, n_models: int, n_params: int, size: int, like: Tensor) -> None:
        if size < 0:
            raise FidelityError(f"memory_size must be >= 0, got {size}")
        self.size = size
        self.s = like.new_zeros(size, n_models, n_params)
        self.y = like.new_zeros(size, n_models, n_params)
        self.rho = like.new_zeros(size, n_models)
        self.steps = 0

    def direction(
        self,
        grads: Tensor,
        rows: Tensor | slice,
        initial: Callable[[Tensor, Tensor | slice], Tensor],
    ) -> Tensor:
        """B^{-1} g for the models ``rows`` (indices, or ``ALL_ROWS``);
        ``initial(vectors, rows)`` applies B_0^{-1}."""
        filled = min(self.steps, self.size)
        if filled == 0:
            return initial(grads, rows)
        newest_first = [(self.steps - 1 - age) % self.size for age in range(filled)]
        pairs = [
            (self.s[slot, rows], self.y[slot, rows], self.rho[slot, rows]) for slot in newest_first
        ]
        q = grads.clone()
        alphas = []
        for s, y, rho in pairs:
            alpha = rho * (s * q).sum(dim=1)
            q -= alpha.unsqueeze(1) * y
            alphas.append(alpha)
        r = initial(q, rows)
        for (s, y, rho), alpha in zip(reversed(pairs), reversed(alphas), strict=True):
            beta = rho * (y * r).sum(dim=1)
            r += (alpha - beta).unsqueeze(1) * s
        return r

    def remember(self, rows: Tensor | slice, s: Tensor, y: Tensor, keep: Tensor) -> None:
        """Store this step's pairs (s, y) of the models ``rows`` where ``keep``; every other
        model gets no pair for this step."""
        if self.size == 0:
            return
        slot = self.steps % self.size
        self.steps += 1
        curvature = (s * y).sum(dim=1)
        usable = keep & (curvature > 0)
        self.rho[slot].zero_()
        self.s[slot, rows] = s
        self.y[slot, rows] = y
        self.rho[slot, rows] = torch.where(
            usable, 1.0 / curvature.clamp_min(torch.finfo(s.dtype).tiny), 0.0
        )


def refit_removals(
    model: FunctionalModel,
    problem: Problem,
    theta_start: Tensor,
    hessian_inverse: Tensor,
    removed: Tensor,
    *,
    gtol: float = 1e-10,
    max_iter: int = 100,
    anchor: Tensor | None = None,
    damping: float = 0.0,
    memory_size: int = 4,
    to_floor: bool = True,
) -> RefitResult:
    """Exact minimisers of J with w_j = 0, one model per entry of ``removed``, all at once
    (plus (damping/2) ||theta - anchor||^2 when an anchor is given; ``hessian_inverse`` is
    then (H + damping I)^{-1}, see ``removal_base_inverse``): to the floating-point floor,
    or, with ``to_floor=False``, until the gradient norm is at most ``gtol``.

    Each model iterates theta <- theta - B_j^{-1} grad J_{-j}(theta), vmapped over models, with
    B_j^{-1} the limited-memory BFGS update (``memory_size`` secant pairs) of P_j^{-1}. P_j is
    the Hessian at theta_s (its inverse is given, as a dense matrix: one matrix product per use
    instead of two triangular solves, several times slower) minus the removed point's Gauss-Newton
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
        partial(torch.matmul, other=hessian_inverse),
        inverse=hessian_inverse,
    )

    batched_grad = objective_gradients(model, problem, anchor, damping)
    # Every model starts at theta_start, where grad J_{-j} = grad J - (1/N) grad L_j: one
    # full-data gradient and the removed points' own, instead of a full-data gradient per model.
    full = batched_grad(theta_start.detach().unsqueeze(0), torch.ones_like(weights[:1]))
    x_removed, y_removed = problem.x_train[removed], problem.y_train[removed]
    form = affine_form(model)
    if form is not None:  # closed form, without vmapped autograd's fixed cost
        own = affine_example_gradients(form, problem.loss, x_removed, y_removed, theta_start)
    else:
        own = per_example_grads(
            model, problem.loss, theta_start.detach(), Examples(x_removed, y_removed)
        )
    result = chord_iterations(
        batched_grad,
        theta_start.detach().unsqueeze(0).expand(removed.numel(), -1),
        full - own / n,
        weights,
        precondition,
        gtol=gtol,
        max_iter=max_iter,
        memory_size=memory_size,
        to_floor=to_floor,
    )
    return finish_with_newton(
        result, model, problem, theta_start, weights, gtol, max_iter, anchor, damping, to_floor
    )


def chord_iterations(
    batched_grad: Callable[[Tensor, Tensor], Tensor],
    starts: Tensor,
    grads: Tensor,
    weights: Tensor,
    precondition: Callable[[Tensor, Tensor | slice], Tensor],
    *,
    gtol: float,
    max_iter: int,
    memory_size: int,
    to_floor: bool = True,
) -> RefitResult:
    """theta_b <- theta_b - B_b^{-1} grad J(theta_b; w_b) for every model b from
    ``starts`` ``[B, p]`` (whose gradients ``grads`` are given), B_b^{-1} the
    limited-memory BFGS update of a fixed ``precondition(vectors, rows)``; see
    ``refit_removals``. Models leave the loop at the floating-point floor (with ``to_floor``;
    otherwise once their gradient norm is at most ``gtol``), or at once when their gradient norm
    grows or stops being finite (left above ``gtol`` for the caller)."""
    count = weights.shape[0]
    thetas = starts.detach().clone()
    grads = grads.clone()
    iterations = torch.zeros(count, dtype=torch.long)
    previous = torch.full((count,), math.inf, dtype=torch.float64)
    active = torch.ones(count, dtype=torch.bool)
    norms = grads.norm(dim=1).double().cpu()
    memory = SecantMemory(count, thetas.shape[1], memory_size, thetas)
    # the last two step lengths of each model (inf until taken), and the rounding unit of theta
    steps = torch.full((count,), math.inf, dtype=torch.float64)
    earlier_steps = steps.clone()
    resolution = torch.finfo(thetas.dtype).eps * thetas.norm(dim=1).double().cpu()
    for _ in range(max_iter):
        # Above gtol a growing gradient is a failure (the caller re-solves those models);
        # below it, a gradient that no longer falls is at the rounding floor.
        diverging = ~torch.isfinite(norms) | ((norms > previous) & (norms > gtol))
        improving = (norms > 0) & (norms < previous)
        # The iteration converges linearly, so the next step would be about step^2 / earlier
        # step long; once that is below the rounding of theta the iterate is at the floor, and
        # stepping on only adds noise.
        next_step = torch.where(torch.isinf(earlier_steps), math.inf, steps**2 / earlier_steps)
        at_floor = next_step <= resolution
        past_tolerance = improving & ~at_floor if to_floor else torch.zeros_like(improving)
        active &= ~diverging & ((norms > gtol) | past_tolerance)
        if not bool(active.any()):
            break
        # only the models still iterating are stepped and re-evaluated: the few slow ones
        # (high-leverage removals) do not keep the whole batch in the loop
        rows = torch.nonzero(active).flatten().to(thetas.device)
        # while every model iterates, views instead of gathered copies
        pick: Tensor | slice = ALL_ROWS if rows.numel() == count else rows
        step = memory.direction(grads[pick], pick, precondition)
        thetas[pick] = thetas[pick] - step
        new_grads = batched_grad(thetas[pick], weights[pick])
        new_norms = new_grads.norm(dim=1).double().cpu()
        step_norms = step.norm(dim=1).double().cpu()
        # Pairs taken within a thousand roundings of theta are rounding noise: they stay out of
        # the memory.
        usable = (step_norms > 1e3 * resolution[active]).to(rows.device)
        memory.remember(pick, -step, new_grads - grads[pick], usable)
        grads[pick] = new_grads
        earlier_steps[active] = steps[active]
        steps[active] = step_norms
        previous[active] = norms[active]
        norms[active] = new_norms
        iterations += active.long()
    return RefitResult(thetas, iterations, norms)


def finish_with_newton(
    result: RefitResult,
    model: FunctionalModel,
    problem: Problem,
    theta_start: Tensor,
    weights: Tensor,
    gtol: float,
    max_iter: int,
    anchor: Tensor | None = None,
    damping: float = 0.0,
    to_floor: bool = True,
) -> RefitResult:
    """Every model of ``result`` not at ``gtol`` solved again by the line-searched
    ``newton_minimize`` from ``theta_start``."""
    thetas, iterations, norms = result.thetas, result.iterations, result.grad_norms
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
            to_floor=to_floor,
        )
        thetas[index] = finished.theta
        norms[index] = finished.grad_norm
        iterations[index] += finished.iterations
    return RefitResult(thetas, iterations, norms)


def refit_weighted(
    model: FunctionalModel,
    problem: Problem,
    theta_start: Tensor,
    weights: Tensor,
    *,
    gtol: float = 1e-10,
    max_iter: int = 100,
    memory_size: int = 4,
) -> RefitResult:
    """Exact minimisers of J(theta; w_b) for many weight vectors ``weights`` ``[B, N]`` at once
    (the subsets of the datamodeling score keep a fraction of the points, the others at 0).

    The chord iteration of ``refit_removals``, started and preconditioned where a random subset
    keeping a fraction m of the points lands on average: at theta_m, the minimiser of J with
    every weight m (the full data with weight decay in effect wd / m; one Newton solve from
    ``theta_start`` per distinct mean weight, shared by every model with that mean), with P_m
    the Hessian of J(.; m) there. A subset's refit differs from theta_m by its sampling noise
    alone, so P_m is close to its Hessian and the steps contract fast; ``memory_size`` secant
    pairs correct the rest. The fixed point is the exact minimiser (the gradient is exact);
    models the iteration does not bring to ``gtol`` are solved by ``newton_minimize``.
    """
    if weights.ndim != 2 or weights.shape[1] != problem.n_train:
        raise FidelityError(
            f"weights must be [n_models, {problem.n_train}], got {tuple(weights.shape)}"
        )
    theta_start = theta_start.detach()
    means = weights.mean(dim=1)
    distinct, owner = torch.unique(torch.round(means * 1e12) / 1e12, return_inverse=True)
    starts = theta_start.unsqueeze(0).repeat(weights.shape[0], 1)
    inverses = []
    for index, mean in enumerate(distinct.tolist()):
        uniform = torch.full_like(weights[0], mean)
        centre = newton_minimize(model, problem, theta_start, uniform, gtol=gtol, max_iter=max_iter)
        hessian = objective_hessian(model, problem, centre.theta, uniform)
        factor, info = torch.linalg.cholesky_ex(hessian)
        if int(info) != 0:
            raise FidelityError(
                f"problem {problem.name!r}: the Hessian of the objective with mean weight "
                f"{mean:g} is not positive definite; weighted refits need weight decay"
            )
        inverses.append(torch.cholesky_inverse(factor))
        starts[owner == index] = centre.theta

    def precondition(vectors: Tensor, rows: Tensor | slice) -> Tensor:
        groups = owner[rows]
        if len(inverses) == 1:
            return vectors @ inverses[0]
        result = torch.empty_like(vectors)
        for index, inverse in enumerate(inverses):
            chosen = groups == index
            result[chosen] = vectors[chosen] @ inverse
        return result

    batched_grad = objective_gradients(model, problem)
    result = chord_iterations(
        batched_grad,
        starts,
        batched_grad(starts, weights),
        weights,
        precondition,
        gtol=gtol,
        max_iter=max_iter,
        memory_size=memory_size,
    )
    return finish_with_newton(result, model, problem, theta_start, weights, gtol, max_iter)
