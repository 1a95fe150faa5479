"""Training-path estimators: attribution through the recorded minibatch run of theta_s.

Influence functions assume theta_s sits at an optimum of J; a network trained for a fixed number
of minibatch epochs does not. These estimators follow the run itself (``fidelity.core.training``:
the batch order is a pure function of the seed, every step a pure function of the weights):

- ``replay``: the exact derivative of the final measurement with respect to each training
  point's weight, by reverse mode through every optimizer step (MAGIC's estimand, Ilyas and
  Engstrom 2025), with no Hessian and no convergence assumed.
- ``tracin-cp``: TracInCP (Pruthi et al. 2020), the learning-rate weighted sum of gradient dot
  products over checkpoints of the run.

Training points are recognised by content among the problem's training rows (the run knows a
point by its position); a duplicated row is scored at its first occurrence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Self

import torch
from torch import Tensor

from fidelity.core.checks import check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.files import row_keys
from fidelity.core.objective import check_target, per_example_grads
from fidelity.core.problem import Examples, Problem, TrainedProblem, Trajectory
from fidelity.core.training import (
    batch_objective,
    check_minibatch,
    optimizer_step,
    record_trajectory,
    replay_states,
    step_batches,
    steps_per_epoch,
)
from fidelity.estimators.base import Estimator


def training_trajectory(trained: TrainedProblem, owner: str, every: int | None) -> Trajectory:
    """theta_s's recorded run: the one training kept (any spacing), else recorded now every
    ``every`` steps (default one epoch). The recording must end at theta_s."""
    recipe = check_minibatch(trained.problem, owner)
    trajectory = trained.trajectory
    if trajectory is None or (every is not None and trajectory.every != every):
        every = every or steps_per_epoch(recipe, trained.problem.n_train)
        trajectory = record_trajectory(trained.model, trained.problem, every)
    if not torch.allclose(trajectory.thetas[-1], trained.theta, rtol=1e-6, atol=1e-9):
        raise FidelityError(
            f"{owner}: the recorded run of {trained.problem.name!r} does not end at theta_s; "
            "theta_s was not trained by this problem's recipe (retrain it without the cache)"
        )
    return trajectory


def total_steps(problem: Problem, owner: str) -> int:
    """The number of steps of the problem's minibatch run (a one-line error for a Newton
    recipe)."""
    recipe = check_minibatch(problem, owner)
    return recipe.epochs * steps_per_epoch(recipe, problem.n_train)


def spaced_steps(problem: Problem, count: int, setting: str) -> list[int]:
    """``count`` step counts evenly spaced over the problem's run, the last at its end (where
    segments end, or checkpoints sit); a one-line error naming ``setting`` when the run has
    fewer steps."""
    owner = setting.split(".")[0]
    total = total_steps(problem, owner)
    if count > total:
        raise FidelityError(
            f"{setting} is {count}, but the run of {problem.name!r} has only {total} steps"
        )
    return [round(total * (c + 1) / count) for c in range(count)]


def training_positions(trained: TrainedProblem, train: Examples, owner: str) -> Tensor:
    """The index in the training set of each example of ``train`` (its first occurrence)."""
    positions: dict[bytes, int] = {}
    for index, key in enumerate(row_keys(trained.problem.train)):
        positions.setdefault(key, index)
    found = [positions.get(key) for key in row_keys(train)]
    missing = sum(position is None for position in found)
    if missing:
        raise FidelityError(
            f"{owner} scores points of the training run; {missing} of the {len(found)} "
            "examples asked for are not training points of the problem"
        )
    return torch.tensor(found, dtype=torch.long)


class ReplayEstimator(Estimator):
    """delta_hat[t, j] = -d m(z_t, theta_T(w)) / d w_j at w = 1: the first-order change of the
    measurement at the end of the recorded training run when w_j goes from 1 to 0 (removal, in
    DESIGN.md's convention: positive means j helped).

    theta_T(w) is the recipe's run with example weights w: the same initialisation and batch
    order, each step descending (1/|B|) sum_{i in B} w_i L_i + (wd/2) ||theta||^2 by the
    recipe's optimizer (SGD with momentum or Adam). The derivative is exact (reverse mode
    through every step: a vector-Jacobian product of the step map in theta, the optimizer's
    moments and the batch's weights, vmapped over test points), so it needs no Hessian, no
    damping and no convergence. The run is recorded every ``checkpoint_every`` steps (default
    one epoch) and each stretch between checkpoints is recomputed on the way back, so memory
    holds one stretch, not the whole run. ``target``: the measurement (``loss``, ``margin``,
    ``log-probability``). ``test_batch``: test points whose adjoints travel together.
    """

    name = "replay"
    training_path = True

    def __init__(
        self,
        *,
        target: str = "loss",
        checkpoint_every: int | None = None,
        test_batch: int = 64,
        batch_size: int = 512,
    ) -> None:
        self.target = check_target(target, "replay")
        if checkpoint_every is not None:
            check_positive_int(checkpoint_every, "replay.checkpoint_every")
        self.checkpoint_every = checkpoint_every
        self.test_batch = check_positive_int(test_batch, "replay.test_batch")
        self.batch_size = check_positive_int(batch_size, "replay.batch_size")

    def check_problem(self, problem: Problem) -> None:
        check_minibatch(problem, self.name)

    def fit(self, trained: TrainedProblem) -> Self:
        start = time.perf_counter()
        self.check_problem(trained.problem)
        self.trajectory_ = training_trajectory(trained, self.name, self.checkpoint_every)
        self.computed_: dict[bytes, Tensor] = {}
        self.trained_ = trained
        self.diagnostics_: dict[str, Any] = {
            "steps": self.trajectory_.total_steps,
            "checkpoints": len(self.trajectory_.steps),
            "fit_seconds": time.perf_counter() - start,
        }
        return self

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        columns = training_positions(trained, train, self.name)
        # one reverse pass gives every training point's weight gradient: a second call for the
        # same test points (the ranking, then the removed points, then all points for the LDS)
        # reuses it
        key = b"".join(row_keys(test))
        gradients = self.computed_.get(key)
        if gradients is None:
            parts = [
                self.weight_gradients(
                    test.subset(torch.arange(i, min(i + self.test_batch, len(test))))
                )
                for i in range(0, len(test), self.test_batch)
            ]
            gradients = (
                torch.cat(parts) if parts else trained.theta.new_zeros(0, trained.problem.n_train)
            )
            self.computed_[key] = gradients
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return -gradients[:, columns.to(gradients.device)]

    def parameter_changes(self, train: Examples) -> Tensor | None:
        """-d theta_T / d w_j for each row of ``train``, ``[n_train, p]``: the first-order change
        of the final parameters when j is removed, by forward mode through the recorded run
        (one tangent per removed point, vmapped)."""
        trained = self._check_fitted()
        problem, trajectory = trained.problem, self.trajectory_
        recipe = check_minibatch(problem, self.name)
        columns = training_positions(trained, train, self.name).to(trained.theta.device)
        batches = step_batches(recipe, problem.n_train)
        theta, first, second = (t.clone() for t in trajectory.state(0))
        tangent = theta.new_zeros(len(columns), theta.numel())
        tangent_first, tangent_second = torch.zeros_like(tangent), torch.zeros_like(tangent)
        step_map = self._step_map()
        for number, index in enumerate(batches, start=1):
            index = index.to(theta.device)
            weights = torch.ones(len(index), dtype=theta.dtype, device=theta.device)
            # removal: each model's own point in this batch has weight tangent -1
            tangent_weights = -(index.unsqueeze(0) == columns.unsqueeze(1)).to(theta.dtype)
            x, y = problem.x_train[index], problem.y_train[index]

            def push(
                dt: Tensor,
                df: Tensor,
                ds: Tensor,
                dw: Tensor,
                primals: tuple[Tensor, ...] = (theta, first, second, weights),
                x: Tensor = x,
                y: Tensor = y,
                n: int = number,
            ) -> tuple[Tensor, ...]:
                def advance(t: Tensor, f: Tensor, s: Tensor, w: Tensor) -> tuple[Tensor, ...]:
                    return step_map(t, f, s, w, x, y, n)

                return torch.func.jvp(advance, primals, (dt, df, ds, dw))[1]

            tangent, tangent_first, tangent_second = torch.func.vmap(push)(
                tangent, tangent_first, tangent_second, tangent_weights
            )
            theta, first, second = optimizer_step(
                recipe, theta, first, second, number, self._gradient(theta, weights, x, y)
            )
        return tangent

    def _step_map(self) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
        trained = self._check_fitted()
        problem, model = trained.problem, trained.model
        recipe = check_minibatch(problem, self.name)

        def step_map(
            theta: Tensor,
            first: Tensor,
            second: Tensor,
            weights: Tensor,
            x: Tensor,
            y: Tensor,
            number: int,
        ) -> tuple[Tensor, Tensor, Tensor]:
            grad = torch.func.grad(batch_objective, argnums=2)(model, problem, theta, weights, x, y)
            return optimizer_step(recipe, theta, first, second, number, grad, differentiable=True)

        return step_map

    def _gradient(self, theta: Tensor, weights: Tensor, x: Tensor, y: Tensor) -> Tensor:
        trained = self._check_fitted()
        return torch.func.grad(batch_objective, argnums=2)(
            trained.model, trained.problem, theta, weights, x, y
        )

    def weight_gradients(self, test: Examples) -> Tensor:
        """``[n_test, N]``: d m(z_t, theta_T(w)) / d w_i for every training point, by reverse mode
        through the recorded run."""
        trained = self._check_fitted()
        problem, model, trajectory = trained.problem, trained.model, self.trajectory_
        recipe = check_minibatch(problem, self.name)
        theta_end = trajectory.thetas[-1]
        adjoint = per_example_grads(
            model, problem.loss, theta_end, test, self.batch_size, target=self.target
        )  # d m / d theta_T, [n_test, p]
        adjoint_first = torch.zeros_like(adjoint)
        adjoint_second = torch.zeros_like(adjoint)
        result = theta_end.new_zeros(len(test), problem.n_train)
        batches = step_batches(recipe, problem.n_train)

        step_map = self._step_map()
        stops = trajectory.steps
        for segment in reversed(range(len(stops) - 1)):
            states = replay_states(trajectory, model, problem, stops[segment], stops[segment + 1])
            for number in reversed(range(stops[segment] + 1, stops[segment + 1] + 1)):
                theta, first, second = states[number - 1 - stops[segment]]
                index = batches[number - 1].to(theta.device)
                weights = torch.ones(len(index), dtype=theta.dtype, device=theta.device)
                x, y = problem.x_train[index], problem.y_train[index]
                pullback = torch.func.vjp(
                    lambda t, f, s, w, x=x, y=y, n=number: step_map(t, f, s, w, x, y, n),
                    theta,
                    first,
                    second,
                    weights,
                )[1]
                adjoint, adjoint_first, adjoint_second, weight_adjoint = torch.func.vmap(pullback)(
                    (adjoint, adjoint_first, adjoint_second)
                )
                result[:, index] += weight_adjoint
        return result


def trajectory_state(
    trajectory: Trajectory, trained: TrainedProblem, step: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(theta, first, second) after ``step`` steps of the recorded run: the nearest checkpoint
    at or before it, replayed forward."""
    if not 0 <= step <= trajectory.total_steps:
        raise FidelityError(f"step {step} is outside the run's 0 .. {trajectory.total_steps}")
    start = max(s for s in trajectory.steps if s <= step)
    return replay_states(trajectory, trained.model, trained.problem, start, step + 1)[-1]


class TracInCheckpointsEstimator(Estimator):
    """delta_hat[t, j] = (1/N) sum_c (eta_c / sum_c' eta_c') g_t(theta_c)^T g_j(theta_c):
    TracInCP (Pruthi et al. 2020), the learning-rate weighted average of the gradient dot
    product over ``checkpoints`` checkpoints of the recorded run, evenly spaced and ending at
    theta_s (the last step). Same sign as influence (positive: removing j is predicted to raise
    t's loss) and grad-dot's units: with one checkpoint it is ``grad-dot`` exactly. The
    recipes here keep a constant learning rate, so the weights are equal; Adam's
    preconditioner is not applied (the gradients are plain, as in TracIn and captum).
    """

    name = "tracin-cp"
    training_path = True

    def __init__(
        self, *, checkpoints: int = 5, checkpoint_every: int | None = None, batch_size: int = 512
    ) -> None:
        self.checkpoints = check_positive_int(checkpoints, "tracin-cp.checkpoints")
        if checkpoint_every is not None:
            check_positive_int(checkpoint_every, "tracin-cp.checkpoint_every")
        self.checkpoint_every = checkpoint_every
        self.batch_size = check_positive_int(batch_size, "tracin-cp.batch_size")

    def check_problem(self, problem: Problem) -> None:
        spaced_steps(problem, self.checkpoints, "tracin-cp.checkpoints")

    def fit(self, trained: TrainedProblem) -> Self:
        start = time.perf_counter()
        self.steps_ = spaced_steps(trained.problem, self.checkpoints, "tracin-cp.checkpoints")
        recipe = check_minibatch(trained.problem, self.name)
        trajectory = training_trajectory(trained, self.name, self.checkpoint_every)
        self.thetas_ = [trajectory_state(trajectory, trained, step)[0] for step in self.steps_]
        rates = torch.full((self.checkpoints,), recipe.learning_rate, dtype=torch.float64)
        self.weights_ = (rates / rates.sum()).tolist()
        self.trained_ = trained
        self.diagnostics_: dict[str, Any] = {
            "checkpoint_steps": self.steps_,
            "fit_seconds": time.perf_counter() - start,
        }
        return self

    def scores(self, test: Examples, train: Examples) -> Tensor:
        trained = self._check_fitted()
        start = time.perf_counter()
        problem = trained.problem
        model = trained.model
        total = trained.theta.new_zeros(len(test), len(train))
        for theta, weight in zip(self.thetas_, self.weights_, strict=True):
            test_grads = per_example_grads(model, problem.loss, theta, test, self.batch_size)
            train_grads = per_example_grads(model, problem.loss, theta, train, self.batch_size)
            total += weight * (test_grads @ train_grads.T)
        self.diagnostics_["scores_seconds"] = time.perf_counter() - start
        return total / problem.n_train
