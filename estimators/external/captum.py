"""captum's influence functions (``NaiveInfluenceFunction``, ``ArnoldiInfluenceFunction``) behind
our estimator contract.

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
- captum loads parameters from a checkpoint file: theta_s is saved to a temporary directory.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Self

import torch
from torch import Tensor

from estimators.base import Estimator
from estimators.external import trained_module
from fidelity.errors import FidelityError
from fidelity.objective import loss_from_outputs
from fidelity.problem import Examples, TrainedProblem
from fidelity.validation import check_nonnegative, check_positive_int

INSTALL_HINT = (
    "captum is not installed; create the peers environment with `bash benchmarks/peers_env.sh`"
)


class CaptumEstimator(Estimator):
    """captum's ``naive`` (dense Hessian, full projection) or ``arnoldi`` influence function,
    with hessian_reg = N (wd + damping): delta_hat[t, j] for the removal of j (epsilon = -1/N),
    the estimand of our ``exact`` (``arnoldi``) at the same damping."""

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
        if method not in ("naive", "arnoldi"):
            raise FidelityError("captum.method must be naive or arnoldi")
        self.method = method
        self.damping = check_nonnegative(damping, "captum.damping")
        self.rank = check_positive_int(rank, "captum.rank")
        self.iterations = check_positive_int(iterations, "captum.iterations")
        self.tol = check_nonnegative(tol, "captum.tol")
        self.seed = seed
        self.batch_size = check_positive_int(batch_size, "captum.batch_size")

    def fit(self, trained: TrainedProblem) -> Self:
        try:
            from captum.influence import NaiveInfluenceFunction
            from captum.influence._core.arnoldi_influence_function import (
                ArnoldiInfluenceFunction,
            )
        except ImportError as error:
            raise FidelityError(INSTALL_HINT) from error
        start = time.perf_counter()
        problem = trained.problem
        regularisation = problem.n_train * (problem.weight_decay + self.damping)
        if regularisation <= 0:
            raise FidelityError("captum needs weight decay or damping above 0 (hessian_reg > 0)")
        module = trained_module(trained)
        self.workdir_ = tempfile.TemporaryDirectory(prefix="fidelity-captum-")
        checkpoint = str(Path(self.workdir_.name) / "theta_s.pt")
        torch.save(module.state_dict(), checkpoint)

        def loss(outputs: Tensor, targets: Tensor) -> Tensor:
            return loss_from_outputs(problem.loss, outputs, targets)  # per example, as required

        dataset = torch.utils.data.TensorDataset(problem.x_train, problem.y_train)
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
        problem = trained.problem
        if len(train) != problem.n_train or not torch.equal(train.x, problem.x_train):
            # captum scores its own train_dataset; take the requested columns from it.
            index = _rows_of(train, problem)
        else:
            index = None
        values = torch.as_tensor(self.influence_.influence((test.x, test.y))).to(trained.theta)
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return values if index is None else values[:, index]


def _rows_of(train: Examples, problem) -> Tensor:
    """Positions of ``train``'s examples in the problem's training set (they must be among
    them); an example repeated in the training set has identical scores at every copy."""
    same_x = (train.x.unsqueeze(1) == problem.x_train.unsqueeze(0)).flatten(2).all(-1)
    same_y = train.y.unsqueeze(1) == problem.y_train.unsqueeze(0)
    same_y = same_y.reshape(*same_x.shape, -1).all(-1)
    matches = same_x & same_y
    found = matches.any(1)
    if not bool(found.all()):
        raise FidelityError("captum scores only the problem's own training points")
    return matches.float().argmax(1)
