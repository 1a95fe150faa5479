"""Formatting of numbers for every report and every line the CLI prints."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from fidelity.results import Interval

Draw = TypeVar("Draw", bound=Callable[..., Any])


def format_interval(entry: Interval | None) -> str:
    """``value [low, high]`` of a metric, ``value`` alone without an interval, ``n/a`` when
    undefined."""
    if entry is None or entry.value is None:
        return "n/a"
    if entry.low is None or entry.high is None:
        return f"{entry.value:.4f}"
    return f"{entry.value:.4f} [{entry.low:.4f}, {entry.high:.4f}]"


def number(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def significant(value: float | None) -> str:
    return number(value, ".3g")


def format_bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def literal_text(draw: Draw) -> Draw:
    """Draw a figure with every text literal: labels and names come from data, and a ``$`` in
    one must print as a dollar sign, not open matplotlib mathtext (where an unbalanced one fails
    at save time, after the run's compute). Settings the drawing makes (a seaborn theme) are
    undone afterwards, so figures do not change one another's look."""

    @functools.wraps(draw)
    def literal(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return cast(Draw, literal)
