"""Typed results of a run: what results.json holds, as frozen dataclasses.

The runner builds a ``RunResults``; reports, the history, ``fidelity check``, the paper figures
and ``fidelity.testing`` read these objects, never raw keys. ``RunResults.to_json`` writes the
document that ``fidelity/results.schema.json`` describes (checked in the tests) and
``RunResults.from_json`` reads it back, validating every field's type.

Numbers that are undefined (a correlation of a constant) are ``None``, never NaN.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np

from fidelity.core.errors import FidelityError

SCHEMA_VERSION = 2
#: Where a problem's arrays live inside a run directory.
ARRAYS_FILE_PATTERN = r"^arrays/[A-Za-z0-9][A-Za-z0-9._-]*[.]npz$"
READABLE_SCHEMA_VERSIONS = (2,)

#: The metrics of every estimator x response, in the order reports show them.
METRIC_NAMES = ("pearson", "spearman", "kendall", "mean_test_pearson", "mean_test_spearman")

Scalar = float | int | str | bool | None
T = TypeVar("T")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval (None where undefined)."""

    value: float | None
    low: float | None = None
    high: float | None = None

    @classmethod
    def of(cls, value: float, low: float = math.nan, high: float = math.nan) -> Interval:
        """From floats, NaN meaning undefined."""
        return cls(finite_or_none(value), finite_or_none(low), finite_or_none(high))


@dataclass(frozen=True)
class NoiseCeiling:
    """Split-half reliability of a multi-seed response (Spearman-Brown corrected) and
    ``max_correlation`` = sqrt(Pearson reliability), the bound on a noise-free predictor's
    Pearson against the seed mean."""

    pearson: float | None
    spearman: float | None
    max_correlation: float | None
    seeds: int
    splits: int
    #: percentile bootstrap interval of ``max_correlation`` (test and removed points resampled)
    max_correlation_low: float | None = None
    max_correlation_high: float | None = None

    @property
    def spearman_bound(self) -> float | None:
        """sqrt(Spearman reliability): the bound on a rank correlation such as LDS."""
        return None if self.spearman is None else math.sqrt(max(self.spearman, 0.0))

    @property
    def bound(self) -> Interval:
        """The bound on the Pearson correlation, with its interval."""
        return Interval(self.max_correlation, self.max_correlation_low, self.max_correlation_high)


@dataclass(frozen=True)
class EstimatorRecord:
    kind: str
    settings: dict[str, Any]
    diagnostics: dict[str, Any]
    fit_seconds: float
    scores_seconds: float
    fit_peak_memory_bytes: int | None = None
    scores_peak_memory_bytes: int | None = None
    fit_cuda_peak_bytes: int | None = None
    scores_cuda_peak_bytes: int | None = None


@dataclass(frozen=True)
class ResponseRecord:
    kind: str
    settings: dict[str, Any]
    seconds: float
    info: dict[str, Any]
    noise_ceiling: NoiseCeiling | None = None


@dataclass(frozen=True)
class Conformance:
    """An estimator against the reference whose estimand it claims to compute."""

    reference: str
    pearson: float | None
    max_relative_difference: float | None
    finite: bool
    flagged: bool
    reason: str | None
    threshold: float
    tolerance: float | None = None


@dataclass(frozen=True)
class Gap:
    """The gap between two steps of the ladder (or the last stage and an estimator)."""

    source: str = field(metadata={"json": "from"})
    target: str = field(metadata={"json": "to"})
    components: tuple[str, ...]
    output_rms: float | None
    relative_mae: float | None
    one_minus_pearson: float | None


@dataclass(frozen=True)
class Decomposition:
    """Bae et al.'s gaps: ``stages`` in ladder order, one gap per consecutive pair, and each
    estimator's gap to the last stage; measurement gaps are relative to ``reference``.
    ``path``: the training-path rung when a `replay` estimator ran (`cold` -> replay, then
    replay -> each other estimator)."""

    reference: str
    stages: tuple[str, ...]
    gaps: tuple[Gap, ...]
    estimators: dict[str, Gap]
    path: tuple[Gap, ...] = ()


@dataclass(frozen=True)
class InfluentialRemoval:
    train_index: int
    reason: str
    label: Any
    text: str | None
    response: str
    mean_actual: float | None
    mean_predicted: dict[str, float | None]


@dataclass(frozen=True)
class PerTestCorrelations:
    """Pearson and Spearman over the removed points, one per test point (None: undefined)."""

    estimator: str
    response: str
    pearson: tuple[float | None, ...]
    spearman: tuple[float | None, ...]


@dataclass(frozen=True)
class CorrelationMatrix:
    """Pooled Pearson between every pair of arrays of a problem (``estimator/LABEL``,
    ``response/LABEL``)."""

    labels: tuple[str, ...]
    values: tuple[tuple[float | None, ...], ...]

    def get(self, first: str, second: str) -> float | None:
        return self.values[self.labels.index(first)][self.labels.index(second)]


@dataclass(frozen=True)
class LdsResults:
    """The linear datamodeling score of every estimator against one subset stage at one alpha:
    ``metrics[estimator]`` holds ``lds`` (mean over test points of the Spearman correlation over
    subsets between the estimator's prediction, additive or its own, and the retrained change)
    and ``lds_pearson``; ``noise_ceiling`` is the split-half reliability of the seed-mean
    measurements per test point (None with one seed)."""

    response: str
    alpha: float
    subsets: int
    seeds: int
    target: str
    metrics: dict[str, dict[str, Interval]]
    noise_ceiling: NoiseCeiling | None = None

    @property
    def label(self) -> str:
        """How history and ``fidelity check`` name it: ``RESPONSE@ALPHA``."""
        return f"{self.response}@{self.alpha:g}"


@dataclass(frozen=True)
class CounterfactualPoint:
    """One budget k of a ranking: the mean change of the target on the test point when its top-k
    points are dropped (interval over test points), and the fraction of correctly classified
    test points whose prediction flips (None for regression)."""

    k: int
    change: Interval
    flipped: float | None


@dataclass(frozen=True)
class Brittleness:
    """dattri's brittleness: over the correctly classified (test point, seed) pairs, the fraction
    that some k of the grid flips, and the median smallest such k among those flipped."""

    correct: int
    flipped_within_budget: float | None
    median_k: float | None


@dataclass(frozen=True)
class CounterfactualResults:
    """Top-k counterfactual removal per ranking (estimators, then `random` and `highest loss`)."""

    response: str
    target: str
    seeds: int
    ks: tuple[int, ...]
    curves: dict[str, tuple[CounterfactualPoint, ...]]
    brittleness: dict[str, Brittleness]


@dataclass(frozen=True)
class GroupSize:
    """Mean signed effect over the groups of one size and the test points: measured and
    predicted (the sum of the estimator's deltas over the group, or its own prediction)."""

    size: int
    groups: int
    mean_actual: float | None
    mean_predicted: float | None


@dataclass(frozen=True)
class GroupFit:
    """Predicted against actual group effects over every (group, test point) pair of one kind:
    Pearson, Spearman, and the slope of predicted on actual through the origin (below 1: the
    additive prediction underestimates the effect, Koh et al. 2019's finding)."""

    pearson: float | None
    spearman: float | None
    slope: float | None
    sizes: tuple[GroupSize, ...]


@dataclass(frozen=True)
class GroupResults:
    """Group effects of one stage: ``fits[estimator][kind]``."""

    response: str
    target: str
    seeds: int
    fits: dict[str, dict[str, GroupFit]]


@dataclass(frozen=True)
class RemovedCounts:
    top: int
    random: int

    @property
    def total(self) -> int:
        return self.top + self.random


@dataclass(frozen=True)
class ProblemResults:
    name: str
    requested_as: str
    description: str
    fingerprint: str
    loss: str
    weight_decay: float
    dtype: str
    device: str
    n_train: int
    n_test: int
    n_params: int
    training: dict[str, Any]
    n_test_points: int
    n_removed: RemovedCounts
    top_by: str | None
    estimators: dict[str, EstimatorRecord]
    skipped_estimators: dict[str, str]
    responses: dict[str, ResponseRecord]
    #: metrics[estimator][response][metric name]
    metrics: dict[str, dict[str, dict[str, Interval]]]
    correlations: CorrelationMatrix
    per_test: tuple[PerTestCorrelations, ...]
    decomposition: Decomposition | None
    conformance: dict[str, Conformance]
    most_influential: tuple[InfluentialRemoval, ...]
    timings: dict[str, float]
    # Relative to the run directory, always inside its arrays/ folder (a results.json that
    # points elsewhere is refused, never read).
    arrays_file: str = field(metadata={"pattern": ARRAYS_FILE_PATTERN})
    lds: tuple[LdsResults, ...] = ()
    counterfactuals: tuple[CounterfactualResults, ...] = ()
    groups: tuple[GroupResults, ...] = ()

    def metric(self, estimator: str, response: str, name: str) -> Interval | None:
        return self.metrics.get(estimator, {}).get(response, {}).get(name)

    def pairs(self) -> list[tuple[str, str]]:
        """Every (estimator, response) scored, in the order of the run."""
        return [(e, r) for e, by_response in self.metrics.items() for r in by_response]

    def undefined_pairs(self) -> list[tuple[str, str]]:
        """The pairs whose Pearson correlation was computed and is undefined (n/a): constant
        values, or values that still overflow; the CLI and the reports warn about them."""
        return [
            (estimator, response)
            for estimator, response in self.pairs()
            if (pearson := self.metric(estimator, response, "pearson")) is not None
            and pearson.value is None
        ]


#: Suite fields that describe a run without changing its numbers.
CONFIGURATION_PROSE = ("description", "source")


def configuration_of(suite: dict[str, Any], fingerprints: dict[str, str]) -> dict[str, Any]:
    """What decides the numbers a run should reproduce: the suite without its prose (name,
    problems, selection, estimators, responses, stages, metrics, seed, damping) and each
    problem's fingerprint (its data, model and training recipe). Two runs with equal
    configurations differ only in the code and the machine, which is what a gate tests."""
    kept = {key: value for key, value in suite.items() if key not in CONFIGURATION_PROSE}
    return {"suite": kept, "problem_fingerprints": dict(fingerprints)}


def configuration_hash(configuration: dict[str, Any]) -> str:
    """A short digest of a configuration (canonical JSON, SHA-256, 16 hex digits)."""
    text = json.dumps(configuration, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: problem -> estimator -> response -> metric name -> interval
MetricTable = dict[str, dict[str, dict[str, dict[str, Interval]]]]


@dataclass(frozen=True)
class RunResults:
    schema_version: int
    run_id: str
    fidelity_version: str
    created: str
    suite: dict[str, Any]
    git_revision: str | None
    environment: dict[str, Any]
    execution: dict[str, Any]
    timings: dict[str, float]
    problems: dict[str, ProblemResults]

    @property
    def suite_name(self) -> str:
        return str(self.suite["name"])

    def configuration(self) -> dict[str, Any]:
        """See ``configuration_of``."""
        fingerprints = {name: problem.fingerprint for name, problem in self.problems.items()}
        return configuration_of(self.suite, fingerprints)

    def configuration_hash(self) -> str:
        return configuration_hash(self.configuration())

    def metric_table(self) -> MetricTable:
        """Every metric by problem, estimator, response and name; an LDS appears as response
        ``SUBSETS@ALPHA`` with metrics ``lds`` and ``lds_pearson``, a counterfactual budget as
        ``COUNTERFACTUAL@kK`` with ``change`` and ``flipped`` (baselines as estimators
        ``random`` and ``highest loss``), a group kind as ``GROUPS:KIND`` with ``pearson``,
        ``spearman`` and ``slope``."""
        table: MetricTable = {}
        for name, problem in self.problems.items():
            by_estimator = {e: dict(by_response) for e, by_response in problem.metrics.items()}
            for entry in problem.lds:
                for estimator, metrics in entry.metrics.items():
                    by_estimator.setdefault(estimator, {})[entry.label] = metrics
            for found in problem.counterfactuals:
                for method, curve in found.curves.items():
                    for point in curve:
                        measured = {"change": point.change}
                        if point.flipped is not None:
                            measured["flipped"] = Interval(point.flipped)
                        label = f"{found.response}@k{point.k}"
                        by_estimator.setdefault(method, {})[label] = measured
            for effects in problem.groups:
                for estimator, by_kind in effects.fits.items():
                    for kind, fit in by_kind.items():
                        label = f"{effects.response}:{kind}"
                        by_estimator.setdefault(estimator, {})[label] = {
                            "pearson": Interval(fit.pearson),
                            "spearman": Interval(fit.spearman),
                            "slope": Interval(fit.slope),
                        }
            table[name] = by_estimator
        return table

    def to_json(self) -> dict[str, Any]:
        """The results.json document (JSON types only)."""
        return _encode(self)

    @classmethod
    def from_json(cls, data: Any, *, source: str = "results") -> RunResults:
        """Validate and read a results.json document."""
        if not isinstance(data, dict):
            raise FidelityError(f"{source}: expected a JSON object")
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise FidelityError(
                f"{source}: results schema version {version!r} cannot be read by this fidelity "
                f"(reads {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); rerun the suite"
            )
        decoded = _decode(cls, data, source)
        _check_schema(data, source)  # and what the type hints alone do not say
        return decoded

    @classmethod
    def load(cls, run_dir: str | Path) -> RunResults:
        """``RUN_DIR/results.json`` (or a results.json path)."""
        path = Path(run_dir)
        path = path / "results.json" if path.is_dir() else path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FidelityError(f"no results.json at {str(path)!r}") from None
        except (OSError, ValueError) as exc:
            raise FidelityError(f"cannot read {str(path)!r}: {exc}") from exc
        return cls.from_json(data, source=str(path))


def finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


SCHEMA_FILE = "results.schema.json"


def schema() -> dict[str, Any]:
    """The JSON Schema of results.json kept in the repository (``fidelity/results.schema.json``)."""
    text = resources.files("fidelity").joinpath(SCHEMA_FILE).read_text("utf-8")
    return json.loads(text)


@cache
def _schema_validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def _check_schema(data: Any, source: str) -> None:
    """Refuse a document that the published JSON Schema does not accept, naming where."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_schema_validator().iter_errors(data))
    if error is not None:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.path)
        message = " ".join(error.message.split())
        shown = message if len(message) <= 200 else message[:197] + "..."
        raise FidelityError(f"{source}{where}: does not match the results schema: {shown}")


def derived_schema() -> dict[str, Any]:
    """The JSON Schema that the dataclasses above define; the stored schema must equal it
    (``python -m fidelity.results`` rewrites the file)."""
    definitions: dict[str, Any] = {}
    _schema_of(RunResults, definitions)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "fidelity results.json",
        "description": "The results of one fidelity run (see fidelity/results.py).",
        "type": "object",
        "properties": {
            **definitions.pop("RunResults")["properties"],
            "schema_version": {"const": SCHEMA_VERSION},
        },
        "required": list(_required(RunResults)),
        "additionalProperties": False,
        "$defs": definitions,
    }


def _required(cls: Any) -> tuple[str, ...]:
    return tuple(
        _json_name(f)
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )


def _schema_of(kind: Any, definitions: dict[str, Any]) -> dict[str, Any]:
    origin = typing.get_origin(kind)
    if kind is Any:
        return {}
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema_of(option, definitions) for option in typing.get_args(kind)]}
    if kind is type(None):
        return {"type": "null"}
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        name = kind.__name__
        if name not in definitions:
            definitions[name] = {}  # placeholder against recursion
            hints = _hints(kind)
            definitions[name] = {
                "type": "object",
                "properties": {
                    _json_name(f): _schema_of(hints[f.name], definitions)
                    | ({"pattern": f.metadata["pattern"]} if "pattern" in f.metadata else {})
                    for f in dataclasses.fields(kind)
                },
                "required": list(_required(kind)),
                "additionalProperties": False,
            }
        return {"$ref": f"#/$defs/{name}"}
    if origin is dict:
        return {
            "type": "object",
            "additionalProperties": _schema_of(typing.get_args(kind)[1], definitions),
        }
    if origin is tuple:
        return {"type": "array", "items": _schema_of(typing.get_args(kind)[0], definitions)}
    names = {float: "number", int: "integer", str: "string", bool: "boolean"}
    if kind in names:
        return {"type": names[kind]}
    raise TypeError(f"no JSON Schema for {kind!r}")


# --- encoding and decoding by the dataclasses' type hints ---------------------------------


def json_ready(value: Any) -> Any:
    """``value`` in JSON types (tuples as lists, NumPy scalars as numbers, NaN as None), so that
    a free-form mapping (settings, diagnostics) reads back from results.json unchanged."""
    return _encode(value)


def _json_name(item: dataclasses.Field[Any]) -> str:
    return item.metadata.get("json", item.name)


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {_json_name(f): _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_encode(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


@cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(kind: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any:
        return data
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _decode(option, data, where)
            except FidelityError as exc:
                errors.append(str(exc))
        raise FidelityError(errors[0] if errors else f"{where}: unexpected null")
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(data, dict):
            raise FidelityError(f"{where}: expected an object for {kind.__name__}")
        hints, values = _hints(kind), {}
        for item in dataclasses.fields(kind):
            name = _json_name(item)
            if name not in data:
                if item.default is not dataclasses.MISSING:
                    continue
                raise FidelityError(f"{where}: missing {name!r}")
            values[item.name] = _decode(hints[item.name], data[name], f"{where}.{name}")
            pattern = item.metadata.get("pattern")
            if pattern is not None and not re.fullmatch(pattern, values[item.name]):
                raise FidelityError(f"{where}.{name}: {values[item.name]!r} must match {pattern}")
        return kind(**values)
    if origin is dict:
        if not isinstance(data, dict):
            raise FidelityError(f"{where}: expected an object")
        _, value_kind = typing.get_args(kind)
        return {k: _decode(value_kind, v, f"{where}.{k}") for k, v in data.items()}
    if origin is tuple:
        if not isinstance(data, list):
            raise FidelityError(f"{where}: expected an array")
        element = typing.get_args(kind)[0]
        return tuple(_decode(element, v, f"{where}[{i}]") for i, v in enumerate(data))
    if kind is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise FidelityError(f"{where}: expected a number")
        return float(data)
    if kind is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise FidelityError(f"{where}: expected an integer")
        return data
    if kind in (str, bool):
        if not isinstance(data, kind):
            raise FidelityError(f"{where}: expected {kind.__name__}")
        return data
    raise TypeError(f"cannot decode {kind!r}")  # a type hint this decoder does not know


if __name__ == "__main__":
    target = Path(__file__).with_name(SCHEMA_FILE)
    target.write_text(json.dumps(derived_schema(), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {target}")
