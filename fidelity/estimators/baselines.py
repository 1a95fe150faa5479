"""Cheap baselines: the floor every real estimator must beat."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fidelity.core.errors import FidelityError
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.estimators.base import InverseCurvatureEstimator


class GradDotEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) g_t^T g_j: influence with the curvature replaced by the identity.

    Same sign convention as influence (positive: removing j is predicted to raise t's loss), in
    loss units only up to the missing curvature scale.
    """

    name = "grad-dot"

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        return {"n_params": trained.n_params}

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        return vectors


class GradCosEstimator(GradDotEstimator):
    """delta_hat[t, j] = cos(g_t, g_j): a ranking score with influence's sign, not a loss change.

    Only its correlations are meaningful (its values lie in [-1, 1] whatever the loss scale).
    """

    name = "grad-cos"

    def parameter_changes(self, train: Examples) -> Tensor | None:
        return None  # a ranking score: it predicts no parameter change

    def perturbation_gradients(self, test: Examples, train: Examples) -> Tensor:
        raise FidelityError(
            "grad-cos is a ranking score, not a loss change: it has no perturbation estimand "
            "(use grad-dot)"
        )

    def scores(self, test: Examples, train: Examples) -> Tensor:
        self._check_fitted()
        test_grads, train_grads = self.gradients(test), self.gradients(train)
        tiny = torch.finfo(test_grads.dtype).tiny
        test_grads = test_grads / test_grads.norm(dim=1, keepdim=True).clamp_min(tiny)
        train_grads = train_grads / train_grads.norm(dim=1, keepdim=True).clamp_min(tiny)
        return test_grads @ train_grads.T
