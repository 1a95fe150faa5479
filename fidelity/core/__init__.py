"""The shared core: problem types, objective, curvature, cache, registry, errors, checks.

It imports torch, numpy and scipy only, and nothing else of the project; ``estimators``,
``retrain`` and the harness build on it.
"""
