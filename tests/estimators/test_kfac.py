"""K-FAC and EK-FAC against explicit dense matrices built from the same factors, the exact
Gauss-Newton terms, and an unfold-based convolution reference."""

import pytest
import torch
import torch.nn.functional as F

from fidelity.core.curvature import CurvatureOperator
from fidelity.core.errors import FidelityError
from fidelity.core.objective import output_hessian_factor, per_example_grads
from fidelity.estimators import EkfacEstimator, GaussNewtonEstimator, KfacEstimator
from fidelity.estimators.kfac import layer_statistics, select_layers
from fidelity.retrain import train
from tests.conftest import make_tiny_cnn_problem, make_tiny_logreg, make_tiny_mlp_problem


@pytest.fixture(scope="module")
def softmax():
    return train(make_tiny_logreg(n_train=40, features=4, classes=3))


@pytest.fixture(scope="module")
def mlp():
    return train(make_tiny_mlp_problem("cross_entropy"))


def block_order(block) -> torch.Tensor:
    """theta index of each entry of the layer's row-major [out, in (+1)] matrix."""
    out, columns, inputs = block.out_features, block.columns, block.in_features
    order = torch.empty(out, columns, dtype=torch.long)
    weight_start = block.weight.start
    for o in range(out):
        for i in range(inputs):
            order[o, i] = weight_start + o * inputs + i
        if block.bias is not None:
            order[o, inputs] = block.bias.start + o
    return order.flatten()


def test_kfac_equals_the_explicit_dense_kronecker_inverse(softmax):
    """One linear softmax layer: A = E[[x, 1][x, 1]^T], S = E[H_out] (expected Fisher)."""
    problem = softmax.problem
    damping = 0.03
    estimator = KfacEstimator(damping=damping).fit(softmax)
    x = torch.cat([problem.x_train, torch.ones(problem.n_train, 1, dtype=torch.float64)], 1)
    activation = x.T @ x / problem.n_train
    outputs = softmax.model(softmax.theta, problem.x_train)
    factor = output_hessian_factor(problem.loss, outputs, problem.y_train)
    gradient = (factor @ factor.transpose(1, 2)).sum(0) / problem.n_train
    (block,) = estimator.blocks_
    order = block_order(block)
    dense = torch.zeros(softmax.n_params, softmax.n_params, dtype=torch.float64)
    dense[order[:, None], order[None, :]] = torch.kron(gradient, activation)
    dense += (problem.weight_decay + damping) * torch.eye(softmax.n_params, dtype=torch.float64)
    vectors = torch.randn(5, softmax.n_params, generator=torch.Generator().manual_seed(1)).double()
    expected = torch.linalg.solve(dense, vectors.T).T
    actual = estimator._inverse_curvature_product(vectors)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def dense_ekfac(trained, estimator):
    """Per covered layer: Q = Q_S kron Q_A, Lambda = diag(Q^T G_l Q) with G_l the layer's block
    of the exact Gauss-Newton matrix (the exact per-example Fisher terms), as a dense p x p."""
    gauss_newton = CurvatureOperator(trained, "gnh").dense()
    gauss_newton.diagonal().sub_(trained.problem.weight_decay)
    p = trained.n_params
    dense = torch.zeros(p, p, dtype=torch.float64)
    for block, (s_vectors, a_vectors), layer_damping in zip(
        estimator.blocks_, estimator.bases_, estimator.dampings_, strict=True
    ):
        order = block_order(block)
        basis = torch.kron(s_vectors, a_vectors)
        block_gn = gauss_newton[order[:, None], order[None, :]]
        values = torch.diagonal(basis.T @ block_gn @ basis)
        shift = trained.problem.weight_decay + layer_damping
        dense[order[:, None], order[None, :]] = basis @ torch.diag(values + shift) @ basis.T
    return dense, gauss_newton


@pytest.mark.parametrize("name", ["softmax", "mlp", "digits-mlp"])
def test_ekfac_equals_the_dense_eigenbasis_construction(name, request, trained_problems):
    trained = trained_problems(name) if name == "digits-mlp" else request.getfixturevalue(name)
    estimator = EkfacEstimator(damping=0.1).fit(trained)
    dense, _ = dense_ekfac(trained, estimator)
    vectors = torch.randn(4, trained.n_params, generator=torch.Generator().manual_seed(2)).double()
    expected = torch.linalg.solve(dense, vectors.T).T
    actual = estimator._inverse_curvature_product(vectors)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def test_eigenvalue_correction_never_fits_worse_than_kfac(mlp):
    """In the Kronecker eigenbasis EK-FAC's diagonal is the best diagonal fit of the
    Gauss-Newton block; K-FAC's product of factor eigenvalues can only be worse."""
    kfac = KfacEstimator().fit(mlp)
    ekfac = EkfacEstimator().fit(mlp)
    _, gauss_newton = dense_ekfac(mlp, ekfac)
    for block, (s_vectors, a_vectors), kfac_values, ekfac_values in zip(
        ekfac.blocks_, ekfac.bases_, kfac.eigenvalues_, ekfac.eigenvalues_, strict=True
    ):
        order = block_order(block)
        basis = torch.kron(s_vectors, a_vectors)
        rotated = basis.T @ gauss_newton[order[:, None], order[None, :]] @ basis
        ekfac_error = (rotated - torch.diag(ekfac_values.flatten())).norm()
        kfac_error = (rotated - torch.diag(kfac_values.flatten())).norm()
        assert ekfac_error <= kfac_error + 1e-12
        assert ekfac_error < kfac_error  # the correction does something on a real MLP


@pytest.fixture(scope="module")
def cnn():
    return train(make_tiny_cnn_problem())


def test_conv2d_factors_match_an_unfold_computation(cnn):
    problem = cnn.problem
    blocks, uncovered = select_layers(cnn.model, None)
    assert [b.name for b in blocks] == ["conv", "head"] and uncovered == []
    ((activations, per_direction),) = list(
        layer_statistics(cnn, blocks, problem.train, "empirical", 512, None)
    )
    patches = F.unfold(problem.x_train.reshape(-1, 2, 5, 5), 3, padding=1, stride=2)
    patches = torch.cat([patches, torch.ones(20, 1, patches.shape[2], dtype=torch.float64)], 1)
    torch.testing.assert_close(activations[0], patches.transpose(1, 2), rtol=0, atol=0)
    # sum_t s_t a_t^T is each example's gradient of the conv weight and bias
    (grads,) = per_direction
    per_example = torch.einsum("bto,bti->boi", grads[0], activations[0])
    reference = per_example_grads(cnn.model, problem.loss, cnn.theta, problem.train)
    conv = blocks[0]
    expected = torch.stack([conv.matrices(row.unsqueeze(0))[0] for row in reference])
    torch.testing.assert_close(per_example, expected, rtol=1e-10, atol=1e-12)


def test_layer_selection_restricts_and_reports(mlp):
    head = EkfacEstimator(layers="2").fit(mlp)
    assert head.diagnostics["layers"] == ["2"]
    assert head.diagnostics["uncovered_parameters"] == ["0.weight", "0.bias"]
    vectors = torch.ones(1, mlp.n_params, dtype=torch.float64)
    solved = head._inverse_curvature_product(vectors)
    assert bool((solved[0, :20] == 0).all()) and bool((solved[0, 20:] != 0).all())
    with pytest.raises(FidelityError, match=r"match no nn\.Linear"):
        EkfacEstimator(layers=["nothing.*"]).fit(mlp)


def test_sampled_fisher_is_seeded_and_approaches_the_expected_one(mlp):
    problem = mlp.problem
    one = EkfacEstimator(fisher="sampled", seed=3).fit(mlp).scores(problem.test, problem.train)
    two = EkfacEstimator(fisher="sampled", seed=3).fit(mlp).scores(problem.test, problem.train)
    assert torch.equal(one, two)
    other = EkfacEstimator(fisher="sampled", seed=4).fit(mlp).scores(problem.test, problem.train)
    assert not torch.equal(one, other)


def test_kfac_and_ekfac_track_gnh_on_a_convex_model(softmax):
    """The Kronecker structure is an approximation even for one layer (G is a sum of
    per-example Kronecker products); both must still track gnh closely here."""
    problem = softmax.problem
    reference = GaussNewtonEstimator(damping=0.01).fit(softmax).scores(problem.test, problem.train)
    for cls in (KfacEstimator, EkfacEstimator):
        scores = cls(damping=0.01).fit(softmax)
        predicted = scores.scores(problem.test, problem.train)
        r = torch.corrcoef(torch.stack([predicted.flatten(), reference.flatten()]))[0, 1]
        assert float(r) > 0.95


def test_bad_settings():
    with pytest.raises(FidelityError, match=r"ekfac\.fisher"):
        EkfacEstimator(fisher="true")
    with pytest.raises(FidelityError, match=r"kfac\.damping_ratio"):
        KfacEstimator(damping_ratio=-0.1)
    with pytest.raises(FidelityError, match=r"kfac\.layers"):
        KfacEstimator(layers=3)


def test_dense_references_restrict_to_the_same_layers(mlp):
    """gnh over the head's parameters only: the head block of G + wd I, gradients restricted."""
    problem = mlp.problem
    head = GaussNewtonEstimator(damping=0.05, layers=["2"]).fit(mlp)
    assert head.diagnostics["uncovered_parameters"] == ["0.weight", "0.bias"]
    matrix = CurvatureOperator(mlp, "gnh").dense()[20:, 20:]
    matrix += 0.05 * torch.eye(matrix.shape[0], dtype=torch.float64)
    grads_test = per_example_grads(mlp.model, problem.loss, mlp.theta, problem.test)[:, 20:]
    grads_train = per_example_grads(mlp.model, problem.loss, mlp.theta, problem.train)[:, 20:]
    expected = grads_test @ torch.linalg.solve(matrix, grads_train.T) / problem.n_train
    actual = head.scores(problem.test, problem.train)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)


def test_kfac_on_digits_mlp_equals_factors_computed_densely(trained_problems):
    """digits-mlp (64-32-10 tanh): A from the layer inputs, S from per-example Jacobians of
    the outputs with respect to each layer's pre-activations and the output Hessians."""
    trained = trained_problems("digits-mlp")
    problem, n = trained.problem, trained.problem.n_train
    estimator = KfacEstimator(damping=0.01).fit(trained)
    params = trained.model.spec.unflatten(trained.theta)
    w0, b0, w1, b1 = (params[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    x = problem.x_train
    hidden_pre = x @ w0.T + b0
    hidden = torch.tanh(hidden_pre)
    outputs = hidden @ w1.T + b1
    output_hessians = output_hessian_factor(problem.loss, outputs, problem.y_train)
    output_hessians = output_hessians @ output_hessians.transpose(1, 2)
    ones = torch.ones(n, 1, dtype=torch.float64)
    # d outputs / d hidden_pre = W1 diag(1 - tanh^2): [n, 10, 32]
    jacobian = w1.unsqueeze(0) * (1 - hidden.pow(2)).unsqueeze(1)
    factors = [
        (
            torch.einsum("nkz,nkl,nlw->zw", jacobian, output_hessians, jacobian) / n,
            torch.cat([x, ones], 1).T @ torch.cat([x, ones], 1) / n,
        ),
        (
            output_hessians.sum(0) / n,
            torch.cat([hidden, ones], 1).T @ torch.cat([hidden, ones], 1) / n,
        ),
    ]
    p = trained.n_params
    dense = (problem.weight_decay + 0.01) * torch.eye(p, dtype=torch.float64)
    for block, (gradient, activation) in zip(estimator.blocks_, factors, strict=True):
        order = block_order(block)
        dense[order[:, None], order[None, :]] += torch.kron(gradient, activation)
    vectors = torch.randn(3, p, generator=torch.Generator().manual_seed(5)).double()
    expected = torch.linalg.solve(dense, vectors.T).T
    actual = estimator._inverse_curvature_product(vectors)
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-10)


def test_damping_is_absolute_and_the_ratio_relative(trained_problems):
    trained = trained_problems("digits-mlp")
    means = [float(v.mean()) for v in KfacEstimator(damping=0.0).fit(trained).eigenvalues_]
    assert KfacEstimator(damping=0.02).fit(trained).dampings_ == [0.02] * len(means)
    relative = KfacEstimator(damping_ratio=0.5).fit(trained).dampings_
    assert relative == pytest.approx([0.5 * m for m in means], rel=1e-12)
    default = KfacEstimator().fit(trained).dampings_
    assert default == pytest.approx([0.1 * m for m in means], rel=1e-12)
    both = KfacEstimator(damping=0.02, damping_ratio=0.5).fit(trained).dampings_
    assert both == pytest.approx([0.02 + 0.5 * m for m in means], rel=1e-12)


def test_the_reduce_form_changes_convolutions_only(mlp, cnn):
    problem = mlp.problem
    expand = KfacEstimator(convolution="expand").fit(mlp).scores(problem.test, problem.train)
    reduce = KfacEstimator(convolution="reduce").fit(mlp).scores(problem.test, problem.train)
    assert torch.equal(expand, reduce)  # a linear layer has one position: the forms agree
    test, train_points = cnn.problem.test, cnn.problem.train
    expand = KfacEstimator(convolution="expand").fit(cnn).scores(test, train_points)
    reduce = KfacEstimator(convolution="reduce").fit(cnn).scores(test, train_points)
    assert not torch.allclose(expand, reduce)
    with pytest.raises(FidelityError, match="convolution must be one of"):
        KfacEstimator(convolution="sum")
