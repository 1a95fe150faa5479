"""Estimators that each break one rule of the estimator contract (for check_estimator)."""

import torch
from torch import Tensor

from fidelity.core.problem import Examples
from fidelity.estimators import Estimator, ExactEstimator


class FlippedSign(ExactEstimator):
    """Upweighting's sign instead of removal's."""

    def scores(self, test: Examples, train: Examples) -> Tensor:
        return -super().scores(test, train)


class Transposed(ExactEstimator):
    def scores(self, test: Examples, train: Examples) -> Tensor:
        return super().scores(test, train).T


class ReturnsNone(ExactEstimator):
    def fit(self, trained):
        super().fit(trained)


class FittedInInit(ExactEstimator):
    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.curvature_ = torch.eye(2)


class ForgetsItsSettings(ExactEstimator):
    """get_params() reports a damping other than the one it was given."""

    def get_params(self):
        return {**super().get_params(), "damping": self.damping + 1.0}


class Noisy(ExactEstimator):
    def scores(self, test: Examples, train: Examples) -> Tensor:
        values = super().scores(test, train)
        return values + 1e-3 * values.abs().max() * torch.rand(values.shape, dtype=values.dtype)


class IgnoresTheTestPoints(ExactEstimator):
    """Scores every row with the first test point's gradients."""

    def scores(self, test: Examples, train: Examples) -> Tensor:
        first = test.subset(torch.zeros(len(test), dtype=torch.long))
        return super().scores(first, train)


class MutatesTheta(ExactEstimator):
    def fit(self, trained):
        trained.theta.add_(1e-3)
        return super().fit(trained)


class NotFinite(ExactEstimator):
    def scores(self, test: Examples, train: Examples) -> Tensor:
        values = super().scores(test, train).clone()
        values[0, 0] = float("nan")
        return values


class Abstract(Estimator):
    name = "abstract"

    def fit(self, trained):
        return self
