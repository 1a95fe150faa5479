"""DataInf (Kwon et al. 2024): a closed-form inverse of each layer's damped empirical Fisher,
swapping the inverse of the average of rank-one terms for the average of their inverses."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fidelity.core.checks import check_nonnegative
from fidelity.core.errors import FidelityError
from fidelity.core.problem import FunctionalModel, TrainedProblem
from fidelity.estimators.base import InverseCurvatureEstimator


def layer_slices(model: FunctionalModel) -> list[tuple[str, slice]]:
    """The flat parameter vector cut into layers: consecutive parameters of the same module
    (``block.weight`` and ``block.bias``) form one layer, named by the module."""
    layers: list[tuple[str, slice]] = []
    start = 0
    for name, size in zip(model.spec.names, model.spec.sizes, strict=True):
        module = name.rpartition(".")[0]
        if layers and layers[-1][0] == module and layers[-1][1].stop == start:
            layers[-1] = (module, slice(layers[-1][1].start, start + size))
        else:
            layers.append((module, slice(start, start + size)))
        start += size
    return layers


class DataInfEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) g_t^T C^{-1} g_j with DataInf's block-diagonal inverse (Kwon et al.
    2024, Eq. 5): for each layer l (a module's parameters),

        C_l^{-1} = (1/N) sum_i (1/lambda_l) (I - g_il g_il^T / (lambda_l + ||g_il||^2)),

    the average over training points of the Sherman-Morrison inverses of g_il g_il^T + lambda_l I,
    standing in for the inverse of their average, the damped empirical Fisher
    (1/N) sum_i g_il g_il^T + lambda_l I (no weight decay: DataInf's curvature). The swap is exact
    for one training point and its error grows with the layer's width (the paper targets LoRA
    adapters). ``damping``: lambda_l for every layer; ``"auto"`` (default) takes DataInf's rule,
    0.1 x the mean of ||g_il||^2 over the training set, per layer. Same sign and units as
    ``exact``: positive, removing j raises t's loss.
    """

    name = "datainf"

    def __init__(self, *, damping: float | str = "auto", batch_size: int = 512) -> None:
        super().__init__(batch_size=batch_size)
        if damping != "auto":
            damping = check_nonnegative(damping, "datainf.damping")
            if damping == 0:
                raise FidelityError(
                    "datainf.damping must be positive (each rank-one term is inverted), or "
                    "'auto' for DataInf's rule"
                )
        self.damping = damping

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        grads = self.gradients(trained.problem.train)
        self.layers_: list[tuple[str, slice, float, Tensor, Tensor]] = []
        for name, where in layer_slices(trained.model):
            block = grads[:, where]
            squared_norms = block.pow(2).sum(1)
            damping = (
                0.1 * float(squared_norms.mean()) if self.damping == "auto" else float(self.damping)
            )
            if not damping > 0:
                raise FidelityError(
                    f"datainf: every training gradient of layer {name!r} of "
                    f"{trained.problem.name!r} is zero, so DataInf's damping rule gives 0; "
                    "set datainf.damping"
                )
            self.layers_.append((name, where, damping, block, 1.0 / (damping + squared_norms)))
        return {
            "layers": [name for name, *_ in self.layers_],
            "damping": {name: damping for name, _, damping, *_ in self.layers_},
        }

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        n_train = self.trained_.problem.n_train
        result = torch.empty_like(vectors)
        for _, where, damping, block, weights in self.layers_:
            part = vectors[:, where]
            projected = (part @ block.T) * weights
            result[:, where] = (part - projected @ block / n_train) / damping
        return result
