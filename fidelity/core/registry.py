"""Name -> object registries that also accept ``package.module:attribute`` import paths."""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fidelity.core.errors import FidelityError, user_code

T = TypeVar("T")


def import_object(path: str, *, kind: str) -> object:
    """Import ``package.module:attribute`` (the attribute may be dotted)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise FidelityError(f"{kind} import path {path!r} must look like 'package.module:name'")
    # Any import-time failure of user code is a user error, sys.exit and Ctrl-C-like
    # interrupts included.
    with user_code(f"cannot import module {module_name!r} for {kind} {path!r}", interrupt=True):
        obj: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise FidelityError(
                f"module {module_name!r} has no attribute {attribute!r} (from {kind} {path!r})"
            ) from exc
    return obj


def constructor_params(obj: object) -> dict[str, Any]:
    """The values of ``obj``'s constructor arguments, read from same-named attributes."""
    names = inspect.signature(type(obj).__init__).parameters
    return {name: getattr(obj, name) for name in names if name != "self"}


@dataclass(frozen=True)
class Entry:
    """One registered name: the object itself, or an import path ``module:attribute`` that is
    imported only when the entry is looked up (listing a registry imports nothing)."""

    target: object
    description: str = ""


class Registry(Generic[T]):
    """A named collection of factories (problems, estimators, responses).

    Entries are given when the registry is built (``Registry(kind, {name: Entry(...)})``) or
    added with ``register``; an entry whose target is an import path string is resolved lazily.
    ``base`` names the class(es) an entry must subclass.
    """

    def __init__(
        self,
        kind: str,
        entries: Mapping[str, Entry] | None = None,
        *,
        base: type | tuple[type, ...] | None = None,
    ) -> None:
        self.kind = kind
        # The class(es) an entry must derive from, where entries are classes (an estimator
        # must be an ``Estimator``): checked when a component is built from a suite.
        self.base = base
        self._entries: dict[str, Entry] = dict(entries or {})

    def register(self, name: str, *, description: str = "") -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            text = description or (getattr(obj, "__doc__", "") or "").strip()
            self._entries[name] = Entry(obj, text)
            return obj

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def description(self, name: str) -> str:
        text = self._entries[name].description
        return text.splitlines()[0] if text else ""

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The entry registered as ``name``, or the object at import path ``name``."""
        if name in self._entries:
            target = self._entries[name].target
            if isinstance(target, str):
                return import_object(target, kind=self.kind)  # type: ignore[return-value]
            return target  # type: ignore[return-value]
        if ":" in name:
            return import_object(name, kind=self.kind)  # type: ignore[return-value]
        valid = ", ".join(self.names()) or "(none)"
        raise FidelityError(
            f"unknown {self.kind} {name!r}; valid names: {valid} "
            "(or an import path 'package.module:name')"
        )


def parse_spec(spec: str, *, kind: str) -> tuple[str, dict[str, object]]:
    """Split ``"name[key=value,...]"`` into the name and keyword options.

    Values are Python literals where they parse as one (``size=400``, ``damping=0.01``) and
    strings otherwise (``device=cpu``).
    """
    spec = spec.strip()
    if not spec.endswith("]") or "[" not in spec:
        if "[" in spec or "]" in spec:
            raise FidelityError(f"{kind} {spec!r}: options must be written name[key=value,...]")
        return spec, {}
    name, _, body = spec[:-1].partition("[")
    try:
        call = ast.parse(f"options({body})", mode="eval").body
    except SyntaxError as exc:
        raise FidelityError(f"{kind} {spec!r}: options are not key=value, ...: {exc.msg}") from exc
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise FidelityError(f"{kind} {spec!r}: options must all be key=value")
    names = [str(keyword.arg) for keyword in call.keywords]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise FidelityError(f"{kind} {spec!r}: option(s) {', '.join(repeated)} given twice")
    options: dict[str, object] = {}
    for keyword in call.keywords:
        if isinstance(keyword.value, ast.Name):  # a bare word: device=cpu
            options[str(keyword.arg)] = keyword.value.id
            continue
        try:
            options[str(keyword.arg)] = ast.literal_eval(keyword.value)
        except ValueError as exc:
            raise FidelityError(
                f"{kind} {spec!r}: option {keyword.arg!r} is not a literal value"
            ) from exc
    return name.strip(), options
