"""Cross-check of our EK-FAC with kronfluence's (runs where kronfluence is installed: the
environment of benchmarks/peers_env.sh)."""

import importlib.util

import numpy as np
import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.estimators import EkfacEstimator, KfacEstimator
from fidelity.estimators.external.kronfluence import KronfluenceEstimator

HAS_KRONFLUENCE = importlib.util.find_spec("kronfluence") is not None


@pytest.mark.skipif(HAS_KRONFLUENCE, reason="kronfluence is installed")
def test_missing_library_names_the_environment_to_create(trained_problems):
    trained = trained_problems("cancer-logreg")
    with pytest.raises(FidelityError, match=r"peers_env\.sh"):
        KronfluenceEstimator().fit(trained)


@pytest.mark.skipif(not HAS_KRONFLUENCE, reason="kronfluence is not installed")
@pytest.mark.parametrize(
    ("ours", "strategy", "fisher"),
    [
        (EkfacEstimator, "ekfac", "empirical"),
        (KfacEstimator, "kfac", "empirical"),
        (EkfacEstimator, "ekfac", "sampled"),
    ],
)
def test_kronecker_scores_agree_with_kronfluence(trained_problems, ours, strategy, fisher):
    """Same Fisher (for `sampled`, the same label draws), damping_factor = wd + damping: the
    two implementations must give the same scores, not merely correlated ones."""
    trained = trained_problems("digits-mlp")
    problem = trained.problem
    test = problem.test.subset(torch.arange(20))
    ours_scores = ours(damping=0.01, fisher=fisher).fit(trained).scores(test, problem.train)
    theirs = (
        KronfluenceEstimator(strategy=strategy, fisher=fisher, damping=0.01)
        .fit(trained)
        .scores(test, problem.train)
    )
    assert theirs.shape == ours_scores.shape
    r = np.corrcoef(ours_scores.flatten().numpy(), theirs.flatten().numpy())[0, 1]
    assert r >= 0.99
    torch.testing.assert_close(ours_scores, theirs, rtol=1e-8, atol=1e-14)


@pytest.mark.skipif(not HAS_KRONFLUENCE, reason="kronfluence is not installed")
def test_a_model_that_is_one_layer_is_scored_like_ours(trained_problems):
    """digits-logreg's model is a bare nn.Linear, which kronfluence cannot track by itself
    (prepare_model recursed without end); the adapter gives it a parent."""
    trained = trained_problems("digits-logreg")
    problem = trained.problem
    test = problem.test.subset(torch.arange(10))
    ours = EkfacEstimator(damping=0.0, fisher="empirical")
    theirs = KronfluenceEstimator(strategy="ekfac", fisher="empirical", damping=0.0)
    expected = ours.fit(trained).scores(test, problem.train)
    torch.testing.assert_close(
        theirs.fit(trained).scores(test, problem.train), expected, rtol=1e-8, atol=1e-14
    )


@pytest.mark.skipif(not HAS_KRONFLUENCE, reason="kronfluence is not installed")
def test_identity_strategy_is_grad_dot_and_ignores_damping():
    from fidelity.estimators.baselines import GradDotEstimator
    from fidelity.retrain import train
    from tests.conftest import make_tiny_mlp_problem

    trained = train(make_tiny_mlp_problem("cross_entropy"))
    problem = trained.problem
    expected = GradDotEstimator().fit(trained).scores(problem.test, problem.train)
    for damping in (0.0, 0.1):
        estimator = KronfluenceEstimator(strategy="identity", damping=damping).fit(trained)
        actual = estimator.scores(problem.test, problem.train)
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-15)


@pytest.mark.skipif(not HAS_KRONFLUENCE, reason="kronfluence is not installed")
@pytest.mark.parametrize("which", ["tokens", "convolution"])
def test_kfac_eigenvalues_of_a_layer_with_positions_are_ours_over_their_count(which):
    """The peers-cnn / peers-text finding, exactly: for a layer applied at T positions (tokens,
    or a convolution's output pixels) kronfluence's K-FAC eigenvalues are ours / T (it averages
    the gradient factor over positions; ours sums it, as KFC's expand form does), while its
    EK-FAC, whose eigenvalues come from the per-example gradients, equals ours."""
    from fidelity.retrain import train
    from tests.conftest import TinyTokenModel, make_tiny_cnn_problem, make_tiny_token_problem

    trained = train(make_tiny_token_problem() if which == "tokens" else make_tiny_cnn_problem())
    problem = trained.problem
    positions = TinyTokenModel.positions if which == "tokens" else 9  # the conv's 3 x 3 outputs
    theirs = KronfluenceEstimator(strategy="kfac", fisher="empirical", damping=0.01).fit(trained)
    theirs = theirs.scores(problem.test, problem.train)
    ours = KfacEstimator(fisher="empirical", damping=0.01).fit(trained)
    assert relative_difference(ours.scores(problem.test, problem.train), theirs) > 1e-3
    ours.denominators_[0] = ours.eigenvalues_[0] / positions + problem.weight_decay + 0.01
    assert relative_difference(ours.scores(problem.test, problem.train), theirs) <= 1e-10
    their_ekfac = KronfluenceEstimator(strategy="ekfac", fisher="empirical", damping=0.01)
    our_ekfac = EkfacEstimator(fisher="empirical", damping=0.01).fit(trained)
    assert (
        relative_difference(
            their_ekfac.fit(trained).scores(problem.test, problem.train),
            our_ekfac.scores(problem.test, problem.train),
        )
        <= 1e-10
    )


def relative_difference(a, b):
    return float((a - b).abs().max() / b.abs().max())
