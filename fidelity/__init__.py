"""fidelity: validate influence-function estimators against retraining.

The top level re-exports the core's problem types (``fidelity.core``), which ``estimators`` and
``retrain`` import; the harness (``fidelity.runner``, ``fidelity.cli``, ...) is imported from
its own modules and never from here.
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
