"""Dense estimators: the exact Hessian (``exact``) and exact Gauss-Newton (``gnh``) solves."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from estimators.base import InverseCurvatureEstimator
from fidelity.curvature import CurvatureOperator, check_curvature
from fidelity.errors import FidelityError
from fidelity.problem import TrainedProblem
from fidelity.validation import check_nonnegative


class ExactEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) g_t^T (C + damping I)^{-1} g_j with C the dense curvature of J.

    Estimand: the first-order change of test loss t when training point j is removed
    (epsilon = -1/N), for the exact Hessian (``curvature="hessian"``) or the exact Gauss-Newton
    matrix (``curvature="gnh"``) of the training objective at theta_s. Positive: removing j
    raises the loss on t. The matrix is built with torch.func and factorised by Cholesky; a
    matrix that is not positive definite raises an error instead of returning a meaningless
    solve.
    """

    name = "exact"

    def __init__(
        self, *, damping: float = 0.0, curvature: str = "hessian", batch_size: int = 512
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.damping = check_nonnegative(damping, f"{self.name}.damping")
        self.curvature = check_curvature(curvature, self.name)

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        matrix = CurvatureOperator(trained, self.curvature, self.batch_size).dense()
        eigenvalues = torch.linalg.eigvalsh(matrix)
        damped = matrix + self.damping * torch.eye(
            matrix.shape[0], dtype=matrix.dtype, device=matrix.device
        )
        factor, info = torch.linalg.cholesky_ex(damped)
        smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
        if int(info) != 0:
            raise FidelityError(
                f"{self.name}: the {self.curvature} of {trained.problem.name!r} plus damping "
                f"{self.damping:g} is not positive definite (smallest eigenvalue {smallest:.3g}, "
                f"largest {largest:.3g}); set damping above "
                f"{max(-smallest, 0.0) + 1e-8 * abs(largest):.3g}"
            )
        self.cholesky_ = factor
        return {
            "n_params": int(matrix.shape[0]),
            "min_eigenvalue": smallest,
            "max_eigenvalue": largest,
            "negative_eigenvalues": int((eigenvalues < 0).sum()),
        }

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        return torch.cholesky_solve(vectors.T, self.cholesky_).T


class GaussNewtonEstimator(ExactEstimator):
    """``exact`` with the Gauss-Newton matrix G + wd I (the reference for GN-based solvers)."""

    name = "gnh"

    def __init__(
        self, *, damping: float = 0.0, curvature: str = "gnh", batch_size: int = 512
    ) -> None:
        super().__init__(damping=damping, curvature=curvature, batch_size=batch_size)
