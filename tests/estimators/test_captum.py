"""captum behind our contract: after conversion its naive influence function equals our dense
`exact` (runs where captum is installed: the environment of benchmarks/peers_env.sh)."""

import importlib.util

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.estimators import ExactEstimator
from fidelity.estimators.external.captum import CaptumEstimator
from fidelity.retrain import train
from tests.conftest import make_tiny_mlp_problem

HAS_CAPTUM = importlib.util.find_spec("captum") is not None


@pytest.fixture(scope="module")
def mlp():
    return train(make_tiny_mlp_problem("cross_entropy"))


@pytest.mark.skipif(HAS_CAPTUM, reason="captum is installed")
def test_missing_library_names_the_environment_to_create(mlp):
    with pytest.raises(FidelityError, match=r"peers_env\.sh"):
        CaptumEstimator().fit(mlp)


def test_bad_method_is_refused():
    with pytest.raises(FidelityError, match=r"captum\.method"):
        CaptumEstimator(method="tracin-typo")


@pytest.mark.skipif(not HAS_CAPTUM, reason="captum is not installed")
@pytest.mark.filterwarnings("ignore")
def test_naive_influence_equals_exact_after_conversion(mlp):
    problem = mlp.problem
    expected = ExactEstimator(damping=0.1).fit(mlp).scores(problem.test, problem.train)
    captum = CaptumEstimator(method="naive", damping=0.1).fit(mlp)
    actual = captum.scores(problem.test, problem.train)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-12)
    columns = torch.tensor([7, 2, 19])
    subset = captum.scores(problem.test, problem.train.subset(columns))
    torch.testing.assert_close(subset, actual[:, columns], rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CAPTUM, reason="captum is not installed")
@pytest.mark.filterwarnings("ignore")
def test_arnoldi_at_full_rank_tracks_exact(mlp):
    problem = mlp.problem
    expected = ExactEstimator(damping=0.1).fit(mlp).scores(problem.test, problem.train)
    captum = CaptumEstimator(method="arnoldi", damping=0.1, rank=38, iterations=38, tol=1e-10)
    captum.fit(mlp)
    actual = captum.scores(problem.test, problem.train)
    r = torch.corrcoef(torch.stack([actual.flatten(), expected.flatten()]))[0, 1]
    assert float(r) > 0.99


@pytest.mark.skipif(not HAS_CAPTUM, reason="captum is not installed")
@pytest.mark.filterwarnings("ignore")
def test_tracincp_at_theta_s_equals_grad_dot(mlp):
    from fidelity.estimators.baselines import GradDotEstimator

    problem = mlp.problem
    expected = GradDotEstimator().fit(mlp).scores(problem.test, problem.train)
    captum = CaptumEstimator(method="tracincp", batch_size=7).fit(mlp)
    actual = captum.scores(problem.test, problem.train)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-14)
