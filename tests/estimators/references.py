"""Dense float64 references shared by the adapter tests."""

import torch

from fidelity.core.objective import per_example_grads


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (the conformance table's measure)."""
    return float((actual - expected).abs().max() / expected.abs().max())


def solve_scores(trained, system):
    """(1/N) g_t^T system^{-1} g_j for the problem's test and training points, ``[n_test, N]``."""
    problem = trained.problem
    g_test = per_example_grads(trained.model, problem.loss, trained.theta, problem.test)
    g_train = per_example_grads(trained.model, problem.loss, trained.theta, problem.train)
    return g_test @ torch.linalg.solve(system, g_train.T) / problem.n_train
