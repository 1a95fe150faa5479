"""The Newton-step and rescaled-influence estimators against exact refits and dense references."""

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.objective import objective, per_example_grads, per_example_loss
from fidelity.estimators import NewtonStepEstimator, RescaledInfluenceEstimator
from fidelity.retrain import Execution, train
from fidelity.retrain.subsets import draw_masks, measurement, retrain_masks
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem


@pytest.fixture(scope="module")
def tiny():
    return train(make_tiny_logreg(n_train=30, n_test=6))


def test_newton_step_equals_the_exact_group_refit_on_ridge(trained_problems):
    """The objective without a group is quadratic, so one Newton step from its minimiser's
    neighbour theta_s lands on the refit; the measurement there is the refit's."""
    trained = trained_problems("diabetes-ridge")
    problem = trained.problem
    masks = torch.ones(4, problem.n_train, dtype=problem.dtype)
    masks[0, :40] = 0.0
    masks[1, 100:101] = 0.0
    masks[2:] = torch.as_tensor(draw_masks(problem.n_train, (0.5,), 2, seed=1))
    refits = retrain_masks(trained, masks, Execution())
    thetas = torch.stack([refits.thetas[row] for row in range(len(masks))])
    estimator = NewtonStepEstimator().fit(trained)
    steps = estimator.group_steps(masks)
    for row in range(len(masks)):
        expected = thetas[row] - trained.theta
        error = float((steps[row] - expected).norm() / expected.norm())
        assert error <= 1e-8, (row, error)
    test = problem.test
    actual = measurement(trained, thetas, test, "loss") - per_example_loss(
        trained.model, problem.loss, trained.theta, test
    )
    predicted = estimator.group_effects(test, masks)
    assert float((predicted - actual).abs().max() / actual.abs().max()) <= 1e-8


def test_single_point_steps_match_a_dense_reference_and_groups_of_one(tiny):
    problem, model, theta = tiny.problem, tiny.model, tiny.theta
    n = problem.n_train
    hessian = torch.autograd.functional.hessian(lambda t: objective(model, problem, t), theta)
    grads = per_example_grads(model, problem.loss, theta, problem.train)
    estimator = NewtonStepEstimator().fit(tiny)
    steps = estimator.parameter_changes(problem.train)
    for j in (0, 7, 29):
        own = torch.autograd.functional.hessian(
            lambda t, j=j: per_example_loss(model, problem.loss, t, problem.train.subset([j]))[0],
            theta,
        )
        expected = torch.linalg.solve(hessian - own / n, grads[j] / n)
        torch.testing.assert_close(steps[j], expected, rtol=1e-9, atol=1e-13)
    scores = estimator.scores(problem.test, problem.train)
    alone = torch.ones(3, n, dtype=problem.dtype)
    for row, j in enumerate((0, 7, 29)):
        alone[row, j] = 0.0
    torch.testing.assert_close(
        estimator.group_effects(problem.test, alone), scores[:, [0, 7, 29]].T, rtol=1e-9, atol=1e-13
    )
    after = per_example_loss(model, problem.loss, theta + steps[7], problem.test)
    before = per_example_loss(model, problem.loss, theta, problem.test)
    torch.testing.assert_close(scores[:, 7], after - before, rtol=1e-10, atol=1e-14)


def test_rif_is_the_linear_newton_step_on_a_model_linear_in_its_parameters(tiny):
    """For a GLM the per-point Gauss-Newton term is the per-point Hessian, so RIF's Woodbury
    step equals the dense single-point Newton step, and its scores are that step's linear
    response."""
    problem = tiny.problem
    rif = RescaledInfluenceEstimator(batch_size=7).fit(tiny)
    newton = NewtonStepEstimator(output="linear").fit(tiny)
    torch.testing.assert_close(
        rif.parameter_changes(problem.train),
        newton.parameter_changes(problem.train),
        rtol=1e-9,
        atol=1e-14,
    )
    torch.testing.assert_close(
        rif.scores(problem.test, problem.train),
        newton.scores(problem.test, problem.train),
        rtol=1e-9,
        atol=1e-14,
    )
    assert 0 < rif.diagnostics["max_leverage"] < 1


def test_rif_on_a_network_uses_the_gauss_newton_term_of_the_removed_point():
    trained = train(make_tiny_mlp_problem("bce", n_train=20))
    problem, model, theta = trained.problem, trained.model, trained.theta
    n = problem.n_train
    damping = 0.5
    hessian = torch.autograd.functional.hessian(lambda t: objective(model, problem, t), theta)
    system = hessian + damping * torch.eye(trained.n_params, dtype=theta.dtype)
    rif = RescaledInfluenceEstimator(damping=damping).fit(trained)
    steps = rif.parameter_changes(problem.train)
    grads = per_example_grads(model, problem.loss, theta, problem.train)
    for j in (0, 11):
        x = problem.x_train[j : j + 1]
        jacobian = torch.autograd.functional.jacobian(lambda t, x=x: model(t, x)[0, 0], theta)
        curvature = torch.sigmoid(model(theta, x)[0, 0])
        gauss_newton = curvature * (1 - curvature) * torch.outer(jacobian, jacobian)
        expected = torch.linalg.solve(system - gauss_newton / n, grads[j] / n)
        torch.testing.assert_close(steps[j], expected, rtol=1e-9, atol=1e-13)


def test_bad_settings_and_inputs_are_refused(tiny):
    with pytest.raises(FidelityError, match="output must be one of"):
        NewtonStepEstimator(output="exact")
    with pytest.raises(FidelityError, match="damping"):
        RescaledInfluenceEstimator(damping=-1.0)
    estimator = NewtonStepEstimator().fit(tiny)
    with pytest.raises(FidelityError, match="group weights must be"):
        estimator.group_effects(tiny.problem.test, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(FidelityError, match="target must be one of"):
        estimator.group_effects(
            tiny.problem.test, torch.ones(1, tiny.problem.n_train, dtype=torch.float64), "logit"
        )


def test_a_step_without_positive_curvature_is_an_error():
    """Removing every point leaves the weight decay only: positive definite. A weight decay of 0
    on a separable set does not leave even that."""
    trained = train(make_tiny_logreg(n_train=30, n_test=6, weight_decay=1e-2))
    estimator = NewtonStepEstimator().fit(trained)
    everything = torch.zeros(1, 30, dtype=torch.float64)
    step = estimator.group_steps(everything)  # H - H_all/N = wd I: defined
    assert bool(torch.isfinite(step).all())
    doubled = torch.full((1, 30), -1.0, dtype=torch.float64)  # dropped weight 2 each: H - 2 H_L
    with pytest.raises(FidelityError, match="not positive definite"):
        estimator.group_steps(doubled)
