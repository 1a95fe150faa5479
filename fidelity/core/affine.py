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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fidelity.core.problem import FunctionalModel

CHUNK_BYTES = 2 << 20  # outputs of the models evaluated together by a gradient function


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


def output_targets(loss: str, targets: Tensor, outputs: int, dtype: torch.dtype) -> Tensor:
    """``[k, n]``: what the link of each output is compared with in dL/df (one-hot classes for
    cross-entropy, the targets themselves for bce and mse), classes first."""
    if loss == "cross_entropy":
        return F.one_hot(targets, outputs).T.to(dtype).contiguous()
    if loss in ("bce", "mse"):
        return targets.T.to(dtype).contiguous()
    raise ValueError(f"unknown loss {loss!r}")


def output_link(loss: str, outputs: Tensor) -> Tensor:
    """The inverse link of outputs ``[B, k, n]`` (classes on dim 1, so that the softmax reduces
    over a strided dimension, several times faster than over a last dimension of a few
    classes), such that dL/df = link - target."""
    if loss == "cross_entropy":
        return torch.softmax(outputs, dim=1)
    if loss == "bce":
        return torch.sigmoid(outputs)
    if loss == "mse":
        return outputs
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


def affine_gradient_function(
    form: AffineForm, loss: str, x: Tensor, y: Tensor, n_train: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """A function of parameters ``[B, p]`` and weights ``[B, n]`` returning ``[B, p]``: the
    gradient of (1/N) sum_i w_bi L(f(theta_b, x_i), y_i) for every model b (no regulariser).

    Everything that does not depend on theta (the transposed inputs, the targets in output
    layout) is prepared once; a call is two matrix products over all models at once (the
    models' weight matrices stacked into one ``[B k, d]`` operand, a single GEMM at the BLAS
    peak), the link and the bias as a row sum.
    """
    k, d = form.out_features, form.in_features
    inputs = x.contiguous()  # [n, d]
    inputs_t = x.T.contiguous()  # [d, n]
    targets = output_targets(loss, y, k, x.dtype)  # [k, n]
    weight = slice(form.weight_offset, form.weight_offset + k * d)
    bias = None if form.bias_offset is None else slice(form.bias_offset, form.bias_offset + k)

    # Models go through in chunks whose outputs fit in about 2 MiB: the link, the target and
    # the weights then pass over data still in cache (twice as fast on digits-logreg's 100
    # models as one pass over all of them).
    chunk = max(1, CHUNK_BYTES // (x.element_size() * k * max(x.shape[0], 1)))

    def gradients(thetas: Tensor, weights: Tensor) -> Tensor:
        result = thetas.new_empty(thetas.shape)
        for start in range(0, thetas.shape[0], chunk):
            part = slice(start, start + chunk)
            models = thetas[part].shape[0]
            matrices = thetas[part, weight].reshape(models * k, d)
            if bias is None:
                outputs = matrices @ inputs_t
            else:
                outputs = torch.addmm(thetas[part, bias].reshape(models * k, 1), matrices, inputs_t)
            residuals = output_link(loss, outputs.view(models, k, -1)).sub_(targets)
            residuals.mul_((weights[part] / n_train).unsqueeze(1))  # [models, k, n]
            result[part, weight] = (residuals.view(models * k, -1) @ inputs).view(models, k * d)
            if bias is not None:
                result[part, bias] = residuals.sum(dim=2)
        return result

    return gradients


def affine_example_gradients(
    form: AffineForm, loss: str, x: Tensor, y: Tensor, theta: Tensor
) -> Tensor:
    """``[n, p]``: the gradient of each example's loss L(f(theta, x_i), y_i) (no 1/N, no
    regulariser), r_i x~_i^T in theta's layout, with r_i = link - target; what
    ``per_example_grads`` computes by vmapped autograd."""
    design = form.design(x)  # [n, c]
    outputs = design @ form.matrices(theta.unsqueeze(0))[0].T  # [n, k]
    link = output_link(loss, outputs.T.unsqueeze(0))[0]  # [k, n]
    residuals = link - output_targets(loss, y, form.out_features, x.dtype)  # [k, n]
    return form.flatten(residuals.T.unsqueeze(2) * design.unsqueeze(1))


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
    # block (a, b) = X~^T diag(S_ab) X~ = block (b, a)^T: only b >= a is computed, one GEMM
    # per row of blocks, X~^T [S_aa X~ | ... | S_ak X~] (memory bounded by k n c numbers; 17%
    # faster on digits-logreg than a batched product of the k - a blocks)
    n = design.shape[0]
    blocks = design.new_empty(k, k, c, c)
    for a in range(k):
        weighted = (curvature[:, a, a:].unsqueeze(-1) * design.unsqueeze(1)).reshape(n, -1)
        upper = (design.T @ weighted).reshape(c, k - a, c).transpose(0, 1)  # [k - a, c, c]
        blocks[a, a:] = upper
        blocks[a + 1 :, a] = upper[1:].transpose(1, 2)
    hessian = blocks.permute(0, 2, 1, 3).reshape(k * c, k * c) / n_train
    order = form.theta_order()
    result = torch.empty_like(hessian)
    result[order.unsqueeze(1), order.unsqueeze(0)] = hessian
    return result
