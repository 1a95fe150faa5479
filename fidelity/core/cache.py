"""Content-addressed on-disk cache of expensive artefacts (trained parameters, retrains).

A key is the SHA-256 of a canonical JSON description of everything that determines the
artefact; a config that differs in anything gets another key, so a stale entry is never read.
Files are written to a temporary name and renamed, so an interrupted run leaves either a
complete entry or none.

The cache does not trust its files: every entry records the kind and key it was written for and
the SHA-256 of its arrays (names, dtypes, shapes and bytes), checked on every read. An entry
that cannot be read, was written for another key (two entries swapped) or whose arrays no longer
match their digest (edited, truncated, flipped bytes) is reported in one line on stderr, moved to
``root/quarantine/`` and treated as absent, so the artefact is recomputed; it is never used and
never fatal. Temporary files of writers that are no longer running are removed when a cache is
opened.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# 2: entries carry their kind, key and content digest (format 1 entries get other keys).
CACHE_FORMAT = 2
META = "__fidelity_cache__"
QUARANTINE = "quarantine"


def cache_key(**parts: object) -> str:
    """SHA-256 hex digest of ``parts`` as canonical JSON (keys sorted)."""
    payload = json.dumps(
        {"cache_format": CACHE_FORMAT, **parts}, sort_keys=True, default=str, allow_nan=False
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _file_mode() -> int:
    """0666 less the umask: the mode ``open(path, "w")`` creates files with (read once, while
    the process is single-threaded, since reading the umask means setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename (the
    temporary name carries the writer's PID, so a killed writer's file can be told apart from a
    live one's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates 0600; the file gets the mode a plain open() would give it.
        os.chmod(tmp_name, FILE_MODE)
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


def content_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over each array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, value.dtype.str, list(value.shape)]).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def writer_pid(name: str) -> int | None:
    """The PID in a temporary name ``.<entry>.<pid>.<random>.tmp``, if there is one."""
    parts = name.split(".")
    if len(parts) >= 5 and parts[0] == "" and parts[-1] == "tmp" and parts[-3].isdigit():
        return int(parts[-3])
    return None


@dataclass(frozen=True)
class EntryCheck:
    """One entry's verification: ``problem`` is None for a sound entry, else why it is not."""

    kind: str
    key: str
    path: Path
    size: int
    problem: str | None


class ArtifactCache:
    """Arrays stored under ``root/<kind>/<key[:2]>/<key>.npz``, verified on read (see the module
    docstring); ``root=None`` disables caching."""

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = None if root is None else Path(root)
        if self.root is not None:
            self.remove_stale_temporaries()

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _path(self, kind: str, key: str) -> Path:
        if self.root is None:
            raise RuntimeError("cache is disabled")
        return self.root / kind / key[:2] / f"{key}.npz"

    def _read(self, kind: str, key: str, path: Path) -> tuple[dict[str, np.ndarray] | None, str]:
        """(arrays, "") for a sound entry, else (None, why not)."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
        except Exception as exc:
            return None, f"unreadable ({type(exc).__name__})"
        if META not in arrays:
            return None, "no verification record"
        try:
            meta = json.loads(bytes(arrays.pop(META)).decode())
        except (ValueError, UnicodeDecodeError):
            return None, "unreadable verification record"
        if meta.get("kind") != kind or meta.get("key") != key:
            return None, f"written for another entry ({meta.get('kind')}/{meta.get('key')})"
        if meta.get("digest") != content_digest(arrays):
            return None, "its arrays do not match their digest"
        return arrays, ""

    def load(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        """The entry's arrays, or None when it is absent or damaged (then quarantined)."""
        if self.root is None:
            return None
        path = self._path(kind, key)
        if not path.exists() and not path.is_symlink():
            return None
        arrays, problem = self._read(kind, key, path)
        if arrays is None:
            self._quarantine(path, kind, problem)
        return arrays

    def _quarantine(self, path: Path, kind: str, problem: str) -> None:
        if self.root is None:
            return
        target = self.root / QUARANTINE / kind / f"{path.name}.{time.time_ns()}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            where = f"moved to {target}"
        except OSError as exc:
            where = f"could not be moved ({exc.strerror}); it is ignored"
        sys.stderr.write(
            f"fidelity: cache entry {kind}/{path.name} is damaged ({problem}); {where}; "
            "recomputing\n"
        )

    def save(self, kind: str, key: str, arrays: Mapping[str, np.ndarray | np.generic]) -> None:
        if self.root is None:
            return
        content = {name: np.asarray(value) for name, value in arrays.items()}
        if META in content:
            raise ValueError(f"{META} is reserved")
        meta = {"kind": kind, "key": key, "digest": content_digest(content)}
        record = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **content, **{META: record})  # type: ignore[arg-type]
        atomic_write_bytes(self._path(kind, key), buffer.getvalue())

    def count(self, kind: str) -> int:
        """Number of stored entries of one kind (used by tests and progress reporting)."""
        if self.root is None or not (self.root / kind).exists():
            return 0
        return sum(1 for _ in (self.root / kind).glob("*/*.npz"))

    def entries(self) -> Iterator[tuple[str, str, Path]]:
        """(kind, key, path) of every stored entry."""
        if self.root is None or not self.root.is_dir():
            return
        for kind_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if kind_dir.name == QUARANTINE:
                continue
            for path in sorted(kind_dir.glob("*/*.npz")):
                yield kind_dir.name, path.stem, path

    def verify(self, *, quarantine: bool = True) -> list[EntryCheck]:
        """Every entry checked as a read checks it; damaged ones quarantined unless told not."""
        found = []
        for kind, key, path in self.entries():
            size = path.stat().st_size if path.is_file() else 0
            arrays, problem = self._read(kind, key, path)
            if arrays is None and quarantine:
                self._quarantine(path, kind, problem)
            found.append(EntryCheck(kind, key, path, size, problem or None))
        return found

    def quarantined(self) -> list[Path]:
        if self.root is None or not (self.root / QUARANTINE).is_dir():
            return []
        kinds = (p for p in (self.root / QUARANTINE).iterdir() if p.is_dir())
        return sorted(entry for kind in kinds for entry in kind.iterdir())

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of writers that are no longer running."""
        if self.root is None or not self.root.is_dir():
            return []
        removed = []
        for path in self.root.rglob(".*.tmp"):
            pid = writer_pid(path.name)
            if pid is not None and not pid_alive(pid):
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    continue
        return removed
