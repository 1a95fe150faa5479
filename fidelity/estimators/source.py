"""SOURCE (Bae et al. 2024): the training run unrolled segment by segment, each segment's
dynamics linearised with a fixed curvature."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import Tensor

from fidelity.core.checks import check_nonnegative, check_positive_int
from fidelity.core.curvature import CurvatureOperator
from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_grads
from fidelity.core.problem import Examples, MinibatchRecipe, Problem, TrainedProblem
from fidelity.core.training import check_minibatch
from fidelity.estimators.base import Estimator
from fidelity.estimators.kfac import EkfacEstimator
from fidelity.estimators.replay import spaced_steps, training_trajectory, trajectory_state

CURVATURES = ("gnh", "ekfac")
HORIZONS = ("run", "stationary")


@dataclass(frozen=True)
class Segment:
    """One stretch of the run, linearised: its end step and parameters there, the spectral
    form of its curvature (dense eigenbasis ``basis`` or an EK-FAC fitted there), Adam's
    diagonal scaling (ones for SGD) and, per eigenvalue, the 2 x 2 propagation of (position,
    momentum) over the stretch and its response to a constant gradient."""

    end: int
    theta: Tensor
    scale: Tensor  # D^{1/2}: Adam's preconditioner square root, ones for SGD, [p]
    basis: Tensor | None  # [p, p] eigenvectors of D^{1/2} C D^{1/2} (gnh)
    ekfac: EkfacEstimator | None
    propagation: Tensor  # [..., 2, 2] T^K per eigenvalue
    response: Tensor  # [..., 2] sum_{i<K} T^i e per eigenvalue

    def to_eigen(self, vectors: Tensor) -> Tensor:
        """Q^T v for rows v (in the curvature's eigenbasis; EK-FAC: per layer)."""
        if self.basis is not None:
            return vectors @ self.basis
        assert self.ekfac is not None
        return _kronecker_rotate(self.ekfac, vectors, transpose=True)

    def from_eigen(self, vectors: Tensor) -> Tensor:
        if self.basis is not None:
            return vectors @ self.basis.T
        assert self.ekfac is not None
        return _kronecker_rotate(self.ekfac, vectors, transpose=False)


def _kronecker_rotate(estimator: EkfacEstimator, vectors: Tensor, *, transpose: bool) -> Tensor:
    """Rows of ``vectors`` ``[m, p]`` into (``transpose``) or out of the EK-FAC eigenbasis, each
    covered layer by its Kronecker factors; the parameters of uncovered layers are left out
    (zero), as EK-FAC's own products leave them."""
    result = torch.zeros_like(vectors)
    for block, (s_vectors, a_vectors) in zip(estimator.blocks_, estimator.bases_, strict=True):
        matrices = block.matrices(vectors).to(s_vectors.dtype)
        if transpose:
            rotated = s_vectors.T @ matrices @ a_vectors
        else:
            rotated = s_vectors @ matrices @ a_vectors.T
        block.scatter(rotated.to(vectors.dtype), result)
    return result


def _ekfac_eigenvalues(estimator: EkfacEstimator, like: Tensor) -> Tensor:
    """The EK-FAC eigenvalues (weight decay and damping included) laid out like theta."""
    result = torch.full_like(like, float("nan"))
    for block, denominator in zip(estimator.blocks_, estimator.denominators_, strict=True):
        block.scatter(denominator.to(like.dtype).unsqueeze(0), result.unsqueeze(0))
    return result


def linear_dynamics(
    eigenvalues: Tensor, steps: int, rate: float, carry: float, gain: float, stationary: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per curvature eigenvalue l: the momentum recursion m' = carry m + gain (l y + c),
    y' = y - rate m' over ``steps`` steps: (T^K ``[..., 2, 2]``, sum_{i<K} T^i e ``[..., 2]``,
    and which directions were unstable). State (y, m); e = (-rate gain, gain) is a constant
    gradient c's entry. ``stationary``: K = infinity, T^K = 0 and the response (-1/l, 0), the
    fixed point of the recursion. A direction the linearised recursion amplifies (spectral
    radius >= 1: a curvature beyond the edge of stability, or l <= 0) is treated as converged
    within the stretch, as training, which did not blow up there, shows it to be."""
    shape = eigenvalues.shape
    values = eigenvalues.reshape(-1)
    transition = values.new_zeros(values.numel(), 2, 2)
    transition[:, 0, 0] = 1 - rate * gain * values
    transition[:, 0, 1] = -rate * carry
    transition[:, 1, 0] = gain * values
    transition[:, 1, 1] = carry
    entry = values.new_tensor([-rate * gain, gain]).expand(values.numel(), 2)
    radius = torch.linalg.eigvals(transition).abs().amax(dim=1)
    unstable = (radius >= 1) | (values <= 0)
    fixed = torch.stack([-1 / values.where(values > 0, 1.0), torch.zeros_like(values)], dim=1)
    if stationary:
        power = torch.zeros_like(transition)
        response = fixed.clone()
    else:
        power = torch.eye(2, dtype=values.dtype, device=values.device).expand_as(transition).clone()
        response = torch.zeros_like(entry)
        for _ in range(steps):
            response = (transition @ response.unsqueeze(-1)).squeeze(-1) + entry
            power = transition @ power
    power[unstable] = 0.0
    response[unstable] = fixed[unstable]
    return power.reshape(*shape, 2, 2), response.reshape(*shape, 2), unstable.reshape(shape)


class SourceEstimator(Estimator):
    """SOURCE (Bae et al. 2024): the removal effect through the recorded run, approximated
    stretch by stretch.

    The run's T steps are split into ``segments`` stretches of equal length. In stretch l the
    dynamics are linearised with a fixed curvature C_l (``curvature``: the dense Gauss-Newton
    matrix, or EK-FAC, plus weight decay and ``damping``) at its last step, the recipe's
    learning rate and momentum (SGD: heavy ball; Adam: the moment average in the coordinates of
    its diagonal preconditioner D_l at that step, bias correction ignored), and the removed
    point's gradient, injected once per epoch, by its average per step g_j(theta_l) / N. The
    perturbation of (parameters, momentum) then propagates exactly through the later stretches'
    linear maps, eigenvalue by eigenvalue:

        delta_hat[t, j] = -(1/N) sum_l a_l^T R_l g_j(theta_l)

    with a_l the measurement's adjoint carried back from the end of the run and R_l the
    stretch's response to a constant gradient. Removal, in DESIGN.md's convention (positive: j
    helped). ``horizon = "stationary"`` lets the last stretch run to its fixed point (K = inf):
    with one segment this is the influence function (1/N) g_t^T (C + damping I)^{-1} g_j at
    theta_s with that curvature (``gnh`` at the same damping). ``horizon = "run"`` (default)
    keeps every stretch's real length. EK-FAC curvature needs an SGD recipe (Adam's diagonal
    scaling does not keep the Kronecker eigenbasis).
    """

    name = "source"
    training_path = True

    def __init__(
        self,
        *,
        segments: int = 4,
        curvature: str = "gnh",
        damping: float = 0.0,
        horizon: str = "run",
        checkpoint_every: int | None = None,
        batch_size: int = 512,
    ) -> None:
        self.segments = check_positive_int(segments, "source.segments")
        if curvature not in CURVATURES:
            raise FidelityError(
                f"source.curvature must be one of {', '.join(CURVATURES)}, got {curvature!r}"
            )
        if horizon not in HORIZONS:
            raise FidelityError(
                f"source.horizon must be one of {', '.join(HORIZONS)}, got {horizon!r}"
            )
        self.curvature = curvature
        self.damping = check_nonnegative(damping, "source.damping")
        self.horizon = horizon
        if checkpoint_every is not None:
            check_positive_int(checkpoint_every, "source.checkpoint_every")
        self.checkpoint_every = checkpoint_every
        self.batch_size = check_positive_int(batch_size, "source.batch_size")

    def check_problem(self, problem: Problem) -> None:
        recipe = check_minibatch(problem, self.name)
        if self.curvature == "ekfac" and recipe.optimizer != "sgd":
            raise FidelityError(
                "source: curvature 'ekfac' needs an SGD recipe (Adam's diagonal preconditioner "
                "does not keep the Kronecker eigenbasis); use curvature 'gnh'"
            )
        spaced_steps(problem, self.segments, "source.segments")

    def fit(self, trained: TrainedProblem) -> Self:
        start = time.perf_counter()
        self.check_problem(trained.problem)
        recipe = check_minibatch(trained.problem, self.name)
        trajectory = training_trajectory(trained, self.name, self.checkpoint_every)
        ends = spaced_steps(trained.problem, self.segments, "source.segments")
        starts = [0, *ends[:-1]]
        self.segments_ = []
        unstable = 0
        for number, (first_step, end) in enumerate(zip(starts, ends, strict=True)):
            theta, _, second = trajectory_state(trajectory, trained, end)
            stationary = self.horizon == "stationary" and number == self.segments - 1
            segment, flagged = self._segment(
                trained, recipe, theta, second, end, end - first_step, stationary
            )
            self.segments_.append(segment)
            unstable += flagged
        self.trained_ = trained
        self.diagnostics_: dict[str, Any] = {
            "segment_ends": ends,
            "unstable_directions": unstable,
            "fit_seconds": time.perf_counter() - start,
        }
        return self

    def _segment(
        self,
        trained: TrainedProblem,
        recipe: MinibatchRecipe,
        theta: Tensor,
        second: Tensor,
        end: int,
        steps: int,
        stationary: bool,
    ) -> tuple[Segment, int]:
        at = dataclasses.replace(trained, theta=theta, trajectory=None, optimizer_state=None)
        if recipe.optimizer == "sgd":
            scale = torch.ones_like(theta)
            carry, gain = recipe.momentum, 1.0
        else:
            corrected = second / (1 - recipe.beta2**end)
            scale = 1 / (corrected.clamp_min(0).sqrt() + recipe.eps).sqrt()
            carry, gain = recipe.momentum, 1 - recipe.momentum
        basis, ekfac = None, None
        if self.curvature == "gnh":
            matrix = CurvatureOperator(at, "gnh", self.batch_size).dense()
            matrix.diagonal().add_(self.damping)
            matrix = scale.unsqueeze(1) * matrix * scale.unsqueeze(0)
            eigenvalues, basis = torch.linalg.eigh(0.5 * (matrix + matrix.T))
        else:
            ekfac = EkfacEstimator(damping=self.damping, batch_size=self.batch_size).fit(at)
            eigenvalues = _ekfac_eigenvalues(ekfac, theta)
        covered = torch.isfinite(eigenvalues)
        # Adam divides its first moment by 1 - beta1^t: the stretch's rate at its last step
        rate = recipe.learning_rate
        if recipe.optimizer == "adam":
            rate = rate / (1 - recipe.momentum**end)
        propagation, response, unstable = linear_dynamics(
            eigenvalues.where(covered, 1.0), steps, rate, carry, gain, stationary
        )
        # parameters EK-FAC does not cover carry no curvature: nothing propagates there
        propagation[~covered] = 0.0
        response[~covered] = 0.0
        segment = Segment(end, theta, scale, basis, ekfac, propagation, response)
        return segment, int((unstable & covered).sum())

    def parameter_changes(self, train: Examples) -> Tensor | None:
        """The predicted theta_T(without j) - theta_s for each row of ``train``, ``[n_train, p]``:
        the forward form of ``scores`` (g_t(theta_T)^T of it is the score), each stretch's
        response to the removed point's gradient carried through the later stretches."""
        trained = self._check_fitted()
        problem, model = trained.problem, trained.model
        position = trained.theta.new_zeros(len(train), trained.n_params)
        momentum = torch.zeros_like(position)
        for segment in self.segments_:
            rotated_position = segment.to_eigen(position / segment.scale)
            rotated_momentum = segment.to_eigen(momentum * segment.scale)
            power = segment.propagation
            new_position = rotated_position * power[..., 0, 0] + rotated_momentum * power[..., 0, 1]
            new_momentum = rotated_position * power[..., 1, 0] + rotated_momentum * power[..., 1, 1]
            gradients = per_example_grads(
                model, problem.loss, segment.theta, train, self.batch_size
            )
            # removal: the point's gradient leaves the steps, c = -g_j / N
            entry = -segment.to_eigen(gradients * segment.scale) / problem.n_train
            new_position = new_position + segment.response[..., 0] * entry
            new_momentum = new_momentum + segment.response[..., 1] * entry
            position = segment.from_eigen(new_position) * segment.scale
            momentum = segment.from_eigen(new_momentum) / segment.scale
        return position

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        problem, model = trained.problem, trained.model
        final = self.segments_[-1].theta
        # the measurement's adjoint for (parameters, momentum) at the end of the run
        adjoint = per_example_grads(model, problem.loss, final, test, self.batch_size)
        adjoint_momentum = torch.zeros_like(adjoint)
        total = final.new_zeros(len(test), len(train))
        for segment in reversed(self.segments_):
            # into the stretch's coordinates: y = D^{-1/2} theta, m~ = D^{1/2} m, rotated
            position = segment.to_eigen(adjoint * segment.scale)
            momentum = segment.to_eigen(adjoint_momentum / segment.scale)
            gradients = per_example_grads(
                model, problem.loss, segment.theta, train, self.batch_size
            )
            entry = segment.to_eigen(gradients * segment.scale)  # D^{1/2} g_j, rotated
            response_position = position * segment.response[..., 0]
            response_momentum = momentum * segment.response[..., 1]
            total += (response_position + response_momentum) @ entry.T
            # back through the stretch: a <- T^K^T a, per eigenvalue
            power = segment.propagation
            new_position = position * power[..., 0, 0] + momentum * power[..., 1, 0]
            new_momentum = position * power[..., 0, 1] + momentum * power[..., 1, 1]
            adjoint = segment.from_eigen(new_position) / segment.scale
            adjoint_momentum = segment.from_eigen(new_momentum) * segment.scale
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return -total / problem.n_train
