"""The estimator contract shared by every influence estimator.

An estimator is configured in ``__init__`` (validation only, no work), ``fit(trained)`` does the
expensive curvature work and returns ``self`` (fitted state ends in ``_``), and
``scores(test, train)`` returns ``delta_hat[t, j]``, the predicted change of test point t's loss
when training point j is REMOVED (DESIGN.md), shaped ``[n_test, n_train]``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

from torch import Tensor

from fidelity.core.checks import check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import mixed_input_gradients, per_example_grads
from fidelity.core.problem import Examples, Problem, TrainedProblem
from fidelity.core.registry import constructor_params


class Estimator(ABC):
    """Base class: sklearn-style parameters, fit/scores lifecycle, diagnostics."""

    name: ClassVar[str]
    # Whether the estimator follows theta_s's minibatch training run (it then needs a problem
    # with a minibatch recipe, and the runner records the run when it trains theta_s).
    training_path: ClassVar[bool] = False

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, as configured (used in results and cache keys)."""
        return constructor_params(self)

    def check_problem(self, problem: Problem) -> None:
        """Refuse, with a FidelityError, a problem this estimator cannot run on, before any
        compute (the runner calls it in preflight). Default: any problem."""
        return None

    @abstractmethod
    def fit(self, trained: TrainedProblem) -> Self:
        """Do the curvature work for ``trained``; return self."""

    @abstractmethod
    def scores(self, test: Examples, train: Examples) -> Tensor:
        """``[n_test, n_train]`` predicted deltas for removal, in DESIGN.md's convention."""

    def parameter_changes(self, train: Examples) -> Tensor | None:
        """Predicted theta_without_j - theta_s for each row of ``train``, ``[n_train, p]``, or
        None where the estimator predicts no parameter change (used by the decomposition's
        output-space gap)."""
        return None

    @property
    def diagnostics(self) -> dict[str, Any]:
        """Iterations, residuals, flags and seconds of the last fit/scores (JSON-serialisable)."""
        return dict(getattr(self, "diagnostics_", {}))

    def _check_fitted(self) -> TrainedProblem:
        trained = getattr(self, "trained_", None)
        if trained is None:
            raise FidelityError(f"estimator {self.name!r} must be fitted before scores()")
        return trained


@runtime_checkable
class GroupEffects(Protocol):
    """An estimator that predicts the effect of reweighting the whole training set at once
    (not the sum of single-point deltas): the group and subset stages use this prediction."""

    name: ClassVar[str]

    def group_effects(self, test: Examples, weights: Tensor, target: str = "loss") -> Tensor:
        """``[m, n_test]``: the predicted change of ``target`` on each test point when the
        training weights become each row of ``weights`` ``[m, N]`` (1 kept, 0 removed)."""
        ...


def perturbation_effects(gradients: Tensor, directions: Tensor) -> Tensor:
    """``[n_test, n_train]``: the first-order change of each test point's loss when training
    input j moves by ``directions[j]`` (any size: the change is linear in it), from
    ``perturbation_gradients`` ``[n_test, n_train, *input_shape]``."""
    if directions.shape != gradients.shape[1:]:
        raise FidelityError(
            f"a perturbation direction per training point must be shaped "
            f"{tuple(gradients.shape[1:])} (training points x input), got {tuple(directions.shape)}"
        )
    return (gradients * directions.unsqueeze(0)).flatten(2).sum(-1)


class InverseCurvatureEstimator(Estimator):
    """Template for estimators of the form (1/N) g_t^T C^{-1} g_j.

    Subclasses implement ``_fit_curvature`` and ``_inverse_curvature_product`` (the product of
    the inverse of their curvature approximation, damping included, with a batch of vectors);
    per-example gradients, batching and the final products are common code here.
    """

    def __init__(self, *, batch_size: int = 512) -> None:
        self.batch_size = check_positive_int(batch_size, f"{self.name}.batch_size")

    @abstractmethod
    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        """Prepare the curvature; return diagnostics."""

    @abstractmethod
    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        """C^{-1} v for each row v of ``vectors`` ``[m, p]``; returns ``[m, p]``."""

    def fit(self, trained: TrainedProblem) -> Self:
        start = time.perf_counter()
        self.trained_ = trained
        details = self._fit_curvature(trained)
        self.diagnostics_ = {**details, "fit_seconds": time.perf_counter() - start}
        return self

    def gradients(self, data: Examples) -> Tensor:
        """Per-example loss gradients at theta_s, ``[n, p]``."""
        trained = self._check_fitted()
        return per_example_grads(
            trained.model, trained.problem.loss, trained.theta, data, self.batch_size
        )

    def parameter_changes(self, train: Examples) -> Tensor | None:
        """(1/N) C^{-1} g_j: the first-order parameter change of removing j, ``[n_train, p]``."""
        trained = self._check_fitted()
        return self._inverse_curvature_product(self.gradients(train)) / trained.problem.n_train

    def perturbation_gradients(self, test: Examples, train: Examples) -> Tensor:
        """``[n_test, n_train, *input_shape]``: d m(z_t, theta_hat) / d x_j, the first-order
        change of test point t's loss per unit change of training input x_j (the rest of the
        training set, and the label y_j, fixed):

            -(1/N) (d/dx_j grad_theta L(z_j))^T (C + damping I)^{-1} g_t

        (Koh & Liang's I_pert,loss, in DESIGN.md's units: the refit theta_hat(x_j) moves by
        -(1/N) C^{-1} d/dx_j grad_theta L(z_j) dx_j). Moving x_j to x_j + eps v changes the loss by
        eps <gradient, v> to first order (``perturbation_effects``); positive: the move raises
        t's loss. One inverse-curvature product per test point, then the mixed second derivative
        of each training point's loss along it (torch.func, no new solver code)."""
        trained = self._check_fitted()
        solved = self._inverse_curvature_product(self.gradients(test))
        problem = trained.problem
        mixed = mixed_input_gradients(
            trained.model, problem.loss, trained.theta, solved, train, self.batch_size
        )
        return -mixed / problem.n_train

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        solved = self._inverse_curvature_product(self.gradients(test))
        deltas = solved @ self.gradients(train).T / trained.problem.n_train
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return deltas
