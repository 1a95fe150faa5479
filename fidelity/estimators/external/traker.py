"""TRAK's reference implementation (the ``traker`` package, 0.3.2, ``TRAKer``) behind our
contract, on CPU.

Conventions mapped here, once (found by comparing with our ``trak`` on a tiny MLP):
- TRAKer's task ``image_classification`` is the margin log(p / (1 - p)) of the true class, our
  ``trak``'s output function, for cross-entropy problems. A bce problem (one logit z) is handed
  to it as two classes with logits (0, z) and labels 0/1: the margin of that view is the signed
  logit, ours for bce, and its 1 - p is bce's. Its scores are ``[train, test]``
  values of sum_m phi_j^m (Phi_m^T Phi_m + lambda I)^{-1} phi_t^m / M times the members' mean
  (1 - p_j): TRAK's tau, positive when j helps t. Our units: delta = (1 - pbar_t) tau, pbar_t
  the members' mean probability of t's class (``trak``'s a_t a_j: the two minus signs cancel).
- TRAKer divides every projected gradient by sqrt(p) before forming Phi^T Phi, so its
  ``lambda_reg`` is ours in other units: lambda_reg = damping N / p gives our
  (1/N) Phi^T Phi + damping I.
- It divides each member's inverse by the mean absolute value of its entries before scoring
  (a numerical guard for float16) and inverts in float32: its scores carry one arbitrary
  positive scale per member, so one model's scores equal ours up to a scale (relative
  difference ~1e-6 after it), and an ensemble weights its members unequally (TRAK's paper
  averages them equally). Compare by correlation (``reference`` without ``tolerance``).
- ``projection = "shared"`` (default) hands TRAKer the matrices our ``trak`` draws (same
  ``seed``, dimension and kind): the comparison then tests everything but the random matrix.
  ``"traker"`` uses its own ``BasicProjector`` (Gaussian, seeded by TRAKer). That projector
  crashes when it has a single block (projection_dim <= its block size) and is asked to
  project after ``finalize_features`` freed its matrix (traker 0.3.2); the adapter gives it
  blocks of half the dimension, which changes the draws, not the method.
- TRAKer keeps its arrays in a directory: a temporary one per fit, removed with the estimator.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from typing import Any, Self

import numpy as np
import torch
from torch import Tensor, nn

from fidelity.core.checks import check_nonnegative, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import target_values
from fidelity.core.problem import Examples, ParamSpec, Problem, TrainedProblem
from fidelity.estimators.base import Estimator
from fidelity.estimators.external import record_scores, rows_of, trained_module
from fidelity.estimators.trak import (
    ENSEMBLES,
    check_projection_dimension,
    ensemble_members,
    random_projection,
)

PROJECTIONS = ("shared", "traker")
INSTALL_HINT = (
    "traker is not installed; create the peers environment with `bash benchmarks/peers_env.sh`"
)


class TrakerEstimator(Estimator):
    """TRAKer's scores (TRAK, Park et al. 2023) converted to delta_hat[t, j] = (1 - pbar_t)
    tau[t, j] up to one positive scale per ensemble member (module docstring): the estimand of
    our ``trak`` with the same ``projection_dim``, ``ensemble_size``, ``ensemble``, ``damping``
    and ``seed``."""

    name = "traker"

    def __init__(
        self,
        *,
        projection_dim: int = 128,
        ensemble_size: int = 1,
        ensemble: str = "seeds",
        projection: str = "shared",
        damping: float = 0.0,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        self.projection_dim = check_positive_int(projection_dim, "traker.projection_dim")
        self.ensemble_size = check_positive_int(ensemble_size, "traker.ensemble_size")
        if ensemble not in ENSEMBLES:
            raise FidelityError(f"traker.ensemble must be one of {', '.join(ENSEMBLES)}")
        self.ensemble = ensemble
        if projection not in PROJECTIONS:
            raise FidelityError(f"traker.projection must be one of {', '.join(PROJECTIONS)}")
        self.projection = projection
        self.damping = check_nonnegative(damping, "traker.damping")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise FidelityError(f"traker.seed must be an integer, got {seed!r}")
        self.seed = seed
        self.batch_size = check_positive_int(batch_size, "traker.batch_size")

    def check_problem(self, problem: Problem) -> None:
        self._check(problem, ParamSpec.of(problem.build_model()).numel)

    def _check(self, problem: Problem, n_params: int) -> None:
        """Refuse a problem without a classification margin, or a projection beyond its
        ``n_params`` parameters."""
        if problem.loss not in ("cross_entropy", "bce") or (
            problem.loss == "bce" and problem.y_train.shape[1:] != (1,)
        ):
            raise FidelityError(
                f"traker's image_classification margin needs a cross_entropy problem or a bce "
                f"problem with one logit; {problem.name!r} is {problem.loss}"
            )
        check_projection_dimension(self.projection_dim, n_params, self.name)

    def fit(self, trained: TrainedProblem) -> Self:
        try:
            from trak import TRAKer
        except ImportError:
            raise FidelityError(INSTALL_HINT) from None
        start = time.perf_counter()
        problem = trained.problem
        self._check(problem, trained.n_params)  # the trained model's count: no rebuild
        thetas, train_seconds = ensemble_members(
            trained, self.ensemble_size, self.ensemble, self.name
        )
        self.workdir_ = tempfile.TemporaryDirectory(prefix="fidelity-traker-")
        module = trained_module(trained)
        if problem.loss == "bce":
            module = TwoClassLogits(module)
        self.traker_ = TRAKer(
            model=copy.deepcopy(module),
            task="image_classification",
            train_set_size=problem.n_train,
            save_dir=self.workdir_.name,
            device=str(problem.device),
            projector=self._projector(trained),
            proj_dim=self.projection_dim,
            use_half_precision=False,
            lambda_reg=self.damping * problem.n_train / trained.n_params,
            logging_level=logging.ERROR,
        )
        self.states_ = [self._state(trained, theta) for theta in thetas]
        for member, state in enumerate(self.states_):
            self.traker_.load_checkpoint(state, model_id=member)
            for begin in range(0, problem.n_train, self.batch_size):
                end = min(begin + self.batch_size, problem.n_train)
                batch = (problem.x_train[begin:end], _classes(problem.y_train[begin:end]))
                self.traker_.featurize(batch=batch, num_samples=end - begin)
        self.traker_.finalize_features()
        self.thetas_ = thetas
        self.trained_ = trained
        self.calls_ = 0
        self.diagnostics_: dict[str, Any] = {
            "members": len(thetas),
            "member_training_seconds": train_seconds,
            "fit_seconds": time.perf_counter() - start,
        }
        return self

    def _projector(self, trained: TrainedProblem) -> Any:
        from trak.projectors import AbstractProjector, BasicProjector, ProjectionType
        from trak.utils import vectorize

        p, k = trained.n_params, self.projection_dim
        device = trained.problem.device
        if self.projection == "traker":
            return BasicProjector(
                grad_dim=p,
                proj_dim=k,
                seed=self.seed,
                proj_type=ProjectionType.normal,
                device=device,
                block_size=max(1, (k + 1) // 2),
                dtype=trained.theta.dtype,
            )
        like = trained.theta

        class SharedProjector(AbstractProjector):
            """Our ``trak``'s matrix for each member (seed + member, Gaussian)."""

            def __init__(self) -> None:
                super().__init__(p, k, 0, ProjectionType.normal, device)
                self.matrices: dict[int, Tensor] = {}

            def project(self, grads: Any, model_id: int) -> Tensor:
                if isinstance(grads, dict):
                    grads = vectorize(grads, device=device)
                if model_id not in self.matrices:
                    self.matrices[model_id] = random_projection(
                        p, k, "gaussian", outer.seed + model_id, like=like
                    )
                return grads.to(like.dtype) @ self.matrices[model_id]

            def free_memory(self) -> None:
                return None

        outer = self
        return SharedProjector()

    @staticmethod
    def _state(trained: TrainedProblem, theta: Tensor) -> dict[str, Tensor]:
        prefix = "inner." if trained.problem.loss == "bce" else ""
        return {
            prefix + name: value.detach().clone()
            for name, value in trained.model.spec.unflatten(theta).items()
        }

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        problem = trained.problem
        self.calls_ += 1
        experiment = f"scores{self.calls_}"
        for member, state in enumerate(self.states_):
            self.traker_.start_scoring_checkpoint(
                experiment, state, model_id=member, num_targets=len(test)
            )
            for begin in range(0, len(test), self.batch_size):
                end = min(begin + self.batch_size, len(test))
                self.traker_.score(
                    batch=(test.x[begin:end], _classes(test.y[begin:end])),
                    num_samples=end - begin,
                )
        tau = torch.as_tensor(
            np.asarray(self.traker_.finalize_scores(experiment)), dtype=problem.dtype
        ).T.to(problem.device)
        with torch.no_grad():
            probabilities = (
                torch.stack(
                    [
                        target_values(trained.model, problem.loss, theta, test, "log-probability")
                        for theta in self.thetas_
                    ]
                )
                .exp()
                .mean(0)
            )
        deltas = (1 - probabilities)[:, None] * tau[:, rows_of(train, problem).to(problem.device)]
        record_scores(self.diagnostics_, deltas, time.perf_counter() - start, [])
        return deltas


class TwoClassLogits(nn.Module):
    """A one-logit bce model seen as two classes with logits (0, z): softmax gives class 1 the
    probability sigmoid(z), so cross-entropy at label 0/1 is the bce loss."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        logit = self.inner(x)
        return torch.cat([torch.zeros_like(logit), logit], dim=-1)


def _classes(y: Tensor) -> Tensor:
    """Class indices for TRAKer: cross-entropy labels as they are, bce's 0/1 column as longs."""
    return y.reshape(-1).long() if y.is_floating_point() else y
