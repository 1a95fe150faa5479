"""The seed study's workflows on any problem: explanations (most helpful and harmful training
points), label-flip poisoning, mislabel detection by self-influence, retrieval prefiltering, and
perturbation influence (its agreement with retraining, and the training-set attack it guides),
and the damping protocol (damping chosen on held-out subsets).

Each function takes a trained problem and fitted estimators and returns a JSON-serialisable
dict; ``fidelity.reports.applications`` renders them and ``fidelity <command>`` runs them."""

from fidelity.applications import damping
from fidelity.applications.common import build_estimators
from fidelity.applications.damping import damping_protocol
from fidelity.applications.explain import explain
from fidelity.applications.mislabel import mislabel
from fidelity.applications.perturb import attack, perturbation_agreement
from fidelity.applications.poison import poison
from fidelity.applications.prefilter import prefilter

__all__ = [
    "attack",
    "build_estimators",
    "damping",
    "damping_protocol",
    "explain",
    "mislabel",
    "perturbation_agreement",
    "poison",
    "prefilter",
]
