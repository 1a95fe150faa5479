"""TRAK (Park et al. 2023): randomly projected gradients of the model's output function, the
projected Gauss-Newton inverse, and an ensemble over independently trained models or over
checkpoints of one run."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import Tensor

from fidelity.core.checks import check_nonnegative, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_grads, target_values
from fidelity.core.problem import (
    Examples,
    FunctionalModel,
    MinibatchRecipe,
    ParamSpec,
    Problem,
    TrainedProblem,
    seeded_variant,
)
from fidelity.core.resources import check_memory
from fidelity.core.training import check_minibatch, train_minibatch
from fidelity.estimators.base import Estimator
from fidelity.estimators.replay import spaced_steps, training_trajectory, trajectory_state

PROJECTIONS = ("gaussian", "rademacher", "orthogonal")
ENSEMBLES = ("seeds", "checkpoints")
DEFAULT_DIMENSION = 512


def check_projection_dimension(dimension: object, n_params: int, owner: str) -> int:
    """``dimension`` if it is an integer in [1, n_params], else a one-line FidelityError: a
    projection to more dimensions than parameters only adds a null space."""
    dimension = check_positive_int(dimension, f"{owner}.projection_dim")
    if dimension > n_params:
        raise FidelityError(
            f"{owner}.projection_dim is {dimension}, but the model has {n_params} parameters: "
            "project to at most as many dimensions as parameters"
        )
    return dimension


def random_projection(
    n_params: int, dimension: int, kind: str, seed: int, *, like: Tensor
) -> Tensor:
    """``[n_params, dimension]``, drawn on the CPU from ``seed`` (the same matrix on every
    device), scaled so that E[P P^T] = I: Gaussian N(0, 1/k) entries, Rademacher +-1/sqrt(k),
    or ``orthogonal``: orthonormal columns (QR of a Gaussian matrix) times sqrt(p / k), which for
    k = p is an orthogonal matrix."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "rademacher":
        signs = torch.randint(0, 2, (n_params, dimension), generator=generator) * 2 - 1
        matrix = signs.to(torch.float64) / math.sqrt(dimension)
    else:
        gaussian = torch.randn(n_params, dimension, generator=generator, dtype=torch.float64)
        if kind == "gaussian":
            matrix = gaussian / math.sqrt(dimension)
        else:
            matrix = torch.linalg.qr(gaussian).Q * math.sqrt(n_params / dimension)
    return matrix.to(dtype=like.dtype, device=like.device)


def output_function(
    model: FunctionalModel, problem: Problem, theta: Tensor, data: Examples, batch_size: int
) -> tuple[Tensor, Tensor]:
    """TRAK's model output function f at ``theta`` for every example: its gradient in the
    parameters ``[n, p]`` and the derivative of the loss in it ``[n]``, with grad_theta L =
    (dL/df) grad_theta f exactly. Classification: the margin log(p / (1 - p)) of the true class,
    whose loss is softplus(-f), so dL/df = -(1 - p) (TRAK's Q, negated); one-output mse: the
    output itself, dL/df = f - y."""
    if problem.loss == "mse":

        def single(point: Tensor, x: Tensor) -> Tensor:
            return model(point, x.unsqueeze(0))[0, 0]

        gradient = torch.func.vmap(torch.func.grad(single), in_dims=(None, 0))
        parts = [
            gradient(theta, data.x[start : start + batch_size])
            for start in range(0, len(data), batch_size)
        ]
        grads = torch.cat(parts) if parts else theta.new_zeros((0, theta.numel()))
        with torch.no_grad():
            outputs = model(theta, data.x)[:, 0]
        return grads, outputs - data.y[:, 0]
    grads = per_example_grads(model, problem.loss, theta, data, batch_size, target="margin")
    with torch.no_grad():
        margins = target_values(model, problem.loss, theta, data, "margin")
    return grads, -torch.sigmoid(-margins)


def ensemble_members(
    trained: TrainedProblem, size: int, ensemble: str, owner: str
) -> tuple[list[Tensor], float]:
    """The parameters of an ensemble of ``size`` models (theta_s first) and the seconds spent
    training them. ``seeds``: theta_s and models trained from the recipe's seeds shifted by 1,
    2, ... (a Newton recipe's unique minimiser ``size`` times); ``checkpoints``: evenly spaced
    checkpoints of theta_s's recorded run, the last (theta_s) first."""
    problem = trained.problem
    start = time.perf_counter()
    if ensemble == "checkpoints":
        trajectory = training_trajectory(trained, owner, None)
        steps = spaced_steps(problem, size, f"{owner}.ensemble_size")
        thetas = [trajectory_state(trajectory, trained, step)[0] for step in steps[::-1]]
        return thetas, time.perf_counter() - start
    if not isinstance(problem.recipe, MinibatchRecipe):
        return [trained.theta] * size, 0.0
    thetas = [trained.theta]
    for offset in range(1, size):
        variant = seeded_variant(problem, offset)
        recipe = check_minibatch(variant, owner)
        model = FunctionalModel.of(variant.build_model())
        weights = torch.ones(1, problem.n_train, dtype=problem.dtype, device=problem.device)
        run = train_minibatch(model, variant, recipe, model.initial_theta(), weights)
        thetas.append(run.thetas[0].detach())
    return thetas, time.perf_counter() - start


@dataclass(frozen=True)
class TrakMember:
    """One model of the ensemble: its parameters, projection and the Cholesky factor of its
    projected curvature (1/N) Phi^T Phi + damping I."""

    theta: Tensor
    projection: Tensor
    cholesky: Tensor


class TrakEstimator(Estimator):
    """delta_hat[t, j] = (1/N) a_t a_j mean_m[phi_t^m^T ((1/N) Phi_m^T Phi_m + damping I)^{-1}
    phi_j^m]: TRAK (Park et al. 2023) in DESIGN.md's units.

    For each of ``ensemble_size`` models m, phi_i^m = P_m^T grad_theta f(z_i; theta_m) is the
    gradient of TRAK's output function f (the margin log(p / (1 - p)) of the true class; a
    one-output regression's output) projected to ``projection_dim`` dimensions (default
    min(512, p // 2)) by a random matrix P_m (``projection``: Gaussian, Rademacher or with
    orthonormal columns; E[P P^T] = I; member m draws it with ``seed + m``), Phi_m stacks the
    training points' phi. The curvature
    is the projected Gauss-Newton matrix of the output function with unit output curvature
    (TRAK's Phi^T Phi; with ``damping`` 0, as in TRAK, the score does not depend on the
    projection's scale). a_i = mean_m dL/df at z_i (for classification -(1 - p_i): TRAK's Q,
    averaged over the ensemble separately from the kernel as TRAK does) converts the margin
    kernel into loss units: with one model, k = p and an orthogonal P, delta_hat is the
    Gauss-Newton influence (1/N) g_t^T (G_f + damping I)^{-1} g_j with G_f = (1/N) sum_i grad f_i
    grad f_i^T and g = (dL/df) grad f the loss gradient. Positive: removing j raises t's loss
    (TRAK's score times a_t: the same ranking of training points per test point).

    ``ensemble``: ``seeds`` trains ``ensemble_size - 1`` more models with the recipe's seeds
    shifted by 1, 2, ... (theta_s is member 0; the same models ``cold``'s seeds train); a Newton
    recipe's minimiser is unique, so its members share theta_s and differ in projection only.
    ``checkpoints``: ``ensemble_size`` evenly spaced checkpoints of theta_s's recorded run
    ending at theta_s (minibatch recipes).
    """

    name = "trak"

    def __init__(
        self,
        *,
        projection_dim: int | None = None,
        ensemble_size: int = 1,
        ensemble: str = "seeds",
        projection: str = "gaussian",
        damping: float = 0.0,
        seed: int = 0,
        batch_size: int = 512,
    ) -> None:
        if projection_dim is not None:
            check_positive_int(projection_dim, "trak.projection_dim")
        self.projection_dim = projection_dim
        self.ensemble_size = check_positive_int(ensemble_size, "trak.ensemble_size")
        if ensemble not in ENSEMBLES:
            raise FidelityError(
                f"trak.ensemble must be one of {', '.join(ENSEMBLES)}, got {ensemble!r}"
            )
        self.ensemble = ensemble
        if projection not in PROJECTIONS:
            raise FidelityError(
                f"trak.projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}"
            )
        self.projection = projection
        self.damping = check_nonnegative(damping, "trak.damping")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise FidelityError(f"trak.seed must be an integer, got {seed!r}")
        self.seed = seed
        self.batch_size = check_positive_int(batch_size, "trak.batch_size")

    def check_problem(self, problem: Problem) -> None:
        self._checked_dimension(problem, ParamSpec.of(problem.build_model()).numel)

    def _checked_dimension(self, problem: Problem, n_params: int) -> int:
        """Refuse a problem without a scalar output function, a projection beyond its
        ``n_params`` parameters or more checkpoints than steps; the projection's dimension."""
        outputs = problem.y_train.shape[1] if problem.loss != "cross_entropy" else 1
        if outputs != 1:
            kind = "regression" if problem.loss == "mse" else "binary"
            raise FidelityError(
                f"trak needs a scalar output function: {problem.name!r} has {outputs} {kind} "
                "outputs"
            )
        dimension = self._dimension(n_params)
        if self.ensemble == "checkpoints":
            spaced_steps(problem, self.ensemble_size, "trak.ensemble_size")
        return dimension

    def _dimension(self, n_params: int) -> int:
        """The projection's dimension for a model of ``n_params`` parameters: the setting, or
        by default min(512, n_params // 2), which keeps the projected curvature regular where
        the output function has a null space (a softmax margin is unchanged when every logit
        shifts: one direction per input of the head)."""
        if self.projection_dim is None:
            return max(1, min(DEFAULT_DIMENSION, n_params // 2))
        return check_projection_dimension(self.projection_dim, n_params, self.name)

    def fit(self, trained: TrainedProblem) -> Self:
        start = time.perf_counter()
        problem = trained.problem
        dimension = self._checked_dimension(problem, trained.n_params)
        itemsize = trained.theta.element_size()
        check_memory(
            self.ensemble_size * trained.n_params * dimension * itemsize,
            f"trak's {self.ensemble_size} projection matrices ({trained.n_params} x {dimension})",
            fix="lower projection_dim or ensemble_size",
            device=problem.device,
        )
        thetas, train_seconds = ensemble_members(
            trained, self.ensemble_size, self.ensemble, self.name
        )
        members = []
        for member, theta in enumerate(thetas):
            projection = random_projection(
                trained.n_params,
                dimension,
                self.projection,
                self.seed + member,
                like=trained.theta,
            )
            grads, _ = output_function(
                trained.model, problem, theta, problem.train, self.batch_size
            )
            features = grads @ projection
            curvature = features.T @ features / problem.n_train
            curvature.diagonal().add_(self.damping)
            factor, info = torch.linalg.cholesky_ex(curvature)
            if int(info) != 0:
                smallest = float(torch.linalg.eigvalsh(curvature)[0]) - self.damping
                raise FidelityError(
                    f"trak: the projected curvature of member {member} of "
                    f"{problem.name!r} ({dimension} dimensions) plus damping "
                    f"{self.damping:g} is singular (smallest eigenvalue {smallest:.3g}); "
                    "set damping > 0 or lower projection_dim"
                )
            members.append(TrakMember(theta, projection, factor))
        self.members_ = members
        self.trained_ = trained
        self.diagnostics_: dict[str, Any] = {
            "projection_dim": dimension,
            "ensemble": self.ensemble,
            "members": len(members),
            "member_training_seconds": train_seconds,
            "fit_seconds": time.perf_counter() - start,
        }
        return self

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        problem = trained.problem
        kernel = trained.theta.new_zeros(len(test), len(train))
        test_scale = trained.theta.new_zeros(len(test))
        train_scale = trained.theta.new_zeros(len(train))
        for member in self.members_:
            test_grads, test_derivative = output_function(
                trained.model, problem, member.theta, test, self.batch_size
            )
            train_grads, train_derivative = output_function(
                trained.model, problem, member.theta, train, self.batch_size
            )
            test_features = test_grads @ member.projection
            train_features = train_grads @ member.projection
            solved = torch.cholesky_solve(test_features.T, member.cholesky).T
            kernel += solved @ train_features.T
            test_scale += test_derivative
            train_scale += train_derivative
        count = len(self.members_)
        kernel /= count
        deltas = (test_scale / count)[:, None] * kernel * (train_scale / count)[None, :]
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return deltas / problem.n_train
