"""captum's influence functions (``NaiveInfluenceFunction``, ``ArnoldiInfluenceFunction``) and
``TracInCP`` behind our estimator contract.

Conventions mapped here, once (found by comparing with our dense ``exact`` on a tiny MLP):
- captum's score is g_test^T (H_sum + hessian_reg I)^{-1} g_train with H_sum the Hessian of the
  *summed* training loss (no weight decay) and no minus sign. With hessian_reg = N (wd +
  damping) that is exactly our removal delta (1/N) g_t^T (H + damping I)^{-1} g_j, so no
  rescaling of the output is needed.
- ``hessian_reg`` must then be positive: captum inverts the regularised Hessian's top
  ``projection_dim`` eigenpairs (hessian_reg = 0 gives NaN on a model with weight decay only
  in our objective). ``naive`` uses projection_dim = p (the full spectrum) and keeps every
  eigenvalue (hessian_inverse_tol below any eigenvalue); ``arnoldi`` uses ``rank`` as its
  projection dimension, ``iterations`` as its Krylov dimension and ``tol`` as its
  ``arnoldi_tol`` (captum's default 0.1 stops the Krylov iteration early: on a 38-parameter
  MLP at full rank it gives Pearson 0.986 with ``exact``; tests use 1e-10).
- ``tracincp``: sum over checkpoints of lr_c grad L(z_t)^T grad L(z_j), positive for a
  proponent (j lowered the test loss), so delta = value / N (same sign). Our training keeps no
  intermediate checkpoints: the one checkpoint is theta_s with learning rate 1, which makes it
  our ``grad-dot`` (1/N) g_t^T g_j, its reference. It takes no damping.
- captum loads parameters from a checkpoint file: theta_s is saved to a temporary directory.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Self

import torch
from torch import Tensor

from fidelity.core.checks import check_nonnegative, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.estimators.base import Estimator
from fidelity.estimators.external import rows_of, trained_module

METHODS = ("naive", "arnoldi", "tracincp")
INSTALL_HINT = (
    "captum is not installed; create the peers environment with `bash benchmarks/peers_env.sh`"
)


class CaptumEstimator(Estimator):
    """captum's ``naive`` (dense Hessian, full projection) or ``arnoldi`` influence function,
    with hessian_reg = N (wd + damping): delta_hat[t, j] for the removal of j (epsilon = -1/N),
    the estimand of our ``exact`` (``arnoldi``) at the same damping; or ``tracincp`` at theta_s
    alone, the estimand of our ``grad-dot``."""

    name = "captum"

    def __init__(
        self,
        *,
        method: str = "naive",
        damping: float = 0.0,
        rank: int = 100,
        iterations: int = 200,
        tol: float = 0.1,
        seed: int = 0,
        batch_size: int = 512,
    ) -> None:
        if method not in METHODS:
            raise FidelityError(f"captum.method must be one of {', '.join(METHODS)}")
        self.method = method
        self.damping = check_nonnegative(damping, "captum.damping")
        self.rank = check_positive_int(rank, "captum.rank")
        self.iterations = check_positive_int(iterations, "captum.iterations")
        self.tol = check_nonnegative(tol, "captum.tol")
        self.seed = seed
        self.batch_size = check_positive_int(batch_size, "captum.batch_size")

    def fit(self, trained: TrainedProblem) -> Self:
        try:
            from captum.influence import NaiveInfluenceFunction, TracInCP
            from captum.influence._core.arnoldi_influence_function import (
                ArnoldiInfluenceFunction,
            )
        except ImportError as error:
            raise FidelityError(INSTALL_HINT) from error
        start = time.perf_counter()
        problem = trained.problem
        regularisation = problem.n_train * (problem.weight_decay + self.damping)
        if regularisation <= 0 and self.method != "tracincp":
            raise FidelityError("captum needs weight decay or damping above 0 (hessian_reg > 0)")
        module = trained_module(trained)
        self.workdir_ = tempfile.TemporaryDirectory(prefix="fidelity-captum-")
        checkpoint = str(Path(self.workdir_.name) / "theta_s.pt")
        torch.save(module.state_dict(), checkpoint)

        def loss(outputs: Tensor, targets: Tensor) -> Tensor:
            return loss_from_outputs(problem.loss, outputs, targets)  # per example, as required

        dataset = torch.utils.data.TensorDataset(problem.x_train, problem.y_train)
        if self.method == "tracincp":
            self.influence_ = TracInCP(
                module,
                dataset,
                [checkpoint],
                loss_fn=loss,
                batch_size=self.batch_size,
                sample_wise_grads_per_batch=False,
            )
            self.trained_ = trained
            self.diagnostics_ = {"fit_seconds": time.perf_counter() - start}
            return self
        common = {
            "loss_fn": loss,
            "batch_size": self.batch_size,
            "hessian_reg": regularisation,
            "hessian_inverse_tol": -float("inf"),
        }
        if self.method == "naive":
            self.influence_ = NaiveInfluenceFunction(
                module, dataset, checkpoint, projection_dim=trained.n_params, **common
            )
        else:
            self.influence_ = ArnoldiInfluenceFunction(
                module,
                dataset,
                checkpoint,
                projection_dim=min(self.rank, trained.n_params),
                arnoldi_dim=min(self.iterations, trained.n_params),
                arnoldi_tol=self.tol,
                seed=self.seed,
                **common,
            )
        self.trained_ = trained
        self.diagnostics_ = {"fit_seconds": time.perf_counter() - start}
        return self

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        # captum scores its own train_dataset; take the requested columns from it.
        index = rows_of(train, trained.problem)
        values = torch.as_tensor(self.influence_.influence((test.x, test.y))).to(trained.theta)
        if self.method == "tracincp":
            values = values / trained.problem.n_train
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return values[:, index]
