"""One contract test over every registered response (as test_api does for the estimators)."""

import pytest
import torch

from fidelity.core.cache import ArtifactCache
from fidelity.retrain import RESPONSES, Execution, Response


def ridge_leave_one_out(trained, test, removed):
    """Closed-form leave-one-out deltas of ridge regression (half squared error), N kept."""
    problem = trained.problem
    design = torch.cat([problem.x_train, torch.ones(problem.n_train, 1)], dim=1)
    test_design = torch.cat([test.x, torch.ones(len(test), 1)], dim=1)
    n, p = design.shape
    system = design.T @ design + n * problem.weight_decay * torch.eye(p)
    rhs = design.T @ problem.y_train[:, 0]

    def loss(theta):
        return 0.5 * (test_design @ theta - test.y[:, 0]) ** 2

    base = loss(torch.linalg.solve(system, rhs))
    columns = []
    for j in removed.tolist():
        x_j, y_j = design[j], problem.y_train[j, 0]
        theta = torch.linalg.solve(system - torch.outer(x_j, x_j), rhs - x_j * y_j)
        columns.append(loss(theta) - base)
    return torch.stack(columns, dim=1)


FIRST_ORDER = {"linear"}
FIRST_ORDER_TOLERANCE = 0.05


@pytest.mark.parametrize("name", RESPONSES.names())
def test_response_contract(name, trained_problems, tmp_path):
    trained = trained_problems("diabetes-ridge")
    problem = trained.problem
    cls = RESPONSES.get(name)
    response = cls()
    assert isinstance(response, Response) and response.name == name
    assert type(response)(**response.get_params()).get_params() == response.get_params()
    test = problem.test.subset(torch.arange(6))
    removed = torch.tensor([3, 40, 3, 200])  # a repeated index gives the same column twice
    theta, test_x, removed_before = trained.theta.clone(), test.x.clone(), removed.clone()

    execution = Execution(cache=ArtifactCache(tmp_path))
    first = response.compute(trained, test, removed, execution)
    assert first.deltas.shape == (6, 4) and first.deltas.dtype == problem.dtype
    assert torch.equal(first.deltas[:, 0], first.deltas[:, 2])
    # The sign convention: delta = m(theta without j) - m(theta_s), against the closed form.
    # At damping 0 on a quadratic objective the refit stages and the PBRF are leave-one-out
    # exactly; `linear` is its first-order term (off by the leverage, here about 3%).
    expected = ridge_leave_one_out(trained, test, removed)
    scale = float(expected.abs().max())
    tolerance = FIRST_ORDER_TOLERANCE if name in FIRST_ORDER else 1e-9
    assert float((first.deltas - expected).abs().max()) <= tolerance * scale
    assert (
        float(torch.corrcoef(torch.stack([first.deltas.flatten(), expected.flatten()]))[0, 1])
        > 0.999
    )

    again = cls().compute(trained, test, removed, execution)  # from the cache where it caches
    assert torch.equal(again.deltas, first.deltas)
    if "refits" in first.info:
        assert first.info["refits"] == 3 and again.info["refits"] == 0
    fresh = cls().compute(trained, test, removed, Execution())  # no cache: deterministic
    assert torch.equal(fresh.deltas, first.deltas)

    assert torch.equal(trained.theta, theta) and torch.equal(test.x, test_x)
    assert torch.equal(removed, removed_before)
    if first.thetas is not None:
        assert first.thetas.shape == (4, trained.n_params)
