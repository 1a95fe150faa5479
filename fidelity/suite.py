"""Suite files: TOML validated into frozen dataclasses, with precise error messages.

A suite names problems, estimators with their settings, response stages, how points are chosen
and how metrics are computed::

    name = "smoke"
    problems = ["digits-logreg", "mypackage.problems:my_problem"]

    [selection]
    test_points = 20
    random = 50
    top = 50
    top_by = "exact"          # label of the estimator that ranks training points

    [metrics]
    bootstrap = 1000
    confidence = 0.95

    [[estimators]]
    kind = "exact"            # registry name or import path package.module:Class
    label = "exact"           # optional; defaults to kind; must be unique
    damping = 0.0             # every other key is a constructor argument of the estimator
    # per-problem settings replace the ones above for that problem
    overrides = { "digits-mlp" = { damping = 0.01 } }
    # estimators only: the estimator of the suite whose estimand this one claims to compute
    # reference = "exact"
    # with a reference: also flag a max relative difference above this (for estimators that
    # claim the reference's numbers, not only its ranking)
    # tolerance = 1e-6
    # estimators only: modules it needs; where one is not importable the estimator is left
    # out of the run and the results say why (an optional library, e.g. torch_influence)
    # requires = ["torch_influence"]

    [[responses]]
    kind = "cold"

A suite may give one damping that every damped component (an estimator or response whose
constructor takes ``damping``) inherits unless its own settings or overrides set ``damping``
(or, for K-FAC, ``damping_ratio``)::

    damping = 0.01                                   # every problem
    damping = { default = 0.0, digits-mlp = 0.01 }   # per problem, with a default
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fidelity.core.errors import FidelityError, user_code
from fidelity.core.registry import Registry
from fidelity.estimators import ESTIMATORS
from fidelity.retrain import COUNTERFACTUAL_RESPONSES, GROUP_RESPONSES, RESPONSES, SUBSET_RESPONSES

BUILTIN_SUITES_PACKAGE = "fidelity.suites"


@dataclass(frozen=True)
class ComponentSpec:
    """An estimator or response: registry kind, unique label, constructor settings, and
    per-problem overrides of those settings (keyed by problem name)."""

    kind: str
    label: str
    settings: Mapping[str, Any]
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    problems: tuple[str, ...] | None = None  # None: every problem of the suite
    # Estimators only: the label of the suite's estimator whose estimand this one claims to
    # compute (a library's direct solver -> our exact at the same damping), for conformance.
    reference: str | None = None
    # With a reference: the max relative difference above which conformance flags it.
    tolerance: float | None = None
    # Estimators only: modules that must be importable for it to run; otherwise it is skipped
    # and the results list it with the missing module.
    requires: tuple[str, ...] = ()
    # Whether its constructor takes `damping`, so that it inherits the suite's damping.
    damped: bool = False
    # Estimators only: whether a user class (named by import path) gets the numeric contract
    # check on the contract problem before any compute (``contract = false`` in the entry:
    # only the class checks, for settings that fit nothing but the user's own model).
    contract: bool = True

    def missing_modules(self) -> list[str]:
        """The modules of ``requires`` that cannot be imported here."""
        missing = []
        for module in self.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(module)
        return missing

    def runs_on(self, *problem_names: str) -> bool:
        return self.problems is None or any(name in self.problems for name in problem_names)

    def settings_for(self, *problem_names: str) -> dict[str, Any]:
        """Settings for a problem known by any of ``problem_names`` (registry name, own name)."""
        merged = dict(self.settings)
        for name in problem_names:
            merged.update(self.overrides.get(name, {}))
        return merged


@dataclass(frozen=True)
class SelectionSpec:
    test_points: int = 20
    random: int = 50
    top: int = 50
    top_by: str | None = None
    # explicit positions in the test split (replaces the draw of ``test_points``)
    test_index: tuple[int, ...] = ()


@dataclass(frozen=True)
class MetricsSpec:
    bootstrap: int = 1000
    confidence: float = 0.95


#: Settings that, when a component gives one, replace the damping it would inherit.
DAMPING_SETTINGS = ("damping", "damping_ratio")


@dataclass(frozen=True)
class DampingSpec:
    """The suite's damping: ``default`` for every problem, ``problems`` per problem name."""

    default: float | None = None
    problems: Mapping[str, float] = field(default_factory=dict)

    def for_problem(self, *problem_names: str) -> float | None:
        for name in problem_names:
            if name in self.problems:
                return self.problems[name]
        return self.default


def component_settings(
    spec: ComponentSpec, damping: DampingSpec, *problem_names: str
) -> dict[str, Any]:
    """A component's settings on a problem: its own (with its per-problem overrides), and the
    suite's damping where the component is damped and sets none itself."""
    merged = spec.settings_for(*problem_names)
    inherited = damping.for_problem(*problem_names)
    if spec.damped and inherited is not None and not set(DAMPING_SETTINGS) & set(merged):
        merged["damping"] = inherited
    return merged


@dataclass(frozen=True)
class Suite:
    name: str
    problems: tuple[str, ...]
    estimators: tuple[ComponentSpec, ...]
    responses: tuple[ComponentSpec, ...]
    selection: SelectionSpec = SelectionSpec()
    # Subset retraining for the linear datamodeling score (fidelity.retrain.subsets); optional.
    subsets: tuple[ComponentSpec, ...] = ()
    # Top-k counterfactual removal (fidelity.retrain.counterfactual); optional.
    counterfactuals: tuple[ComponentSpec, ...] = ()
    # Group effects (fidelity.retrain.groups); optional.
    groups: tuple[ComponentSpec, ...] = ()
    metrics: MetricsSpec = MetricsSpec()
    description: str = ""
    seed: int = 0
    source: str = ""
    selection_overrides: Mapping[str, SelectionSpec] = field(default_factory=dict)
    damping: DampingSpec = DampingSpec()

    def settings_for(self, spec: ComponentSpec, *problem_names: str) -> dict[str, Any]:
        """A component's settings on a problem (see ``component_settings``)."""
        return component_settings(spec, self.damping, *problem_names)

    def selection_for(self, *problem_names: str) -> SelectionSpec:
        """The selection for a problem known by any of ``problem_names``."""
        for name in problem_names:
            if name in self.selection_overrides:
                return self.selection_overrides[name]
        return self.selection

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for group in ("estimators", "responses", "subsets", "counterfactuals", "groups"):
            data[group] = [
                {
                    **dict(c["settings"]),
                    **{
                        k: c[k]
                        for k in ("kind", "label", "reference", "tolerance")
                        if c[k] is not None
                    },
                    **({"requires": list(c["requires"])} if c["requires"] else {}),
                    **({} if c["contract"] else {"contract": False}),
                }
                for c in data[group]
            ]
        return data

    def with_problems(self, problems: tuple[str, ...]) -> Suite:
        return Suite(**{**vars(self), "problems": problems})

    def with_subsets(self, kind: str, label: str, settings: Mapping[str, Any]) -> Suite:
        """The suite with one more subset stage (validated as a suite entry would be)."""
        check_label(label, "subset stage")
        taken = {spec.label for spec in (*self.responses, *self.subsets)}
        if label in taken:
            raise FidelityError(f"label {label!r} is taken in suite {self.name!r}")
        build_component(SUBSET_RESPONSES, kind, settings, where=label)
        spec = ComponentSpec(kind, label, dict(settings))
        return Suite(**{**vars(self), "subsets": (*self.subsets, spec)})

    def with_test_index(self, problem: str, test_index: tuple[int, ...]) -> Suite:
        """The suite measuring exactly these test points of ``problem``."""
        chosen = replace(self.selection_for(problem), test_index=tuple(test_index))
        overrides = {**self.selection_overrides, problem: chosen}
        return Suite(**{**vars(self), "selection_overrides": overrides})

    def with_estimator(self, kind: str, label: str, settings: Mapping[str, Any]) -> Suite:
        """The suite with one more estimator (validated as a suite entry would be)."""
        check_label(label, "estimator")
        if label in {spec.label for spec in self.estimators}:
            raise FidelityError(f"estimator label {label!r} is taken in suite {self.name!r}")
        component = build_component(ESTIMATORS, kind, settings, where=label)
        spec = ComponentSpec(kind, label, dict(settings), damped=_takes_damping(component))
        return Suite(**{**vars(self), "estimators": (*self.estimators, spec)})


#: A suite's name names its run directory (runs/NAME-TIME) and its history rows: one path
#: component, no hidden file, nothing a shell or a file system treats specially.
SUITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
#: Labels name arrays (``estimator/LABEL``) and history rows and are shown in every report
#: (escaped; figures draw them literally, so ``$`` is fine), but a control character has no
#: business in one.
MAX_LABEL = 100

#: More bootstrap resamples than this change no printed digit and can exhaust memory.
MAX_BOOTSTRAP = 100_000


def check_suite_name(name: str, where: str) -> str:
    if not SUITE_NAME.fullmatch(name):
        raise FidelityError(
            f"{where}: name {name!r} must be 1-100 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit (it names the run directory)"
        )
    return name


def check_label(label: str, where: str) -> str:
    printable = all(character.isprintable() for character in label)
    if not label.strip() or label != label.strip() or len(label) > MAX_LABEL or not printable:
        raise FidelityError(
            f"{where}: label {label!r} must be 1-{MAX_LABEL} printable characters without "
            "surrounding spaces"
        )
    return label


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    # bool is an int in Python; a suite saying `top = true` is a mistake, not 1.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise FidelityError(f"{where} must be {_type_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise FidelityError(f"{where} must be {_type_name(kind)}, got {type(value).__name__}")
    return value


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise FidelityError(
            f"{where}: unknown key(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(allowed))}"
        )


def _dataclass_from_table(cls: type, table: Any, where: str) -> Any:
    _expect(table, dict, where)
    defaults = cls()
    fields = {name: getattr(defaults, name) for name in vars(defaults)}
    _check_keys(table, set(fields), where)
    values = {}
    for name, default in fields.items():
        value = table.get(name, default)
        if value is not None or default is not None:
            expected: type | tuple[type, ...] = type(default) if default is not None else str
            if expected is float:
                expected = (int, float)
            _expect(value, expected, f"{where}.{name}")
        values[name] = value
    return cls(**values)


def _components(
    entries: Any, kind: str, registry: Registry[Any], where: str, *, references: bool = False
) -> tuple[ComponentSpec, ...]:
    _expect(entries, list, where)
    if not entries:
        raise FidelityError(f"{where}: name at least one {kind}")
    specs, labels = [], set()
    for position, entry in enumerate(entries):
        at = f"{where}[{position}]"
        _expect(entry, dict, at)
        if "kind" not in entry:
            raise FidelityError(f"{at}: missing key 'kind' (one of {', '.join(registry.names())})")
        name = _expect(entry["kind"], str, f"{at}.kind")
        label = check_label(_expect(entry.get("label", name), str, f"{at}.label"), at)
        if label in labels:
            raise FidelityError(f"{at}: label {label!r} is used twice; give each a unique label")
        labels.add(label)
        estimator_keys = ("reference", "requires", "tolerance", "contract") if references else ()
        reserved = ("kind", "label", "overrides", "problems", *estimator_keys)
        settings = {k: v for k, v in entry.items() if k not in reserved}
        reference = entry.get("reference")
        if reference is not None:
            _expect(reference, str, f"{at}.reference")
        tolerance = entry.get("tolerance")
        if tolerance is not None:
            _expect(tolerance, (int, float), f"{at}.tolerance")
            if reference is None or not tolerance >= 0:
                raise FidelityError(
                    f"{at}.tolerance must be a non-negative number next to a reference"
                )
            tolerance = float(tolerance)
        contract = (
            _expect(entry.get("contract", True), bool, f"{at}.contract") if references else True
        )
        requires = entry.get("requires", []) if references else []
        requires = [requires] if isinstance(requires, str) else requires
        _expect(requires, list, f"{at}.requires")
        for position_, module in enumerate(requires):
            _expect(module, str, f"{at}.requires[{position_}]")
        overrides = _expect(entry.get("overrides", {}), dict, f"{at}.overrides")
        only = entry.get("problems")
        if only is not None:
            _expect(only, list, f"{at}.problems")
            for position_, problem in enumerate(only):
                _expect(problem, str, f"{at}.problems[{position_}]")
            only = tuple(only)
        for problem, changes in overrides.items():
            _expect(changes, dict, f"{at}.overrides.{problem}")
        component = build_component(registry, name, settings, where=at)  # validates; no work
        damped = _takes_damping(component)
        specs.append(
            ComponentSpec(
                name,
                label,
                settings,
                overrides,
                only,
                reference,
                tolerance,
                tuple(requires),
                damped,
                contract,
            )
        )
    for spec in specs:
        if spec.reference is None:
            continue
        target = next((other for other in specs if other.label == spec.reference), None)
        if target is None or target is spec:
            raise FidelityError(
                f"{where}: {spec.label}.reference {spec.reference!r} must be the label of "
                f"another {kind} ({', '.join(s.label for s in specs if s is not spec)})"
            )
        if target.problems is not None and (
            spec.problems is None or set(spec.problems) - set(target.problems)
        ):
            raise FidelityError(
                f"{where}: {spec.label} runs on problems its reference {target.label!r} does not"
            )
    return tuple(specs)


def _takes_damping(component: object) -> bool:
    """Whether a component inherits the suite's damping: its constructor takes ``damping``."""
    return "damping" in inspect.signature(type(component)).parameters


def _article(noun: str) -> str:
    return "an" if noun[:1] in "aeiou" else "a"


def build_component(
    registry: Registry[Any], kind: str, settings: Mapping[str, Any], *, where: str
) -> Any:
    """Instantiate an estimator or response from its registry kind and settings."""
    cls = registry.get(kind)
    if not isinstance(cls, type):
        raise FidelityError(f"{where}: {registry.kind} {kind!r} is not a class")
    if registry.base is not None and not issubclass(cls, registry.base):
        bases = registry.base if isinstance(registry.base, tuple) else (registry.base,)
        names = " or ".join(f"{base.__module__}.{base.__qualname__}" for base in bases)
        raise FidelityError(
            f"{where}: {kind!r} is not {_article(registry.kind)} {registry.kind}: "
            f"{cls.__qualname__} must subclass {names}"
        )
    parameters = inspect.signature(cls).parameters
    allowed = {n for n, p in parameters.items() if n != "self" and p.kind is p.KEYWORD_ONLY}
    _check_keys(settings, allowed, f"{where} ({registry.kind} {kind!r})")
    try:
        with user_code(f"building {registry.kind} {kind!r} failed"):
            return cls(**settings)
    except FidelityError as exc:
        if isinstance(exc.__cause__, TypeError):
            raise FidelityError(f"{where}: bad settings for {kind!r}: {exc.__cause__}") from exc
        raise FidelityError(f"{where}: {exc}") from exc


def parse_suite(data: Mapping[str, Any], *, source: str = "") -> Suite:
    """Validate a parsed TOML document into a ``Suite``."""
    where = source or "suite"
    allowed = {
        "name",
        "description",
        "seed",
        "problems",
        "estimators",
        "responses",
        "selection",
        "metrics",
        "damping",
        "subsets",
        "counterfactuals",
        "groups",
    }
    _check_keys(data, allowed, where)
    for required in ("name", "problems", "estimators", "responses"):
        if required not in data:
            raise FidelityError(f"{where}: missing key {required!r}")
    name = check_suite_name(_expect(data["name"], str, f"{where}: name"), where)
    problems = _expect(data["problems"], list, f"{where}: problems")
    if not problems:
        raise FidelityError(f"{where}: problems must name at least one problem")
    for position, problem in enumerate(problems):
        _expect(problem, str, f"{where}: problems[{position}]")
    repeated = sorted({p for p in problems if problems.count(p) > 1})
    if repeated:
        raise FidelityError(f"{where}: problems lists {', '.join(repeated)} more than once")
    estimators = _components(
        data["estimators"], "estimator", ESTIMATORS, f"{where}: estimators", references=True
    )
    responses = _components(data["responses"], "response", RESPONSES, f"{where}: responses")
    subsets: tuple[ComponentSpec, ...] = ()
    if "subsets" in data:
        subsets = _components(
            data["subsets"], "subset response", SUBSET_RESPONSES, f"{where}: subsets"
        )
    counterfactuals: tuple[ComponentSpec, ...] = ()
    if "counterfactuals" in data:
        counterfactuals = _components(
            data["counterfactuals"],
            "counterfactual stage",
            COUNTERFACTUAL_RESPONSES,
            f"{where}: counterfactuals",
        )
    groups: tuple[ComponentSpec, ...] = ()
    if "groups" in data:
        groups = _components(data["groups"], "group stage", GROUP_RESPONSES, f"{where}: groups")
    labels = [spec.label for spec in (*responses, *subsets, *counterfactuals, *groups)]
    taken = sorted({label for label in labels if labels.count(label) > 1})
    if taken:
        raise FidelityError(
            f"{where}: label(s) {', '.join(taken)} name more than one response, subsets, "
            "counterfactual or group stage; give each a unique label"
        )
    selection_table = dict(_expect(data.get("selection", {}), dict, f"{where}: selection"))
    selection_changes = _expect(
        selection_table.pop("overrides", {}), dict, f"{where}: selection.overrides"
    )
    selection = _selection(selection_table, f"{where}: selection")
    selection_overrides = {
        problem: _selection(
            {**selection_table, **_expect(changes, dict, f"{where}: selection.overrides")},
            f"{where}: selection.overrides.{problem}",
        )
        for problem, changes in selection_changes.items()
    }
    metrics = _dataclass_from_table(MetricsSpec, data.get("metrics", {}), f"{where}: metrics")
    for spec in (*estimators, *responses, *subsets, *counterfactuals, *groups):
        for what, named in (("overrides", spec.overrides), ("problems", spec.problems or ())):
            unknown = sorted(set(named) - set(problems))
            if unknown:
                raise FidelityError(
                    f"{where}: {spec.label} has {what} for {', '.join(unknown)}, which the "
                    f"suite does not run (problems: {', '.join(problems)})"
                )
    unknown = sorted(set(selection_overrides) - set(problems))
    if unknown:
        raise FidelityError(f"{where}: selection.overrides names {', '.join(unknown)}, not run")
    for problem in problems:
        running = [spec.label for spec in estimators if spec.runs_on(problem)]
        if not running:
            raise FidelityError(f"{where}: no estimator runs on problem {problem!r}")
        if not any(spec.runs_on(problem) for spec in responses):
            raise FidelityError(f"{where}: no response runs on problem {problem!r}")
        top_by = selection_overrides.get(problem, selection).top_by
        if top_by is not None and top_by not in running:
            raise FidelityError(
                f"{where}: selection.top_by {top_by!r} is not an estimator label that runs on "
                f"{problem!r} ({', '.join(running)})"
            )
    damping = _damping(data.get("damping"), problems, f"{where}: damping")
    checked: list[tuple[ComponentSpec, Registry[Any]]] = [
        *((spec, ESTIMATORS) for spec in estimators),
        *((spec, RESPONSES) for spec in responses),
        *((spec, SUBSET_RESPONSES) for spec in subsets),
        *((spec, COUNTERFACTUAL_RESPONSES) for spec in counterfactuals),
        *((spec, GROUP_RESPONSES) for spec in groups),
    ]
    for spec, registry in checked:
        # Every problem's settings (own, overridden, inherited) must build; this does no work.
        for problem in problems:
            if spec.runs_on(problem):
                settings = component_settings(spec, damping, problem)
                build_component(registry, spec.kind, settings, where=f"{spec.label} on {problem}")
    seed = _expect(data.get("seed", 0), int, f"{where}: seed")
    if seed < 0:
        raise FidelityError(f"{where}: seed must be >= 0, got {seed}")
    if not 0 <= metrics.bootstrap <= MAX_BOOTSTRAP or not (0 < metrics.confidence < 1):
        raise FidelityError(
            f"{where}: metrics needs 0 <= bootstrap <= {MAX_BOOTSTRAP:,} and 0 < confidence < 1"
        )
    return Suite(
        name=name,
        problems=tuple(problems),
        estimators=estimators,
        responses=responses,
        selection=selection,
        subsets=subsets,
        counterfactuals=counterfactuals,
        groups=groups,
        metrics=metrics,
        description=_expect(data.get("description", ""), str, f"{where}: description"),
        seed=seed,
        source=source,
        selection_overrides=selection_overrides,
        damping=damping,
    )


def _damping(value: Any, problems: list[str], where: str) -> DampingSpec:
    if value is None:
        return DampingSpec()
    if not isinstance(value, dict):
        number = _expect(value, (int, float), where)
        if not number >= 0:
            raise FidelityError(f"{where} must be >= 0, got {number}")
        return DampingSpec(float(number))
    values = {}
    for name, number in value.items():
        _expect(number, (int, float), f"{where}.{name}")
        if not number >= 0:
            raise FidelityError(f"{where}.{name} must be >= 0, got {number}")
        values[name] = float(number)
    unknown = sorted(set(values) - set(problems) - {"default"})
    if unknown:
        raise FidelityError(
            f"{where} names {', '.join(unknown)}, which the suite does not run "
            f"(problems: {', '.join(problems)}; or 'default')"
        )
    default = values.pop("default", None)
    return DampingSpec(default, values)


def _selection(table: Mapping[str, Any], where: str) -> SelectionSpec:
    table = dict(table)
    test_index = _expect(table.pop("test_index", []), list, f"{where}.test_index")
    for position in test_index:
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise FidelityError(f"{where}.test_index must hold non-negative integers")
    if len(set(test_index)) != len(test_index):
        raise FidelityError(f"{where}.test_index names a test point twice")
    selection = replace(
        _dataclass_from_table(SelectionSpec, table, where), test_index=tuple(test_index)
    )
    for field_name in ("test_points", "random", "top"):
        if getattr(selection, field_name) < 0:
            raise FidelityError(f"{where}.{field_name} must be >= 0")
    if selection.test_points < 1 or selection.random + selection.top < 2:
        raise FidelityError(f"{where} needs test_points >= 1 and at least two removed points")
    return selection


def builtin_suites() -> list[str]:
    folder = resources.files(BUILTIN_SUITES_PACKAGE)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_suite(name_or_path: str) -> Suite:
    """A bundled suite by name (``smoke``) or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FidelityError(f"suite file {name_or_path!r} does not exist")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise FidelityError(
                f"suite file {name_or_path!r} is not UTF-8 text (byte {exc.start}); TOML files "
                "are UTF-8"
            ) from None
        except OSError as exc:
            raise FidelityError(
                f"cannot read suite file {name_or_path!r}: {exc.strerror}"
            ) from None
    elif name_or_path in builtin_suites():
        resource = resources.files(BUILTIN_SUITES_PACKAGE) / f"{name_or_path}.toml"
        text, source = resource.read_text(encoding="utf-8"), f"{name_or_path}.toml"
    else:
        raise FidelityError(
            f"unknown suite {name_or_path!r}; bundled suites: {', '.join(builtin_suites())} "
            "(or a path to a .toml file)"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FidelityError(f"suite {source}: malformed TOML: {exc}") from exc
    return parse_suite(data, source=source)
