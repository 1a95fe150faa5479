"""Checks of user-supplied settings; each raises FidelityError naming the setting."""

from __future__ import annotations

from fidelity.core.errors import FidelityError


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FidelityError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_nonnegative(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise FidelityError(f"{name} must be a number >= 0, got {value!r}")
    if value == float("inf"):
        raise FidelityError(f"{name} must be finite")
    return float(value)


def check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FidelityError(f"{name} must be an integer, got {value!r}")
    return value
