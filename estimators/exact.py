"""The exact influence estimator: dense Hessian of J, Cholesky solve."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from estimators.base import InverseCurvatureEstimator
from fidelity.errors import FidelityError
from fidelity.objective import objective_hessian
from fidelity.problem import TrainedProblem


class ExactEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) g_t^T (H + damping I)^{-1} g_j, H the dense Hessian of J.

    Estimand: the first-order change of test loss t when training point j is removed
    (epsilon = -1/N), for the exact curvature of the training objective at theta_s. Positive:
    removing j raises the loss on t. The Hessian is built with torch.func (reverse over
    reverse) and factorised by Cholesky; a Hessian that is not positive definite raises an
    error instead of returning a meaningless solve.
    """

    name = "exact"

    def __init__(self, *, damping: float = 0.0, batch_size: int = 512) -> None:
        super().__init__(batch_size=batch_size)
        if not (isinstance(damping, int | float) and math.isfinite(damping) and damping >= 0):
            raise FidelityError(f"exact.damping must be a number >= 0, got {damping!r}")
        self.damping = float(damping)

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        hessian = objective_hessian(trained.model, trained.problem, trained.theta)
        eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
        factor, info = torch.linalg.cholesky_ex(hessian + self.damping * eye)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(hessian)[0])
            raise FidelityError(
                f"exact: the Hessian of {trained.problem.name!r} plus damping {self.damping:g} is "
                f"not positive definite (smallest Hessian eigenvalue {smallest:.3g}); set "
                f"damping above {max(-smallest, 0.0):.3g}"
            )
        self.cholesky_ = factor
        diagonal = factor.diagonal()
        return {
            "n_params": int(hessian.shape[0]),
            "condition_estimate": float((diagonal.max() / diagonal.min()) ** 2),
        }

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        return torch.cholesky_solve(vectors.T, self.cholesky_).T
