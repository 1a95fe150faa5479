"""pyDVL behind our contract: after conversion, its solvers equal our dense reference (runs
where pyDVL is installed: the environment of benchmarks/peers_env.sh)."""

import importlib.util
import math

import pytest
import torch

from fidelity.core.curvature import CurvatureOperator
from fidelity.core.errors import FidelityError
from fidelity.core.objective import loss_from_outputs
from fidelity.core.problem import Examples
from fidelity.estimators import ExactEstimator
from fidelity.estimators.external.pydvl import PydvlEstimator
from fidelity.estimators.kfac import EkfacEstimator, KfacEstimator
from fidelity.metrics import pearson
from fidelity.retrain import train
from tests.conftest import make_tiny_mlp_problem
from tests.estimators.references import relative_error, solve_scores

HAS_PYDVL = importlib.util.find_spec("pydvl") is not None


@pytest.fixture(scope="module")
def mlp():
    return train(make_tiny_mlp_problem("cross_entropy"))


@pytest.mark.skipif(HAS_PYDVL, reason="pydvl is installed")
def test_missing_library_names_the_environment_to_create(mlp):
    with pytest.raises(FidelityError, match=r"peers_env\.sh"):
        PydvlEstimator().fit(mlp)


def test_bad_settings_are_refused():
    with pytest.raises(FidelityError, match=r"pydvl\.solver"):
        PydvlEstimator(solver="nystroem-typo")
    with pytest.raises(FidelityError, match=r"pydvl\.mode"):
        PydvlEstimator(mode="fisher")
    with pytest.raises(FidelityError, match="does not apply"):
        PydvlEstimator(solver="ekfac", mode="gauss-newton")


@pytest.mark.skipif(not HAS_PYDVL, reason="pydvl is not installed")
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("solver", "options", "tolerance"),
    [
        ("direct", {}, 1e-6),
        ("cg", {"tol": 1e-12}, 1e-6),
        ("arnoldi", {"rank": 38}, 1e-6),  # rank = p: the whole spectrum
        ("lissa", {"depth": 5000, "scale": 10.0, "tol": 1e-12}, 1e-3),
        ("nystroem", {"rank": 38}, 1e-6),  # a full sketch of a positive definite Hessian
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


def empirical_fisher_scores(trained, scale: float, damping: float):
    """(1/N) g_t^T (scale F + (wd + damping) I)^{-1} g_j with F the empirical Fisher (no wd)."""
    problem = trained.problem
    identity = torch.eye(trained.n_params, dtype=trained.theta.dtype)
    fisher = CurvatureOperator(trained, "empirical-fisher").dense()
    fisher = fisher - problem.weight_decay * identity
    return solve_scores(trained, scale * fisher + (problem.weight_decay + damping) * identity)


def gauss_newton_scores(trained, solver, **options):
    problem = trained.problem
    estimator = PydvlEstimator(solver=solver, mode="gauss-newton", damping=0.1, **options)
    return estimator.fit(trained).scores(problem.test, problem.train)


@pytest.mark.skipif(not HAS_PYDVL, reason="pydvl is not installed")
@pytest.mark.filterwarnings("ignore")
def test_gauss_newton_mode_is_the_empirical_fisher(mlp):
    """Its LiSSA, and its CG for one right-hand side, equal our exact empirical-Fisher solve."""
    problem = mlp.problem
    reference = ExactEstimator(damping=0.1, curvature="empirical-fisher").fit(mlp)
    one = Examples(problem.x_test[:1], problem.y_test[:1])
    cg = PydvlEstimator(solver="cg", mode="gauss-newton", damping=0.1, tol=1e-12).fit(mlp)
    assert (
        relative_error(cg.scores(one, problem.train), reference.scores(one, problem.train)) < 1e-6
    )
    lissa = gauss_newton_scores(mlp, "lissa", depth=3000, scale=10.0, tol=1e-12)
    expected = reference.scores(problem.test, problem.train)
    assert relative_error(lissa, expected) < 1e-6
    gnh = ExactEstimator(damping=0.1, curvature="gnh").fit(mlp).scores(problem.test, problem.train)
    assert relative_error(gnh, expected) > 0.1  # and it is not the Gauss-Newton matrix


@pytest.mark.skipif(not HAS_PYDVL, reason="pydvl is not installed")
@pytest.mark.filterwarnings("ignore")
def test_gauss_newton_mode_deviations_are_what_the_library_computes(mlp):
    """pyDVL 0.10's Gauss-Newton mode mis-normalises its matrix. Measured, not corrected:
    - ``gauss_newton()`` (direct) divides the summed batch matrices by p (k - 1) for k loader
      batches (it counts each p x p batch matrix's rows as points and skips the first batch):
      one batch divides by zero;
    - ``PointAveraging`` (the operator behind CG, Arnoldi and Nystroem) divides by the number
      of vectors multiplied, not the number of points: CG on m test gradients at once solves
      with F / m, Arnoldi and Nystroem, which sketch with ``rank`` vectors, with F / rank."""
    problem, p = mlp.problem, mlp.n_params
    assert not bool(torch.isfinite(gauss_newton_scores(mlp, "direct")).all())
    batches = math.ceil(problem.n_train / 7)
    expected = empirical_fisher_scores(mlp, problem.n_train / (p * (batches - 1)), 0.1)
    assert relative_error(gauss_newton_scores(mlp, "direct", batch_size=7), expected) < 1e-10
    cg = gauss_newton_scores(mlp, "cg", tol=1e-12)
    assert relative_error(cg, empirical_fisher_scores(mlp, 1 / problem.n_test, 0.1)) < 1e-6
    for solver in ("arnoldi", "nystroem"):
        sketched = gauss_newton_scores(mlp, solver, rank=p)
        assert relative_error(sketched, empirical_fisher_scores(mlp, 1 / p, 0.1)) < 1e-8


@pytest.mark.skipif(not HAS_PYDVL, reason="pydvl is not installed")
@pytest.mark.filterwarnings("ignore")
def test_ekfac_deviates_from_the_expected_fisher_ekfac(mlp):
    """pyDVL's EK-FAC builds its gradient factors from the backward pass of
    sum_c sqrt(p_c) log p_c instead of model-drawn labels (see the adapter's docstring), so it
    is not our EK-FAC (or K-FAC) with the expected Fisher. Measured on this MLP: Pearson 0.938
    (K-FAC 0.945)."""
    problem = mlp.problem
    for update_diagonal, ours in ((True, EkfacEstimator), (False, KfacEstimator)):
        reference = ours(damping=0.1, fisher="expected").fit(mlp)
        expected = reference.scores(problem.test, problem.train)
        estimator = PydvlEstimator(solver="ekfac", damping=0.1, update_diagonal=update_diagonal)
        actual = estimator.fit(mlp).scores(problem.test, problem.train)
        assert bool(torch.isfinite(actual).all())
        r = pearson(actual.flatten().numpy(), expected.flatten().numpy())
        assert 0.9 < r < 0.99
        assert relative_error(actual, expected) > 0.1


@pytest.mark.skipif(not HAS_PYDVL, reason="pydvl is not installed")
def test_ekfac_refuses_other_losses():
    trained = train(make_tiny_mlp_problem("mse"))
    with pytest.raises(FidelityError, match="cross-entropy only"):
        PydvlEstimator(solver="ekfac").fit(trained)


def chunk_averaged_scores(trained, batch_size: int, damping: float):
    """(1/N) g_t^T (Hbar + (wd + damping) I)^{-1} g_j with Hbar the unweighted mean over loader
    batches of each batch's mean-loss Hessian."""
    problem, model = trained.problem, trained.model
    blocks = []
    for start in range(0, problem.n_train, batch_size):
        x, y = (
            problem.x_train[start : start + batch_size],
            problem.y_train[start : start + batch_size],
        )
        blocks.append(
            torch.autograd.functional.hessian(
                lambda t, x=x, y=y: loss_from_outputs(problem.loss, model(t, x), y).mean(),
                trained.theta,
            )
        )
    identity = torch.eye(trained.n_params, dtype=trained.theta.dtype)
    return solve_scores(
        trained, torch.stack(blocks).mean(0) + (problem.weight_decay + damping) * identity
    )


@pytest.mark.skipif(not HAS_PYDVL, reason="pydvl is not installed")
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("solver", "options"), [("cg", {"tol": 1e-12}), ("arnoldi", {"rank": 38})])
def test_hessian_operator_averages_batches_without_their_sizes(mlp, solver, options):
    """pyDVL 0.10's ``HessianOperator`` (CG, Arnoldi) averages the loader batches' mean-loss
    Hessians with equal weights (``ChunkAveraging``): exact for equal batches, not for a
    smaller last batch (30 points in batches of 7). Its direct solver is unaffected."""
    problem = mlp.problem
    exact = ExactEstimator(damping=0.1).fit(mlp).scores(problem.test, problem.train)

    def scores(batch_size):
        estimator = PydvlEstimator(solver=solver, damping=0.1, batch_size=batch_size, **options)
        return estimator.fit(mlp).scores(problem.test, problem.train)

    assert relative_error(scores(10), exact) < 1e-8
    uneven = scores(7)
    assert relative_error(uneven, exact) > 0.05
    assert relative_error(uneven, chunk_averaged_scores(mlp, 7, 0.1)) < 1e-8
    direct = PydvlEstimator(solver="direct", damping=0.1, batch_size=7).fit(mlp)
    assert relative_error(direct.scores(problem.test, problem.train), exact) < 1e-8


@pytest.mark.skipif(not HAS_PYDVL, reason="pydvl is not installed")
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_perturbation_influence_equals_ours_after_conversion(mlp, damping):
    # pyDVL's "perturbation" mode is <(C + r I)^{-1} g_test, d/dx grad L(x)> with no minus
    # sign and no 1/N: our d m(z_t) / d x_j is -value / N, for its direct solver as for ours
    problem = mlp.problem
    ours = (
        ExactEstimator(damping=damping).fit(mlp).perturbation_gradients(problem.test, problem.train)
    )
    theirs = (
        PydvlEstimator(solver="direct", damping=damping, batch_size=problem.n_train)
        .fit(mlp)
        .perturbation_gradients(problem.test, problem.train)
    )
    assert theirs.shape == ours.shape == (problem.n_test, problem.n_train, 3)
    assert relative_error(theirs, ours) <= 1e-6
