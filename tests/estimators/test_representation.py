"""The representation-similarity baseline against its definition."""

import dataclasses

import pytest
import torch

from fidelity.estimators import RepresentationEstimator
from fidelity.estimators.baselines import penultimate_features
from fidelity.retrain import train
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem


def cosine(a, b):
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return a @ b.T


def test_on_a_linear_model_it_is_the_cosine_of_the_inputs_signed_by_label_agreement():
    trained = train(make_tiny_logreg())
    problem = trained.problem
    plain = RepresentationEstimator(signed=False).fit(trained).scores(problem.test, problem.train)
    assert torch.allclose(plain, cosine(problem.x_test, problem.x_train), atol=1e-14)
    signed = RepresentationEstimator().fit(trained).scores(problem.test, problem.train)
    agree = problem.y_test[:, None] == problem.y_train[None, :]
    assert torch.equal(signed, torch.where(agree, plain, -plain))


def test_a_network_uses_the_input_of_its_last_linear_layer():
    trained = train(make_tiny_mlp_problem(loss="bce"))
    problem = trained.problem
    weights = trained.model.spec.unflatten(trained.theta)
    hidden = torch.tanh(problem.x_train @ weights["0.weight"].T + weights["0.bias"])
    assert torch.allclose(penultimate_features(trained, problem.train, 7), hidden, atol=1e-14)


def test_regression_signs_follow_the_residuals():
    problem = make_tiny_mlp_problem(loss="mse")
    trained = train(problem)
    scores = RepresentationEstimator().fit(trained).scores(problem.test, problem.train)
    plain = RepresentationEstimator(signed=False).fit(trained).scores(problem.test, problem.train)
    with torch.no_grad():
        test_residual = trained.model(trained.theta, problem.x_test) - problem.y_test
        train_residual = trained.model(trained.theta, problem.x_train) - problem.y_train
    sign = torch.sign(test_residual @ train_residual.T)
    assert torch.allclose(scores, sign * plain, atol=1e-14)


def test_a_model_without_a_linear_head_is_refused():
    problem = dataclasses.replace(
        make_tiny_logreg(), model_factory=lambda: torch.nn.Flatten(), name="no-head"
    )
    from fidelity.core.errors import FidelityError
    from fidelity.core.problem import FunctionalModel, TrainedProblem

    module = problem.build_model()
    trained = TrainedProblem(
        problem, FunctionalModel.of(module), torch.zeros(0, dtype=torch.float64)
    )
    with pytest.raises(FidelityError, match=r"nn\.Linear"):
        RepresentationEstimator().fit(trained).scores(problem.test, problem.train)
