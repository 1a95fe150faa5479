"""Output locations checked before compute, and one writer per run directory.

A run that has trained and retrained for minutes must not then fail because its run directory,
cache or history cannot be written: every location is probed up front (by creating and removing
a file in it, which is what counts, whoever the user is) and refused in one line. Two runs given
the same ``--out`` race for a claim file beside it; the loser is told at once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fidelity.core.cache import pid_alive
from fidelity.core.errors import FidelityError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path.cwd()


def check_writable(path: Path, what: str, *, directory: bool) -> None:
    """Refuse (``FidelityError``) unless ``path`` can be written: as a directory (created where
    missing) or as a file (created where missing, opened for writing where present)."""
    path = Path(path)
    shown = repr(str(path))
    if path.exists():
        if directory and not path.is_dir():
            raise FidelityError(f"{what} {shown} is not a directory")
        if not directory and path.is_dir():
            raise FidelityError(f"{what} {shown} is a directory, not a file")
    found = path if directory and path.is_dir() else _nearest_existing(path.parent)
    if not found.is_dir():
        raise FidelityError(f"cannot create {what} {shown}: {str(found)!r} is not a directory")
    try:
        handle, probe = tempfile.mkstemp(dir=found, prefix=".fidelity-write-probe-")
        os.close(handle)
        os.unlink(probe)
        if not directory and path.is_file():
            with open(path, "r+b"):
                pass
    except OSError as exc:
        raise FidelityError(
            f"{what} {shown} is not writable ({exc.strerror or exc}); choose another location"
        ) from None


def claim_path(out: Path) -> Path:
    """The claim file of run directory ``out`` (beside it, so that it is not part of it)."""
    return out.parent / f".{out.name}.claim"


@contextmanager
def claimed(out: Path) -> Iterator[None]:
    """Hold run directory ``out`` for this process while the block runs.

    The claim is a file beside ``out`` holding the PID, created atomically (a hard link that
    fails where the name exists); a claim whose process is gone (a killed run) is taken over.
    Another live claim is refused in one line, before any compute.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    claim = claim_path(out)
    # The claim appears with its PID already in it (a hard link of a written file), so a
    # competitor never reads an empty claim and mistakes it for a dead one.
    try:
        handle, written = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.claim-")
        with os.fdopen(handle, "w") as stream:
            stream.write(str(os.getpid()))
    except OSError as exc:
        raise FidelityError(f"cannot claim run directory {str(out)!r}: {exc.strerror}") from None
    try:
        for _ in range(2):
            try:
                os.link(written, claim)
                break
            except FileExistsError:
                holder = _claim_holder(claim)
                if holder is not None and pid_alive(holder):
                    raise FidelityError(
                        f"run directory {str(out)!r} is being written by another fidelity run "
                        f"(pid {holder}); choose another --out"
                    ) from None
                claim.unlink(missing_ok=True)  # left by a killed run: take it over
            except OSError as exc:
                raise FidelityError(
                    f"cannot claim run directory {str(out)!r}: {exc.strerror or exc}"
                ) from None
        else:
            raise FidelityError(f"cannot claim run directory {str(out)!r}: another run holds it")
    finally:
        os.unlink(written)
    try:
        yield
    finally:
        if _claim_holder(claim) == os.getpid():
            claim.unlink(missing_ok=True)


def _claim_holder(claim: Path) -> int | None:
    try:
        text = claim.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
