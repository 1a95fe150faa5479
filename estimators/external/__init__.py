"""Adapters that wrap other influence libraries in this project's estimator contract.

Each adapter imports its library lazily (a missing library is a FidelityError naming how to
install it), maps our settings to the library's own, and converts its output to DESIGN.md's
convention. They are not in the ESTIMATORS registry, so that the main environment needs none of
these libraries; a suite names them by import path, e.g.
``kind = "estimators.external.kronfluence:KronfluenceEstimator"``.
"""

from __future__ import annotations

from torch import nn

from fidelity.problem import TrainedProblem


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
