"""The response contract: what retraining actually does to the measurement when j is removed.

Every response returns ``delta[t, j] = m(z_t, theta_without_j) - m(z_t, theta_s)`` with m the
test loss (no regulariser), shaped ``[n_test, n_removed]`` (DESIGN.md's sign convention).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_loss
from fidelity.core.problem import Examples, TrainedProblem
from fidelity.core.registry import constructor_params
from fidelity.retrain.execution import Execution


@dataclass(frozen=True)
class ResponseResult:
    """Deltas ``[n_test, n_removed]``; ``per_seed`` ``[n_seeds, n_test, n_removed]`` when the
    response averages independent training seeds (``deltas`` is then their mean); ``thetas``
    ``[n_removed, p]``, the parameters the stage reached for each removal (seed 0's for a
    multi-seed response), which the decomposition compares in output space."""

    deltas: Tensor
    info: dict[str, Any] = field(default_factory=dict)
    per_seed: Tensor | None = None
    thetas: Tensor | None = None


class Response(ABC):
    """A stage of the response ladder; configured in ``__init__`` (validation only, no work),
    computed by ``compute``, which never changes its inputs."""

    name: ClassVar[str]

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, as configured (recorded in results)."""
        return constructor_params(self)

    @abstractmethod
    def compute(
        self,
        trained: TrainedProblem,
        test: Examples,
        removed: Tensor,
        execution: Execution | None = None,
    ) -> ResponseResult:
        """Actual deltas ``[n_test, n_removed]`` for removing each training index in ``removed``."""


def check_removed(removed: Tensor, n_train: int) -> Tensor:
    """The removed training indices as a flat long tensor, validated against ``n_train``."""
    removed = torch.as_tensor(removed, dtype=torch.long).flatten()
    if removed.numel() and (int(removed.min()) < 0 or int(removed.max()) >= n_train):
        raise FidelityError(f"removed indices must lie in [0, {n_train})")
    return removed


def stack_removed(thetas: dict[int, Tensor], removed: Tensor, trained: TrainedProblem) -> Tensor:
    """``[n_removed, p]``: the retrained parameters in the order of ``removed``."""
    if not removed.numel():
        return trained.theta.new_zeros((0, trained.n_params))
    return torch.stack([thetas[index] for index in removed.tolist()])


def measure(trained: TrainedProblem, thetas: Tensor, test: Examples) -> Tensor:
    """Test loss of each parameter vector, ``[n_models, n_test]``."""
    model, loss = trained.model, trained.problem.loss
    return torch.func.vmap(lambda theta: per_example_loss(model, loss, theta, test))(thetas)
