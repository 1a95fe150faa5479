"""Content-addressed on-disk cache of expensive artefacts (trained parameters, retrains).

A key is the SHA-256 of a canonical JSON description of everything that determines the
artefact; a config that differs in anything gets another key, so a stale entry is never read.
Files are written to a temporary name and renamed, so an interrupted run leaves either a
complete entry or none.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

CACHE_FORMAT = 1


def cache_key(**parts: object) -> str:
    """SHA-256 hex digest of ``parts`` as canonical JSON (keys sorted)."""
    payload = json.dumps(
        {"cache_format": CACHE_FORMAT, **parts}, sort_keys=True, default=str, allow_nan=False
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def default_cache_dir() -> Path:
    """``$FIDELITY_CACHE_DIR``, else ``$XDG_CACHE_HOME/fidelity`` or ``~/.cache/fidelity``."""
    explicit = os.environ.get("FIDELITY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fidelity"


class ArtifactCache:
    """Arrays stored under ``root/<kind>/<key[:2]>/<key>.npz``; ``root=None`` disables caching."""

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = None if root is None else Path(root)

    def _path(self, kind: str, key: str) -> Path:
        if self.root is None:
            raise RuntimeError("cache is disabled")
        return self.root / kind / key[:2] / f"{key}.npz"

    def load(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        if self.root is None:
            return None
        path = self._path(kind, key)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}

    def has_all(self, kind: str, keys: Iterable[str]) -> bool:
        """Whether every key of one kind is stored (false whenever caching is disabled)."""
        if self.root is None:
            return False
        return all(self._path(kind, key).exists() for key in keys)

    def save(self, kind: str, key: str, arrays: Mapping[str, np.ndarray | np.generic]) -> None:
        if self.root is None:
            return
        buffer = io.BytesIO()
        np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})  # type: ignore[arg-type]
        atomic_write_bytes(self._path(kind, key), buffer.getvalue())

    def count(self, kind: str) -> int:
        """Number of stored entries of one kind (used by tests and progress reporting)."""
        if self.root is None or not (self.root / kind).exists():
            return 0
        return sum(1 for _ in (self.root / kind).glob("*/*.npz"))
