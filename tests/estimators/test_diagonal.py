"""The diagonal rung against a dense reference."""

import dataclasses

import pytest
import torch

from fidelity.core.curvature import CurvatureOperator
from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_grads
from fidelity.core.problem import FunctionalModel, TrainedProblem
from fidelity.estimators import DiagonalEstimator
from fidelity.retrain import train
from tests.conftest import make_tiny_mlp_problem


@pytest.mark.parametrize("curvature", ["gnh", "empirical-fisher"])
def test_scores_use_the_damped_dense_diagonal(curvature):
    trained = train(make_tiny_mlp_problem(loss="cross_entropy"))
    problem = trained.problem
    diagonal = CurvatureOperator(trained, curvature).dense().diagonal() + 0.05
    grads = per_example_grads(trained.model, problem.loss, trained.theta, problem.train)
    test_grads = per_example_grads(trained.model, problem.loss, trained.theta, problem.test)
    expected = (test_grads / diagonal) @ grads.T / problem.n_train
    scores = (
        DiagonalEstimator(curvature=curvature, damping=0.05)
        .fit(trained)
        .scores(problem.test, problem.train)
    )
    assert torch.allclose(scores, expected, rtol=1e-12, atol=1e-16)


def test_a_non_positive_hessian_diagonal_names_the_damping():
    # away from a minimum (the initialisation, scaled) the Hessian has negative diagonal entries
    problem = dataclasses.replace(make_tiny_mlp_problem(loss="cross_entropy"), weight_decay=0.0)
    model = FunctionalModel.of(problem.build_model())
    trained = TrainedProblem(problem, model, model.initial_theta() * 3)
    assert float(CurvatureOperator(trained, "hessian").dense().diagonal().min()) < 0
    with pytest.raises(FidelityError, match="set damping above"):
        DiagonalEstimator(curvature="hessian").fit(trained)
