"""Perturbation influence against closed forms and against exact refits with a moved input."""

import dataclasses

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_loss
from fidelity.core.problem import Examples
from fidelity.estimators import (
    ConjugateGradientEstimator,
    ExactEstimator,
    GradCosEstimator,
    perturbation_effects,
)
from fidelity.retrain import train
from fidelity.retrain.newton import newton_minimize
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem


def relative(a, b):
    return float((a - b).norm() / b.norm())


def test_ridge_perturbation_is_the_derivative_of_the_closed_form_refit():
    # mse on a linear model with a bias: theta(x_j) = (X~^T X~ + N wd I)^{-1} X~^T y, so the
    # test loss after the refit is a closed-form function of x_j, differentiated by autograd
    problem = make_tiny_mlp_problem(loss="mse")
    from fidelity.problems.models import linear_model

    problem = dataclasses.replace(
        problem, model_factory=lambda: linear_model(3, 1), name="tiny-ridge"
    )
    trained = train(problem)
    n = problem.n_train
    test = problem.test
    gradients = ExactEstimator().fit(trained).perturbation_gradients(test, problem.train)

    def test_losses(x_train):
        design = torch.cat([x_train, torch.ones(n, 1, dtype=x_train.dtype)], dim=1)
        system = design.T @ design + n * problem.weight_decay * torch.eye(4, dtype=x_train.dtype)
        theta = torch.linalg.solve(system, design.T @ problem.y_train)[:, 0]
        weight, bias = theta[:3], theta[3]
        return 0.5 * (test.x @ weight + bias - test.y[:, 0]) ** 2

    expected = torch.func.jacrev(test_losses)(problem.x_train)  # [n_test, n_train, 3]
    torch.testing.assert_close(gradients, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("estimator", [ExactEstimator(), ConjugateGradientEstimator(tol=1e-12)])
def test_logistic_perturbation_matches_a_central_difference_of_exact_refits(estimator):
    problem = make_tiny_logreg()
    trained = train(problem)
    test = problem.test.subset(torch.arange(6))
    columns = torch.tensor([0, 9, 31])
    gradients = estimator.fit(trained).perturbation_gradients(test, problem.train.subset(columns))
    generator = torch.Generator().manual_seed(3)
    directions = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    predicted = perturbation_effects(gradients, directions)
    step = 1e-5
    for k, j in enumerate(columns.tolist()):

        def refit(sign, j=j, k=k):
            x = problem.x_train.clone()
            x[j] += sign * step * directions[k]
            theta = newton_minimize(
                trained.model, dataclasses.replace(problem, x_train=x), trained.theta, gtol=1e-13
            ).theta
            return per_example_loss(trained.model, problem.loss, theta, test)

        difference = (refit(1) - refit(-1)) / (2 * step)
        assert relative(predicted[:, k], difference) <= 1e-5


def test_a_zero_direction_changes_nothing_and_shapes_are_checked():
    trained = train(make_tiny_logreg())
    problem = trained.problem
    gradients = ExactEstimator().fit(trained).perturbation_gradients(problem.test, problem.train)
    zero = torch.zeros(problem.n_train, 3, dtype=torch.float64)
    assert torch.equal(
        perturbation_effects(gradients, zero),
        torch.zeros(problem.n_test, problem.n_train, dtype=torch.float64),
    )
    with pytest.raises(FidelityError, match="must be shaped"):
        perturbation_effects(gradients, torch.zeros(problem.n_train, 4, dtype=torch.float64))
    with pytest.raises(FidelityError, match="ranking score"):
        GradCosEstimator().fit(trained).perturbation_gradients(problem.test, problem.train)


def test_integer_inputs_are_refused():
    trained = train(make_tiny_logreg())
    problem = trained.problem
    integers = Examples(problem.train.x.long(), problem.train.y)
    with pytest.raises(FidelityError, match="floating-point inputs"):
        ExactEstimator().fit(trained).perturbation_gradients(problem.test, integers)
