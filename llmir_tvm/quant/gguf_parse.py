"""A minimal GGUF (v2/v3) file parser: metadata scalars and strings, tensor directory, memory-mapped data.

Why our own: the ``gguf`` package's reader builds a numpy view for every metadata item, which
takes ~25 s for a 49k-token vocabulary on a 2-core machine; this one skips arrays it does not
need and reads the default model's directory in well under a second.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: GGML tensor type ids (``ggml.h``) of the types read here by name.
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
              12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
#: ``(elements, bytes)`` per block of each type (float types: one element).
TYPE_SIZES = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
              "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
              "Q5_K": (256, 176), "Q6_K": (256, 210)}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: ``shape`` row-major (slowest dimension first), ``data`` its raw bytes."""

    name: str
    type_name: str
    type_id: int
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, memory-mapped


@dataclass
class GGUFFile:
    """A parsed GGUF file: ``metadata`` (scalars and strings; arrays as their length) and ``tensors`` in file order."""

    path: Path
    metadata: dict
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buffer: memoryview):
        self.buffer, self.pos = buffer, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buffer, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        value = bytes(self.buffer[self.pos:self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return value

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS:  # skipped, its length kept
                self.pos += count * struct.calcsize(_SCALARS[item])
            else:
                for _ in range(count):
                    self.value(item)
            return count
        raise ValueError(f"GGUF: unknown metadata value type {kind}")


def parse_gguf(path: str | Path) -> GGUFFile:
    """Parse the GGUF file at ``path`` (its tensor data stays memory-mapped)."""
    path = Path(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(mapped))
    if bytes(mapped[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {bytes(mapped[:4])!r})")
    cursor.pos = 4
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cursor.unpack("<Q"), cursor.unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
        type_id, offset = cursor.unpack("<I"), cursor.unpack("<Q")
        infos.append((name, tuple(reversed(dims)), type_id, offset))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-cursor.pos // alignment) * alignment
    tensors = []
    for name, shape, type_id, offset in infos:
        type_name = GGML_TYPES.get(type_id, f"type{type_id}")
        if type_name not in TYPE_SIZES:
            raise ValueError(f"{path.name}: tensor {name} has GGML type {type_id}, which this reader does not know")
        elements, nbytes = TYPE_SIZES[type_name]
        size = int(np.prod(shape)) // elements * nbytes
        tensors.append(GGUFTensor(name, type_name, type_id, shape, mapped[start + offset:start + offset + size]))
    return GGUFFile(path, metadata, tensors)
