"""LiSSA influence: inverse-curvature products by the stochastic Neumann recursion
(Agarwal et al. 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fidelity.core.checks import check_int, check_nonnegative, check_positive_int
from fidelity.core.curvature import CurvatureOperator, check_curvature
from fidelity.core.errors import FidelityError
from fidelity.core.problem import TrainedProblem
from fidelity.estimators.base import InverseCurvatureEstimator


class LissaEstimator(InverseCurvatureEstimator):
    """delta_hat[t, j] = (1/N) h_t^T g_j, h_t the LiSSA estimate of (C + damping I)^{-1} g_t.

    Estimand: as ``exact``/``gnh`` (removal, epsilon = -1/N, positive = j helped), approximated
    by the stochastic Neumann recursion of Agarwal et al. (2017) as used by Koh & Liang:
    h_0 = v, h_t = v + h_{t-1} - (C_B h_{t-1} + damping h_{t-1}) / scale, result h_depth /
    scale, averaged over ``repeats`` runs. C_B is the curvature of the objective on a minibatch of
    ``minibatch_size`` examples drawn without replacement by a generator seeded with ``seed``
    (``minibatch_size=None`` uses the whole training set: deterministic). The recursion converges
    only if ``scale`` exceeds half the largest eigenvalue of C + damping I (and C + damping I is
    positive definite); ``scale="auto"`` sets it to that eigenvalue, estimated by 50 steps of
    power iteration at fit. A growing iterate is detected and reported with the scale to use,
    instead of returning garbage.

    What a finite answer is worth is measured, not assumed: after the recursion each column's
    full-batch relative residual ||(C + damping I) h - g_t|| / ||g_t|| is computed (as CG
    reports it) and columns above ``tol`` are counted as unconverged; at fit, 50 power steps on
    (largest I - C - damping I) estimate the smallest eigenvalue, and a clearly negative one
    (below -1e-6 x the largest) is flagged as ``indefinite``: the recursion then has no
    convergent inverse to approach, whatever it returns. Both reach the report's warnings.
    """

    name = "lissa"

    def __init__(
        self,
        *,
        damping: float = 0.0,
        curvature: str = "hessian",
        scale: float | str = "auto",
        depth: int = 1000,
        repeats: int = 1,
        minibatch_size: int | None = None,
        seed: int = 0,
        tol: float = 1e-2,
        batch_size: int = 512,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.damping = check_nonnegative(damping, "lissa.damping")
        self.curvature = check_curvature(curvature, "lissa")
        if scale != "auto":
            scale = check_nonnegative(scale, "lissa.scale")
            if scale == 0:
                raise FidelityError("lissa.scale must be > 0 or 'auto'")
        self.scale = scale
        self.depth = check_positive_int(depth, "lissa.depth")
        self.repeats = check_positive_int(repeats, "lissa.repeats")
        if minibatch_size is not None:
            check_positive_int(minibatch_size, "lissa.minibatch_size")
        self.minibatch_size = minibatch_size
        self.seed = check_int(seed, "lissa.seed")
        self.tol = check_nonnegative(tol, "lissa.tol")

    def _fit_curvature(self, trained: TrainedProblem) -> dict[str, Any]:
        self.operator_ = CurvatureOperator(trained, self.curvature, self.batch_size)
        largest = self._largest_eigenvalue()
        self.scale_ = largest if isinstance(self.scale, str) else float(self.scale)
        if self.scale_ <= largest / 2:
            # The full-batch recursion provably diverges; catching it here beats waiting for
            # the iterate to grow, which takes long when the scale is just below the limit.
            raise self._divergence(0, 0, float("nan"), float("nan"), largest)
        smallest = largest - self._largest_eigenvalue(shift=largest)
        return {
            "n_params": trained.n_params,
            "scale": self.scale_,
            "largest_eigenvalue": largest,
            "smallest_eigenvalue_estimate": smallest,
            "indefinite": bool(smallest < -1e-6 * abs(largest)),
        }

    def _largest_eigenvalue(self, iterations: int = 50, shift: float | None = None) -> float:
        """Power iteration on C + damping I, or on shift I - C - damping I."""
        generator = torch.Generator().manual_seed(self.seed)
        theta = self.operator_.trained.theta
        v = torch.randn(theta.numel(), generator=generator, dtype=theta.dtype).to(theta.device)
        value = 0.0
        for _ in range(iterations):
            v = v / v.norm()
            w = self.operator_.matvec(v) + self.damping * v
            if shift is not None:
                w = shift * v - w
            value = float(v @ w)
            v = w
        return value

    def _divergence(
        self, step: int, repeat: int, norm: float, start: float, largest: float | None = None
    ) -> FidelityError:
        largest = self._largest_eigenvalue() if largest is None else largest
        where = (
            f"diverges (scale {self.scale_:.3g} is at most half the largest eigenvalue)"
            if step == 0
            else f"diverged at step {step} of repeat {repeat} (iterate norm {norm:.3g}, started "
            f"at {start:.3g}) with scale {self.scale_:.3g}"
        )
        return FidelityError(
            f"lissa {where}; the largest eigenvalue of the damped "
            f"{self.curvature} is about {largest:.3g}: use scale >= {largest:.2g} (convergence "
            f"needs more than {largest / 2:.2g}; minibatch curvature can exceed the full one, so "
            "leave a margin) or scale = 'auto'. If the curvature has negative eigenvalues, add "
            "damping as well"
        )

    def _inverse_curvature_product(self, vectors: Tensor) -> Tensor:
        train = self.operator_.trained.problem.train
        n = len(train)
        size = n if self.minibatch_size is None else min(self.minibatch_size, n)
        generator = torch.Generator().manual_seed(self.seed)
        v_norm = vectors.norm(dim=1, keepdim=True)
        total = torch.zeros_like(vectors)
        for repeat in range(self.repeats):
            h = vectors.clone()
            order, position = torch.randperm(n, generator=generator), 0
            for step in range(1, self.depth + 1):
                if size == n:
                    batch = train
                else:
                    if position + size > n:
                        order, position = torch.randperm(n, generator=generator), 0
                    batch = train.subset(order[position : position + size].to(train.x.device))
                    position += size
                product = self.operator_.minibatch_matvec(h, batch) + self.damping * h
                h = vectors + h - product / self.scale_
                h_norm = h.norm(dim=1, keepdim=True)
                # A convergent recursion has ||h_t|| <= (t + 1) ||v||; allow noise on top.
                growing = bool((h_norm > 10 * (step + 1) * v_norm).any())
                if growing or not bool(torch.isfinite(h).all()):
                    raise self._divergence(step, repeat, float(h_norm.max()), float(v_norm.max()))
            total += h / self.scale_
        solved = total / self.repeats
        applied = self.operator_.matvec(solved) + self.damping * solved
        residual = (applied - vectors).norm(dim=1) / v_norm.squeeze(1).clamp_min(1e-300)
        self.diagnostics_.update(
            {
                "depth": self.depth,
                "repeats": self.repeats,
                "relative_residual": residual.tolist(),
                "max_relative_residual": float(residual.max()) if len(residual) else 0.0,
                "unconverged_columns": int((residual > self.tol).sum()),
            }
        )
        return solved
