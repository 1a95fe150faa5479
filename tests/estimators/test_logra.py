"""The LoGra-style projected influence against exact empirical-Fisher influence."""

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.estimators import ExactEstimator, LograEstimator
from fidelity.retrain import train
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("layers", [None, "2"])
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_orthogonal_projections_that_keep_everything_are_exact_empirical_fisher(layers, damping):
    trained = train(make_tiny_mlp_problem(loss="cross_entropy"))
    problem = trained.problem
    logra = LograEstimator(factor_dim=100, projection="orthogonal", damping=damping, layers=layers)
    exact = ExactEstimator(curvature="empirical-fisher", damping=damping, layers=layers)
    ours = logra.fit(trained).scores(problem.test, problem.train)
    reference = exact.fit(trained).scores(problem.test, problem.train)
    assert relative(ours, reference) <= 1e-9
    assert logra.diagnostics["projected_dim"] == (38 if layers is None else 18)


def test_projection_is_kronecker_structured():
    # P^T vec(G) for one layer is vec(P_out^T G P_in): the block's projection of a rank-one
    # gradient a b^T is (P_out^T a)(P_in^T b)^T
    trained = train(make_tiny_logreg())
    logra = LograEstimator(factor_dim=2).fit(trained)
    block = logra.blocks_[0]
    outputs, inputs = logra.projections_[0]
    a = torch.randn(block.out_features, dtype=torch.float64)
    b = torch.randn(block.columns, dtype=torch.float64)
    vector = torch.zeros(1, trained.n_params, dtype=torch.float64)
    block.scatter(torch.outer(a, b).unsqueeze(0), vector)
    projected = logra._project(vector)
    assert torch.allclose(projected[0], torch.outer(outputs.T @ a, inputs.T @ b).flatten())
    assert projected.shape == (1, 4)


def test_bad_settings_are_refused():
    with pytest.raises(FidelityError, match="factor_dim must be"):
        LograEstimator(factor_dim=0)
    with pytest.raises(FidelityError, match=r"logra\.projection must be one of"):
        LograEstimator(projection="rademacher")
