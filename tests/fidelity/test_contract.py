"""check_estimator: every registered estimator honours the contract, each broken rule is
refused in one line, and a suite's user class is checked before any compute."""

import numpy as np
import pytest
import torch

from fidelity.contract import (
    _trained_contract_problem,
    check_estimator,
    closed_form_influence,
    contract_problem,
)
from fidelity.core.errors import FidelityError
from fidelity.estimators import ESTIMATORS, ExactEstimator
from fidelity.testing import check_estimator as exported
from tests.fidelity import broken_estimators as broken
from tests.fidelity.user_estimators import NotAnEstimator


def test_the_closed_form_is_the_exact_influence_of_the_contract_problem():
    trained = _trained_contract_problem()
    problem = trained.problem
    exact = ExactEstimator().fit(trained).scores(problem.test, problem.train).numpy()
    np.testing.assert_allclose(exact, closed_form_influence(problem), rtol=1e-9, atol=1e-15)
    assert problem.n_train == 24 and problem.n_test == 6 and problem.dtype == torch.float64


@pytest.fixture(scope="module")
def required_settings(tmp_path_factory):
    """The `scores` estimator reads a file: the contract problem's closed-form scores."""
    path = tmp_path_factory.mktemp("contract") / "closed-form.npy"
    np.save(path, closed_form_influence(contract_problem()))
    return {"scores": {"path": str(path)}}


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_every_registered_estimator_honours_the_contract(name, required_settings):
    check_estimator(ESTIMATORS.get(name), required_settings.get(name))
    assert exported is check_estimator


@pytest.mark.parametrize(
    ("estimator", "reason"),
    [
        (NotAnEstimator, "does not subclass fidelity.estimators.Estimator"),
        (broken.Abstract, "leaves scores abstract"),
        (broken.FittedInInit, "__init__ sets fitted state curvature_"),
        (broken.ForgetsItsSettings, "does not round-trip"),
        (broken.ReturnsNone, "fit() returned NoneType, not self"),
        (broken.Transposed, "returned shape (24, 6) for 6 test and 24 training points"),
        (broken.NotFinite, "NaN or infinite"),
        (broken.FlippedSign, "correlate -1.000 with the closed-form removal influence"),
        (broken.IgnoresTheTestPoints, "rows must follow test points"),
        (broken.Noisy, "not deterministic"),
        (broken.MutatesTheta, "changed theta_s"),
    ],
)
def test_each_broken_rule_is_refused_in_one_line(estimator, reason):
    with pytest.raises(FidelityError) as raised:
        check_estimator(estimator)
    message = str(raised.value)
    assert reason in message and "breaks the estimator contract" in message
    assert "\n" not in message
    # The contract problem a broken estimator damaged is rebuilt for the next check.
    check_estimator(ExactEstimator)


def test_an_instance_is_checked_as_configured_and_rules_1_to_3_alone():
    check_estimator(ExactEstimator(damping=0.01))
    with pytest.raises(FidelityError, match=r"bad settings|unexpected keyword"):
        check_estimator(ExactEstimator, {"nope": 1})
    check_estimator(broken.FlippedSign, numeric=False)  # the sign is a numeric rule
    with pytest.raises(FidelityError, match="__init__ sets fitted state"):
        check_estimator(broken.FittedInInit, numeric=False)


SUITE = """
name = "user"
problems = ["tests.fidelity.user_problems:tiny"]
[selection]
test_points = 3
top = 2
random = 3
[[estimators]]
kind = "tests.fidelity.user_estimators:UpweightingSign"
{extra}
[[responses]]
kind = "cold"
"""


def test_a_suite_s_user_class_is_checked_before_any_compute(tmp_path, capsys):
    from fidelity.cli import main

    path = tmp_path / "user.toml"
    path.write_text(SUITE.format(extra=""))
    common = ["--cache-dir", str(tmp_path / "cache"), "--no-history", "-q"]
    assert main(["run", str(path), "--out", str(tmp_path / "run"), *common]) == 2
    error = capsys.readouterr().err
    assert "breaks the estimator contract" in error and "the sign is flipped" in error
    assert "contract = false" in error
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "theta").exists()
    path.write_text(SUITE.format(extra="contract = false"))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), *common]) == 0
