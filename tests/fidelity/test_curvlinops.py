"""Our curvature against an independent library: curvlinops-for-pytorch's Gauss-Newton,
Hessian, empirical Fisher and K-FAC (both the expand and the reduce form for convolutions) on
the models both support.

Runs in the peers environment (``bash benchmarks/peers_env.sh``), skipped where curvlinops is
not installed. curvlinops' operators act on an nn.Module's own parameters, so each test loads
theta_s into a copy of the module (our functional model is never touched) and compares dense
matrices in float64: ours hold weight decay, theirs the loss's curvature alone; our `mse` is
half the squared error summed over outputs, so for one output its curvature is half of
``MSELoss(reduction="mean")``'s."""

import copy
from functools import partial

import pytest
import torch
from torch import nn

from fidelity.core.curvature import CurvatureOperator
from fidelity.estimators import EkfacEstimator, KfacEstimator
from fidelity.retrain import train
from tests.conftest import make_tiny_cnn_problem, make_tiny_logreg, make_tiny_mlp_problem

curvlinops = pytest.importorskip("curvlinops")


PROBLEMS = {
    "logreg": make_tiny_logreg,
    "mlp-ce": partial(make_tiny_mlp_problem, loss="cross_entropy"),
    "mlp-bce": partial(make_tiny_mlp_problem, loss="bce"),
    "mlp-mse": partial(make_tiny_mlp_problem, loss="mse"),
    "cnn": make_tiny_cnn_problem,
}


@pytest.fixture(scope="module")
def trained_problems():
    return {name: train(make()) for name, make in PROBLEMS.items()}


def module_at_theta(trained):
    """A copy of the problem's module holding theta_s, with its parameter list."""
    module = copy.deepcopy(trained.model.module)
    with torch.no_grad():
        for name, value in trained.model.spec.unflatten(trained.theta).items():
            module.get_parameter(name).copy_(value)
    return module, [module.get_parameter(name) for name in trained.model.spec.names]


def loss_function(loss: str) -> nn.Module:
    return {
        "cross_entropy": nn.CrossEntropyLoss(),
        "bce": nn.BCEWithLogitsLoss(),
        "mse": nn.MSELoss(),
    }[loss]


def their_dense(operator_class, trained, **settings):
    problem = trained.problem
    module, params = module_at_theta(trained)
    operator = operator_class(
        module,
        loss_function(problem.loss),
        params,
        [(problem.x_train, problem.y_train)],
        check_deterministic=False,
        **settings,
    )
    eye = torch.eye(trained.n_params, dtype=torch.float64)
    # torch linear operators and scipy ones both accept a matrix on the right
    return torch.as_tensor(operator @ eye, dtype=torch.float64)


def our_dense(trained, curvature):
    matrix = CurvatureOperator(trained, curvature).dense()
    matrix.diagonal().sub_(trained.problem.weight_decay)
    # our mse is half the squared error; MSELoss(mean) with one output is the full one
    return 2 * matrix if trained.problem.loss == "mse" else matrix


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize(
    "curvature, operator",
    [
        ("gnh", "GGNLinearOperator"),
        ("hessian", "HessianLinearOperator"),
        ("empirical-fisher", "EFLinearOperator"),
    ],
)
def test_dense_curvatures_equal_curvlinops(trained_problems, name, curvature, operator):
    trained = trained_problems[name]
    ours = our_dense(trained, curvature)
    if curvature == "empirical-fisher" and trained.problem.loss == "mse":
        # the empirical Fisher of a mean squared error is scaled by the loss's own factor
        # twice (gradients of 0.5 r^2 against r^2): four times ours, not twice
        ours = 2 * ours
    theirs = their_dense(getattr(curvlinops, operator), trained)
    assert relative(ours, theirs) <= 1e-8


def our_kfac_dense(trained, fisher, convolution="expand", estimator_class=KfacEstimator):
    """Our K-FAC matrix, S kron A per covered layer, in theta's order: K applied to every unit
    matrix of a layer's [out, in (+1)] layout, each image placed at that unit's theta index."""
    estimator = estimator_class(fisher=fisher, convolution=convolution).fit(trained)
    p = trained.n_params
    matrix = torch.zeros(p, p, dtype=torch.float64)
    for block, (s_vectors, a_vectors), values in zip(
        estimator.blocks_, estimator.bases_, estimator.eigenvalues_, strict=True
    ):
        size = block.out_features * block.columns
        units = torch.eye(size, dtype=torch.float64).reshape(size, block.out_features, -1)
        images = s_vectors @ ((s_vectors.T @ units @ a_vectors) * values) @ a_vectors.T
        placed, rows = torch.zeros(size, p, dtype=torch.float64), torch.zeros_like(matrix[:size])
        block.scatter(units, placed)
        block.scatter(images, rows)
        matrix[placed.argmax(dim=1)] = rows  # K is symmetric: row u is K e_u
    return matrix


@pytest.mark.parametrize("name", ["logreg", "mlp-ce", "mlp-bce", "cnn"])
def test_kfac_equals_curvlinops_type2_expand(trained_problems, name):
    # our "expected" Fisher passes the output-Hessian factor's columns backwards: curvlinops'
    # type-2 Fisher; convolutions in the expand form (Grosse & Martens' KFC)
    trained = trained_problems[name]
    ours = our_kfac_dense(trained, "expected")
    theirs = their_dense(
        curvlinops.KFACLinearOperator,
        trained,
        fisher_type="type-2",
        kfac_approx="expand",
        separate_weight_and_bias=False,
    )
    assert relative(ours, theirs) <= 1e-8


@pytest.mark.parametrize("name", ["logreg", "mlp-ce", "cnn"])
def test_kfac_empirical_equals_curvlinops_empirical(trained_problems, name):
    trained = trained_problems[name]
    ours = our_kfac_dense(trained, "empirical")
    theirs = their_dense(
        curvlinops.KFACLinearOperator,
        trained,
        fisher_type="empirical",
        kfac_approx="expand",
        separate_weight_and_bias=False,
    )
    assert relative(ours, theirs) <= 1e-8


@pytest.mark.parametrize("fisher, theirs", [("expected", "type-2"), ("empirical", "empirical")])
def test_kfac_reduce_equals_curvlinops_reduce_and_differs_from_expand(
    trained_problems, fisher, theirs
):
    trained = trained_problems["cnn"]
    ours = our_kfac_dense(trained, fisher, convolution="reduce")
    reference = their_dense(
        curvlinops.KFACLinearOperator,
        trained,
        fisher_type=theirs,
        kfac_approx="reduce",
        separate_weight_and_bias=False,
    )
    assert relative(ours, reference) <= 1e-8
    # the two forms are different approximations of a convolution's block
    assert relative(our_kfac_dense(trained, fisher), reference) > 1e-3


@pytest.mark.parametrize("name", ["logreg", "mlp-ce", "cnn"])
def test_ekfac_equals_curvlinops_ekfac(trained_problems, name):
    # the eigenvalue correction in K-FAC's eigenbasis, from the same per-example gradients
    trained = trained_problems[name]
    ours = our_kfac_dense(trained, "expected", estimator_class=EkfacEstimator)
    theirs = their_dense(
        curvlinops.EKFACLinearOperator,
        trained,
        fisher_type="type-2",
        kfac_approx="expand",
        separate_weight_and_bias=False,
    )
    assert relative(ours, theirs) <= 1e-8
