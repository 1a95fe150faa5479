"""grad-dot restricted to layers: the gradient product over the selected layers' parameters."""

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_grads
from fidelity.estimators import ESTIMATORS
from fidelity.estimators.kfac import parameter_subset
from fidelity.retrain import train
from tests.conftest import make_tiny_mlp_problem


@pytest.fixture(scope="module")
def mlp():
    return train(make_tiny_mlp_problem("cross_entropy"))


def test_grad_dot_over_some_layers_is_the_product_of_their_gradients(mlp):
    problem = mlp.problem
    grad_dot = ESTIMATORS.get("grad-dot")
    scores = grad_dot(layers="2").fit(mlp).scores(problem.test, problem.train)
    columns, uncovered = parameter_subset(mlp.model, "2")
    g_test = per_example_grads(mlp.model, problem.loss, mlp.theta, problem.test)[:, columns]
    g_train = per_example_grads(mlp.model, problem.loss, mlp.theta, problem.train)[:, columns]
    torch.testing.assert_close(scores, g_test @ g_train.T / problem.n_train, rtol=1e-12, atol=0)
    assert uncovered == ["0.weight", "0.bias"]
    every_layer = grad_dot(layers="*").fit(mlp).scores(problem.test, problem.train)
    plain = grad_dot().fit(mlp).scores(problem.test, problem.train)
    torch.testing.assert_close(every_layer, plain, rtol=1e-12, atol=0)
    cosine = ESTIMATORS.get("grad-cos")(layers="2").fit(mlp).scores(problem.test, problem.train)
    norms = g_test.norm(dim=1, keepdim=True) * g_train.norm(dim=1)
    torch.testing.assert_close(cosine, g_test @ g_train.T / norms, rtol=1e-12, atol=0)


def test_layers_that_match_nothing_are_refused(mlp):
    with pytest.raises(FidelityError, match=r"layers \['encoder\.\*'\] match no nn\.Linear"):
        ESTIMATORS.get("grad-dot")(layers="encoder.*").fit(mlp)
