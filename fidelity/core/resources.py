"""Memory a computation is about to need, against what the machine has, refused up front.

A dense curvature matrix of a 200k-parameter model is 320 GB; without a check the allocator
fails minutes into a run with a traceback. Estimates here are lower bounds of the dominant
buffers (a refusal is always right; passing the check does not promise the work fits).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fidelity.core.errors import FidelityError

_MEMINFO = Path("/proc/meminfo")

#: Environment variable that overrides the memory available to a run, in bytes (to test the
#: refusal, or to budget a shared machine below what it reports).
MEMORY_LIMIT_VARIABLE = "FIDELITY_MEMORY_LIMIT"


def available_memory(device: torch.device | None = None) -> int | None:
    """Bytes a run may still allocate on ``device``: free CUDA memory on a GPU; on the CPU
    ``$FIDELITY_MEMORY_LIMIT`` where set, else MemAvailable from /proc/meminfo (None where
    neither is known)."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    limit = os.environ.get(MEMORY_LIMIT_VARIABLE)
    if limit is not None:
        try:
            value = int(float(limit))
        except ValueError:
            raise FidelityError(
                f"${MEMORY_LIMIT_VARIABLE} must be a number of bytes, got {limit!r}"
            ) from None
        if value <= 0:
            raise FidelityError(f"${MEMORY_LIMIT_VARIABLE} must be positive, got {limit!r}")
        return value
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def dense_matrix_bytes(n_params: int, itemsize: int, copies: int = 1) -> int:
    """Bytes of ``copies`` dense ``[n_params, n_params]`` matrices."""
    return copies * n_params * n_params * itemsize


def format_bytes(count: float) -> str:
    """``123.4 GB``: decimal units, as memory is quoted."""
    units = ("B", "KB", "MB", "GB", "TB", "PB")
    position = 0
    while abs(count) >= 1000 and position < len(units) - 1:
        count /= 1000
        position += 1
    return f"{count:.0f} B" if position == 0 else f"{count:.1f} {units[position]}"


def check_memory(required: int, what: str, *, fix: str, device: torch.device | None = None) -> None:
    """Refuse in one line when ``required`` bytes exceed the memory available on ``device``."""
    available = available_memory(device)
    if available is not None and required > available:
        raise FidelityError(
            f"{what} needs at least {format_bytes(required)}, but {format_bytes(available)} "
            f"is available; {fix}"
        )
