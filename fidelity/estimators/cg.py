"""Conjugate-gradient influence: inverse-curvature products by (preconditioned) CG."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fidelity.core.checks import check_nonnegative, check_positive_int
from fidelity.core.curvature import (
    CurvatureOperator,
    block_conjugate_gradient,
    check_curvature,
    conjugate_gradient,
)
from fidelity.core.errors import FidelityError
from fidelity.core.problem import TrainedProblem
from fidelity.estimators.base import InverseCurvatureEstimator

PRECONDITIONERS = (None, "jacobi")


class ConjugateGradientEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) x_t^T g_j with x_t solving (C + damping I) x_t = g_t by CG.

    Estimand: as ``exact``/``gnh`` (removal, epsilon = -1/N, positive = j helped), up to the
    solver's tolerance. All test gradients are solved at once: by block CG (``block=True``, the
    default: one search space shared by all test gradients, far fewer steps when the spectrum
    decays) or each with its own step sizes (``block=False``). ``tol`` is the relative residual
    ||r|| / ||g_t|| at which a column stops. A direction of
    non-positive curvature (p^T A p <= 0, possible for the Hessian of a non-convex model without
    enough damping) stops that column at its last iterate and is counted in diagnostics, never
    stepped along. ``preconditioner="jacobi"`` uses the exact Gauss-Newton diagonal plus damping.
    """

    name = "cg"

    def __init__(
        self,
        *,
        damping: float = 0.0,
        curvature: str = "hessian",
        tol: float = 1e-8,
        max_iter: int = 1000,
        preconditioner: str | None = None,
        block: bool = True,
        batch_size: int = 512,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.damping = check_nonnegative(damping, "cg.damping")
        self.curvature = check_curvature(curvature, "cg")
        self.tol = check_nonnegative(tol, "cg.tol")
        self.max_iter = check_positive_int(max_iter, "cg.max_iter")
        if preconditioner not in PRECONDITIONERS:
            raise FidelityError(
                f"cg.preconditioner must be omitted or 'jacobi', got {preconditioner!r}"
            )
        self.preconditioner = preconditioner
        if not isinstance(block, bool):
            raise FidelityError(f"cg.block must be true or false, got {block!r}")
        self.block = block

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        self.operator_ = CurvatureOperator(trained, self.curvature, self.batch_size)
        self.inverse_diagonal_: Tensor | None = None
        if self.preconditioner == "jacobi":
            diagonal = self.operator_.gauss_newton_diagonal() + self.damping
            if bool((diagonal <= 0).any()):
                raise FidelityError(
                    f"cg: the jacobi preconditioner meets {int((diagonal <= 0).sum())} "
                    "parameter(s) with zero Gauss-Newton curvature and no weight decay; add "
                    "damping or drop the preconditioner"
                )
            self.inverse_diagonal_ = 1.0 / diagonal
        return {"n_params": trained.n_params}

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        def apply(v: Tensor) -> Tensor:
            return self.operator_.matvec(v) + self.damping * v

        def precondition(r: Tensor) -> Tensor:
            if self.inverse_diagonal_ is None:
                return r
            return r * self.inverse_diagonal_

        solve = block_conjugate_gradient if self.block else conjugate_gradient
        result = solve(
            apply,
            vectors,
            tol=self.tol,
            max_iter=self.max_iter,
            precondition=None if self.inverse_diagonal_ is None else precondition,
        )
        x, iterations, negative = result.solution, result.iterations, result.negative_curvature
        b_norm = vectors.norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)
        residual = (vectors - apply(x)).norm(dim=1) / b_norm
        self.diagnostics_.update(
            {
                "iterations": iterations.tolist(),
                "relative_residual": residual.tolist(),
                "max_relative_residual": float(residual.max()) if len(residual) else 0.0,
                "negative_curvature_columns": int(negative.sum()),
                "unconverged_columns": int((residual > self.tol).sum()),
            }
        )
        return x
