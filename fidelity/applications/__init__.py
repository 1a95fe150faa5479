"""The seed study's workflows on any problem: explanations (most helpful and harmful training
points), label-flip poisoning, mislabel detection by self-influence, and retrieval prefiltering.

Each function takes a trained problem and fitted estimators and returns a JSON-serialisable
dict; ``fidelity.reports.applications`` renders them and ``fidelity <command>`` runs them."""

from fidelity.applications.common import build_estimators
from fidelity.applications.explain import explain
from fidelity.applications.mislabel import mislabel
from fidelity.applications.poison import poison
from fidelity.applications.prefilter import prefilter

__all__ = ["build_estimators", "explain", "mislabel", "poison", "prefilter"]
