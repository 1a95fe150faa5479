"""The diagonal rung of the curvature ladder: influence with only the curvature's diagonal."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fidelity.core.checks import check_nonnegative
from fidelity.core.curvature import CurvatureOperator, check_curvature
from fidelity.core.errors import FidelityError
from fidelity.core.problem import TrainedProblem
from fidelity.core.resources import check_memory, dense_matrix_bytes
from fidelity.estimators.base import InverseCurvatureEstimator


class DiagonalEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) g_t^T (diag(C) + damping I)^{-1} g_j: the curvature C (the
    Gauss-Newton matrix by default, the empirical Fisher or the Hessian, weight decay included)
    cut to its exact diagonal, one rung below K-FAC on the curvature ladder (Hong et al. 2025)
    and above the identity of ``grad-dot``. Same sign and units as ``exact``: positive, removing
    j raises t's loss. The Hessian's diagonal comes from its dense matrix (so its memory is
    checked); a diagonal entry that is not positive after damping is an error naming the
    damping needed."""

    name = "diagonal"

    def __init__(
        self, *, damping: float = 0.0, curvature: str = "gnh", batch_size: int = 512
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.damping = check_nonnegative(damping, "diagonal.damping")
        self.curvature = check_curvature(curvature, self.name)

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        if self.curvature == "hessian":
            check_memory(
                dense_matrix_bytes(trained.n_params, trained.theta.element_size(), copies=2),
                f"the dense Hessian of {trained.problem.name!r} ({trained.n_params} parameters) "
                "for its diagonal",
                fix="use curvature 'gnh' or 'empirical-fisher', whose diagonals need no matrix",
                device=trained.problem.device,
            )
        diagonal = CurvatureOperator(trained, self.curvature, self.batch_size).diagonal()
        damped = diagonal + self.damping
        smallest = float(damped.min())
        if not smallest > 0:
            raise FidelityError(
                f"diagonal: the {self.curvature} diagonal of {trained.problem.name!r} plus "
                f"damping {self.damping:g} has an entry {smallest:.3g} <= 0; set damping above "
                f"{self.damping - smallest + 1e-8 * float(damped.abs().max()):.3g}"
            )
        self.inverse_diagonal_ = 1.0 / damped
        return {
            "n_params": trained.n_params,
            "min_diagonal": float(diagonal.min()),
            "max_diagonal": float(diagonal.max()),
        }

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        return vectors * self.inverse_diagonal_
