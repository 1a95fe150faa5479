"""torch-influence behind our contract. It is not on PyPI: these tests run where
``import torch_influence`` works (its source tree on the path or installed), and otherwise
check the missing-library error."""

import importlib.util

import pytest
import torch

from fidelity.core.curvature import CurvatureOperator
from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_grads
from fidelity.core.problem import Examples
from fidelity.estimators import ExactEstimator
from fidelity.estimators.external.torch_influence import TorchInfluenceEstimator
from fidelity.metrics import pearson
from fidelity.retrain import train
from tests.conftest import make_tiny_mlp_problem
from tests.estimators.references import relative_error

HAS_TORCH_INFLUENCE = importlib.util.find_spec("torch_influence") is not None
needs_library = pytest.mark.skipif(
    not HAS_TORCH_INFLUENCE, reason="torch_influence is not importable"
)


@pytest.fixture(scope="module")
def mlp():
    return train(make_tiny_mlp_problem("cross_entropy"))


@pytest.mark.skipif(HAS_TORCH_INFLUENCE, reason="torch_influence is importable")
def test_missing_library_says_it_is_not_on_pypi(mlp):
    with pytest.raises(FidelityError, match="not on PyPI"):
        TorchInfluenceEstimator().fit(mlp)


def test_bad_settings_are_refused():
    with pytest.raises(FidelityError, match="solver"):
        TorchInfluenceEstimator(solver="arnoldi")
    with pytest.raises(FidelityError, match="no Gauss-Newton mode"):
        TorchInfluenceEstimator(solver="autograd", gnh=True)
    with pytest.raises(FidelityError, match="scale"):
        TorchInfluenceEstimator(scale=0.0)


def with_regulariser_offset(trained, curvature: str, damping: float):
    """Our exact scores plus the library's offset (1/N) (wd theta_s)^T (C + damping I)^-1 g_t,
    the same for every training point of a test point (its training gradients include the
    regulariser's)."""
    problem = trained.problem
    exact = ExactEstimator(damping=damping, curvature=curvature).fit(trained)
    expected = exact.scores(problem.test, problem.train)
    matrix = CurvatureOperator(trained, curvature).dense()
    matrix.diagonal().add_(damping)
    g_test = per_example_grads(trained.model, problem.loss, trained.theta, problem.test)
    offset = g_test @ torch.linalg.solve(matrix, problem.weight_decay * trained.theta)
    return expected, expected + offset.unsqueeze(1) / problem.n_train


@needs_library
@pytest.mark.parametrize(("solver", "gnh"), [("autograd", False), ("cg", False), ("cg", True)])
def test_exact_solvers_equal_exact_plus_the_regulariser_offset(mlp, solver, gnh):
    problem = mlp.problem
    exact, expected = with_regulariser_offset(mlp, "gnh" if gnh else "hessian", 0.1)
    estimator = TorchInfluenceEstimator(solver=solver, gnh=gnh, damping=0.1, tol=1e-12)
    actual = estimator.fit(mlp).scores(problem.test, problem.train)
    assert actual.shape == (problem.n_test, problem.n_train)
    assert relative_error(actual, expected) < 1e-6
    assert relative_error(actual, exact) > 1e-3  # the offset is measurable here (wd 0.01)


@needs_library
def test_without_weight_decay_it_equals_exact(mlp):
    from dataclasses import replace

    problem = replace(make_tiny_mlp_problem("cross_entropy"), weight_decay=0.0)
    trained = train(problem)
    expected = ExactEstimator(damping=0.1).fit(trained).scores(problem.test, problem.train)
    actual = TorchInfluenceEstimator(damping=0.1).fit(trained).scores(problem.test, problem.train)
    assert relative_error(actual, expected) < 1e-6


@needs_library
def test_lissa_is_seeded_and_close_to_its_fixed_point(mlp):
    """LiSSA samples batches with replacement: reproducible by seed, stochastic otherwise."""
    problem = mlp.problem
    _, expected = with_regulariser_offset(mlp, "hessian", 0.1)

    def lissa(seed):
        estimator = TorchInfluenceEstimator(
            solver="lissa", damping=0.1, depth=150, scale=2.0, batch_size=30, seed=seed
        )
        return estimator.fit(mlp).scores(problem.test, problem.train)

    first, again, other = lissa(0), lissa(0), lissa(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert pearson(first.flatten().numpy(), expected.flatten().numpy()) > 0.95


@needs_library
def test_a_subset_of_training_points_is_scored_by_position(mlp):
    problem = mlp.problem
    subset = Examples(problem.x_train[[4, 0, 17]], problem.y_train[[4, 0, 17]])
    estimator = TorchInfluenceEstimator(damping=0.1).fit(mlp)
    whole = estimator.scores(problem.test, problem.train)
    torch.testing.assert_close(estimator.scores(problem.test, subset), whole[:, [4, 0, 17]])
