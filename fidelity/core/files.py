"""Arrays handed in from elsewhere (score matrices, ground truth): reading and checking them.

``.npy`` (one array), ``.npz`` and ``.safetensors`` (named arrays) are read without pickle and
without any dependency beyond numpy; a file that cannot be read, or an index array that does not
fit the split it indexes, is a ``FidelityError`` naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from fidelity.core.errors import FidelityError
from fidelity.core.problem import Examples

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "I64": np.int64,
    "I32": np.int32,
    "BOOL": np.bool_,
    "U8": np.uint8,
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (8-byte header length, JSON header, raw data)."""
    data = path.read_bytes()
    if len(data) < 8:
        raise FidelityError(f"{str(path)!r} is not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as exc:
        raise FidelityError(f"{str(path)!r} is not a safetensors file: {exc}") from exc
    found = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise FidelityError(f"{str(path)!r}: tensor {name!r} has unsupported dtype")
        start, stop = entry["data_offsets"]
        raw = data[8 + length + start : 8 + length + stop]
        found[name] = np.frombuffer(raw, dtype=dtype).reshape(entry["shape"]).copy()
    return found


def read_arrays(path: Path, what: str, single: str) -> dict[str, np.ndarray]:
    """The arrays of ``path`` by name; a ``.npy`` file's one array is named ``single``.
    ``what`` names the file in errors ("score file", "ground-truth file")."""
    if not path.is_file():
        raise FidelityError(f"{what} {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {single: np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as stored:
                return {name: stored[name] for name in stored.files}
        if suffix == ".safetensors":
            return read_safetensors(path)
    except (OSError, ValueError) as exc:
        raise FidelityError(f"cannot read {what} {str(path)!r}: {exc}") from exc
    raise FidelityError(f"{what} {str(path)!r}: expected .npy, .npz or .safetensors")


def check_index(values: np.ndarray | None, size: int, name: str, where: str) -> np.ndarray:
    """A 1-d array of distinct positions in [0, size) (all positions when ``values`` is None)."""
    if values is None:
        return np.arange(size)
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise FidelityError(f"{where}: {name} must be a 1-d integer array")
    if values.size and (values.min() < 0 or values.max() >= size):
        raise FidelityError(f"{where}: {name} must lie in [0, {size})")
    if np.unique(values).size != values.size:
        raise FidelityError(f"{where}: {name} holds an index twice")
    return values.astype(np.int64)


def row_keys(examples: Examples) -> list[bytes]:
    """One key per example from its input and target bytes: how an example handed back by the
    runner is found in a file that indexes the problem's split."""
    x = examples.x.detach().cpu().reshape(len(examples), -1).numpy()
    y = examples.y.detach().cpu().reshape(len(examples), -1).numpy()
    return [x[i].tobytes() + y[i].tobytes() for i in range(len(examples))]
