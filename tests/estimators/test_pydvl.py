"""pyDVL behind our contract: after conversion, its solvers equal our dense reference (runs
where pyDVL is installed: the environment of benchmarks/peers_env.sh)."""

import importlib.util

import pytest

from estimators import ExactEstimator
from estimators.external.pydvl import PydvlEstimator
from fidelity.errors import FidelityError
from retrain import train
from tests.conftest import make_tiny_mlp_problem

HAS_PYDVL = importlib.util.find_spec("pydvl") is not None


@pytest.fixture(scope="module")
def mlp():
    return train(make_tiny_mlp_problem("cross_entropy"))


@pytest.mark.skipif(HAS_PYDVL, reason="pydvl is installed")
def test_missing_library_names_the_environment_to_create(mlp):
    with pytest.raises(FidelityError, match=r"peers_env\.sh"):
        PydvlEstimator().fit(mlp)


def test_bad_solver_is_refused():
    with pytest.raises(FidelityError, match=r"pydvl\.solver"):
        PydvlEstimator(solver="nystroem-typo")


@pytest.mark.skipif(not HAS_PYDVL, reason="pydvl is not installed")
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("solver", "options", "tolerance"),
    [
        ("direct", {}, 1e-6),
        ("cg", {"tol": 1e-12}, 1e-6),
        ("arnoldi", {"rank": 38}, 1e-6),  # rank = p: the whole spectrum
        ("lissa", {"depth": 5000, "scale": 10.0, "tol": 1e-12}, 1e-3),
    ],
)
def test_solvers_equal_exact_after_conversion(mlp, solver, options, tolerance):
    problem = mlp.problem
    assert mlp.n_params == 38
    expected = ExactEstimator(damping=0.1).fit(mlp).scores(problem.test, problem.train)
    actual = (
        PydvlEstimator(solver=solver, damping=0.1, **options)
        .fit(mlp)
        .scores(problem.test, problem.train)
    )
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error <= tolerance
