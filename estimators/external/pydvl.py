"""pyDVL's influence-function models (direct, CG, LiSSA, Arnoldi) behind our estimator contract.

Conventions mapped here, once:
- pyDVL's ``influences(..., mode="up")`` is <(H + r I)^{-1} g_test, g_train> with H the Hessian
  of the *mean* training loss and no minus sign, so our removal delta is its value / N (same
  sign: positive means j helped).
- pyDVL's Hessian knows no weight decay: ``regularization = wd + damping``.
- LiSSA: pyDVL iterates h <- b + (1 - dampen) h - (H h)/scale (no regularization on top of
  ``dampen`` unless given); our LiSSA's ``scale`` maps to its ``scale``, our damping enters
  through ``regularization`` and ``dampen`` stays 0.
- The model is a fresh module with theta_s loaded; pyDVL computes every gradient with its own
  code on it.
"""

from __future__ import annotations

import time
from typing import Any, Self

import torch
from torch import Tensor

from estimators.base import Estimator
from estimators.external import trained_module
from fidelity.errors import FidelityError
from fidelity.objective import loss_from_outputs
from fidelity.problem import Examples, TrainedProblem
from fidelity.validation import check_nonnegative, check_positive_int

SOLVERS = ("direct", "cg", "lissa", "arnoldi")
INSTALL_HINT = (
    "pydvl is not installed; create the peers environment with `bash benchmarks/peers_env.sh`"
)


class PydvlEstimator(Estimator):
    """pyDVL's ``solver`` (direct, cg, lissa, arnoldi) on the Hessian of the mean training loss
    plus (wd + damping) I, converted to delta_hat[t, j] (removal of j, epsilon = -1/N): the
    estimand of our ``exact`` (and ``cg``/``lissa``/``arnoldi``) at the same damping."""

    name = "pydvl"

    def __init__(
        self,
        *,
        solver: str = "direct",
        damping: float = 0.0,
        rank: int = 100,
        depth: int = 1000,
        scale: float = 10.0,
        tol: float = 1e-8,
        batch_size: int = 512,
    ) -> None:
        if solver not in SOLVERS:
            raise FidelityError(f"pydvl.solver must be one of {', '.join(SOLVERS)}")
        self.solver = solver
        self.damping = check_nonnegative(damping, "pydvl.damping")
        self.rank = check_positive_int(rank, "pydvl.rank")
        self.depth = check_positive_int(depth, "pydvl.depth")
        self.scale = check_nonnegative(scale, "pydvl.scale")
        self.tol = check_nonnegative(tol, "pydvl.tol")
        self.batch_size = check_positive_int(batch_size, "pydvl.batch_size")

    def _model(self, trained: TrainedProblem) -> Any:
        try:
            from pydvl.influence.torch import (
                ArnoldiInfluence,
                CgInfluence,
                DirectInfluence,
                LissaInfluence,
            )
        except ImportError as error:
            raise FidelityError(INSTALL_HINT) from error
        problem = trained.problem
        module = trained_module(trained)

        def loss(outputs: Tensor, targets: Tensor) -> Tensor:
            return loss_from_outputs(problem.loss, outputs, targets).mean()

        regularization = problem.weight_decay + self.damping
        if self.solver == "direct":
            return DirectInfluence(module, loss, regularization=regularization)
        if self.solver == "cg":
            return CgInfluence(
                module,
                loss,
                regularization=regularization,
                rtol=self.tol,
                atol=0.0,
                maxiter=10 * trained.n_params,
                solve_simultaneously=True,
            )
        if self.solver == "lissa":
            return LissaInfluence(
                module,
                loss,
                regularization=regularization,
                maxiter=self.depth,
                scale=self.scale,
                rtol=self.tol,
                warn_on_max_iteration=False,
            )
        return ArnoldiInfluence(module, loss, regularization=regularization, rank=self.rank)

    def fit(self, trained: TrainedProblem) -> Self:
        start = time.perf_counter()
        problem = trained.problem
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(problem.x_train, problem.y_train),
            batch_size=self.batch_size,
        )
        self.influence_model_ = self._model(trained).fit(loader)
        self.trained_ = trained
        self.diagnostics_ = {"fit_seconds": time.perf_counter() - start}
        return self

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        values = self.influence_model_.influences(test.x, test.y, train.x, train.y, mode="up")
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return torch.as_tensor(values).to(trained.theta) / trained.problem.n_train
