"""The closed-form gradient and Hessian of affine models against autograd, on every loss."""

import pytest
import torch
from torch import nn

from fidelity.core.affine import affine_example_gradients, affine_form
from fidelity.core.objective import (
    objective,
    objective_gradients,
    objective_hessian,
    per_example_grads,
)
from fidelity.core.problem import FunctionalModel
from fidelity.problems import load_problem
from fidelity.retrain.newton import SecantMemory


@pytest.mark.parametrize("name", ["digits-logreg", "cancer-logreg", "diabetes-ridge"])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_closed_forms_equal_autograd(name, damping):
    problem = load_problem(name)
    model = FunctionalModel.of(problem.build_model())
    assert affine_form(model) is not None
    generator = torch.Generator().manual_seed(0)
    p = model.spec.numel
    thetas = 0.3 * torch.randn(3, p, generator=generator, dtype=torch.float64)
    weights = torch.rand(3, problem.n_train, generator=generator, dtype=torch.float64)
    anchor = torch.randn(p, generator=generator, dtype=torch.float64)

    def value(theta, weight):
        return objective(model, problem, theta, weight, anchor, damping)

    reference = torch.func.vmap(torch.func.grad(value))(thetas, weights)
    closed = objective_gradients(model, problem, anchor, damping)(thetas, weights)
    torch.testing.assert_close(closed, reference, rtol=1e-12, atol=1e-14)
    dense = torch.func.jacrev(torch.func.grad(value))(thetas[0], weights[0])
    hessian = objective_hessian(model, problem, thetas[0], weights[0], anchor, damping)
    torch.testing.assert_close(hessian, dense, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["digits-logreg", "cancer-logreg", "diabetes-ridge"])
def test_example_gradients_equal_autograd(name):
    problem = load_problem(name)
    model = FunctionalModel.of(problem.build_model())
    theta = 0.3 * torch.randn(
        model.spec.numel, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    points = problem.train.subset(torch.arange(0, 40, 3))
    reference = per_example_grads(model, problem.loss, theta, points)
    closed = affine_example_gradients(affine_form(model), problem.loss, points.x, points.y, theta)
    torch.testing.assert_close(closed, reference, rtol=1e-12, atol=1e-14)


def test_only_a_bare_linear_layer_with_trained_bias_takes_the_closed_form():
    assert affine_form(FunctionalModel.of(nn.Linear(3, 2))) is not None
    assert affine_form(FunctionalModel.of(nn.Linear(3, 2, bias=False))) is not None
    assert affine_form(FunctionalModel.of(nn.Sequential(nn.Linear(3, 2)))) is None
    frozen = nn.Linear(3, 2)
    frozen.bias.requires_grad_(False)
    assert affine_form(FunctionalModel.of(frozen)) is None


def test_layout_without_bias_round_trips():
    model = FunctionalModel.of(nn.Linear(4, 3, bias=False))
    form = affine_form(model)
    thetas = torch.randn(2, model.spec.numel, dtype=torch.float64)
    torch.testing.assert_close(form.flatten(form.matrices(thetas)), thetas)
    assert sorted(form.theta_order().tolist()) == list(range(model.spec.numel))


def test_secant_memory_reproduces_bfgs_on_a_quadratic():
    # On f = 1/2 x^T A x with an identity start, L-BFGS directions from exact secant pairs of a
    # quadratic satisfy the secant equation B^{-1} y = s for the newest pair.
    generator = torch.Generator().manual_seed(1)
    basis = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    matrix = basis @ basis.T + 5 * torch.eye(5, dtype=torch.float64)
    memory = SecantMemory(1, 5, 3, matrix)
    rows = torch.tensor([0])
    identity = lambda vectors, rows: vectors.clone()  # noqa: E731
    step = torch.randn(1, 5, generator=generator, dtype=torch.float64)
    memory.remember(rows, step, step @ matrix, torch.tensor([True]))
    direction = memory.direction(step @ matrix, rows, identity)
    torch.testing.assert_close(direction, step, rtol=1e-12, atol=1e-12)
    empty = SecantMemory(1, 5, 0, matrix)
    torch.testing.assert_close(empty.direction(step, rows, identity), step)
    # a pair without positive curvature is ignored
    memory = SecantMemory(1, 5, 3, matrix)
    memory.remember(rows, step, -step @ matrix, torch.tensor([True]))
    torch.testing.assert_close(memory.direction(step, rows, identity), step)


@pytest.mark.parametrize("loss,outputs", [("cross_entropy", 4), ("bce", 1), ("mse", 3)])
def test_output_hessian_factor_squares_to_the_output_hessian(loss, outputs):
    from fidelity.core.objective import loss_from_outputs, output_hessian_factor

    generator = torch.Generator().manual_seed(2)
    values = 3 * torch.randn(6, outputs, generator=generator, dtype=torch.float64)
    if loss == "cross_entropy":
        targets = torch.randint(0, outputs, (6,), generator=generator)
    else:
        targets = torch.rand(6, outputs, generator=generator, dtype=torch.float64)
    factor = output_hessian_factor(loss, values, targets)

    def single(out, target):
        return torch.func.hessian(
            lambda o: loss_from_outputs(loss, o.unsqueeze(0), target.unsqueeze(0)).sum()
        )(out)

    expected = torch.func.vmap(single)(values, targets)
    torch.testing.assert_close(factor @ factor.transpose(1, 2), expected, rtol=1e-12, atol=1e-14)
