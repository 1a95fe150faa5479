import pytest
import torch

from fidelity.core.objective import objective, objective_hessian
from fidelity.core.problem import FunctionalModel
from fidelity.problems import load_problem
from fidelity.retrain.newton import newton_minimize, refit_removals, removal_weights
from tests.conftest import make_tiny_logreg


@pytest.mark.parametrize("name", ["digits-logreg", "cancer-logreg", "diabetes-ridge"])
def test_training_reaches_gradient_tolerance(trained_problems, name):
    trained = trained_problems(name)
    gradient = torch.func.grad(lambda t: objective(trained.model, trained.problem, t))(
        trained.theta
    )
    assert float(gradient.norm()) <= 1e-10
    assert trained.info["grad_norm"] <= 1e-10


def test_diabetes_ridge_matches_normal_equations(trained_problems):
    trained = trained_problems("diabetes-ridge")
    problem = trained.problem
    design = torch.cat([problem.x_train, torch.ones(problem.n_train, 1)], dim=1)
    n, p = design.shape
    system = design.T @ design / n + problem.weight_decay * torch.eye(p)
    solution = torch.linalg.solve(system, design.T @ problem.y_train[:, 0] / n)
    # nn.Linear flattens as (weight[1, 10], bias[1])
    torch.testing.assert_close(trained.theta, solution, rtol=1e-12, atol=1e-13)


def test_newton_starts_from_given_parameters():
    problem = make_tiny_logreg()
    model = FunctionalModel.of(problem.build_model())
    far = torch.full((model.spec.numel,), 3.0)
    from_far = newton_minimize(model, problem, far)
    from_init = newton_minimize(model, problem, model.initial_theta())
    assert from_far.converged and from_init.converged
    torch.testing.assert_close(from_far.theta, from_init.theta, rtol=0, atol=1e-12)
    started_at_optimum = newton_minimize(model, problem, from_init.theta)
    assert started_at_optimum.iterations <= 1


def test_refit_removals_equals_newton_on_each_weighted_objective():
    problem = make_tiny_logreg()
    model = FunctionalModel.of(problem.build_model())
    theta_s = newton_minimize(model, problem, model.initial_theta()).theta
    inverse = torch.linalg.inv(objective_hessian(model, problem, theta_s))
    removed = torch.tensor([0, 5, 17, 39])
    fast = refit_removals(model, problem, theta_s, inverse, removed)
    weights = removal_weights(problem.n_train, removed, theta_s)
    for b in range(removed.numel()):
        reference = newton_minimize(model, problem, model.initial_theta(), weights[b]).theta
        torch.testing.assert_close(fast.thetas[b], reference, rtol=0, atol=1e-12)
    assert bool((fast.grad_norms <= 1e-10).all())


def test_refit_is_independent_of_group_composition():
    problem = make_tiny_logreg()
    model = FunctionalModel.of(problem.build_model())
    theta_s = newton_minimize(model, problem, model.initial_theta()).theta
    inverse = torch.linalg.inv(objective_hessian(model, problem, theta_s))
    together = refit_removals(model, problem, theta_s, inverse, torch.tensor([3, 9, 21]))
    alone = refit_removals(model, problem, theta_s, inverse, torch.tensor([9]))
    torch.testing.assert_close(together.thetas[1], alone.thetas[0], rtol=0, atol=1e-14)


def test_problem_with_nan_is_rejected():
    from fidelity.core.errors import FidelityError

    problem = load_problem("cancer-logreg")
    x_train = problem.x_train.clone()
    x_train[3, 2] = float("nan")
    with pytest.raises(FidelityError, match=r"x_train holds 1 NaN"):
        type(problem)(**{**vars(problem), "x_train": x_train})


def test_refits_that_diverge_fall_back_to_line_searched_newton():
    """On a non-convex MLP the Woodbury-preconditioned iteration overflows for some removals
    (it did for point 16 before the fallback caught growing norms); all must still converge,
    to the same local minimum as Newton from theta_s."""
    from tests.conftest import make_tiny_mlp_problem

    problem = make_tiny_mlp_problem("mse", n_train=30)
    model = FunctionalModel.of(problem.build_model())
    theta_s = newton_minimize(model, problem, model.initial_theta()).theta
    inverse = torch.linalg.inv(objective_hessian(model, problem, theta_s))
    result = refit_removals(model, problem, theta_s, inverse, torch.arange(30))
    assert bool((result.grad_norms <= 1e-10).all())
    assert bool(torch.isfinite(result.thetas).all())
    weights = removal_weights(30, torch.tensor([16]), theta_s)[0]
    reference = newton_minimize(model, problem, theta_s, weights).theta
    torch.testing.assert_close(result.thetas[16], reference, rtol=0, atol=1e-9)


def test_secant_memory_changes_iterations_not_minimisers(trained_problems):
    trained = trained_problems("digits-logreg")
    problem, model = trained.problem, trained.model
    inverse = torch.linalg.inv(objective_hessian(model, problem, trained.theta))
    removed = torch.arange(0, 200, 20)
    plain = refit_removals(model, problem, trained.theta, inverse, removed, memory_size=0)
    secant = refit_removals(model, problem, trained.theta, inverse, removed, memory_size=4)
    torch.testing.assert_close(secant.thetas, plain.thetas, rtol=0, atol=1e-12)
    assert bool((secant.grad_norms <= 1e-10).all())


@pytest.mark.parametrize("name", ["digits-logreg", "cancer-logreg", "diabetes-ridge"])
def test_affine_removal_preconditioner_equals_the_autograd_one(trained_problems, name):
    # The closed form (P^{-1} contracted with x~_j) against the generic Woodbury on autograd
    # Jacobians, and both against the dense inverse of H - h_j / N.
    from functools import partial

    from fidelity.retrain.newton import removal_preconditioner

    trained = trained_problems(name)
    problem, model, theta = trained.problem, trained.model, trained.theta
    hessian = objective_hessian(model, problem, theta)
    inverse = torch.linalg.inv(hessian)
    removed = torch.tensor([0, 7, 30])
    solve = partial(torch.matmul, other=inverse)
    closed = removal_preconditioner(model, problem, theta, removed, solve, inverse=inverse)
    generic = removal_preconditioner(model, problem, theta, removed, solve)
    vectors = torch.randn(
        3, theta.numel(), dtype=theta.dtype, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(closed(vectors), generic(vectors), rtol=1e-9, atol=1e-12)
    weights = removal_weights(problem.n_train, removed, theta)
    for b in range(3):
        dense = objective_hessian(model, problem, theta, weights[b])
        expected = torch.linalg.solve(dense, vectors[b])
        torch.testing.assert_close(closed(vectors)[b], expected, rtol=1e-8, atol=1e-10)


def test_refits_stop_at_the_floor_without_losing_accuracy(trained_problems):
    # Stopping once the next step would be below theta's rounding takes fewer steps than
    # stepping until the gradient stops halving, and reaches the same minimisers.
    trained = trained_problems("digits-logreg")
    problem, model = trained.problem, trained.model
    inverse = torch.linalg.inv(objective_hessian(model, problem, trained.theta))
    removed = torch.arange(3, 300, 30)
    result = refit_removals(model, problem, trained.theta, inverse, removed)
    weights = removal_weights(problem.n_train, removed, trained.theta)
    for b in range(removed.numel()):
        reference = newton_minimize(model, problem, trained.theta, weights[b], gtol=1e-13).theta
        torch.testing.assert_close(result.thetas[b], reference, rtol=0, atol=1e-12)
    assert bool((result.grad_norms <= 1e-10).all())


@pytest.mark.parametrize("name", ["digits-logreg", "cancer-logreg", "diabetes-ridge"])
def test_weighted_refits_equal_newton_on_each_subset(trained_problems, name):
    # The vmapped chord iteration on subsets (half the points at weight 0) against the
    # line-searched Newton method on each weighted objective, and iterations that stay few.
    from fidelity.retrain.newton import refit_weighted
    from fidelity.retrain.subsets import draw_masks

    trained = trained_problems(name)
    problem, model = trained.problem, trained.model
    masks = torch.as_tensor(draw_masks(problem.n_train, (0.5, 0.9), 3, seed=4))
    result = refit_weighted(model, problem, trained.theta, masks)
    assert bool((result.grad_norms <= 1e-10).all())
    assert int(result.iterations.max()) < 60
    for b in range(masks.shape[0]):
        reference = newton_minimize(model, problem, trained.theta, masks[b]).theta
        torch.testing.assert_close(result.thetas[b], reference, rtol=0, atol=1e-11)


def test_weighted_refits_refuse_a_wrong_shape():
    from fidelity.core.errors import FidelityError
    from fidelity.retrain.newton import refit_weighted

    problem = make_tiny_logreg()
    model = FunctionalModel.of(problem.build_model())
    with pytest.raises(FidelityError, match="weights must be"):
        refit_weighted(model, problem, model.initial_theta(), torch.ones(2, problem.n_train + 1))


def test_float32_preconditioner_moves_no_minimiser(trained_problems):
    # digits-logreg is well conditioned (lambda_min >= wd = 1e-3, condition about 460): its base
    # inverse is formed in float32, within float32's rounding of the float64 one, and the refits
    # it preconditions reach the float64-preconditioned minimisers in as many steps.
    from fidelity.retrain.newton import removal_base_inverse

    trained = trained_problems("digits-logreg")
    problem, model, theta = trained.problem, trained.model, trained.theta
    exact = torch.linalg.inv(objective_hessian(model, problem, theta))
    single = removal_base_inverse(model, problem, theta)
    assert single.dtype == torch.float32
    difference = float((single.double() - exact).norm() / exact.norm())
    assert 1e-12 < difference < 1e-4  # float32's rounding: not the float64 inverse, close to it
    removed = torch.arange(5, 500, 50)
    fast = refit_removals(model, problem, theta, single, removed)
    reference = refit_removals(model, problem, theta, exact, removed)
    torch.testing.assert_close(fast.thetas, reference.thetas, rtol=0, atol=1e-12)
    assert torch.equal(fast.iterations, reference.iterations)


def test_ill_conditioned_preconditioner_stays_float64():
    # Without weight decay nothing bounds the condition number: float64, the Cholesky inverse.
    from fidelity.retrain.newton import removal_base_inverse

    problem = make_tiny_logreg()
    problem = type(problem)(**{**vars(problem), "weight_decay": 1e-9})
    model = FunctionalModel.of(problem.build_model())
    theta = newton_minimize(model, problem, model.initial_theta()).theta
    hessian = objective_hessian(model, problem, theta)
    expected = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    torch.testing.assert_close(
        removal_base_inverse(model, problem, theta), expected, rtol=0, atol=0
    )
