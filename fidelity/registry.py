"""Name -> object registries that also accept ``package.module:attribute`` import paths."""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from fidelity.errors import FidelityError

T = TypeVar("T")


def import_object(path: str, *, kind: str) -> object:
    """Import ``package.module:attribute`` (the attribute may be dotted)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise FidelityError(f"{kind} import path {path!r} must look like 'package.module:name'")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a user error
        raise FidelityError(
            f"cannot import module {module_name!r} for {kind} {path!r}: {type(exc).__name__}: {exc}"
        ) from exc
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


class Registry(Generic[T]):
    """A named collection of factories (problems, estimators, responses)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def register(self, name: str, *, description: str = "") -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            self._descriptions[name] = description or (getattr(obj, "__doc__", "") or "").strip()
            return obj

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def description(self, name: str) -> str:
        return self._descriptions[name].splitlines()[0] if self._descriptions[name] else ""

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The entry registered as ``name``, or the object at import path ``name``."""
        if name in self._entries:
            return self._entries[name]
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
