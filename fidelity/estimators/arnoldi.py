"""Arnoldi influence (Schioppa et al. 2022): invert the curvature on its top eigenspace."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fidelity.core.checks import check_int, check_nonnegative, check_positive_int
from fidelity.core.curvature import CurvatureOperator, check_curvature
from fidelity.core.errors import FidelityError
from fidelity.core.problem import TrainedProblem
from fidelity.estimators.base import InverseCurvatureEstimator


class ArnoldiEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) sum_{i <= k} (u_i^T g_t)(u_i^T g_j) / (lambda_i + damping).

    Estimand: the influence of removing j (epsilon = -1/N, positive = j helped) with the
    curvature replaced by its ``rank`` eigenpairs of largest magnitude, found by the Arnoldi
    iteration (full re-orthogonalisation, ``iterations`` Krylov steps from a random start seeded
    by ``seed``); directions outside that subspace are dropped, as in Schioppa et al. With
    ``rank`` equal to the number of parameters it is the exact solve.
    """

    name = "arnoldi"

    def __init__(
        self,
        *,
        rank: int = 50,
        iterations: int | None = None,
        damping: float = 0.0,
        curvature: str = "hessian",
        seed: int = 0,
        batch_size: int = 512,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.rank = check_positive_int(rank, "arnoldi.rank")
        if iterations is not None:
            check_positive_int(iterations, "arnoldi.iterations")
            if iterations < rank:
                raise FidelityError("arnoldi.iterations must be >= arnoldi.rank")
        self.iterations = iterations
        self.damping = check_nonnegative(damping, "arnoldi.damping")
        self.curvature = check_curvature(curvature, "arnoldi")
        self.seed = check_int(seed, "arnoldi.seed")

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        operator = CurvatureOperator(trained, self.curvature, self.batch_size)
        p = trained.n_params
        steps = min(self.iterations or 2 * self.rank, p)
        theta = trained.theta
        generator = torch.Generator().manual_seed(self.seed)
        start = torch.randn(p, generator=generator, dtype=theta.dtype).to(theta.device)
        basis = torch.zeros(steps + 1, p, dtype=theta.dtype, device=theta.device)
        hessenberg = torch.zeros(steps + 1, steps, dtype=theta.dtype, device=theta.device)
        basis[0] = start / start.norm()
        found = steps
        for j in range(steps):
            w = operator.matvec(basis[j])
            for _ in range(2):  # twice is enough (Kahan-Parlett)
                coefficients = basis[: j + 1] @ w
                w = w - coefficients @ basis[: j + 1]
                hessenberg[: j + 1, j] += coefficients
            norm = w.norm()
            hessenberg[j + 1, j] = norm
            if float(norm) <= 1e-12 * float(hessenberg[: j + 1, j].abs().max()):
                found = j + 1  # invariant subspace: the Krylov space is exhausted
                break
            basis[j + 1] = w / norm
        small = hessenberg[:found, :found]
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (small + small.T))
        keep = torch.argsort(eigenvalues.abs(), descending=True)[: min(self.rank, found)]
        self.eigenvalues_ = eigenvalues[keep]
        self.eigenvectors_ = eigenvectors[:, keep].T @ basis[:found]  # [k, p]
        shifted = self.eigenvalues_ + self.damping
        if bool((shifted <= 0).any()):
            smallest = float(self.eigenvalues_.min())
            raise FidelityError(
                f"arnoldi: the {self.curvature} of {trained.problem.name!r} has a kept eigenvalue "
                f"{smallest:.3g} that damping {self.damping:g} does not make positive; set damping "
                f"above {-smallest:.3g} or use curvature='gnh'"
            )
        return {
            "krylov_steps": found,
            "rank": int(keep.numel()),
            "top_eigenvalue": float(self.eigenvalues_[0]),
            "smallest_kept_eigenvalue": float(self.eigenvalues_.abs().min()),
        }

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        coordinates = vectors @ self.eigenvectors_.T  # [m, k]
        return (coordinates / (self.eigenvalues_ + self.damping)) @ self.eigenvectors_
