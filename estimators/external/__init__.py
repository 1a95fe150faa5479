"""Adapters that wrap other influence libraries in this project's estimator contract.

Each adapter imports its library lazily (a missing library is a FidelityError naming how to
install it), maps our settings to the library's own, and converts its output to DESIGN.md's
convention. They are not in the ESTIMATORS registry, so that the main environment needs none of
these libraries; a suite names them by import path, e.g.
``kind = "estimators.external.kronfluence:KronfluenceEstimator"``.
"""
