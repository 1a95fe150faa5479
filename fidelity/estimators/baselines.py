"""Cheap baselines: the floor every real estimator must beat."""

from __future__ import annotations

import time
from typing import Any, Self

import torch
from torch import Tensor

from fidelity.core.checks import check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.estimators.base import Estimator, InverseCurvatureEstimator
from fidelity.estimators.kfac import check_layers, parameter_subset


class GradDotEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) g_t^T g_j: influence with the curvature replaced by the identity.

    Same sign convention as influence (positive: removing j is predicted to raise t's loss), in
    loss units only up to the missing curvature scale. ``layers`` (fnmatch patterns of module
    names, as for ``kfac``) keeps only the gradients of those nn.Linear/nn.Conv2d layers (the
    others count as zero), as libraries that track layers rather than parameters compute it.
    """

    name = "grad-dot"

    def __init__(self, *, layers: str | list[str] | None = None, batch_size: int = 512) -> None:
        super().__init__(batch_size=batch_size)
        self.layers = check_layers(layers, self.name)

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        self.subset_: Tensor | None = None
        if self.layers is None:
            return {"n_params": trained.n_params}
        self.subset_, uncovered = parameter_subset(trained.model, self.layers)
        return {"n_params": int(self.subset_.numel()), "uncovered_parameters": uncovered}

    def gradients(self, data: Examples) -> Tensor:
        gradients = super().gradients(data)
        if self.subset_ is None:
            return gradients
        kept = torch.zeros_like(gradients)
        columns = self.subset_.to(gradients.device)
        kept[:, columns] = gradients[:, columns]
        return kept

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


def penultimate_features(trained: TrainedProblem, data: Examples, batch_size: int) -> Tensor:
    """``[n, d]``: the input of the model's last ``nn.Linear`` (the last one called in a
    forward pass) at theta_s, flattened: the representation its head reads. For a linear model
    these are the inputs themselves; for the text problems the encoder's sentence features."""
    linears = [m for m in trained.model.module.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise FidelityError(
            f"representation needs a model whose head is an nn.Linear; {trained.problem.name!r} "
            "has none"
        )
    seen: list[Tensor] = []

    def keep(module: torch.nn.Module, inputs: tuple[Tensor, ...]) -> None:
        seen.append(inputs[0])

    handles = [linear.register_forward_pre_hook(keep) for linear in linears]
    parts = []
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                seen.clear()
                trained.model(trained.theta, data.x[start : start + batch_size])
                parts.append(seen[-1].reshape(seen[-1].shape[0], -1))
    finally:
        for handle in handles:
            handle.remove()
    if not parts:
        return trained.theta.new_zeros((0, linears[-1].in_features))
    return torch.cat(parts)


class RepresentationEstimator(Estimator):
    """delta_hat[t, j] = s_tj cos(h_t, h_j): representation similarity, a ranking score with
    influence's sign, not a loss change.

    h is the input of the model's last nn.Linear at theta_s (``penultimate_features``: the
    penultimate layer of a network, the inputs of a linear model, the encoder's sentence
    features on the text problems). With ``signed`` (default) s_tj is +1 when the training
    point's label agrees with the test point's and -1 otherwise (classification), or the sign
    of the product of their residuals f - y (regression): a similar point of another class is
    predicted to hurt, as influence would say. ``signed=False``: the plain cosine. On
    attribution benchmarks such baselines are competitive with gradient methods (Hanawa et al.
    2021); an estimator that does not beat it should be seen not to.
    """

    name = "representation"

    def __init__(self, *, signed: bool = True, batch_size: int = 512) -> None:
        if not isinstance(signed, bool):
            raise FidelityError(f"representation.signed must be true or false, got {signed!r}")
        self.signed = signed
        self.batch_size = check_positive_int(batch_size, "representation.batch_size")

    def fit(self, trained: TrainedProblem) -> Self:
        # Nothing to fit: the features are read at theta_s when scoring.
        self.trained_ = trained
        self.diagnostics_: dict[str, Any] = {"fit_seconds": 0.0}
        return self

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        test_features = penultimate_features(trained, test, self.batch_size)
        train_features = penultimate_features(trained, train, self.batch_size)
        tiny = torch.finfo(test_features.dtype).tiny
        test_features = test_features / test_features.norm(dim=1, keepdim=True).clamp_min(tiny)
        train_features = train_features / train_features.norm(dim=1, keepdim=True).clamp_min(tiny)
        similarity = test_features @ train_features.T
        if self.signed:
            similarity = similarity * _agreement(trained.problem.loss, test, train, trained)
        self.diagnostics_["feature_dim"] = int(test_features.shape[1])
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return similarity


def _agreement(loss: str, test: Examples, train: Examples, trained: TrainedProblem) -> Tensor:
    """``[n_test, n_train]`` of +1 / -1: labels agree (classification), or residuals share a
    sign (regression; a zero residual gives 0)."""
    if loss == "cross_entropy":
        same = test.y[:, None] == train.y[None, :]
    elif loss == "bce":
        same = (test.y[:, None, :] == train.y[None, :, :]).all(-1)
    else:
        with torch.no_grad():
            test_residual = trained.model(trained.theta, test.x) - test.y
            train_residual = trained.model(trained.theta, train.x) - train.y
        return torch.sign(test_residual @ train_residual.T)
    return same.to(trained.theta.dtype) * 2 - 1
