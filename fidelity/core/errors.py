"""The one exception type users can cause, and the guard that turns user code's failures
into it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class FidelityError(Exception):
    """An error caused by user input (suite file, names, data, settings).

    The message names the offending input and, where there is one, the fix. The CLI prints it
    on one line and exits with status 2.
    """


@contextmanager
def user_code(what: str, *, interrupt: bool = False) -> Iterator[None]:
    """Run user code (a module import, a problem or model factory, a component constructor) so
    that whatever it raises becomes one ``FidelityError``, ``"{what}: {reason}"``.

    ``SystemExit`` is caught too: a user module that calls ``sys.exit(0)`` must not make a run
    look successful, nor ``sys.exit(3)`` end it with a bare status. With ``interrupt`` a
    ``KeyboardInterrupt`` is one as well (raised at import time it is the module's doing, not a
    Ctrl-C of a run that has done work worth keeping).
    """
    caught: tuple[type[BaseException], ...] = (Exception, SystemExit)
    if interrupt:
        caught = (*caught, KeyboardInterrupt)
    try:
        yield
    except FidelityError:
        raise
    except caught as exc:
        if isinstance(exc, SystemExit):
            reason = f"it called sys.exit({exc.code!r})"
        else:
            detail = " ".join(str(exc).split())
            reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise FidelityError(f"{what}: {reason}") from exc
