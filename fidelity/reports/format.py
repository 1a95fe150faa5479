"""Formatting of numbers for every report and every line the CLI prints."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from fidelity.results import Interval

Draw = TypeVar("Draw", bound=Callable[..., Any])

#: Matplotlib settings every figure is drawn under (see ``literal_text``).
PRINT_READY: dict[str, Any] = {
    "text.parse_math": False,
    "figure.constrained_layout.use": True,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.04,
}


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
    """Draw a figure print-ready and with every text literal: labels and names come from data,
    and a ``$`` in one must print as a dollar sign, not open matplotlib mathtext (where an
    unbalanced one fails at save time, after the run's compute). Figures are laid out by
    matplotlib's constrained layout (titles, labels and legends get room, none is clipped) and
    PDFs embed TrueType fonts (``fonttype`` 42: journals reject Type 3). Settings the drawing
    makes (a seaborn theme) are undone afterwards, so figures do not change one another's look."""

    @functools.wraps(draw)
    def literal(*args: Any, **kwargs: Any) -> Any:
        import matplotlib

        with matplotlib.rc_context(cast(Any, PRINT_READY)):
            return draw(*args, **kwargs)

    return cast(Draw, literal)


def log_axis(axis: Any, which: str = "x", ticks: int = 6, at: Any = None) -> None:
    """A logarithmic axis labelled in plain text (``1e-10``, ``0.01``, ``10``): matplotlib's
    default labels are mathtext, which ``literal_text`` turns off, so they would print as
    ``$\\mathdefault{10^{-10}}$``; and at most ``ticks`` labelled decades, so that a span of many
    decades does not crowd its labels together. ``at``: label exactly these values instead (the
    k of a counterfactual curve), which also labels a span inside one decade."""
    from matplotlib import ticker

    scale = axis.set_xscale if which == "x" else axis.set_yscale
    scale("log")
    target = axis.xaxis if which == "x" else axis.yaxis
    if at is not None:
        target.set_major_locator(ticker.FixedLocator(sorted(set(at))))
    else:
        target.set_major_locator(ticker.LogLocator(base=10, numticks=ticks))
    target.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(ticker.NullFormatter())


def interval_bars(axis: Any, x: Any, low: Any, high: Any, color: Any, **style: Any) -> None:
    """Vertical bars from ``low`` to ``high`` at ``x``, drawn as the interval itself.

    A percentile bootstrap interval need not contain its point estimate (a correlation near 1
    has a bootstrap distribution skewed below it, and round-off can put an interval end a few
    ulps on the wrong side), so bars expressed as distances from the point would be negative or,
    with an absolute value, wrong. Missing ends (NaN) draw nothing."""
    import numpy as np

    low = np.asarray(low, dtype=float)
    high = np.asarray(high, dtype=float)
    lower = np.minimum(low, high)
    upper = np.maximum(low, high)
    axis.errorbar(
        x,
        (lower + upper) / 2,
        yerr=(upper - lower) / 2,
        fmt="none",
        ecolor=color,
        **style,
    )
