"""Closed forms of J's gradient and Hessian for models affine in their parameters.

For f(theta, x) = W x + b (a bare ``nn.Linear``: logistic and ridge regression) the output is
linear in theta, so with X~ = [X, 1] and r_i = dL/df at example i,

    grad J = (1/N) sum_i w_i r_i x~_i^T + wd theta                    (one matrix product)
    H      = (1/N) sum_i w_i S_i (x) x~_i x~_i^T + wd I,  S_i = d^2 L / d f^2

exactly (the Gauss-Newton matrix is the Hessian: f has no curvature in theta). Many models'
gradients are then two matrix products over all models at once, where vmapped autograd builds
and walks a graph per call; the exact leave-one-out refits of convex problems spend most of
their time there. ``objective_gradients`` and ``objective_hessian`` in ``fidelity.core.objective``
use these forms when ``affine_form`` recognises the model and autograd otherwise; tests compare
both on every loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fidelity.core.problem import FunctionalModel


@dataclass(frozen=True)
class AffineForm:
    """Where W (``[k, d]``, row-major) and b (``[k]``, absent without bias) sit in theta."""

    in_features: int
    out_features: int
    weight_offset: int
    bias_offset: int | None

    @property
    def columns(self) -> int:
        """Columns of the augmented matrix [W, b]."""
        return self.in_features + (self.bias_offset is not None)

    def matrices(self, thetas: Tensor) -> Tensor:
        """``[B, k, columns]``: [W, b] of each row of ``thetas`` ``[B, p]``."""
        k, d = self.out_features, self.in_features
        weight = thetas[:, self.weight_offset : self.weight_offset + k * d].reshape(-1, k, d)
        if self.bias_offset is None:
            return weight
        bias = thetas[:, self.bias_offset : self.bias_offset + k].unsqueeze(-1)
        return torch.cat([weight, bias], dim=-1)

    def flatten(self, matrices: Tensor) -> Tensor:
        """The inverse of ``matrices``: ``[B, k, columns]`` -> ``[B, p]``."""
        k, d = self.out_features, self.in_features
        thetas = matrices.new_empty(matrices.shape[0], self.numel)
        thetas[:, self.weight_offset : self.weight_offset + k * d] = matrices[..., :d].reshape(
            -1, k * d
        )
        if self.bias_offset is not None:
            thetas[:, self.bias_offset : self.bias_offset + k] = matrices[..., d]
        return thetas

    @property
    def numel(self) -> int:
        return self.out_features * self.columns

    def design(self, x: Tensor) -> Tensor:
        """X~: the inputs, with a column of ones when there is a bias."""
        if self.bias_offset is None:
            return x
        return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)

    def theta_order(self) -> Tensor:
        """Index into theta of each entry of the flattened [W, b] (row-major, ``[k * columns]``)."""
        k, d = self.out_features, self.in_features
        order = torch.empty(k, self.columns, dtype=torch.long)
        order[:, :d] = self.weight_offset + torch.arange(k * d).reshape(k, d)
        if self.bias_offset is not None:
            order[:, d] = self.bias_offset + torch.arange(k)
        return order.reshape(-1)


def affine_form(model: FunctionalModel) -> AffineForm | None:
    """The layout of theta when ``model`` is a bare ``nn.Linear`` with all its parameters
    trained, else None (any other module, even an affine one, takes the autograd path)."""
    module = model.module
    if type(module) is not nn.Linear or any(True for _ in module.buffers()):
        return None
    offsets = dict(zip(model.spec.names, _offsets(model.spec.sizes), strict=True))
    if "weight" not in offsets or set(offsets) - {"weight", "bias"}:
        return None
    if module.bias is not None and "bias" not in offsets:
        return None  # a frozen bias is not part of theta: leave it to autograd
    return AffineForm(
        module.in_features, module.out_features, offsets["weight"], offsets.get("bias")
    )


def _offsets(sizes: tuple[int, ...]) -> list[int]:
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return starts


def output_gradients(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """dL/df for outputs ``[B, k, n]`` (classes on dim 1, so that the softmax reduces over a
    strided dimension, several times faster than over a last dimension of a few classes)."""
    if loss == "cross_entropy":
        probabilities = torch.softmax(outputs, dim=1)
        return probabilities.sub_(F.one_hot(targets, outputs.shape[1]).T.to(outputs.dtype))
    if loss == "bce":
        return torch.sigmoid(outputs).sub_(targets.T)
    if loss == "mse":
        return outputs - targets.T
    raise ValueError(f"unknown loss {loss!r}")


def output_hessians(loss: str, outputs: Tensor) -> Tensor:
    """d^2 L / d f^2 for outputs ``[n, k]``: ``[n, k, k]``."""
    if loss == "cross_entropy":
        probabilities = torch.softmax(outputs, dim=1)
        outer = probabilities.unsqueeze(2) * probabilities.unsqueeze(1)
        return torch.diag_embed(probabilities) - outer
    if loss == "bce":
        probabilities = torch.sigmoid(outputs)
        return torch.diag_embed(probabilities * (1 - probabilities))
    if loss == "mse":
        eye = torch.eye(outputs.shape[1], dtype=outputs.dtype, device=outputs.device)
        return eye.expand(outputs.shape[0], -1, -1)
    raise ValueError(f"unknown loss {loss!r}")


def affine_gradients(
    form: AffineForm,
    loss: str,
    x: Tensor,
    y: Tensor,
    thetas: Tensor,
    weights: Tensor,
    n_train: int,
) -> Tensor:
    """``[B, p]``: the gradient of (1/N) sum_i w_bi L(f(theta_b, x_i), y_i) for every model b
    (no regulariser), two matrix products over all models at once."""
    design = form.design(x)  # [n, c]
    matrices = form.matrices(thetas)  # [B, k, c]
    outputs = matrices @ design.T  # [B, k, n]
    residuals = output_gradients(loss, outputs, y).mul_((weights / n_train).unsqueeze(1))
    return form.flatten(residuals @ design)


def affine_hessian(
    form: AffineForm, loss: str, x: Tensor, theta: Tensor, weights: Tensor | None, n_train: int
) -> Tensor:
    """``[p, p]``: (1/N) sum_i w_i S_i (x) x~_i x~_i^T in theta's layout (no regulariser)."""
    design = form.design(x)  # [n, c]
    outputs = design @ form.matrices(theta.unsqueeze(0))[0].T  # [n, k]
    curvature = output_hessians(loss, outputs)  # [n, k, k]
    if weights is not None:
        curvature = curvature * weights[:, None, None]
    k, c = form.out_features, form.columns
    # block (a, b) = X~^T diag(S_ab) X~; one broadcast product per row of blocks bounds the
    # memory at k n c numbers
    rows = [
        design.T @ (curvature[:, a, :].T.unsqueeze(-1) * design) for a in range(k)
    ]  # each [k, c, c]
    hessian = torch.stack(rows).permute(0, 2, 1, 3).reshape(k * c, k * c) / n_train
    order = form.theta_order()
    result = torch.empty_like(hessian)
    result[order.unsqueeze(1), order.unsqueeze(0)] = hessian
    return result
