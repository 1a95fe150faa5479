import dataclasses

import pytest
import torch
from torch import nn

from fidelity.core.errors import FidelityError
from fidelity.core.objective import objective, per_example_loss
from fidelity.core.problem import FunctionalModel, NewtonRecipe, Problem, TrainedProblem
from fidelity.estimators import ExactEstimator, GaussNewtonEstimator
from fidelity.retrain.newton import newton_minimize


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
    problem, model = trained.problem, trained.model
    hessian = torch.autograd.functional.hessian(
        lambda t: objective(model, problem, t), trained.theta
    )
    assert float(torch.linalg.eigvalsh(hessian).min()) < 0  # the premise: indefinite

    def gradients(examples):
        return torch.stack(
            [
                torch.autograd.functional.jacobian(
                    lambda t, i=i: per_example_loss(model, problem.loss, t, examples)[i],
                    trained.theta,
                )
                for i in range(len(examples))
            ]
        )

    test_grads, train_grads = gradients(problem.test), gradients(problem.train)
    damped = hessian + 10.0 * torch.eye(hessian.shape[0])
    expected = test_grads @ torch.linalg.solve(damped, train_grads.T) / problem.n_train
    scores = ExactEstimator(damping=10.0).fit(trained).scores(problem.test, problem.train)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("damping", [-1.0, float("nan"), "0.1"])
def test_bad_damping_is_rejected_at_construction(damping):
    with pytest.raises(FidelityError, match=r"exact.damping"):
        ExactEstimator(damping=damping)


def test_scores_before_fit_is_an_error():
    with pytest.raises(FidelityError, match=r"must be fitted"):
        ExactEstimator().scores(None, None)


def wide_problem(outputs: int) -> TrainedProblem:
    """An MLP with more parameters (4-16-k) than training outputs (12 k), at a seeded theta."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    if outputs == 1:
        y, loss = (torch.rand(12, 1, generator=generator) > 0.5).double(), "bce"
    else:
        y, loss = torch.randint(0, outputs, (12,), generator=generator), "cross_entropy"
    problem = Problem(
        name="wide",
        x_train=x,
        y_train=y,
        x_test=x[:5],
        y_test=y[:5],
        model_factory=lambda: nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, outputs)),
        loss=loss,
        weight_decay=1e-2,
    )
    model = FunctionalModel.of(problem.build_model())
    theta = model.initial_theta() + 0.3 * torch.randn(
        model.spec.numel, generator=generator, dtype=torch.float64
    )
    return TrainedProblem(problem, model, theta)


@pytest.mark.parametrize("outputs", [1, 3])
@pytest.mark.parametrize("layers", [None, "2"])
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_woodbury_gauss_newton_equals_the_dense_solve(outputs, layers, damping):
    trained = wide_problem(outputs)
    problem = trained.problem
    settings = {"damping": damping, "layers": layers}
    dense = GaussNewtonEstimator(solver="dense", **settings).fit(trained)
    woodbury = GaussNewtonEstimator(solver="woodbury", **settings).fit(trained)
    assert woodbury.diagnostics["solver"] == "woodbury"
    expected = dense.scores(problem.test, problem.train)
    torch.testing.assert_close(
        woodbury.scores(problem.test, problem.train), expected, rtol=1e-10, atol=1e-14
    )
    for key in ("min_eigenvalue", "max_eigenvalue"):
        assert woodbury.diagnostics[key] == pytest.approx(dense.diagnostics[key], rel=1e-9)


def test_auto_solver_picks_woodbury_only_when_outputs_are_fewer_than_parameters():
    trained = wide_problem(1)  # 12 outputs, 97 parameters
    assert GaussNewtonEstimator().fit(trained).diagnostics["solver"] == "woodbury"
    assert GaussNewtonEstimator(layers="2").fit(trained).diagnostics["solver"] == "woodbury"
    assert ExactEstimator(damping=1.0).fit(trained).diagnostics["solver"] == "dense"


def test_woodbury_needs_gauss_newton_and_a_positive_shift():
    with pytest.raises(FidelityError, match="woodbury"):
        ExactEstimator(solver="woodbury")
    with pytest.raises(FidelityError, match="solver"):
        GaussNewtonEstimator(solver="qr")
    trained = wide_problem(1)
    flat = TrainedProblem(
        dataclasses.replace(trained.problem, weight_decay=0.0), trained.model, trained.theta
    )
    with pytest.raises(FidelityError, match="weight decay"):
        GaussNewtonEstimator(solver="woodbury").fit(flat)
