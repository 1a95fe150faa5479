"""Curvature products against dense float64 references built independently."""

import pytest
import torch

from fidelity.core.curvature import CurvatureOperator
from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs, objective
from fidelity.core.problem import FunctionalModel, TrainedProblem
from tests.conftest import make_tiny_mlp_problem

LOSSES = ["cross_entropy", "bce", "mse"]


def at_random_point(loss: str) -> TrainedProblem:
    """A tiny MLP at a random (untrained) point: curvature products hold at any theta."""
    problem = make_tiny_mlp_problem(loss)
    model = FunctionalModel.of(problem.build_model())
    theta = torch.randn(model.spec.numel, generator=torch.Generator().manual_seed(1)).double()
    return TrainedProblem(problem, model, theta)


def dense_hessian(trained):
    return torch.autograd.functional.hessian(
        lambda t: objective(trained.model, trained.problem, t), trained.theta
    )


def output_hessian(loss, outputs):
    if loss == "cross_entropy":
        probs = outputs.softmax(-1)
        return torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    if loss == "bce":
        s = outputs.sigmoid()
        return (s * (1 - s)).unsqueeze(-1)
    return torch.eye(outputs.shape[-1]).expand(outputs.shape[0], -1, -1)


def dense_gauss_newton(trained):
    problem, model, theta = trained.problem, trained.model, trained.theta
    jacobian = torch.autograd.functional.jacobian(lambda t: model(t, problem.x_train), theta)
    hout = output_hessian(problem.loss, model(theta, problem.x_train))
    gn = torch.einsum("nkp,nkl,nlq->pq", jacobian, hout, jacobian) / problem.n_train
    return gn + problem.weight_decay * torch.eye(theta.numel())


@pytest.mark.parametrize("loss", LOSSES)
def test_hessian_vector_products_equal_dense_hessian(loss):
    trained = at_random_point(loss)
    vectors = torch.randn(4, trained.n_params, generator=torch.Generator().manual_seed(2)).double()
    reference = vectors @ dense_hessian(trained)
    operator = CurvatureOperator(trained, "hessian", batch_size=7)
    torch.testing.assert_close(operator.matvec(vectors), reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(operator.dense(), dense_hessian(trained), rtol=0, atol=1e-10)


@pytest.mark.parametrize("loss", LOSSES)
def test_gauss_newton_vector_products_equal_dense_gauss_newton(loss):
    trained = at_random_point(loss)
    vectors = torch.randn(4, trained.n_params, generator=torch.Generator().manual_seed(3)).double()
    reference_matrix = dense_gauss_newton(trained)
    operator = CurvatureOperator(trained, "gnh", batch_size=7)
    torch.testing.assert_close(
        operator.matvec(vectors), vectors @ reference_matrix, rtol=0, atol=1e-10
    )
    torch.testing.assert_close(operator.dense(), reference_matrix, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        operator.gauss_newton_diagonal(), reference_matrix.diagonal(), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("loss", LOSSES)
def test_empirical_fisher_products_equal_a_loop_of_gradient_outer_products(loss):
    trained = at_random_point(loss)
    problem, model, theta = trained.problem, trained.model, trained.theta
    reference = problem.weight_decay * torch.eye(trained.n_params, dtype=theta.dtype)
    for i in range(problem.n_train):
        x, y = problem.x_train[i : i + 1], problem.y_train[i : i + 1]
        gradient = torch.autograd.functional.jacobian(
            lambda t, x=x, y=y: loss_from_outputs(problem.loss, model(t, x), y).sum(), theta
        )
        reference = reference + torch.outer(gradient, gradient) / problem.n_train
    vectors = torch.randn(4, trained.n_params, generator=torch.Generator().manual_seed(4)).double()
    operator = CurvatureOperator(trained, "empirical-fisher", batch_size=7)
    torch.testing.assert_close(operator.matvec(vectors), vectors @ reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(operator.dense(), reference, rtol=0, atol=1e-10)
    # It is not the Gauss-Newton matrix away from a perfect fit.
    assert float((reference - dense_gauss_newton(trained)).abs().max()) > 1e-3


def test_gauss_newton_is_positive_semidefinite_where_the_hessian_is_not():
    trained = at_random_point("cross_entropy")
    hessian = CurvatureOperator(trained, "hessian").dense()
    gauss_newton = CurvatureOperator(trained, "gnh").dense()
    assert float(torch.linalg.eigvalsh(hessian)[0]) < 0
    assert float(torch.linalg.eigvalsh(gauss_newton)[0]) >= trained.problem.weight_decay - 1e-12


@pytest.mark.parametrize("curvature", ["hessian", "gnh", "empirical-fisher"])
def test_products_do_not_depend_on_batch_size(curvature):
    trained = at_random_point("cross_entropy")
    vectors = torch.randn(3, trained.n_params, generator=torch.Generator().manual_seed(4)).double()
    results = [CurvatureOperator(trained, curvature, b).matvec(vectors) for b in (1, 4, 30, 512)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-13)


def test_single_vector_and_block_agree():
    trained = at_random_point("mse")
    operator = CurvatureOperator(trained, "hessian")
    vectors = torch.randn(2, trained.n_params, generator=torch.Generator().manual_seed(5)).double()
    torch.testing.assert_close(operator.matvec(vectors[1]), operator.matvec(vectors)[1])


@pytest.mark.parametrize("curvature", ["hessian", "gnh", "empirical-fisher"])
def test_weighted_sum_equals_the_weighted_objectives_curvature(curvature):
    """sum_i w_i C_i: the Hessian of the weighted objective less its regulariser (hessian), and
    the dense matrix at unit weights; examples of weight 0 are skipped, not multiplied."""
    trained = at_random_point("cross_entropy")
    problem = trained.problem
    operator = CurvatureOperator(trained, curvature, batch_size=7)
    ones = operator.weighted_sum(None)
    expected = (operator.dense() - problem.weight_decay * torch.eye(trained.n_params)) * (
        problem.n_train
    )
    torch.testing.assert_close(0.5 * (ones + ones.T), expected, rtol=1e-10, atol=1e-12)
    weights = torch.linspace(0, 1, problem.n_train, dtype=torch.float64)
    weights[::3] = 0.0
    weighted = operator.weighted_sum(weights)
    if curvature == "hessian":
        reference = torch.autograd.functional.hessian(
            lambda t: objective(trained.model, problem, t, weights), trained.theta
        ) - problem.weight_decay * torch.eye(trained.n_params)
        torch.testing.assert_close(weighted, reference * problem.n_train, rtol=1e-9, atol=1e-11)
    kept = torch.nonzero(weights).squeeze(1)
    manual = sum(
        float(weights[i]) * operator.weighted_sum(torch.eye(problem.n_train)[i].double())
        for i in kept.tolist()
    )
    torch.testing.assert_close(weighted, manual, rtol=1e-9, atol=1e-11)
    with pytest.raises(FidelityError, match="curvature weights must have shape"):
        operator.weighted_sum(weights[:-1])


def _spd(eigenvalues, seed):
    generator = torch.Generator().manual_seed(seed)
    size = eigenvalues.numel()
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return (basis * eigenvalues) @ basis.T


def test_block_cg_equals_the_dense_solve_in_fewer_steps():
    from fidelity.core.curvature import block_conjugate_gradient, conjugate_gradient

    # a few large curvature directions above a bulk, as in a network's Hessian
    spectrum = torch.cat([torch.logspace(2, 1, 10), torch.logspace(-1, -2, 50)]).double()
    matrix = _spd(spectrum, 0)
    generator = torch.Generator().manual_seed(1)
    rhs = torch.randn(8, 60, generator=generator, dtype=torch.float64)
    rhs[5] = rhs[1] + 2 * rhs[2]  # a column in the span of others adds no direction
    rhs[6] = 0.0  # and a zero column is solved at once
    expected = torch.linalg.solve(matrix, rhs.T).T

    def apply(vectors):
        return vectors @ matrix

    block = block_conjugate_gradient(apply, rhs, tol=1e-10, max_iter=200)
    single = conjugate_gradient(apply, rhs, tol=1e-10, max_iter=200)
    torch.testing.assert_close(block.solution, expected, rtol=1e-7, atol=1e-8)
    assert bool(block.converged.all()) and not bool(block.negative_curvature.any())
    assert int(block.iterations.max()) < int(single.iterations.max())
    assert int(block.iterations[6]) == 0
    jacobi = 1.0 / matrix.diagonal()
    preconditioned = block_conjugate_gradient(
        apply, rhs, tol=1e-10, max_iter=200, precondition=lambda r: r * jacobi
    )
    torch.testing.assert_close(preconditioned.solution, expected, rtol=1e-7, atol=1e-8)


def test_block_cg_hands_an_indefinite_span_to_per_column_cg():
    from fidelity.core.curvature import block_conjugate_gradient

    matrix = torch.diag(torch.tensor([2.0, 1.0, -1.0, 3.0], dtype=torch.float64))
    rhs = torch.eye(4, dtype=torch.float64)
    result = block_conjugate_gradient(lambda v: v @ matrix, rhs, tol=1e-12, max_iter=20)
    assert bool(result.negative_curvature[2])
    assert bool(result.converged[[0, 1, 3]].all())
    torch.testing.assert_close(
        result.solution[[0, 1, 3]], torch.linalg.solve(matrix, rhs.T).T[[0, 1, 3]]
    )


@pytest.mark.parametrize("curvature", ["gnh", "empirical-fisher", "hessian"])
@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "mse"])
def test_diagonal_is_the_dense_matrix_diagonal(curvature, loss):
    from fidelity.core.curvature import CurvatureOperator
    from fidelity.retrain import train
    from tests.conftest import make_tiny_mlp_problem

    trained = train(make_tiny_mlp_problem(loss=loss))
    operator = CurvatureOperator(trained, curvature, batch_size=7)
    dense = operator.dense().diagonal()
    assert torch.allclose(operator.diagonal(), dense, rtol=1e-12, atol=1e-14)
