"""Where and with what a run happened: git revision, package versions, machine."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from fidelity import __version__

PACKAGES = (
    "influence-fidelity",
    "torch",
    "numpy",
    "scipy",
    "scikit-learn",
    "joblib",
    "seaborn",
    "matplotlib",
    "tqdm",
)


def git_revision(path: Path | None = None) -> str | None:
    """HEAD of the git checkout holding the fidelity sources (None if not a checkout)."""
    where = path or Path(__file__).resolve().parent
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if completed.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return completed.stdout.strip() + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict[str, object]:
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "packages": package_versions(),
    }


def provenance() -> dict[str, object]:
    """What an output was made with and when: fidelity's version, the git revision, the
    environment and the time (UTC), as run results carry them."""
    return {
        "fidelity_version": __version__,
        "git_revision": git_revision(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": environment(),
    }
