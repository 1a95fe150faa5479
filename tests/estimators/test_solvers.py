"""Iterative and low-rank solvers against the dense estimators, and the baselines."""

import pytest
import torch

from fidelity.core.curvature import CurvatureOperator
from fidelity.core.errors import FidelityError
from fidelity.estimators import (
    ArnoldiEstimator,
    ConjugateGradientEstimator,
    ExactEstimator,
    GaussNewtonEstimator,
    GradCosEstimator,
    GradDotEstimator,
    LissaEstimator,
)
from fidelity.retrain import train
from tests.conftest import make_tiny_mlp_problem
from tests.estimators.test_exact import saddle_problem


@pytest.fixture(scope="module")
def mlp():
    """A tiny MLP trained by Newton to a strict local minimum (positive definite Hessian)."""
    return train(make_tiny_mlp_problem("cross_entropy"))


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def scores(estimator, trained):
    problem = trained.problem
    return estimator.fit(trained).scores(problem.test, problem.train)


@pytest.mark.parametrize(
    ("reference", "curvature"), [(ExactEstimator, "hessian"), (GaussNewtonEstimator, "gnh")]
)
@pytest.mark.parametrize("preconditioner", [None, "jacobi"])
@pytest.mark.parametrize("block", [True, False])
def test_cg_reaches_the_dense_solve(mlp, reference, curvature, preconditioner, block):
    expected = scores(reference(), mlp)
    estimator = ConjugateGradientEstimator(
        curvature=curvature, tol=1e-12, preconditioner=preconditioner, block=block
    )
    assert relative_error(scores(estimator, mlp), expected) <= 1e-6
    assert estimator.diagnostics["max_relative_residual"] <= 1e-12
    assert estimator.diagnostics["negative_curvature_columns"] == 0
    assert len(estimator.diagnostics["iterations"]) == mlp.problem.n_test


def test_cg_with_damping_reaches_damped_solve(mlp):
    expected = scores(ExactEstimator(damping=0.3), mlp)
    actual = scores(ConjugateGradientEstimator(damping=0.3, tol=1e-12), mlp)
    assert relative_error(actual, expected) <= 1e-6


@pytest.mark.parametrize("block", [True, False])
def test_cg_reports_negative_curvature_instead_of_using_it(block):
    trained = saddle_problem()
    estimator = ConjugateGradientEstimator(max_iter=10, block=block)
    result = scores(estimator, trained)
    assert bool(torch.isfinite(result).all())
    assert estimator.diagnostics["negative_curvature_columns"] > 0


def test_lissa_with_enough_depth_is_within_five_percent(mlp):
    expected = scores(ExactEstimator(), mlp)
    estimator = LissaEstimator(depth=3000)
    assert relative_error(scores(estimator, mlp), expected) <= 0.05
    assert estimator.diagnostics["scale"] > 0


def test_lissa_minibatches_are_seeded_and_repeats_reduce_the_error(mlp):
    first = scores(LissaEstimator(depth=400, minibatch_size=8, seed=3), mlp)
    again = scores(LissaEstimator(depth=400, minibatch_size=8, seed=3), mlp)
    other = scores(LissaEstimator(depth=400, minibatch_size=8, seed=4), mlp)
    assert torch.equal(first, again) and not torch.equal(first, other)
    expected = scores(ExactEstimator(), mlp)
    averaged = scores(LissaEstimator(depth=400, minibatch_size=8, seed=3, repeats=8), mlp)
    assert relative_error(averaged, expected) < relative_error(first, expected)


def test_lissa_with_too_small_scale_fails_with_the_scale_to_use(mlp):
    with pytest.raises(FidelityError, match=r"lissa diverges .* use scale >= [0-9.]+"):
        scores(LissaEstimator(scale=1e-3, depth=100), mlp)


def test_lissa_just_below_the_convergence_limit_fails_at_fit(mlp):
    """Growth per step is barely above 1 there, so a norm check alone would miss it."""
    largest = LissaEstimator(depth=1).fit(mlp).diagnostics["largest_eigenvalue"]
    with pytest.raises(FidelityError, match="lissa diverges"):
        LissaEstimator(scale=largest / 2.1, depth=20).fit(mlp)
    assert LissaEstimator(scale=largest / 1.9, depth=20).fit(mlp).scale_ > largest / 2


def test_arnoldi_refuses_to_invert_negative_curvature():
    with pytest.raises(FidelityError, match=r"arnoldi: .* set damping above"):
        ArnoldiEstimator(rank=2).fit(saddle_problem())
    assert ArnoldiEstimator(rank=2, damping=10.0).fit(saddle_problem()).eigenvalues_.numel() == 2


def test_lissa_on_negative_curvature_fails_instead_of_returning_garbage():
    with pytest.raises(FidelityError, match="add damping"):
        scores(LissaEstimator(depth=500), saddle_problem())


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_arnoldi_with_full_rank_equals_exact(mlp, damping):
    p = mlp.n_params
    expected = scores(ExactEstimator(damping=damping), mlp)
    actual = scores(ArnoldiEstimator(rank=p, iterations=p, damping=damping), mlp)
    assert relative_error(actual, expected) <= 1e-8


@pytest.mark.parametrize("rank", [2, 8, 20])
def test_arnoldi_equals_the_inverse_on_the_top_eigenspace(mlp, rank):
    problem = mlp.problem
    eigenvalues, eigenvectors = torch.linalg.eigh(CurvatureOperator(mlp, "hessian").dense())
    top = torch.argsort(eigenvalues.abs(), descending=True)[:rank]
    projected = eigenvectors[:, top] @ torch.diag(1 / eigenvalues[top]) @ eigenvectors[:, top].T
    estimator = ArnoldiEstimator(rank=rank, iterations=mlp.n_params).fit(mlp)
    test_grads, train_grads = estimator.gradients(problem.test), estimator.gradients(problem.train)
    expected = test_grads @ projected @ train_grads.T / problem.n_train
    actual = estimator.scores(problem.test, problem.train)
    assert relative_error(actual, expected) <= 1e-8


def test_arnoldi_finds_the_top_eigenvalues(mlp):
    estimator = ArnoldiEstimator(rank=3, iterations=mlp.n_params).fit(mlp)
    dense = torch.linalg.eigvalsh(CurvatureOperator(mlp, "hessian").dense())
    torch.testing.assert_close(
        estimator.eigenvalues_.sort(descending=True).values, dense.flip(0)[:3], rtol=1e-9, atol=0
    )


def test_grad_dot_and_grad_cos(mlp):
    problem = mlp.problem
    dot = GradDotEstimator().fit(mlp)
    grads_test, grads_train = dot.gradients(problem.test), dot.gradients(problem.train)
    torch.testing.assert_close(
        dot.scores(problem.test, problem.train), grads_test @ grads_train.T / problem.n_train
    )
    cos = scores(GradCosEstimator(), mlp)
    expected = torch.nn.functional.cosine_similarity(
        grads_test.unsqueeze(1), grads_train.unsqueeze(0), dim=-1
    )
    torch.testing.assert_close(cos, expected)
    assert float(cos.abs().max()) <= 1 + 1e-12


@pytest.mark.parametrize(
    ("cls", "settings", "message"),
    [
        (ConjugateGradientEstimator, {"preconditioner": "ilu"}, "cg.preconditioner"),
        (ConjugateGradientEstimator, {"max_iter": 0}, "cg.max_iter"),
        (LissaEstimator, {"scale": 0}, "lissa.scale"),
        (LissaEstimator, {"depth": 1.5}, "lissa.depth"),
        (ArnoldiEstimator, {"rank": 5, "iterations": 3}, "iterations must be >="),
        (ExactEstimator, {"curvature": "fisher"}, "exact.curvature must be one of"),
    ],
)
def test_bad_settings_are_rejected(cls, settings, message):
    with pytest.raises(FidelityError, match=message):
        cls(**settings)


def test_lissa_reports_each_columns_residual(mlp):
    """The residual diagnostic is ||(C + damping I) h - g|| / ||g|| per test point, computed
    here independently from the dense matrix; a shallow recursion is flagged, a deep one not."""
    problem = mlp.problem
    dense = CurvatureOperator(mlp).dense() + 0.1 * torch.eye(mlp.n_params, dtype=torch.float64)
    for depth, flagged in ((3, True), (3000, False)):
        estimator = LissaEstimator(depth=depth, damping=0.1).fit(mlp)
        gradients = estimator.gradients(problem.test)
        solved = estimator._inverse_curvature_product(gradients)
        expected = (solved @ dense - gradients).norm(dim=1) / gradients.norm(dim=1)
        found = torch.tensor(estimator.diagnostics["relative_residual"], dtype=torch.float64)
        torch.testing.assert_close(found, expected, rtol=1e-8, atol=1e-12)
        assert (estimator.diagnostics["unconverged_columns"] > 0) == flagged, depth
        assert estimator.diagnostics["max_relative_residual"] == pytest.approx(float(found.max()))


def test_lissa_flags_an_indefinite_curvature_at_fit():
    fitted = LissaEstimator(depth=10).fit(saddle_problem())
    assert fitted.diagnostics["indefinite"] is True
    assert fitted.diagnostics["smallest_eigenvalue_estimate"] < 0
    damped = LissaEstimator(depth=10, damping=10.0).fit(saddle_problem())
    assert damped.diagnostics["indefinite"] is False
