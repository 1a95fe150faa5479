"""Ground truth: training loops and the response-function ladder."""

from fidelity.registry import Registry
from retrain.linear import LinearResponse
from retrain.responses import ColdResponse, Execution, Response, ResponseResult
from retrain.train import train

RESPONSES: Registry[type[Response]] = Registry("response")
RESPONSES.register("cold")(ColdResponse)
RESPONSES.register("linear")(LinearResponse)

__all__ = [
    "RESPONSES",
    "ColdResponse",
    "Execution",
    "LinearResponse",
    "Response",
    "ResponseResult",
    "train",
]
