"""Peak memory of a block of work, for estimator diagnostics and benchmarks."""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int | None:
    """Resident set size of this process in bytes (None where /proc is unavailable)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Context manager measuring the peak RSS increase over the block's start, in bytes.

    A sampling thread reads /proc every ``interval`` seconds (the process's high-water mark
    ``ru_maxrss`` cannot say what one block added once an earlier block peaked higher). Where
    /proc is missing, the increase of ``ru_maxrss`` is used, which is a lower bound.
    ``peak_increase`` is set on exit; ``cuda_peak_bytes`` too when CUDA is in use.
    """

    def __init__(self, *, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_increase: int | None = None
        self.cuda_peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        self._start = current_rss()
        self._peak = self._start or 0
        self._start_maxrss = _maxrss()
        self._stop = threading.Event()
        self._thread = None
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._cuda = _cuda_reset()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            rss = current_rss() or 0
            self.peak_increase = max(self._peak, rss) - (self._start or 0)
        else:
            self.peak_increase = max(_maxrss() - self._start_maxrss, 0)
        if self._cuda:
            import torch

            self.cuda_peak_bytes = int(torch.cuda.max_memory_allocated())


def _maxrss() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def _cuda_reset() -> bool:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    torch.cuda.reset_peak_memory_stats()
    return True
