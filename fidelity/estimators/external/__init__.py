"""Adapters that wrap other influence libraries in this project's estimator contract.

Each adapter imports its library lazily (a missing library is a FidelityError naming how to
install it), maps our settings to the library's own, and converts its output to DESIGN.md's
convention. They are not in the ESTIMATORS registry, so that the main environment needs none of
these libraries; a suite names them by import path, e.g.
``kind = "fidelity.estimators.external.kronfluence:KronfluenceEstimator"``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fidelity.core.errors import FidelityError
from fidelity.core.problem import Examples, Problem, TrainedProblem


def trained_module(trained: TrainedProblem) -> nn.Module:
    """A fresh module of the problem's architecture holding theta_s (for libraries that need an
    nn.Module); the trained problem's own module is never touched."""
    problem = trained.problem
    module = problem.build_model().to(dtype=problem.dtype, device=problem.device)
    module.load_state_dict(trained.model.spec.unflatten(trained.theta.detach().clone()))
    return module.eval()


def with_parent(module: nn.Module) -> nn.Module:
    """``module``, or a one-element ``nn.Sequential`` around it when it has no submodules.

    Libraries that find a model's layers among its submodules (kronfluence replaces them in
    their parent; dattri collects parameters by submodule) cannot handle a model that is a
    single layer, such as the logistic problems' bare ``nn.Linear``. Same parameters, same
    outputs."""
    return module if any(True for _ in module.children()) else nn.Sequential(module)


@contextlib.contextmanager
def library_context(trained: TrainedProblem, seed: int, library: str) -> Iterator[list[str]]:
    """Run a library call with torch's default dtype set to the problem's (libraries that
    allocate buffers with the default dtype would otherwise compute a float64 problem in
    float32) and torch's global RNG forked and seeded with ``seed`` (libraries that draw from
    it, such as random projections or sampled batches, become reproducible and leave the
    caller's RNG untouched); yields the list that collects the library's warnings."""
    messages: list[str] = []
    device = trained.problem.device
    devices = [] if device.type != "cuda" else [device.index or torch.cuda.current_device()]
    with default_dtype(trained.problem.dtype):
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.manual_seed(seed)
            yield messages
        for item in w:
            text = str(item.message)
            if library in item.filename and text not in messages:
                messages.append(text)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` for the block, restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def rows_of(train: Examples, problem: Problem) -> Tensor:
    """Positions of ``train``'s examples in the problem's training set, for libraries that score
    only their own training set; an example repeated in the training set has identical scores
    at every copy."""
    if len(train) == problem.n_train and torch.equal(train.x, problem.x_train):
        return torch.arange(problem.n_train)
    same_x = (train.x.unsqueeze(1) == problem.x_train.unsqueeze(0)).flatten(2).all(-1)
    same_y = train.y.unsqueeze(1) == problem.y_train.unsqueeze(0)
    same_y = same_y.reshape(*same_x.shape, -1).all(-1)
    matches = same_x & same_y
    if not bool(matches.any(1).all()):
        raise FidelityError("this library scores only the problem's own training points")
    return matches.float().argmax(1)


def record_scores(diagnostics: dict, deltas: Tensor, seconds: float, messages: list[str]) -> None:
    """Add a scores call's seconds, count of non-finite values and library warnings to an
    adapter's diagnostics (non-finite scores are a conformance finding, not an error)."""
    diagnostics["scores_seconds"] = seconds
    diagnostics["nonfinite_scores"] = int((~torch.isfinite(deltas)).sum())
    diagnostics["library_warnings"] = [*diagnostics.get("library_warnings", []), *messages]


def examples_loader(data: Examples, batch_size: int) -> torch.utils.data.DataLoader:
    """``data`` as the (x, y) DataLoader libraries take: in order, batches of ``batch_size``."""
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x, data.y), batch_size=max(1, batch_size)
    )
