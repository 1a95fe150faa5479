"""Progress as log lines: one line per stage, with counts and elapsed time.

Every layer logs to a child of the ``fidelity`` logger (``stage_logger("runner")``); nothing is
printed unless the command line (or a user) configures a handler, as the standard library
intends. ``configure`` is what the CLI calls: lines on stderr, INFO by default, WARNING with
``-q``, DEBUG with ``-v``. Progress bars (tqdm) are shown only on a terminal and never replace
these lines, so a CI log shows what happened and when.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

ROOT = "fidelity"
_FORMAT = "fidelity: %(asctime)s %(message)s"


def stage_logger(part: str) -> logging.Logger:
    """The logger of one part of the code (``fidelity.<part>``)."""
    return logging.getLogger(f"{ROOT}.{part}")


def configure(verbosity: int = 0, stream: TextIO | None = None) -> logging.Handler:
    """Send fidelity's log lines to ``stream`` (stderr): ``verbosity`` < 0 warnings only, 0
    stages (INFO), > 0 details (DEBUG). Replaces a handler an earlier call installed, and
    silences third-party progress bars (Hugging Face downloads and weight loading), which would
    otherwise leak into logs."""
    root = logging.getLogger(ROOT)
    for handler in list(root.handlers):
        if getattr(handler, "_fidelity_cli", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler._fidelity_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(
        logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity else logging.INFO
    )
    root.propagate = False
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return handler
