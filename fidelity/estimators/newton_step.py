"""Estimators that take one Newton step on the objective without the removed points.

The first-order influence function solves with H, the curvature of the objective WITH the
removed points; on convex problems that is what makes it underestimate large or high-leverage
removals (Koh et al. 2019; Rubinstein & Hopkins 2025). Both estimators here put the removed
points' own curvature back:

``newton-step``: for a removed group U with dropped weights d_i (1 for a removed point),

    Delta_U = (H + damping I - (1/N) sum_i d_i H_i)^{-1} (1/N) sum_i d_i g_i

one Newton step from theta_s on J without U (H_i the exact Hessian of L_i, g_i its gradient,
theta_s taken as J's minimiser), and the prediction is the measurement at the stepped
parameters, ``m(z_t, theta_s + Delta_U) - m(z_t, theta_s)`` (``output = "linear"``: its
first-order part ``grad m(z_t)^T Delta_U``). On a quadratic objective (ridge) the step lands on
the refit's minimiser, so it equals the exact group refit. It is not additive: a group's
prediction is its own step, computed by ``group_effects``; ``scores`` gives single-point steps.

``rif``: the rescaled influence function of Rubinstein & Hopkins (2025), each point's own
Newton step taken with the first-order response (additive over a group, like every score
estimator):

    delta_hat[t, j] = g_t^T (H + damping I - G_j / N)^{-1} g_j / N

with G_j = J_j^T H_out,j J_j the point's Gauss-Newton term, which is its exact Hessian for every
model linear in its parameters (the generalised linear models the paper treats). G_j has rank at
most k (outputs), so the correction is a k x k Woodbury solve per point; for a GLM with one
output, G_j = r_j r_j^T and g_j is parallel to r_j, so the step is the paper's
IF_j / (1 - h_j) with the leverage h_j = r_j^T H^{-1} r_j / N.
"""

from __future__ import annotations

import time
from typing import Any, Self

import torch
from torch import Tensor

from fidelity.core.checks import check_nonnegative, check_positive_int
from fidelity.core.curvature import DENSE_LIMIT, CurvatureOperator
from fidelity.core.errors import FidelityError
from fidelity.core.objective import (
    check_target,
    loss_from_outputs,
    per_example_grads,
    target_values,
)
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.estimators.base import Estimator

OUTPUTS = ("evaluate", "linear")


def _dense_hessian(trained: TrainedProblem, damping: float, batch_size: int, owner: str) -> Tensor:
    if trained.n_params > DENSE_LIMIT:
        raise FidelityError(
            f"{owner}: {trained.problem.name!r} has {trained.n_params} parameters; the Newton "
            f"step solves with the dense Hessian, formed up to {DENSE_LIMIT}"
        )
    matrix = CurvatureOperator(trained, "hessian", batch_size).dense()
    matrix.diagonal().add_(damping)
    return matrix


def _example_hessians(trained: TrainedProblem, batch: Examples) -> Tensor:
    """The exact Hessian of each example's loss at theta_s, ``[b, p, p]``."""
    model, loss, theta = trained.model, trained.problem.loss, trained.theta

    def single(x: Tensor, y: Tensor) -> Tensor:
        def value(t: Tensor) -> Tensor:
            return loss_from_outputs(loss, model(t, x.unsqueeze(0)), y.unsqueeze(0)).sum()

        return torch.func.jacrev(torch.func.grad(value))(theta)

    hessians = torch.func.vmap(single)(batch.x, batch.y)
    return 0.5 * (hessians + hessians.transpose(1, 2))


class NewtonStepEstimator(Estimator):
    """One Newton step on the objective without a point (``scores``) or a group
    (``group_effects``), exact curvature; see the module docstring for the estimand.

    ``damping`` is added to H (and so to every step's matrix); ``output``: ``evaluate`` (the
    measurement at theta_s + Delta, default) or ``linear`` (its first-order change);
    ``batch_size``: examples whose p x p Hessians are held at once.
    """

    name = "newton-step"

    def __init__(
        self, *, damping: float = 0.0, output: str = "evaluate", batch_size: int = 16
    ) -> None:
        self.damping = check_nonnegative(damping, f"{self.name}.damping")
        if output not in OUTPUTS:
            raise FidelityError(
                f"{self.name}.output must be one of {', '.join(OUTPUTS)}, got {output!r}"
            )
        self.output = output
        self.batch_size = check_positive_int(batch_size, f"{self.name}.batch_size")

    def fit(self, trained: TrainedProblem) -> Self:
        start = time.perf_counter()
        self.trained_ = trained
        self.hessian_ = _dense_hessian(trained, self.damping, 512, self.name)
        eigenvalues = torch.linalg.eigvalsh(self.hessian_)
        self.train_gradients_ = per_example_grads(
            trained.model, trained.problem.loss, trained.theta, trained.problem.train
        )
        self.diagnostics_: dict[str, Any] = {
            "n_params": trained.n_params,
            "min_eigenvalue": float(eigenvalues[0]),
            "max_eigenvalue": float(eigenvalues[-1]),
            "fit_seconds": time.perf_counter() - start,
        }
        return self

    def _solve(self, matrices: Tensor, vectors: Tensor, what: str) -> Tensor:
        factor, info = torch.linalg.cholesky_ex(matrices)
        if bool((info != 0).any()):
            raise FidelityError(
                f"{self.name}: the Hessian without {what} plus damping {self.damping:g} is not "
                "positive definite; the Newton step is undefined there (raise damping)"
            )
        return torch.cholesky_solve(vectors.unsqueeze(-1), factor).squeeze(-1)

    def parameter_changes(self, train: Examples) -> Tensor:
        """Delta_j for each row of ``train`` removed alone, ``[n_train, p]``."""
        trained = self._check_fitted()
        n = trained.problem.n_train
        model, loss, theta = trained.model, trained.problem.loss, trained.theta
        steps = []
        for start in range(0, len(train), self.batch_size):
            batch = Examples(
                train.x[start : start + self.batch_size], train.y[start : start + self.batch_size]
            )
            own = _example_hessians(trained, batch)
            grads = per_example_grads(model, loss, theta, batch, len(batch))
            steps.append(self._solve(self.hessian_ - own / n, grads / n, "a training point"))
        return torch.cat(steps) if steps else theta.new_zeros((0, theta.numel()))

    def effects(self, test: Examples, steps: Tensor, target: str = "loss") -> Tensor:
        """``[n_steps, n_test]``: the change of ``target`` on each test point for each
        parameter change, by this estimator's ``output``."""
        trained = self._check_fitted()
        model, loss, theta = trained.model, trained.problem.loss, trained.theta
        check_target(target, self.name)
        if self.output == "linear":
            gradients = per_example_grads(model, loss, theta, test, 512, target)
            return steps @ gradients.T
        base = target_values(model, loss, theta, test, target)

        def measured(step: Tensor) -> Tensor:
            return target_values(model, loss, theta + step, test, target)

        return torch.func.vmap(measured)(steps) - base

    def scores(self, test: Examples, train: Examples) -> Tensor:
        start = time.perf_counter()
        deltas = self.effects(test, self.parameter_changes(train)).T
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return deltas

    def group_steps(self, weights: Tensor) -> Tensor:
        """Delta for each row of ``weights`` ``[m, N]`` (the kept weights of the whole training
        set: 1 kept, 0 removed), ``[m, p]``."""
        trained = self._check_fitted()
        problem = trained.problem
        if weights.dim() != 2 or weights.shape[1] != problem.n_train:
            raise FidelityError(
                f"{self.name}: group weights must be [groups, {problem.n_train}], got "
                f"{tuple(weights.shape)}"
            )
        operator = CurvatureOperator(trained, "hessian", 512)
        dropped = (1.0 - weights).to(dtype=problem.dtype, device=problem.device)
        steps = []
        for row in dropped:
            matrix = self.hessian_ - operator.weighted_sum(row) / problem.n_train
            gradient = row @ self.train_gradients_ / problem.n_train
            steps.append(self._solve(matrix, gradient, "a group"))
        return torch.stack(steps) if steps else trained.theta.new_zeros((0, trained.n_params))

    def group_effects(self, test: Examples, weights: Tensor, target: str = "loss") -> Tensor:
        """``[m, n_test]``: the predicted change of ``target`` on each test point when the
        training set is reweighted by each row of ``weights`` (one Newton step per row)."""
        start = time.perf_counter()
        effects = self.effects(test, self.group_steps(weights), target)
        self.diagnostics_["group_seconds"] = (
            self.diagnostics_.get("group_seconds", 0.0) + time.perf_counter() - start
        )
        return effects


class RescaledInfluenceEstimator(Estimator):
    """Rescaled influence functions (Rubinstein & Hopkins 2025); see the module docstring.

    ``damping`` is added to H; ``batch_size``: training points whose Woodbury corrections are
    formed at once.
    """

    name = "rif"

    def __init__(self, *, damping: float = 0.0, batch_size: int = 256) -> None:
        self.damping = check_nonnegative(damping, f"{self.name}.damping")
        self.batch_size = check_positive_int(batch_size, f"{self.name}.batch_size")

    def fit(self, trained: TrainedProblem) -> Self:
        start = time.perf_counter()
        self.trained_ = trained
        hessian = _dense_hessian(trained, self.damping, 512, self.name)
        factor, info = torch.linalg.cholesky_ex(hessian)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(hessian)[0])
            raise FidelityError(
                f"{self.name}: the Hessian of {trained.problem.name!r} plus damping "
                f"{self.damping:g} is not positive definite (smallest eigenvalue {smallest:.3g})"
            )
        self.cholesky_ = factor
        self.diagnostics_: dict[str, Any] = {
            "n_params": trained.n_params,
            "fit_seconds": time.perf_counter() - start,
        }
        return self

    def parameter_changes(self, train: Examples) -> Tensor:
        """(1/N)(H + damping I - G_j/N)^{-1} g_j for each row of ``train``, ``[n_train, p]``;
        the largest leverage (eigenvalue of G_j H^{-1} / N) is kept in diagnostics."""
        trained = self._check_fitted()
        n, p = trained.problem.n_train, trained.n_params
        model, loss, theta = trained.model, trained.problem.loss, trained.theta
        operator = CurvatureOperator(trained, "gnh", self.batch_size)
        steps, largest = [], 0.0
        for start in range(0, len(train), self.batch_size):
            batch = Examples(
                train.x[start : start + self.batch_size], train.y[start : start + self.batch_size]
            )
            grads = per_example_grads(model, loss, theta, batch, len(batch))  # [b, p]
            factors = operator.gauss_newton_factors(batch)  # [b, k, p]: G_j = R_j^T R_j
            b, k = factors.shape[:2]
            stacked = torch.cat([grads, factors.reshape(b * k, p)])
            solved = torch.cholesky_solve(stacked.T, self.cholesky_).T
            first, directions = solved[:b], solved[b:].reshape(b, k, p)  # H^-1 g, H^-1 R^T
            # (H - R^T R / N)^{-1} g = a + U (N I - R U)^{-1} R a, with a = H^-1 g, U = H^-1 R^T
            gram = factors @ directions.transpose(1, 2)  # [b, k, k]: R H^-1 R^T
            leverage = torch.linalg.eigvalsh(0.5 * (gram + gram.transpose(1, 2))) / n
            largest = max(largest, float(leverage.max()))
            if float(leverage.max()) >= 1.0:
                raise FidelityError(
                    f"{self.name}: a training point has leverage {float(leverage.max()):.3g} "
                    ">= 1, so the Hessian without it is not positive definite (raise damping)"
                )
            eye = torch.eye(k, dtype=theta.dtype, device=theta.device)
            projected = (factors @ first.unsqueeze(-1)).squeeze(-1)  # [b, k]: R a
            corrected = torch.linalg.solve(n * eye - gram, projected)
            step = first + (directions.transpose(1, 2) @ corrected.unsqueeze(-1)).squeeze(-1)
            steps.append(step / n)
        self.diagnostics_["max_leverage"] = largest
        return torch.cat(steps) if steps else theta.new_zeros((0, p))

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        gradients = per_example_grads(trained.model, trained.problem.loss, trained.theta, test)
        deltas = gradients @ self.parameter_changes(train).T
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return deltas
