import pytest
import torch
from torch import nn

from estimators import ExactEstimator
from fidelity.errors import FidelityError
from fidelity.objective import objective, per_example_loss
from fidelity.problem import FunctionalModel, NewtonRecipe, Problem, TrainedProblem
from retrain.newton import newton_minimize


def test_exact_equals_closed_form_ridge_influence(trained_problems):
    trained = trained_problems("diabetes-ridge")
    problem = trained.problem
    design = torch.cat([problem.x_train, torch.ones(problem.n_train, 1)], dim=1)
    test_design = torch.cat([problem.x_test, torch.ones(problem.n_test, 1)], dim=1)
    n, p = design.shape
    # A = X^T X + N wd I, H = A / N; g = x (x^T theta - y); delta = (1/N) g_t^T H^{-1} g_j
    system = design.T @ design + n * problem.weight_decay * torch.eye(p)
    theta = torch.linalg.solve(system, design.T @ problem.y_train[:, 0])
    train_grads = design * (design @ theta - problem.y_train[:, 0]).unsqueeze(1)
    test_grads = test_design * (test_design @ theta - problem.y_test[:, 0]).unsqueeze(1)
    expected = test_grads @ torch.linalg.solve(system, train_grads.T)
    actual = ExactEstimator().fit(trained).scores(problem.test, problem.train)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", ["cancer-logreg", "digits-logreg"])
def test_exact_matches_finite_difference_upweighting(trained_problems, name):
    """delta_hat[t, j] = -d m_t / d w_j: removal is w_j -> 0 with the same 1/N (DESIGN.md)."""
    trained = trained_problems(name)
    problem, model = trained.problem, trained.model
    test = problem.test.subset(torch.arange(6))
    train_index = [0, 7, 101]
    predicted = (
        ExactEstimator().fit(trained).scores(test, problem.train.subset(torch.tensor(train_index)))
    )
    step = 1e-3
    for column, j in enumerate(train_index):
        losses = []
        for sign in (+1, -1):
            weights = torch.ones(problem.n_train)
            weights[j] += sign * step
            theta = newton_minimize(model, problem, trained.theta, weights).theta
            losses.append(per_example_loss(model, problem.loss, theta, test))
        derivative = (losses[0] - losses[1]) / (2 * step)
        torch.testing.assert_close(predicted[:, column], -derivative, rtol=1e-5, atol=1e-12)


def test_damping_adds_a_multiple_of_the_identity(trained_problems):
    trained = trained_problems("cancer-logreg")
    problem = trained.problem
    hessian = torch.autograd.functional.hessian(
        lambda t: objective(trained.model, problem, t), trained.theta
    )
    estimator = ExactEstimator(damping=0.5).fit(trained)
    test_grads, train_grads = estimator.gradients(problem.test), estimator.gradients(problem.train)
    damped = hessian + 0.5 * torch.eye(hessian.shape[0])
    expected = test_grads @ torch.linalg.solve(damped, train_grads.T) / problem.n_train
    actual = estimator.scores(problem.test, problem.train)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-15)
    undamped = ExactEstimator().fit(trained).scores(problem.test, problem.train)
    assert float((undamped - actual).abs().max()) > 1e-3 * float(undamped.abs().max())


def saddle_problem() -> TrainedProblem:
    """f(x) = a b x at a = b = 0.1 with no weight decay. With r = abx - y the Hessian has
    H_aa = H_bb = mean(0.01 x^2) and H_ab = mean(x (0.02 x - y)) < 0, so it is indefinite, and
    along the gradient direction (1, 1) the curvature mean(0.06 x^2 - 2 x y) is negative."""
    x = torch.linspace(-1, 1, 8).unsqueeze(1)
    problem = Problem(
        name="saddle",
        x_train=x,
        y_train=2 * x + 0.5,
        x_test=x[:3],
        y_test=2 * x[:3],
        model_factory=lambda: nn.Sequential(
            nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        ),
        loss="mse",
        weight_decay=0.0,
        recipe=NewtonRecipe(),
    )
    model = FunctionalModel.of(problem.build_model())
    return TrainedProblem(problem, model, torch.full((2,), 0.1))


def test_non_positive_definite_hessian_without_damping_is_an_error():
    with pytest.raises(FidelityError, match=r"not positive definite.*set damping above"):
        ExactEstimator().fit(saddle_problem())


def test_enough_damping_makes_an_indefinite_hessian_usable():
    trained = saddle_problem()
    scores = (
        ExactEstimator(damping=10.0)
        .fit(trained)
        .scores(trained.problem.test, trained.problem.train)
    )
    assert bool(torch.isfinite(scores).all())


@pytest.mark.parametrize("damping", [-1.0, float("nan"), "0.1"])
def test_bad_damping_is_rejected_at_construction(damping):
    with pytest.raises(FidelityError, match=r"exact.damping"):
        ExactEstimator(damping=damping)


def test_scores_before_fit_is_an_error():
    with pytest.raises(FidelityError, match=r"must be fitted"):
        ExactEstimator().scores(None, None)
