"""The PBRF stage: its objective, agreement with retraining on convex models, the first-order
limit that is the linear stage, convergence checks, cache and solver paths."""

import pytest
import torch

from fidelity.core.cache import ArtifactCache
from fidelity.core.errors import FidelityError
from fidelity.core.objective import objective
from fidelity.retrain import (
    ColdResponse,
    Execution,
    LinearResponse,
    PbrfResponse,
    ProximalResponse,
    train,
)
from fidelity.retrain import pbrf as pbrf_module
from fidelity.retrain.newton import removal_weights
from tests.conftest import make_tiny_mlp_problem


@pytest.fixture(scope="module")
def mlp():
    return train(make_tiny_mlp_problem("cross_entropy"))


@pytest.mark.parametrize("name", ["cancer-logreg", "digits-logreg"])
def test_pbrf_objective_is_the_leave_one_out_objective_plus_a_constant(trained_problems, name):
    """For models linear in their parameters D_L sums to J up to terms the stationarity of
    theta_s cancels, so Q_j - J_{-j} is the same at any theta."""
    trained = trained_problems(name)
    problem, j = trained.problem, 3
    removal = torch.zeros(problem.n_train, dtype=trained.theta.dtype)
    removal[j] = 1.0
    pbrf = pbrf_module.pbrf_objective(trained, damping=0.0)
    weights = removal_weights(problem.n_train, torch.tensor([j]), trained.theta)[0]
    generator = torch.Generator().manual_seed(0)
    gaps = []
    for scale in (0.0, 0.01, 0.3):
        theta = trained.theta + scale * torch.randn(
            trained.n_params, generator=generator, dtype=trained.theta.dtype
        )
        gaps.append(float(pbrf(theta, removal) - objective(trained.model, problem, theta, weights)))
    assert max(gaps) - min(gaps) <= 1e-10 * max(1.0, abs(gaps[0]))


@pytest.mark.parametrize("name", ["cancer-logreg", "diabetes-ridge", "digits-logreg"])
def test_pbrf_equals_cold_on_convex_problems(trained_problems, name):
    trained = trained_problems(name)
    test, removed = trained.problem.test, torch.arange(0, 60, 6)
    cold = ColdResponse().compute(trained, test, removed).deltas
    result = PbrfResponse().compute(trained, test, removed)
    assert float((result.deltas - cold).abs().max() / cold.abs().max()) <= 1e-5
    assert result.info["max_grad_norm"] <= 1e-10
    assert result.thetas.shape == (10, trained.n_params)


def test_damped_pbrf_equals_proximal_retraining_on_ridge(trained_problems):
    trained = trained_problems("diabetes-ridge")
    test, removed = trained.problem.test, torch.tensor([0, 17, 200])
    proximal = ProximalResponse(damping=0.3).compute(trained, test, removed).deltas
    pbrf = PbrfResponse(damping=0.3).compute(trained, test, removed).deltas
    torch.testing.assert_close(pbrf, proximal, rtol=1e-9, atol=1e-14)


def test_pbrf_approaches_linear_as_the_removal_weight_shrinks(mlp):
    """The linear stage is the first-order response of the PBRF: the gap shrinks like w."""
    problem = mlp.problem
    removed = torch.arange(0, 30, 3)
    linear = LinearResponse(damping=0.0).compute(mlp, problem.test, removed).deltas
    errors = []
    for weight in (1e-2, 1e-3, 1e-4):
        deltas = PbrfResponse(removal_weight=weight).compute(mlp, problem.test, removed).deltas
        errors.append(float((deltas - linear).abs().max() / linear.abs().max()))
    assert errors[0] < 0.05
    assert errors[1] < 0.2 * errors[0]
    assert errors[2] < 0.2 * errors[1]


def test_far_responses_converge_and_a_short_budget_is_an_error(mlp):
    """On a 30-point network removal moves the PBRF optimum far from theta_s; the solver must
    still converge (Newton finishes) or say that it did not."""
    problem = mlp.problem
    removed = torch.arange(0, 30, 3)
    result = PbrfResponse().compute(mlp, problem.test, removed)
    assert result.info["max_grad_norm"] <= 1e-10
    assert float((result.thetas - mlp.theta).norm(dim=1).max()) > 0.1
    with pytest.raises(FidelityError, match=r"pbrf .* did not converge .* raise pbrf\.max_iter"):
        PbrfResponse(max_iter=1).compute(mlp, problem.test, removed)


def test_cg_path_equals_dense_path(mlp, monkeypatch):
    problem = mlp.problem
    removed = torch.tensor([1, 4, 9])
    dense = PbrfResponse(damping=0.05).compute(mlp, problem.test, removed)
    monkeypatch.setattr(pbrf_module, "DENSE_LIMIT", 0)
    iterative = PbrfResponse(damping=0.05).compute(mlp, problem.test, removed)
    assert dense.info["solver"] == "dense" and iterative.info["solver"] == "cg"
    torch.testing.assert_close(iterative.deltas, dense.deltas, rtol=1e-7, atol=1e-13)


def test_cache_resumes_and_separates_settings(mlp, tmp_path):
    problem = mlp.problem
    execution = Execution(cache=ArtifactCache(tmp_path))
    removed = torch.tensor([2, 5, 7])
    first = PbrfResponse(damping=0.1, group_size=2).compute(mlp, problem.test, removed, execution)
    again = PbrfResponse(damping=0.1).compute(mlp, problem.test, removed, execution)
    assert first.info["refits"] == 3 and again.info["cached"] == 3 and again.info["refits"] == 0
    torch.testing.assert_close(again.deltas, first.deltas, rtol=0, atol=0)
    other = PbrfResponse(damping=0.2).compute(mlp, problem.test, removed, execution)
    assert other.info["refits"] == 3


def test_bad_settings():
    with pytest.raises(FidelityError, match=r"pbrf\.damping"):
        PbrfResponse(damping=-1)
    with pytest.raises(FidelityError, match=r"pbrf\.removal_weight must be positive"):
        PbrfResponse(removal_weight=0)
    with pytest.raises(FidelityError, match=r"pbrf\.max_iter"):
        PbrfResponse(max_iter=0)
