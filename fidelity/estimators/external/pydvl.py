"""pyDVL's influence-function models (direct, CG, LiSSA, Arnoldi, Nystroem, EK-FAC) behind our
estimator contract.

Conventions mapped here, once (found by comparing with our dense references on a tiny MLP):
- pyDVL's ``influences(..., mode="up")`` is <(C + r I)^{-1} g_test, g_train> with C the
  curvature of the *mean* training loss and no minus sign, so our removal delta is its value
  / N (same sign: positive means j helped).
- pyDVL's curvature knows no weight decay: ``regularization = wd + damping`` (EK-FAC:
  ``hessian_regularization``).
- ``mode = "gauss-newton"`` is pyDVL's ``SecondOrderMode.GAUSS_NEWTON``, which is the
  *empirical Fisher* (1/N) sum_i g_i g_i^T at the training labels, not the Gauss-Newton matrix
  J^T H_out J: its reference is our ``exact`` with ``curvature = "empirical-fisher"``.
- LiSSA: pyDVL iterates h <- b + (1 - dampen) h - (H h)/scale (no regularization on top of
  ``dampen`` unless given); our LiSSA's ``scale`` maps to its ``scale``, our damping enters
  through ``regularization`` and ``dampen`` stays 0.
- Nystroem draws its sketch from torch's global RNG: the call runs in a forked RNG seeded
  with ``seed``. With ``rank = p`` the sketch spans everything and the solve is exact for a
  positive semi-definite curvature.
- EK-FAC (cross-entropy, nn.Linear layers only, every layer) is meant to use the true Fisher
  (labels from the model): its reference is our ``ekfac`` with ``fisher = "expected"`` and
  the same damping. pyDVL's K-FAC factors are built from the backward pass of
  sum_c sqrt(p_c) log p_c rather than from model-drawn labels, which gives the gradient
  factor (sum_c sqrt(p_c) a_c)(sum_c sqrt(p_c) a_c)^T instead of sum_c p_c a_c a_c^T (a_c =
  e_c - p); we do not correct it, the conformance table measures it.
- Calls run with torch's default dtype set to the problem's (pyDVL allocates its K-FAC
  buffers with the default dtype). The model is a fresh module with theta_s loaded; pyDVL
  computes every gradient with its own code on it.
"""

from __future__ import annotations

import time
from typing import Any, Self

import torch
from torch import Tensor

from fidelity.core.checks import check_int, check_nonnegative, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.estimators.base import Estimator
from fidelity.estimators.external import (
    examples_loader,
    library_context,
    record_scores,
    trained_module,
)

SOLVERS = ("direct", "cg", "lissa", "arnoldi", "nystroem", "ekfac")
MODES = ("hessian", "gauss-newton")
INSTALL_HINT = (
    "pydvl is not installed; create the peers environment with `bash benchmarks/peers_env.sh`"
)


class PydvlEstimator(Estimator):
    """pyDVL's ``solver`` on the curvature of the mean training loss (``mode``: its Hessian or
    its "Gauss-Newton" empirical Fisher; EK-FAC: its Kronecker-factored Fisher) plus
    (wd + damping) I, converted to delta_hat[t, j] (removal of j, epsilon = -1/N): the estimand
    of our ``exact`` (``curvature`` hessian or empirical-fisher) at the same damping, or of our
    ``ekfac`` with the expected Fisher for ``solver = "ekfac"``."""

    name = "pydvl"

    def __init__(
        self,
        *,
        solver: str = "direct",
        mode: str = "hessian",
        damping: float = 0.0,
        rank: int = 100,
        depth: int = 1000,
        scale: float = 10.0,
        tol: float = 1e-8,
        update_diagonal: bool = True,
        seed: int = 0,
        batch_size: int = 512,
    ) -> None:
        if solver not in SOLVERS:
            raise FidelityError(f"pydvl.solver must be one of {', '.join(SOLVERS)}")
        if mode not in MODES:
            raise FidelityError(f"pydvl.mode must be one of {', '.join(MODES)}")
        if solver == "ekfac" and mode != "hessian":
            raise FidelityError("pydvl.mode does not apply to solver 'ekfac' (its own Fisher)")
        if not isinstance(update_diagonal, bool):
            raise FidelityError("pydvl.update_diagonal must be true or false")
        self.solver = solver
        self.mode = mode
        self.damping = check_nonnegative(damping, "pydvl.damping")
        self.rank = check_positive_int(rank, "pydvl.rank")
        self.depth = check_positive_int(depth, "pydvl.depth")
        self.scale = check_nonnegative(scale, "pydvl.scale")
        self.tol = check_nonnegative(tol, "pydvl.tol")
        self.update_diagonal = update_diagonal
        self.seed = check_int(seed, "pydvl.seed")
        self.batch_size = check_positive_int(batch_size, "pydvl.batch_size")

    def _model(self, trained: TrainedProblem) -> Any:
        try:
            from pydvl.influence.torch import (
                ArnoldiInfluence,
                CgInfluence,
                DirectInfluence,
                EkfacInfluence,
                LissaInfluence,
                NystroemSketchInfluence,
            )
            from pydvl.influence.torch.util import SecondOrderMode
        except ImportError as error:
            raise FidelityError(INSTALL_HINT) from error
        problem = trained.problem
        module = trained_module(trained)
        regularization = problem.weight_decay + self.damping
        if self.solver == "ekfac":
            if problem.loss != "cross_entropy":
                raise FidelityError(
                    f"pyDVL's EK-FAC supports cross-entropy only; {problem.name!r} uses "
                    f"{problem.loss!r}"
                )
            return EkfacInfluence(
                module,
                update_diagonal=self.update_diagonal,
                hessian_regularization=regularization,
            )

        def loss(outputs: Tensor, targets: Tensor) -> Tensor:
            return loss_from_outputs(problem.loss, outputs, targets).mean()

        common = {
            "regularization": regularization,
            "second_order_mode": (
                SecondOrderMode.GAUSS_NEWTON
                if self.mode == "gauss-newton"
                else SecondOrderMode.HESSIAN
            ),
        }
        if self.solver == "direct":
            return DirectInfluence(module, loss, **common)
        if self.solver == "cg":
            return CgInfluence(
                module,
                loss,
                rtol=self.tol,
                atol=0.0,
                maxiter=10 * trained.n_params,
                solve_simultaneously=True,
                **common,
            )
        if self.solver == "lissa":
            return LissaInfluence(
                module,
                loss,
                maxiter=self.depth,
                scale=self.scale,
                rtol=self.tol,
                warn_on_max_iteration=False,
                **common,
            )
        if self.solver == "nystroem":
            return NystroemSketchInfluence(
                module, loss, rank=min(self.rank, trained.n_params), **common
            )
        return ArnoldiInfluence(module, loss, rank=self.rank, **common)

    def fit(self, trained: TrainedProblem) -> Self:
        start = time.perf_counter()
        problem = trained.problem
        loader = examples_loader(problem.train, self.batch_size)
        with library_context(trained, self.seed, "pydvl") as messages:
            self.influence_model_ = self._model(trained).fit(loader)
        self.trained_ = trained
        self.diagnostics_ = {
            "fit_seconds": time.perf_counter() - start,
            "library_warnings": messages,
        }
        return self

    def perturbation_gradients(self, test: Examples, train: Examples) -> Tensor:
        """pyDVL's perturbation influence ``<(C_mean + r I)^{-1} g_test, d/dx grad L(x)>``
        (``mode="perturbation"``, ``[n_test, n_train, *input]``), converted to our
        ``d m(z_t) / d x_j``: -value / N (its up-weighting convention has no minus sign and no
        1/N, as in ``scores``; moving an input is an up-weighting of the derivative)."""
        trained = self._check_fitted()
        with library_context(trained, self.seed, "pydvl"):
            values = self.influence_model_.influences(
                test.x, test.y, train.x, train.y, mode="perturbation"
            )
        return -torch.as_tensor(values).detach().to(trained.theta) / trained.problem.n_train

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        with library_context(trained, self.seed, "pydvl") as messages:
            values = self.influence_model_.influences(test.x, test.y, train.x, train.y, mode="up")
        deltas = torch.as_tensor(values).detach().to(trained.theta) / trained.problem.n_train
        record_scores(self.diagnostics_, deltas, time.perf_counter() - start, messages)
        return deltas
