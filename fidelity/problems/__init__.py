"""Problems: the registry of built-in problems and the resolution of a problem spec.

The registry holds import paths, so listing it imports no data or model code; a problem's
module is imported when the problem is built. Built-in problems live in ``tabular`` (the
scikit-learn data sets) and ``text`` (movie-review sentences with the MiniLM encoder).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

from fidelity.core.cache import ArtifactCache
from fidelity.core.errors import FidelityError, user_code
from fidelity.core.problem import Problem
from fidelity.core.registry import Entry, Registry, parse_spec

PROBLEMS: Registry[Callable[..., Problem]] = Registry(
    "problem",
    {
        "digits-logreg": Entry(
            "fidelity.problems.tabular:digits_logreg", "digits 8x8, 10-class logistic regression"
        ),
        "cancer-logreg": Entry(
            "fidelity.problems.tabular:cancer_logreg", "breast cancer, binary logistic regression"
        ),
        "diabetes-ridge": Entry(
            "fidelity.problems.tabular:diabetes_ridge", "diabetes, ridge regression (linear, mse)"
        ),
        "digits-mlp": Entry(
            "fidelity.problems.tabular:digits_mlp", "digits, 64-32-10 tanh MLP (non-convex)"
        ),
        "diabetes-mlp": Entry(
            "fidelity.problems.tabular:diabetes_mlp", "diabetes, 10-64-64-1 tanh MLP regression"
        ),
        "digits-cnn": Entry(
            "fidelity.problems.tabular:digits_cnn",
            "digits as 1x8x8 images, two conv layers + linear",
        ),
        "movies-minilm-logreg": Entry(
            "fidelity.problems.text:movies_minilm_logreg",
            "movie-review sentences, frozen MiniLM embedding + logistic regression",
        ),
        "movies-minilm-finetune": Entry(
            "fidelity.problems.text:movies_minilm_finetune",
            "movie-review sentences, last MiniLM block + head fine-tuned (non-convex)",
        ),
    },
)


def load_problem(spec: str, *, cache: ArtifactCache | None = None) -> Problem:
    """Build the problem registered as ``name`` or returned by the callable at ``pkg.mod:fn``,
    with keyword options given as ``name[key=value,...]`` (e.g. ``movies-minilm-logreg[size=500]``).
    A problem built with options is named by its spec with the options sorted, so results of
    two configurations never share a name.

    ``cache`` reaches a factory that takes a ``cache`` argument (the text problems keep their
    encodings there); it is not an option, since it changes no number.
    """
    name, options = parse_spec(spec, kind="problem")
    factory = PROBLEMS.get(name)
    if not callable(factory):
        raise FidelityError(f"problem {name!r} is not callable; it must return a Problem")
    accepted = inspect.signature(factory).parameters
    if "cache" in options:
        raise FidelityError(f"problem {spec!r}: 'cache' is not an option; use --cache-dir")
    unknown = sorted(set(options) - set(accepted))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        shown = [option for option in accepted if option != "cache"]
        raise FidelityError(
            f"problem {name!r} has no option(s) {', '.join(unknown)}; "
            f"options: {', '.join(shown) or 'none'}"
        )
    arguments = dict(options)
    if cache is not None and "cache" in accepted:
        arguments["cache"] = cache
    with user_code(f"problem {name!r} failed to build"):
        problem = factory(**arguments)
    if not isinstance(problem, Problem):
        raise FidelityError(
            f"problem {name!r} returned {type(problem).__name__}, expected fidelity.Problem"
        )
    if options:
        shown_options = ",".join(f"{key}={options[key]!r}" for key in sorted(options))
        problem = dataclasses.replace(problem, name=f"{problem.name}[{shown_options}]")
    return problem


__all__ = ["PROBLEMS", "load_problem"]
