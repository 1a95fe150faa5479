"""Projected-gradient influence in the spirit of LoGra (Choe et al. 2024): each layer's gradient
projected on both sides by small random matrices (a Kronecker-structured projection), then the
damped empirical Fisher inverted in that space."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fidelity.core.checks import check_nonnegative, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.problem import TrainedProblem
from fidelity.estimators.base import InverseCurvatureEstimator
from fidelity.estimators.kfac import LayerBlock, check_layers, select_layers
from fidelity.estimators.trak import random_projection

PROJECTIONS = ("gaussian", "orthogonal")


class LograEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) g_t^T P (F + (wd + damping) I)^{-1} P^T g_j.

    P is block diagonal over the covered layers (nn.Linear and nn.Conv2d, as ``kfac`` covers
    them; ``layers`` selects some): a layer whose gradient is the ``[out, in (+1 for the
    bias)]`` matrix G is projected to P_out^T G P_in, ``[k_out, k_in]`` with k = min(
    ``factor_dim``, side): the Kronecker product P_out kron P_in acting on vec(G), as LoGra
    projects (its memory saving, projecting the activations and output gradients before their
    outer product, is not needed at this scale: the projected gradients are the same). The
    projections are Gaussian with E[P P^T] = I, or with orthonormal columns (``projection``),
    drawn per layer from ``seed`` and the layer's position. F = (1/N) sum_i (P^T g_i)(P^T g_i)^T
    is the empirical Fisher in the projected space (LoGra's raw Fisher), inverted densely.
    Uncovered parameters contribute nothing (listed in diagnostics). With orthogonal
    projections that keep every dimension it is ``exact`` with ``curvature="empirical-fisher"``
    and the same ``layers`` and damping. Same sign and units as ``exact``.
    """

    name = "logra"

    def __init__(
        self,
        *,
        factor_dim: int = 16,
        damping: float = 0.0,
        projection: str = "gaussian",
        layers: str | list[str] | None = None,
        seed: int = 0,
        batch_size: int = 512,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.factor_dim = check_positive_int(factor_dim, "logra.factor_dim")
        self.damping = check_nonnegative(damping, "logra.damping")
        if projection not in PROJECTIONS:
            raise FidelityError(
                f"logra.projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}"
            )
        self.projection = projection
        self.layers = check_layers(layers, self.name)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise FidelityError(f"logra.seed must be an integer, got {seed!r}")
        self.seed = seed

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        blocks, uncovered = select_layers(trained.model, self.layers)
        if not blocks:
            raise FidelityError(
                f"logra: {trained.problem.name!r} has no nn.Linear or nn.Conv2d layer to project"
            )
        self.blocks_: list[LayerBlock] = blocks
        self.projections_: list[tuple[Tensor, Tensor]] = []
        for position, block in enumerate(blocks):
            sides = []
            for side, size in enumerate((block.out_features, block.columns)):
                seed = self.seed + 2 * position + side
                dimension = min(self.factor_dim, size)
                sides.append(
                    random_projection(size, dimension, self.projection, seed, like=trained.theta)
                )
            self.projections_.append((sides[0], sides[1]))
        features = self._project(self.gradients(trained.problem.train))
        problem = trained.problem
        fisher = features.T @ features / problem.n_train
        fisher.diagonal().add_(problem.weight_decay + self.damping)
        factor, info = torch.linalg.cholesky_ex(fisher)
        if int(info) != 0:
            raise FidelityError(
                f"logra: the projected empirical Fisher of {problem.name!r} plus weight decay "
                f"and damping {self.damping:g} is singular; set damping > 0"
            )
        self.cholesky_ = factor
        return {
            "projected_dim": int(features.shape[1]),
            "layers": [block.name for block in blocks],
            "uncovered_parameters": uncovered,
        }

    def _project(self, vectors: Tensor) -> Tensor:
        """P^T v for each row of ``vectors`` ``[m, p]``: ``[m, sum_l k_out k_in]``."""
        parts = []
        for block, (outputs, inputs) in zip(self.blocks_, self.projections_, strict=True):
            matrices = block.matrices(vectors)  # [m, out, columns]
            parts.append((outputs.T @ matrices @ inputs).flatten(1))
        return torch.cat(parts, dim=1)

    def _lift(self, projected: Tensor) -> Tensor:
        """P u for each row of ``projected``: back to ``[m, p]`` (zero off the covered layers)."""
        result = projected.new_zeros(projected.shape[0], self.trained_.n_params)
        start = 0
        for block, (outputs, inputs) in zip(self.blocks_, self.projections_, strict=True):
            rows, columns = outputs.shape[1], inputs.shape[1]
            small = projected[:, start : start + rows * columns].reshape(-1, rows, columns)
            block.scatter(outputs @ small @ inputs.T, result)
            start += rows * columns
        return result

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        projected = self._project(vectors)
        solved = torch.cholesky_solve(projected.T, self.cholesky_).T
        return self._lift(solved)
