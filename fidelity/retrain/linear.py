"""The last rung of the response ladder: the linearised PBRF, solved in closed form."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from fidelity.core.checks import check_nonnegative, check_positive_int
from fidelity.core.curvature import (
    DENSE_LIMIT,
    CurvatureOperator,
    block_conjugate_gradient,
    gauss_newton_factor,
    gauss_newton_woodbury,
    woodbury_pays,
)
from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_grads
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.retrain.execution import Execution
from fidelity.retrain.response import Response, ResponseResult, check_removed


class LinearResponse(Response):
    """theta_j = theta_s + (1/N) (G + (wd + damping) I)^{-1} g_j: the minimiser of the PBRF
    with the network linearised around theta_s and the loss replaced by its second-order
    expansion in output space (Bae et al. 2022), G = (1/N) sum_i J_i^T H_out,i J_i.

    delta[t, j] = g_t^T (theta_j - theta_s): the measurement is linearised too, so that the next
    gap on the ladder (this stage vs an estimator at the same damping) is the estimator's solver
    error alone. Solved exactly: dense Cholesky up to 6,000 parameters; beyond, the Woodbury
    form when the model has more parameters than training outputs, else conjugate gradient to a
    relative residual of 1e-10.
    """

    name = "linear"

    def __init__(self, *, damping: float = 0.0, batch_size: int = 512) -> None:
        self.damping = check_nonnegative(damping, "linear.damping")
        self.batch_size = check_positive_int(batch_size, "linear.batch_size")

    def compute(
        self,
        trained: TrainedProblem,
        test: Examples,
        removed: Tensor,
        execution: Execution | None = None,
    ) -> ResponseResult:
        start = time.perf_counter()
        problem = trained.problem
        removed = check_removed(removed, problem.n_train).to(trained.theta.device)
        train_grads = per_example_grads(
            trained.model,
            problem.loss,
            trained.theta,
            problem.train.subset(removed),
            self.batch_size,
        )
        if trained.n_params <= DENSE_LIMIT:
            factor = gauss_newton_factor(trained, self.damping, self.batch_size, self.name)
            solved, solver = torch.cholesky_solve(train_grads.T, factor).T, "dense"
        elif woodbury_pays(trained):
            woodbury = gauss_newton_woodbury(trained, self.damping, self.batch_size)
            solved, solver = woodbury.solve(train_grads), "woodbury"
        else:
            operator = CurvatureOperator(trained, "gnh", self.batch_size)
            solved, solver = self._conjugate_gradient(operator, train_grads), "cg"
        steps = solved / problem.n_train  # theta_j - theta_s
        test_grads = per_example_grads(
            trained.model, problem.loss, trained.theta, test, self.batch_size
        )
        info = {"seconds": time.perf_counter() - start, "solver": solver}
        return ResponseResult(test_grads @ steps.T, info, thetas=trained.theta + steps)

    def _conjugate_gradient(self, operator: CurvatureOperator, rhs: Tensor) -> Tensor:
        # block CG: the removed points' gradients share one search space (positive definite
        # Gauss-Newton: no breakdown)
        result = block_conjugate_gradient(
            lambda v: operator.matvec(v) + self.damping * v,
            rhs,
            tol=1e-10,
            max_iter=10 * rhs.shape[1],
        )
        if not bool(result.converged.all()):
            raise FidelityError(
                "linear: conjugate gradient did not reach a relative residual of 1e-10"
            )
        return result.solution
