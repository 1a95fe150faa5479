"""fidelity: validate influence-function estimators against retraining.

This package's top level holds only light, shared types; the runner and CLI are imported from
their modules (``fidelity.runner``, ``fidelity.cli``) so that ``estimators`` and ``retrain`` can
import from here without an import cycle.
"""

from fidelity.core.errors import FidelityError
from fidelity.core.problem import Examples, FunctionalModel, NewtonRecipe, Problem, TrainedProblem

__version__ = "0.1.0"

__all__ = [
    "Examples",
    "FidelityError",
    "FunctionalModel",
    "NewtonRecipe",
    "Problem",
    "TrainedProblem",
    "__version__",
]
