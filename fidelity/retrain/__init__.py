"""Ground truth: training loops and the response-function ladder.

``response`` holds the contract every stage follows, ``execution`` how retrains are spread over
workers and cached, ``refit`` the one refit template with its presets (cold, warm, proximal),
``pbrf`` and ``linear`` the last two rungs.
"""

from fidelity.core.problem import seeded_variant
from fidelity.core.registry import Registry
from fidelity.retrain.counterfactual import CounterfactualResponse, CounterfactualResult
from fidelity.retrain.execution import Execution
from fidelity.retrain.groups import GroupResult, GroupsResponse
from fidelity.retrain.imported import ImportedSubsets, read_ground_truth
from fidelity.retrain.linear import LinearResponse
from fidelity.retrain.pbrf import PbrfResponse
from fidelity.retrain.perturbation import PerturbedResult, retrain_perturbed
from fidelity.retrain.refit import ColdResponse, ProximalResponse, WarmResponse
from fidelity.retrain.response import Response, ResponseResult
from fidelity.retrain.subsets import SubsetResult, SubsetsResponse
from fidelity.retrain.train import train

RESPONSES: Registry[type[Response]] = Registry("response", base=Response)
for _response in (ColdResponse, WarmResponse, ProximalResponse, PbrfResponse, LinearResponse):
    RESPONSES.register(_response.name)(_response)
# Subset retraining has its own result (masks and measured changes, not per-point deltas).
SUBSET_RESPONSES: Registry[type[SubsetsResponse] | type[ImportedSubsets]] = Registry(
    "subset response", base=(SubsetsResponse, ImportedSubsets)
)
SUBSET_RESPONSES.register(SubsetsResponse.name)(SubsetsResponse)
SUBSET_RESPONSES.register(ImportedSubsets.name)(ImportedSubsets)
COUNTERFACTUAL_RESPONSES: Registry[type[CounterfactualResponse]] = Registry(
    "counterfactual", base=CounterfactualResponse
)
COUNTERFACTUAL_RESPONSES.register(CounterfactualResponse.name)(CounterfactualResponse)
GROUP_RESPONSES: Registry[type[GroupsResponse]] = Registry("group stage", base=GroupsResponse)
GROUP_RESPONSES.register(GroupsResponse.name)(GroupsResponse)

__all__ = [
    "COUNTERFACTUAL_RESPONSES",
    "GROUP_RESPONSES",
    "RESPONSES",
    "SUBSET_RESPONSES",
    "ColdResponse",
    "CounterfactualResponse",
    "CounterfactualResult",
    "Execution",
    "GroupResult",
    "GroupsResponse",
    "ImportedSubsets",
    "LinearResponse",
    "PbrfResponse",
    "PerturbedResult",
    "ProximalResponse",
    "Response",
    "ResponseResult",
    "SubsetResult",
    "SubsetsResponse",
    "WarmResponse",
    "read_ground_truth",
    "retrain_perturbed",
    "seeded_variant",
    "train",
]
