"""Group effects (Koh et al. 2019, "On the accuracy of influence functions for measuring group
effects"): retrain without whole groups of training points and compare with the additive
prediction, the sum of the estimator's deltas over the group.

Groups of each size are drawn three ways: ``random`` (uniform), ``class`` (uniform within one
class, the class drawn per group: coherent in the label) and ``neighbours`` (an anchor drawn
uniformly and its nearest training points in input space, Euclidean: coherent in the input).
Each group's weights are set to 0 (the same 1/N) and the model retrained through the subset
engine; measured: the change of the target on every test point, in the sign convention of every
other array.
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
from fidelity.core.objective import check_target
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.core.registry import constructor_params
from fidelity.retrain.execution import Execution
from fidelity.retrain.subsets import retrain_masks_over_seeds

GROUP_KINDS = ("random", "class", "neighbours")


@dataclass(frozen=True)
class GroupResult:
    """``members`` ``[n_groups, N]`` 0/1 (1: in the group, removed), ``kinds`` and ``sizes`` per
    group, ``per_seed`` ``[n_seeds, n_groups, n_test]`` measured changes."""

    members: Tensor
    kinds: tuple[str, ...]
    sizes: tuple[int, ...]
    per_seed: Tensor
    target: str
    info: dict[str, Any] = field(default_factory=dict)


def draw_groups(
    x: np.ndarray, labels: np.ndarray | None, sizes: tuple[int, ...], count: int, seed: int
) -> list[tuple[str, int, np.ndarray]]:
    """(kind, size, member indices) for ``count`` groups of every kind and size."""
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    flat = x.reshape(n, -1)
    found = []
    for size in sizes:
        for kind in GROUP_KINDS:
            if kind == "class" and labels is None:
                continue
            for _ in range(count):
                if kind == "random":
                    members = rng.choice(n, size=size, replace=False)
                elif kind == "class" and labels is not None:
                    classes = [c for c in np.unique(labels) if (labels == c).sum() >= size]
                    if not classes:
                        raise FidelityError(f"groups: no class has {size} training points")
                    chosen = classes[rng.integers(len(classes))]
                    members = rng.choice(np.flatnonzero(labels == chosen), size, replace=False)
                else:
                    anchor = rng.integers(n)
                    distances = ((flat - flat[anchor]) ** 2).sum(axis=1)
                    members = np.argsort(distances, kind="stable")[:size]
                found.append((kind, size, np.sort(members)))
    return found


class GroupsResponse:
    """Retraining without groups of growing size (see the module docstring).

    ``sizes``: group sizes; ``groups``: groups per kind and size; ``seeds``: training seeds (a
    Newton recipe's refit is unique and measured once); ``target`` as for `subsets`; ``seed``:
    the draw of the groups.
    """

    name: ClassVar[str] = "groups"

    def __init__(
        self,
        *,
        sizes: tuple[int, ...] | list[int] = (10, 40, 160),
        groups: int = 5,
        seeds: int = 1,
        target: str = "loss",
        seed: int = 0,
        group_size: int = 64,
    ) -> None:
        if not isinstance(sizes, tuple | list) or not sizes:
            raise FidelityError("groups.sizes must be a non-empty list of group sizes")
        for size in sizes:
            check_positive_int(size, "groups.sizes")
        check_target(target, "groups")
        self.sizes = tuple(int(size) for size in sizes)
        self.groups = check_positive_int(groups, "groups.groups")
        self.seeds = check_positive_int(seeds, "groups.seeds")
        self.target = target
        self.seed = check_int(seed, "groups.seed")
        self.group_size = check_positive_int(group_size, "groups.group_size")

    def get_params(self) -> dict[str, Any]:
        return constructor_params(self)

    def compute(
        self, trained: TrainedProblem, test: Examples, execution: Execution | None = None
    ) -> GroupResult:
        execution = execution or Execution()
        start = time.perf_counter()
        problem = trained.problem
        if max(self.sizes) >= problem.n_train:
            raise FidelityError(
                f"groups.sizes: a group of {max(self.sizes)} leaves too few of "
                f"{problem.n_train} training points"
            )
        labels = None
        if problem.loss == "cross_entropy":
            labels = problem.y_train.cpu().numpy()
        elif problem.loss == "bce":
            labels = (problem.y_train[:, 0] > 0.5).long().cpu().numpy()
        drawn = draw_groups(
            problem.x_train.cpu().numpy(), labels, self.sizes, self.groups, self.seed
        )
        members = np.zeros((len(drawn), problem.n_train))
        for row, (_, _, indices) in enumerate(drawn):
            members[row, indices] = 1.0
        weights = torch.as_tensor(1.0 - members, dtype=problem.dtype, device=problem.device)
        runs = retrain_masks_over_seeds(
            trained, weights, execution, seeds=self.seeds, group_size=self.group_size
        )
        per_seed = [run.change(test, self.target) for run in runs]
        seeds, computed = len(runs), sum(run.computed for run in runs)
        info = {
            "groups": len(drawn),
            "seeds": seeds,
            "refits": computed,
            "cached": seeds * len(drawn) - computed,
            "seconds": time.perf_counter() - start,
        }
        return GroupResult(
            torch.as_tensor(members),
            tuple(kind for kind, _, _ in drawn),
            tuple(size for _, size, _ in drawn),
            torch.stack(per_seed).detach().cpu(),
            self.target,
            info,
        )
