"""Dense estimators: the exact Hessian (``exact``) and exact Gauss-Newton (``gnh``) solves."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fidelity.core.checks import check_nonnegative
from fidelity.core.curvature import (
    CurvatureOperator,
    GaussNewtonWoodbury,
    check_curvature,
    gauss_newton_woodbury,
    woodbury_pays,
)
from fidelity.core.errors import FidelityError
from fidelity.core.problem import TrainedProblem
from fidelity.estimators.base import InverseCurvatureEstimator
from fidelity.estimators.kfac import check_layers, parameter_subset

SOLVERS = ("auto", "dense", "woodbury")


class ExactEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) g_t^T (C + damping I)^{-1} g_j with C the dense curvature of J.

    Estimand: the first-order change of test loss t when training point j is removed
    (epsilon = -1/N), for the exact Hessian (``curvature="hessian"``), the exact Gauss-Newton
    matrix (``curvature="gnh"``) or the empirical Fisher (``curvature="empirical-fisher"``,
    gradient outer products at the training labels; see ``fidelity.core.curvature``) of the training
    objective at theta_s. Positive: removing j
    raises the loss on t. The matrix is built with torch.func and factorised by Cholesky; a
    matrix that is not positive definite raises an error instead of returning a meaningless
    solve.

    ``layers`` (fnmatch patterns of module names, as for ``kfac``/``ekfac``) restricts the
    solve to the parameters of those nn.Linear/nn.Conv2d layers: the curvature block of that
    subset and the gradients' entries in it, the like-for-like reference for an estimator that
    covers only some layers. The other parameters contribute nothing and are listed in
    diagnostics.

    ``solver``: ``dense`` forms the p x p matrix; ``woodbury`` (Gauss-Newton only) solves
    exactly through the ``[N k, N k]`` Gram matrix of per-example Jacobians, which is what makes
    an exact reference possible for a model with millions of parameters and a few hundred
    training points; ``auto`` picks Woodbury when N k is below the parameters solved for.
    """

    name = "exact"

    def __init__(
        self,
        *,
        damping: float = 0.0,
        curvature: str = "hessian",
        layers: str | list[str] | None = None,
        solver: str = "auto",
        batch_size: int = 512,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.damping = check_nonnegative(damping, f"{self.name}.damping")
        self.curvature = check_curvature(curvature, self.name)
        self.layers = check_layers(layers, self.name)
        if solver not in SOLVERS:
            raise FidelityError(
                f"{self.name}.solver must be one of {', '.join(SOLVERS)}, got {solver!r}"
            )
        if solver == "woodbury" and self.curvature != "gnh":
            raise FidelityError(f"{self.name}: solver 'woodbury' needs curvature 'gnh'")
        self.solver = solver

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        self.subset_: Tensor | None = None
        uncovered: list[str] = []
        if self.layers is not None:
            self.subset_, uncovered = parameter_subset(trained.model, self.layers)
        size = trained.n_params if self.subset_ is None else len(self.subset_)
        self.woodbury_: GaussNewtonWoodbury | None = None
        if self.solver == "woodbury" or (
            self.solver == "auto" and self.curvature == "gnh" and woodbury_pays(trained, size)
        ):
            return self._fit_woodbury(trained, uncovered)
        matrix = CurvatureOperator(trained, self.curvature, self.batch_size).dense()
        if self.subset_ is not None:
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
            "solver": "dense",
            "min_eigenvalue": smallest,
            "max_eigenvalue": largest,
            "negative_eigenvalues": int((eigenvalues < 0).sum()),
        }

    def _fit_woodbury(self, trained: TrainedProblem, uncovered: list[str]) -> dict[str, Any]:
        woodbury = gauss_newton_woodbury(trained, self.damping, self.batch_size, self.subset_)
        self.woodbury_ = woodbury
        weight_decay = trained.problem.weight_decay
        above = woodbury.eigenvalues
        return {
            "n_params": int(woodbury.factors.shape[1]),
            "uncovered_parameters": uncovered,
            "solver": "woodbury",
            "min_eigenvalue": weight_decay + min(float(above[0]), 0.0),
            "max_eigenvalue": weight_decay + float(above[-1]),
            "negative_eigenvalues": 0,
        }

    def _solve(self, vectors: Tensor) -> Tensor:
        if self.woodbury_ is not None:
            return self.woodbury_.solve(vectors)
        return torch.cholesky_solve(vectors.T, self.cholesky_).T

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        if self.subset_ is None:
            return self._solve(vectors)
        result = torch.zeros_like(vectors)
        subset = self.subset_.to(vectors.device)
        result[:, subset] = self._solve(vectors[:, subset])
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
        solver: str = "auto",
        batch_size: int = 512,
    ) -> None:
        super().__init__(
            damping=damping,
            curvature=curvature,
            layers=layers,
            solver=solver,
            batch_size=batch_size,
        )
