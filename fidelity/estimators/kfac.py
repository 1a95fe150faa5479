"""Kronecker-factored curvature: K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse &
Martens 2016) and EK-FAC (George et al. 2018; Grosse et al. 2023).

For a layer with weight matrix W (out x in, a bias as one more input column of ones), input
activations a and pre-activation gradients s, the per-example gradient is sum_t s_t a_t^T (t:
spatial positions of a convolution, one for a linear layer), and the Fisher block is
approximated by S kron A with

    A = (1/N) sum_i (1/T) sum_t a_it a_it^T,   S = (1/N) sum_i sum_c sum_t s_ict s_ict^T

(c: the backward directions of the chosen Fisher, below). With A = Q_A diag(l_A) Q_A^T and
S = Q_S diag(l_S) Q_S^T, K-FAC's eigenvalues in the Kronecker eigenbasis are l_S[o] l_A[i];
EK-FAC replaces them by the exact second moments of the per-example gradients in that basis,
Lambda[o, i] = (1/N) sum_i sum_c ((Q_S^T D_ic Q_A)[o, i])^2. Nothing of size p x p is formed.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fidelity.core.checks import check_int, check_nonnegative
from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs, output_hessian_factor
from fidelity.core.problem import Examples, FunctionalModel, TrainedProblem
from fidelity.estimators.base import InverseCurvatureEstimator

FISHERS = ("expected", "sampled", "empirical")
CONVOLUTIONS = ("expand", "reduce")
DEFAULT_DAMPING_RATIO = 0.1  # of each layer's mean eigenvalue, when no damping is given
SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerBlock:
    """Where one covered layer's parameters sit in theta, as an [out, in (+1)] matrix."""

    name: str
    module: nn.Module
    weight: slice
    bias: slice | None
    out_features: int
    in_features: int  # columns of the weight matrix (in_channels x kernel size for Conv2d)

    @property
    def columns(self) -> int:
        return self.in_features + (self.bias is not None)

    def matrices(self, vectors: Tensor) -> Tensor:
        """Rows of ``vectors`` ``[m, p]`` as this layer's ``[m, out, columns]`` matrices."""
        weight = vectors[:, self.weight].reshape(-1, self.out_features, self.in_features)
        if self.bias is None:
            return weight
        return torch.cat([weight, vectors[:, self.bias].unsqueeze(-1)], dim=-1)

    def scatter(self, matrices: Tensor, out: Tensor) -> None:
        """Write ``[m, out, columns]`` matrices back into the rows of ``out`` ``[m, p]``."""
        out[:, self.weight] = matrices[..., : self.in_features].reshape(out.shape[0], -1)
        if self.bias is not None:
            out[:, self.bias] = matrices[..., -1]


def select_layers(
    model: FunctionalModel, layers: str | Sequence[str] | None
) -> tuple[list[LayerBlock], list[str]]:
    """The covered layers (``layers``: None for every supported layer, or fnmatch patterns of
    module names such as ``"mlp.*"``) and the names of the parameters left uncovered."""
    patterns = [layers] if isinstance(layers, str) else None if layers is None else list(layers)
    offsets, position = {}, 0
    for name, size in zip(model.spec.names, model.spec.sizes, strict=True):
        offsets[name] = slice(position, position + size)
        position += size
    blocks = []
    for name, module in model.module.named_modules():
        if not isinstance(module, SUPPORTED_LAYERS):
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            continue  # reported as uncovered below
        prefix = f"{name}." if name else ""
        weight_name, bias_name = f"{prefix}weight", f"{prefix}bias"
        if weight_name not in offsets:
            continue
        weight = module.weight
        blocks.append(
            LayerBlock(
                name=name,
                module=module,
                weight=offsets[weight_name],
                bias=offsets.get(bias_name),
                out_features=weight.shape[0],
                in_features=weight[0].numel(),
            )
        )
    if patterns is not None and not blocks:
        raise FidelityError(f"layers {patterns} match no nn.Linear or nn.Conv2d module")
    covered = set()
    for block in blocks:
        prefix = f"{block.name}." if block.name else ""
        covered.add(f"{prefix}weight")
        if block.bias is not None:
            covered.add(f"{prefix}bias")
    return blocks, [name for name in model.spec.names if name not in covered]


def check_layers(layers: object, owner: str) -> str | list[str] | None:
    """Validate a ``layers`` setting: None, one fnmatch pattern, or a list of them."""
    if layers is None or isinstance(layers, str):
        return layers
    if isinstance(layers, list | tuple) and all(isinstance(p, str) for p in layers):
        return list(layers)
    raise FidelityError(f"{owner}.layers must be a pattern or a list of patterns")


def parameter_subset(
    model: FunctionalModel, layers: str | Sequence[str]
) -> tuple[Tensor, list[str]]:
    """theta indices of the parameters of the layers ``layers`` selects, and the names of the
    parameters left out."""
    blocks, uncovered = select_layers(model, layers)
    pieces = [torch.arange(b.weight.start, b.weight.stop) for b in blocks]
    pieces += [torch.arange(b.bias.start, b.bias.stop) for b in blocks if b.bias is not None]
    return torch.cat(pieces).sort().values, uncovered


def layer_inputs(block: LayerBlock, inputs: Tensor) -> Tensor:
    """Activations ``[B, T, in (+1)]`` of one layer (unfolded patches for Conv2d)."""
    module = block.module
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(
            inputs,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,  # type: ignore[arg-type]  # a tuple here: see select_layers
            stride=module.stride,
        ).transpose(1, 2)
    else:
        patches = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    if block.bias is not None:
        patches = torch.cat([patches, patches.new_ones((*patches.shape[:-1], 1))], dim=-1)
    return patches


def layer_output_grads(block: LayerBlock, grads: Tensor) -> Tensor:
    """Pre-activation gradients ``[B, T, out]`` of one layer."""
    if isinstance(block.module, nn.Conv2d):
        return grads.flatten(2).transpose(1, 2)
    return grads.reshape(grads.shape[0], -1, grads.shape[-1])


def backward_directions(
    loss: str, fisher: str, outputs: Tensor, targets: Tensor, generator: torch.Generator | None
) -> list[Tensor]:
    """Per-example output-space vectors v (each ``[B, k]``) whose back-propagation gives the
    pre-activation gradients of the Fisher: the rows of the output-Hessian factor
    (``expected``: sum over them is the Gauss-Newton matrix exactly), the loss gradient at
    labels sampled from the model (``sampled``, the true Fisher), or at the training labels
    (``empirical``)."""
    detached = outputs.detach()
    if fisher == "expected":
        factor = output_hessian_factor(loss, detached, targets)  # [B, k, k], R R^T = H_out
        return [factor[:, :, c] for c in range(factor.shape[-1])]
    if fisher == "sampled":
        targets = sampled_targets(loss, detached, generator)
    return [
        torch.func.grad(lambda o: loss_from_outputs(loss, o, targets).sum())(detached),
    ]


def sampled_targets(loss: str, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Targets drawn from the model's predictive distribution at ``outputs`` (categorical for
    cross-entropy, Bernoulli for bce, unit-variance Gaussian for mse), on the CPU generator."""
    outputs = outputs.detach()
    if loss == "cross_entropy":
        probabilities = torch.softmax(outputs, dim=-1).cpu()
        drawn = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        return drawn.to(outputs.device)
    if loss == "bce":
        probabilities = torch.sigmoid(outputs).cpu()
        return torch.bernoulli(probabilities, generator=generator).to(outputs)
    # mse is the Gaussian negative log-likelihood with unit variance
    noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
    return outputs + noise.to(outputs.device)


class _Capture:
    """Forward hooks that record each covered layer's input and add a zero probe to its output,
    so that the gradient with respect to the probe is the pre-activation gradient."""

    def __init__(self, blocks: list[LayerBlock]) -> None:
        self.blocks = blocks
        self.inputs: dict[str, Tensor] = {}
        self.probes: dict[str, Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> _Capture:
        for block in self.blocks:
            self.handles.append(block.module.register_forward_hook(self._hook(block.name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            probe = torch.zeros_like(output, requires_grad=True)
            self.inputs[name] = args[0].detach()
            self.probes[name] = probe
            return output + probe

        return hook


def layer_statistics(
    trained: TrainedProblem,
    blocks: list[LayerBlock],
    data: Examples,
    fisher: str,
    batch_size: int,
    generator: torch.Generator | None,
):
    """Yield, per batch, each layer's activations ``[B, T, in (+1)]`` and a list (one entry per
    backward direction) of pre-activation gradients ``[B, T, out]``."""
    model, loss = trained.model, trained.problem.loss
    theta = trained.theta.detach()
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size], data.y[start : start + batch_size]
        with torch.enable_grad(), _Capture(blocks) as capture:
            outputs = model(theta, x)
            directions = backward_directions(loss, fisher, outputs, y, generator)
            probes = [capture.probes[block.name] for block in blocks]
            per_direction = []
            for index, direction in enumerate(directions):
                grads = torch.autograd.grad(
                    (outputs * direction).sum(),
                    probes,
                    retain_graph=index + 1 < len(directions),
                )
                per_direction.append(
                    [layer_output_grads(b, g) for b, g in zip(blocks, grads, strict=True)]
                )
        activations = [layer_inputs(b, capture.inputs[b.name]) for b in blocks]
        yield activations, per_direction


class KroneckerEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) g_t^T (F_kron + (wd + damping_l) I)^{-1} g_j over the covered
    layers, with F_kron the K-FAC (``ekfac=False``) or EK-FAC Fisher blocks described in the
    module docstring: the influence of removing j (epsilon = -1/N, positive = j helped) with
    the Gauss-Newton matrix replaced by a block-diagonal Kronecker approximation. Parameters of
    layers that are not covered contribute nothing and are listed in diagnostics.

    ``fisher``: ``"expected"`` (default; backward passes through the output-Hessian factor, so
    the factors average the exact Gauss-Newton terms), ``"sampled"`` (labels drawn from the
    model with ``seed``: the true Fisher of Grosse et al. and kronfluence) or ``"empirical"``
    (training labels). Damping of layer l: ``damping`` (absolute, added to the curvature as
    everywhere in fidelity) plus ``damping_ratio`` x the mean eigenvalue of the layer (the
    relative form of Grosse et al. 2023); with neither given, ``damping_ratio = 0.1``, with
    one given the other is 0. Weight decay is added to every eigenvalue, as in ``gnh``.
    ``layers``: fnmatch patterns of module names (a string or list), default every nn.Linear
    and nn.Conv2d. ``convolution``: how a convolution's spatial positions enter the factors
    (Eschenhagen et al. 2023): ``"expand"`` (default; KFC, every position an example of the
    layer, as in the module docstring) or ``"reduce"`` (A from each example's mean patch, S from
    each example's gradient summed over positions: A = (1/N) sum_i abar_i abar_i^T,
    S = (1/N) sum_i sum_c sbar_ic sbar_ic^T); linear layers are the same in both.
    """

    ekfac = False

    def __init__(
        self,
        *,
        damping: float | None = None,
        damping_ratio: float | None = None,
        fisher: str = "expected",
        layers: str | list[str] | None = None,
        factor_dtype: str = "float64",
        convolution: str = "expand",
        seed: int = 0,
        batch_size: int = 512,
    ) -> None:
        super().__init__(batch_size=batch_size)
        if convolution not in CONVOLUTIONS:
            raise FidelityError(
                f"{self.name}.convolution must be one of {', '.join(CONVOLUTIONS)}, got "
                f"{convolution!r}"
            )
        self.convolution = convolution
        if damping is None and damping_ratio is None:
            damping_ratio = DEFAULT_DAMPING_RATIO
        self.damping = check_nonnegative(damping or 0.0, f"{self.name}.damping")
        self.damping_ratio = check_nonnegative(damping_ratio or 0.0, f"{self.name}.damping_ratio")
        if fisher not in FISHERS:
            raise FidelityError(
                f"{self.name}.fisher must be one of {', '.join(FISHERS)}, got {fisher!r}"
            )
        if factor_dtype not in ("float64", "float32"):
            raise FidelityError(f"{self.name}.factor_dtype must be float64 or float32")
        self.fisher = fisher
        self.layers = check_layers(layers, self.name)
        self.factor_dtype = factor_dtype
        self.seed = check_int(seed, f"{self.name}.seed")

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        blocks, uncovered = select_layers(trained.model, self.layers)
        if not blocks:
            raise FidelityError(
                f"{self.name}: {trained.problem.name!r} has no nn.Linear or nn.Conv2d layer"
            )
        dtype = getattr(torch, self.factor_dtype)
        n = trained.problem.n_train
        generator = torch.Generator().manual_seed(self.seed)
        zeros = trained.theta.new_zeros
        activation_cov = [zeros((b.columns, b.columns), dtype=dtype) for b in blocks]
        gradient_cov = [zeros((b.out_features, b.out_features), dtype=dtype) for b in blocks]
        tick = time.perf_counter()
        for activations, per_direction in layer_statistics(
            trained, blocks, trained.problem.train, self.fisher, self.batch_size, generator
        ):
            for index, a in enumerate(activations):
                a = a.to(dtype)
                reduce = self.convolution == "reduce"
                if reduce:
                    a = a.mean(dim=1, keepdim=True)
                activation_cov[index] += torch.einsum("bti,btj->ij", a, a) / a.shape[1] / n
                for grads in per_direction:
                    s = grads[index].to(dtype)
                    if reduce:
                        s = s.sum(dim=1, keepdim=True)
                    gradient_cov[index] += torch.einsum("bto,btq->oq", s, s) / n
        factor_seconds = time.perf_counter() - tick
        self.blocks_ = blocks
        self.bases_, self.eigenvalues_ = [], []
        for a_cov, s_cov in zip(activation_cov, gradient_cov, strict=True):
            a_values, a_vectors = torch.linalg.eigh(a_cov)
            s_values, s_vectors = torch.linalg.eigh(s_cov)
            self.bases_.append((s_vectors, a_vectors))
            self.eigenvalues_.append(torch.outer(s_values, a_values).clamp_min(0))
        if self.ekfac:
            # Same labels as the first pass, so both passes see one Fisher.
            generator = torch.Generator().manual_seed(self.seed)
            corrected = [torch.zeros_like(values) for values in self.eigenvalues_]
            for activations, per_direction in layer_statistics(
                trained, blocks, trained.problem.train, self.fisher, self.batch_size, generator
            ):
                for index, a in enumerate(activations):
                    s_vectors, a_vectors = self.bases_[index]
                    a = a.to(dtype)
                    for grads in per_direction:
                        per_example = torch.einsum("bto,bti->boi", grads[index].to(dtype), a)
                        rotated = s_vectors.T @ per_example @ a_vectors
                        corrected[index] += rotated.pow(2).sum(0) / n
            self.eigenvalues_ = corrected
        weight_decay = trained.problem.weight_decay
        # One term alone when only one is set, so each form is exactly what it says.
        self.dampings_ = [
            self.damping + self.damping_ratio * float(values.mean())
            if self.damping_ratio
            else self.damping
            for values in self.eigenvalues_
        ]
        self.denominators_ = [
            values + weight_decay + damping
            for values, damping in zip(self.eigenvalues_, self.dampings_, strict=True)
        ]
        if any(float(d.min()) <= 0 for d in self.denominators_):
            raise FidelityError(
                f"{self.name}: a Kronecker eigenvalue plus weight decay and damping is not "
                "positive; set damping above 0"
            )
        factor_bytes = sum(
            (s.numel() + a.numel()) * s.element_size() + d.numel() * d.element_size()
            for (s, a), d in zip(self.bases_, self.denominators_, strict=True)
        )
        return {
            "layers": [block.name for block in blocks],
            "uncovered_parameters": uncovered,
            "covered_params": sum(b.out_features * b.columns for b in blocks),
            "layer_dampings": self.dampings_,
            "factor_bytes": int(factor_bytes),
            "factor_seconds": factor_seconds,
        }

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        result = torch.zeros_like(vectors)
        for block, (s_vectors, a_vectors), denominator in zip(
            self.blocks_, self.bases_, self.denominators_, strict=True
        ):
            matrices = block.matrices(vectors).to(s_vectors.dtype)
            rotated = s_vectors.T @ matrices @ a_vectors
            solved = s_vectors @ (rotated / denominator) @ a_vectors.T
            block.scatter(solved.to(vectors.dtype), result)
        return result


class KfacEstimator(KroneckerEstimator):
    __doc__ = (
        "K-FAC: influence with each covered layer's curvature block replaced by S kron A.\n\n"
        + (KroneckerEstimator.__doc__ or "")
    )
    name = "kfac"


class EkfacEstimator(KroneckerEstimator):
    __doc__ = (
        "EK-FAC: K-FAC with eigenvalues corrected to the per-example gradients' moments.\n\n"
        + (KroneckerEstimator.__doc__ or "")
    )
    name = "ekfac"
    ekfac = True
