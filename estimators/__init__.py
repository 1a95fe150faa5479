"""Influence estimators, all in DESIGN.md's contract and sign convention."""

from estimators.base import Estimator, InverseCurvatureEstimator
from estimators.exact import ExactEstimator
from fidelity.registry import Registry

ESTIMATORS: Registry[type[Estimator]] = Registry("estimator")
ESTIMATORS.register("exact")(ExactEstimator)

__all__ = ["ESTIMATORS", "Estimator", "ExactEstimator", "InverseCurvatureEstimator"]
