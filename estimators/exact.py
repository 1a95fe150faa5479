"""Dense estimators: the exact Hessian (``exact``) and exact Gauss-Newton (``gnh``) solves."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from estimators.base import InverseCurvatureEstimator
from estimators.kfac import check_layers, parameter_subset
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

    ``layers`` (fnmatch patterns of module names, as for ``kfac``/``ekfac``) restricts the
    solve to the parameters of those nn.Linear/nn.Conv2d layers: the curvature block of that
    subset and the gradients' entries in it, the like-for-like reference for an estimator that
    covers only some layers. The other parameters contribute nothing and are listed in
    diagnostics.
    """

    name = "exact"

    def __init__(
        self,
        *,
        damping: float = 0.0,
        curvature: str = "hessian",
        layers: str | list[str] | None = None,
        batch_size: int = 512,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.damping = check_nonnegative(damping, f"{self.name}.damping")
        self.curvature = check_curvature(curvature, self.name)
        self.layers = check_layers(layers, self.name)

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        matrix = CurvatureOperator(trained, self.curvature, self.batch_size).dense()
        self.subset_, uncovered = None, []
        if self.layers is not None:
            self.subset_, uncovered = parameter_subset(trained.model, self.layers)
            matrix = matrix[self.subset_[:, None], self.subset_[None, :]]
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
            "uncovered_parameters": uncovered,
            "min_eigenvalue": smallest,
            "max_eigenvalue": largest,
            "negative_eigenvalues": int((eigenvalues < 0).sum()),
        }

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        if self.subset_ is None:
            return torch.cholesky_solve(vectors.T, self.cholesky_).T
        result = torch.zeros_like(vectors)
        subset = self.subset_.to(vectors.device)
        result[:, subset] = torch.cholesky_solve(vectors[:, subset].T, self.cholesky_).T
        return result


class GaussNewtonEstimator(ExactEstimator):
    """``exact`` with the Gauss-Newton matrix G + wd I (the reference for GN-based solvers)."""

    name = "gnh"

    def __init__(
        self,
        *,
        damping: float = 0.0,
        curvature: str = "gnh",
        layers: str | list[str] | None = None,
        batch_size: int = 512,
    ) -> None:
        super().__init__(damping=damping, curvature=curvature, layers=layers, batch_size=batch_size)
