"""Ground truth: training loops and the response-function ladder."""

from fidelity.registry import Registry
from retrain.linear import LinearResponse
from retrain.pbrf import PbrfResponse
from retrain.responses import (
    ColdResponse,
    Execution,
    ProximalResponse,
    Response,
    ResponseResult,
    WarmResponse,
)
from retrain.train import train

RESPONSES: Registry[type[Response]] = Registry("response")
RESPONSES.register("cold")(ColdResponse)
RESPONSES.register("warm")(WarmResponse)
RESPONSES.register("proximal")(ProximalResponse)
RESPONSES.register("pbrf")(PbrfResponse)
RESPONSES.register("linear")(LinearResponse)

__all__ = [
    "RESPONSES",
    "ColdResponse",
    "Execution",
    "LinearResponse",
    "PbrfResponse",
    "ProximalResponse",
    "Response",
    "ResponseResult",
    "WarmResponse",
    "train",
]
