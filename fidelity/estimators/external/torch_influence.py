"""torch-influence (Bae et al.'s reference implementation: ``AutogradInfluenceModule``,
``CGInfluenceModule``, ``LiSSAInfluenceModule``) behind our estimator contract.

torch-influence is not on PyPI: the adapter works wherever ``import torch_influence``
succeeds (install it from its source tree), and says so otherwise.

Conventions mapped here, once:
- The library takes a ``BaseObjective``: ours returns the model's outputs, the batch-mean loss
  on them and J's regulariser (wd/2) ||theta||^2, and the mean test loss without it, so its
  risk Hessian is our H (or, with ``gnh``, our G) including weight decay, and ``damp`` is our
  ``damping`` unchanged.
- ``influences(train_idxs, test_idxs)`` estimates L - L_0 for the removal of each training
  point, already divided by N: our delta, same sign, no rescaling. We call it once per test
  point (it scores the mean loss of the test indices it is given) with that point's
  ``stest``.
- Its training gradients are of ``train_loss``, which includes the regulariser: the score
  of j is (1/N) (g_j + wd theta_s)^T (H + damp I)^{-1} g_t rather than
  (1/N) g_j^T (H + damp I)^{-1} g_t. Removing j does not remove the regulariser, so this adds
  the same offset to every training point of a test point when weight decay is non-zero; we
  do not correct it, the conformance table measures it.
- CG is scipy's ``cg`` (``rtol = tol``, ``atol = 0``, ``maxiter = max_iter``); LiSSA draws its
  batches from torch's global RNG, so the calls run in a forked RNG seeded with ``seed``.
- torch-influence scores only its own training loader's points: the requested training
  examples must be among the problem's.
"""

from __future__ import annotations

import time
from typing import Any, Self

import torch
from torch import Tensor, nn

from fidelity.core.checks import check_int, check_nonnegative, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.estimators.base import Estimator
from fidelity.estimators.external import (
    examples_loader,
    library_context,
    record_scores,
    rows_of,
    trained_module,
)

SOLVERS = ("autograd", "cg", "lissa")
INSTALL_HINT = (
    "torch_influence is not importable; it is not on PyPI: install it from its source tree "
    "(github.com/alstonlo/torch-influence) into the peers environment, e.g. "
    "`.peers-venv/bin/pip install --no-deps <path to torch-influence>`"
)


def _import_torch_influence() -> Any:
    try:
        import torch_influence
    except ImportError as error:
        raise FidelityError(INSTALL_HINT) from error
    return torch_influence


def _objective(base: type, trained: TrainedProblem) -> Any:
    problem = trained.problem

    class ProblemObjective(base):
        def train_outputs(self, model: nn.Module, batch: Any) -> Tensor:
            return model(batch[0])

        def train_loss_on_outputs(self, outputs: Tensor, batch: Any) -> Tensor:
            return loss_from_outputs(problem.loss, outputs, batch[1]).mean()

        def train_regularization(self, params: Tensor) -> Tensor:
            return 0.5 * problem.weight_decay * params.square().sum()

        def test_loss(self, model: nn.Module, params: Tensor, batch: Any) -> Tensor:
            return loss_from_outputs(problem.loss, model(batch[0]), batch[1]).mean()

    return ProblemObjective()


class TorchInfluenceEstimator(Estimator):
    """torch-influence's ``solver`` (``autograd``: dense risk Hessian inverted; ``cg``;
    ``lissa``) on the Hessian (``gnh``: Gauss-Newton) of J plus ``damping`` I: delta_hat[t, j]
    for the removal of j (epsilon = -1/N), the estimand of our ``exact`` (``gnh``) at the same
    damping up to the regulariser-gradient offset described in the module docstring."""

    name = "torch-influence"

    def __init__(
        self,
        *,
        solver: str = "autograd",
        gnh: bool = False,
        damping: float = 0.0,
        tol: float = 1e-8,
        max_iter: int | None = None,
        depth: int = 1000,
        repeat: int = 1,
        scale: float = 10.0,
        seed: int = 0,
        batch_size: int = 512,
    ) -> None:
        if solver not in SOLVERS:
            raise FidelityError(f"torch-influence.solver must be one of {', '.join(SOLVERS)}")
        if not isinstance(gnh, bool):
            raise FidelityError("torch-influence.gnh must be true or false")
        if gnh and solver == "autograd":
            raise FidelityError("torch-influence's autograd solver has no Gauss-Newton mode")
        self.solver = solver
        self.gnh = gnh
        self.damping = check_nonnegative(damping, "torch-influence.damping")
        self.tol = check_nonnegative(tol, "torch-influence.tol")
        if max_iter is not None:
            check_positive_int(max_iter, "torch-influence.max_iter")
        self.max_iter = max_iter
        self.depth = check_positive_int(depth, "torch-influence.depth")
        self.repeat = check_positive_int(repeat, "torch-influence.repeat")
        if not scale > 0:
            raise FidelityError("torch-influence.scale must be positive")
        self.scale = float(scale)
        self.seed = check_int(seed, "torch-influence.seed")
        self.batch_size = check_positive_int(batch_size, "torch-influence.batch_size")

    def fit(self, trained: TrainedProblem) -> Self:
        library = _import_torch_influence()
        start = time.perf_counter()
        problem = trained.problem
        common = {
            "model": trained_module(trained),
            "objective": _objective(library.BaseObjective, trained),
            "train_loader": examples_loader(problem.train, self.batch_size),
            "test_loader": examples_loader(problem.test, self.batch_size),
            "device": problem.device,
            "damp": self.damping,
        }
        with library_context(trained, self.seed, "torch_influence") as messages:
            if self.solver == "autograd":
                self.module_ = library.AutogradInfluenceModule(**common)
            elif self.solver == "cg":
                self.module_ = library.CGInfluenceModule(
                    **common,
                    gnh=self.gnh,
                    rtol=self.tol,
                    atol=0.0,
                    maxiter=self.max_iter or 10 * trained.n_params,
                )
            else:
                self.module_ = library.LiSSAInfluenceModule(
                    **common,
                    gnh=self.gnh,
                    repeat=self.repeat,
                    depth=self.depth,
                    scale=self.scale,
                )
        self.trained_ = trained
        self.diagnostics_ = {
            "fit_seconds": time.perf_counter() - start,
            "library_warnings": messages,
        }
        return self

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        train_indices = rows_of(train, trained.problem).tolist()
        # The module scores test points by index into its test loader: point it at `test`.
        self.module_.test_loader = examples_loader(test, self.batch_size)
        rows = []
        with library_context(trained, self.seed, "torch_influence") as messages:
            for t in range(len(test)):
                stest = self.module_.stest([t])
                rows.append(self.module_.influences(train_indices, [t], stest=stest))
        deltas = (
            torch.stack(rows).to(trained.theta)
            if rows
            else trained.theta.new_zeros(0, len(train_indices))
        )
        record_scores(self.diagnostics_, deltas, time.perf_counter() - start, messages)
        return deltas
