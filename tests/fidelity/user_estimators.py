"""Estimators importable by path, as a peer library's adapter would be."""

from torch import Tensor

from fidelity.core.errors import FidelityError
from fidelity.core.problem import Examples
from fidelity.estimators.baselines import GradDotEstimator


class NanAfterFirstColumn(GradDotEstimator):
    """grad-dot whose scores are NaN beyond the first training point: a broken solver."""

    name = "nan-after-first"

    def scores(self, test: Examples, train: Examples) -> Tensor:
        values = super().scores(test, train).clone()
        values[:, 1:] = float("nan")
        return values

    def parameter_changes(self, train: Examples) -> Tensor | None:
        return None


class CrashesInFit(GradDotEstimator):
    """A library that raises while fitting (as dattri's EK-FAC does on token sequences)."""

    name = "crashes-in-fit"

    def fit(self, trained):
        raise UnboundLocalError("cannot access local variable 'a_prev'")


class CrashesInScores(GradDotEstimator):
    """A library that fits and then raises while scoring."""

    name = "crashes-in-scores"

    def scores(self, test: Examples, train: Examples) -> Tensor:
        raise RuntimeError("shape mismatch\nsecond line of the message")


class RefusesTheProblem(GradDotEstimator):
    """An adapter that refuses the problem (as pyDVL's EK-FAC refuses a bce problem)."""

    name = "refuses-the-problem"

    def fit(self, trained):
        raise FidelityError("this library supports cross-entropy only")


class NotAnEstimator:
    """A class a suite could name as an estimator kind by mistake: it has no fit or scores."""

    def __init__(self) -> None:
        self.configured = True


class UpweightingSign(GradDotEstimator):
    """grad-dot with the upweighting sign: a user solver that breaks the contract's sign rule."""

    name = "upweighting-sign"

    def scores(self, test: Examples, train: Examples) -> Tensor:
        return -super().scores(test, train)
