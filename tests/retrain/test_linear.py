"""The linearised PBRF stage against the dense estimators it must equal."""

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.estimators import ExactEstimator, GaussNewtonEstimator
from fidelity.retrain import LinearResponse, train
from fidelity.retrain import linear as linear_module
from tests.conftest import make_tiny_mlp_problem


@pytest.fixture(scope="module")
def mlp():
    return train(make_tiny_mlp_problem("cross_entropy"))


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_linear_equals_gnh_at_the_same_damping(mlp, damping):
    problem = mlp.problem
    removed = torch.arange(0, 30, 2)
    response = LinearResponse(damping=damping).compute(mlp, problem.test, removed)
    expected = (
        GaussNewtonEstimator(damping=damping)
        .fit(mlp)
        .scores(problem.test, problem.train.subset(removed))
    )
    torch.testing.assert_close(response.deltas, expected, rtol=1e-8, atol=1e-14)
    assert response.info["solver"] == "dense"


def test_cg_path_equals_dense_path(mlp, monkeypatch):
    problem = mlp.problem
    removed = torch.tensor([1, 4, 9])
    dense = LinearResponse(damping=0.01).compute(mlp, problem.test, removed)
    monkeypatch.setattr(linear_module, "DENSE_LIMIT", 0)
    iterative = LinearResponse(damping=0.01).compute(mlp, problem.test, removed)
    assert iterative.info["solver"] == "cg"
    torch.testing.assert_close(iterative.deltas, dense.deltas, rtol=1e-8, atol=1e-14)


def test_woodbury_path_equals_dense_path(monkeypatch):
    """12 binary examples, 26 parameters: beyond the dense limit the Woodbury form applies."""
    trained = train(make_tiny_mlp_problem("bce", n_train=12))
    problem, removed = trained.problem, torch.tensor([0, 5, 11])
    dense = LinearResponse(damping=0.01).compute(trained, problem.test, removed)
    monkeypatch.setattr(linear_module, "DENSE_LIMIT", 0)
    woodbury = LinearResponse(damping=0.01).compute(trained, problem.test, removed)
    assert woodbury.info["solver"] == "woodbury"
    torch.testing.assert_close(woodbury.deltas, dense.deltas, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(woodbury.thetas, dense.thetas, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["diabetes-ridge", "cancer-logreg"])
def test_linear_equals_exact_on_models_linear_in_their_parameters(trained_problems, name):
    """There G = H, so the linearised PBRF is the exact influence."""
    trained = trained_problems(name)
    problem = trained.problem
    removed = torch.arange(0, 60, 3)
    response = LinearResponse().compute(trained, problem.test, removed)
    expected = ExactEstimator().fit(trained).scores(problem.test, problem.train.subset(removed))
    torch.testing.assert_close(response.deltas, expected, rtol=1e-8, atol=1e-14)


def test_bad_settings():
    with pytest.raises(FidelityError, match=r"linear\.damping"):
        LinearResponse(damping=-1)
