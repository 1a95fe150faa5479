"""Top-k counterfactual removal: retrain without the k training points an attribution ranks most
helpful to one test point, and measure what happens to that test point.

For each ranking (an estimator's deltas, and two baselines: k random points, and the k training
points of highest loss at theta_s), each test point t and each k of the grid, the k points with
the largest delta[t, j] (the most helpful ones) are dropped (weight 0, the same 1/N) and the
model retrained with the recipe (`fidelity.retrain.subsets.retrain_masks`: cached, grouped,
paired seeds).
Measured: the change of the target on t, m(z_t, theta_without_k) - m(z_t, theta_s), and whether
t's prediction flips from correct to wrong (classification). A ranking that finds the points
that matter gives a larger change and more flips for the same k; brittleness (dattri's) is the
smallest k that flips a correctly classified test point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fidelity.core.checks import check_int, check_positive_int
from fidelity.core.errors import FidelityError
from fidelity.core.objective import check_target, per_example_loss
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.core.registry import constructor_params
from fidelity.retrain.execution import Execution
from fidelity.retrain.subsets import mask_digest, retrain_masks_over_seeds

RANDOM, HIGHEST_LOSS = "random", "highest loss"


@dataclass(frozen=True)
class CounterfactualResult:
    """``methods`` (the rankings, estimators first), ``ks``; ``change`` ``[n_seeds, n_methods,
    n_test, n_ks]``; ``correct_before`` ``[n_seeds, n_test]`` and ``correct_after`` (the shape of
    ``change``) for classification problems, else None."""

    methods: tuple[str, ...]
    ks: tuple[int, ...]
    change: Tensor
    correct_before: Tensor | None
    correct_after: Tensor | None
    target: str
    info: dict[str, Any] = field(default_factory=dict)


def _correct(trained: TrainedProblem, thetas: Tensor, test: Examples) -> Tensor | None:
    """``[n_models, n_test]``: whether each model predicts each test label (None for mse)."""
    problem, model = trained.problem, trained.model
    if problem.loss == "mse":
        return None

    def single(theta: Tensor) -> Tensor:
        outputs = model(theta, test.x)
        if problem.loss == "bce":
            return (outputs[:, 0] > 0) == (test.y[:, 0] > 0.5)
        return outputs.argmax(dim=1) == test.y

    return torch.func.vmap(single)(thetas)


class CounterfactualResponse:
    """Retraining without each ranking's top-k points per test point (see the module docstring).

    ``ks``: the removal budgets; ``seeds``: training seeds (a Newton recipe's refit is unique and
    measured once); ``target``: the measurement (as for `subsets`); ``seed``: the random baseline.
    """

    name: ClassVar[str] = "counterfactual"

    def __init__(
        self,
        *,
        ks: tuple[int, ...] | list[int] = (10, 20, 40),
        seeds: int = 1,
        target: str = "loss",
        seed: int = 0,
        group_size: int = 64,
    ) -> None:
        if not isinstance(ks, tuple | list) or not ks:
            raise FidelityError("counterfactual.ks must be a non-empty list of removal counts")
        for k in ks:
            check_positive_int(k, "counterfactual.ks")
        if sorted(set(ks)) != list(ks):
            raise FidelityError("counterfactual.ks must be increasing, without repeats")
        check_target(target, "counterfactual")
        self.ks = tuple(int(k) for k in ks)
        self.seeds = check_positive_int(seeds, "counterfactual.seeds")
        self.target = target
        self.seed = check_int(seed, "counterfactual.seed")
        self.group_size = check_positive_int(group_size, "counterfactual.group_size")

    def get_params(self) -> dict[str, Any]:
        return constructor_params(self)

    def rankings(
        self, trained: TrainedProblem, scores: dict[str, np.ndarray], n_test: int
    ) -> dict[str, np.ndarray]:
        """``[n_test, N]`` training indices, most helpful first, per ranking."""
        problem = trained.problem
        if self.ks[-1] >= problem.n_train:
            raise FidelityError(
                f"counterfactual.ks: removing {self.ks[-1]} of {problem.n_train} training points "
                "leaves too few; lower the largest k"
            )
        found = {}
        for label, matrix in scores.items():
            if matrix.shape != (n_test, problem.n_train):
                raise FidelityError(f"counterfactual: scores of {label!r} are not [n_test, N]")
            # stable sort on the negated deltas: the largest (most helpful) first, ties by index
            found[label] = np.argsort(-matrix, axis=1, kind="stable")
        rng = np.random.default_rng(self.seed)
        found[RANDOM] = np.stack([rng.permutation(problem.n_train) for _ in range(n_test)])
        losses = per_example_loss(trained.model, problem.loss, trained.theta, problem.train)
        order = np.argsort(-losses.detach().cpu().numpy(), kind="stable")
        found[HIGHEST_LOSS] = np.repeat(order[None, :], n_test, axis=0)
        return found

    def compute(
        self,
        trained: TrainedProblem,
        test: Examples,
        scores: dict[str, np.ndarray],
        execution: Execution | None = None,
    ) -> CounterfactualResult:
        execution = execution or Execution()
        start = time.perf_counter()
        problem = trained.problem
        n_test = len(test)
        rankings = self.rankings(trained, scores, n_test)
        methods = tuple(rankings)
        # One mask per (method, test point, k); identical drop sets are trained once.
        masks: list[np.ndarray] = []
        slots: list[tuple[int, int, int, int]] = []
        unique: dict[str, int] = {}
        for m, method in enumerate(methods):
            for t in range(n_test):
                for kk, k in enumerate(self.ks):
                    mask = np.ones(problem.n_train)
                    mask[rankings[method][t, :k]] = 0.0
                    digest = mask_digest(mask)
                    if digest not in unique:
                        unique[digest] = len(masks)
                        masks.append(mask)
                    slots.append((m, t, kk, unique[digest]))
        weights = torch.as_tensor(np.stack(masks), dtype=problem.dtype, device=problem.device)
        runs = retrain_masks_over_seeds(
            trained, weights, execution, seeds=self.seeds, group_size=self.group_size
        )
        seeds, computed = len(runs), sum(run.computed for run in runs)
        shape = (seeds, len(methods), n_test, len(self.ks))
        change = torch.empty(shape, dtype=torch.float64)
        correct_after = torch.zeros(shape, dtype=torch.bool)
        before_rows: list[Tensor] = []
        classification = problem.loss != "mse"
        for offset, run in enumerate(runs):
            changes = run.change(test, self.target)  # [n_masks, n_test]
            right = _correct(run.trained, run.thetas, test)
            before = _correct(run.trained, run.trained.theta.unsqueeze(0), test)
            if before is not None:
                before_rows.append(before[0].cpu())
            for m, t, kk, row in slots:
                change[offset, m, t, kk] = float(changes[row, t])
                if right is not None:
                    correct_after[offset, m, t, kk] = bool(right[row, t])
        info = {
            "masks": len(masks),
            "seeds": seeds,
            "refits": computed,
            "cached": seeds * len(masks) - computed,
            "seconds": time.perf_counter() - start,
        }
        return CounterfactualResult(
            methods,
            self.ks,
            change,
            torch.stack(before_rows) if classification else None,
            correct_after if classification else None,
            self.target,
            info,
        )
