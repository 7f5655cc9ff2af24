"""The quantized weight formats: one place that says how each stores a ``[N, K]`` weight.

A quantized weight (:class:`QuantizedWeight`) is a ``Linear``/embedding matrix ``W [N, K]``
(PyTorch layout: ``N`` output features, rows; ``K`` input features) held as a few *planes*,
numpy arrays whose rows are ``W``'s rows:

============ ============================================================= =================
format       planes (per row)                                               value of element
============ ============================================================= =================
``int8``     ``qs`` int8 [K], ``scale`` float32 [1]                         ``scale * qs``
``int4``     ``qs`` uint8 [G*16], ``d``, ``m`` float16 [G]                  ``d * q + m``
``q8_0``     ``qs`` int8 [K], ``d`` float16 [K/32]                          ``d * qs``
``q4_0``     ``qs`` uint8 [K/2], ``d`` float16 [K/32]                       ``d * (q - 8)``
``q4_1``     ``qs`` uint8 [K/2], ``d``, ``m`` float16 [K/32]                ``d * q + m``
``q4_k``     ``qs`` uint8 [K/2], ``d``, ``dmin`` float16 [K/256],           ``d*sc*q - dmin*mn``
             ``sc``, ``mn`` uint8 [K/32]
============ ============================================================= =================

Four-bit values ``q`` are packed two to a byte as GGUF stores them: in a 32-element group
(``int4``, ``q4_0``, ``q4_1``) byte ``j`` holds element ``j`` in its low nibble and ``j + 16`` in
its high one; in ``q4_k`` each 64-element chunk's 32 bytes hold elements ``0..31`` (low) and
``32..63`` (high). The GGUF formats keep the file's bits exactly: the same quants and float16
scales, with the block structs split into planes (``q4_k``'s 6-bit sub-block scales/mins widened
to one byte each), so the kernels load aligned vectors. ``int4``'s last group is zero-padded when
``K`` is not a multiple of 32 (``G = ceil(K / 32)``).

:func:`dequantize` is the numpy reference of every format (float32, the arithmetic GGUF's own
dequantizer does, so results are bit-identical).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Elements per group (scale) along K, by format (``int8``: one scale per row).
GROUP = {"int8": 0, "int4": 32, "q8_0": 32, "q4_0": 32, "q4_1": 32, "q4_k": 32}
#: ``q4_k`` super-block: 256 elements share ``d`` / ``dmin``.
SUPER_BLOCK = 256
#: The formats a GGUF file's tensors are kept in (others are dequantized on load).
GGUF_FORMATS = ("q8_0", "q4_0", "q4_1", "q4_k")
#: Every weight format.
FORMATS = ("int8", "int4", *GGUF_FORMATS)


def plane_specs(fmt: str, n: int, k: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{plane: (shape, dtype)}`` of a ``[n, k]`` weight in ``fmt`` (also checks that ``k`` fits it)."""
    check_shape(fmt, n, k)
    if fmt == "int8":
        return {"qs": ((n, k), "int8"), "scale": ((n, 1), "float32")}
    groups = -(-k // 32)
    if fmt == "q8_0":
        return {"qs": ((n, k), "int8"), "d": ((n, groups), "float16")}
    planes = {"qs": ((n, groups * 16), "uint8")}
    if fmt == "q4_k":
        supers = k // SUPER_BLOCK
        return {**planes, "d": ((n, supers), "float16"), "dmin": ((n, supers), "float16"),
                "sc": ((n, groups), "uint8"), "mn": ((n, groups), "uint8")}
    planes["d"] = ((n, groups), "float16")
    if fmt in ("q4_1", "int4"):
        planes["m"] = ((n, groups), "float16")
    return planes


def check_shape(fmt: str, n: int, k: int) -> None:
    """Raise a ``ValueError`` naming the problem when a ``[n, k]`` weight cannot be held in ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    if n < 1 or k < 1:
        raise ValueError(f"{fmt}: a weight needs positive dimensions, got [{n}, {k}]")
    block = SUPER_BLOCK if fmt == "q4_k" else GROUP[fmt]
    if fmt in GGUF_FORMATS and k % block:
        raise ValueError(f"{fmt}: K={k} is not a multiple of the block size {block}")


@dataclass
class QuantizedWeight:
    """A ``[N, K]`` weight held in ``format``: ``planes`` as :func:`plane_specs` lists them."""

    format: str
    shape: tuple[int, int]
    planes: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        n, k = (int(d) for d in self.shape)
        self.shape = (n, k)
        specs = plane_specs(self.format, n, k)
        if set(self.planes) != set(specs):
            raise ValueError(f"{self.format} weight [{n}, {k}]: planes {sorted(self.planes)}, expected {sorted(specs)}")
        for name, (shape, dtype) in specs.items():
            plane = self.planes[name]
            if tuple(plane.shape) != shape or str(plane.dtype) != dtype:
                raise ValueError(f"{self.format} weight [{n}, {k}]: plane {name!r} is {plane.dtype}{list(plane.shape)}, "
                                 f"expected {dtype}{list(shape)}")

    @property
    def nbytes(self) -> int:
        """Bytes of all planes (what the compiled model stores and reads)."""
        return sum(int(p.nbytes) for p in self.planes.values())

    def take_rows(self, rows: np.ndarray) -> "QuantizedWeight":
        """The weight with its rows reordered (``W[rows]``): every plane is row-major, so this is exact."""
        return QuantizedWeight(self.format, (len(rows), self.shape[1]), {k: np.ascontiguousarray(p[rows]) for k, p in self.planes.items()})

    def dequantize(self) -> np.ndarray:
        """``W`` as float32 (:func:`dequantize`)."""
        return dequantize(self)


def unpack_nibbles(qs: np.ndarray, chunk: int) -> np.ndarray:
    """Four-bit values of packed bytes ``[n, bytes]``, GGUF's order: each ``chunk // 2`` bytes hold a
    ``chunk``-element run, the low nibbles its first half and the high nibbles its second."""
    n, nbytes = qs.shape
    half = chunk // 2
    runs = qs.reshape(n, nbytes // half, 1, half) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (runs & np.uint8(0x0F)).reshape(n, nbytes * 2)


def pack_nibbles(q: np.ndarray, chunk: int) -> np.ndarray:
    """The inverse of :func:`unpack_nibbles`: values ``0..15`` ``[n, m]`` (``m`` a multiple of ``chunk``) as bytes."""
    n, m = q.shape
    runs = q.astype(np.uint8).reshape(n, m // chunk, 2, chunk // 2)
    return (runs[:, :, 0, :] | (runs[:, :, 1, :] << np.uint8(4))).reshape(n, m // 2)


def dequantize(weight: QuantizedWeight) -> np.ndarray:
    """The float32 ``[N, K]`` matrix a quantized weight stands for (the numpy reference of the kernels)."""
    fmt, (n, k), p = weight.format, weight.shape, weight.planes
    if fmt == "int8":
        return p["qs"].astype(np.float32) * p["scale"]
    if fmt == "q8_0":
        return (p["qs"].reshape(n, -1, 32).astype(np.float32) * p["d"].astype(np.float32)[..., None]).reshape(n, k)
    chunk = 64 if fmt == "q4_k" else 32
    q = unpack_nibbles(p["qs"], chunk).reshape(n, -1, 32).astype(np.float32)
    if fmt == "q4_0":
        return (p["d"].astype(np.float32)[..., None] * (q - np.float32(8))).reshape(n, k)
    if fmt == "q4_k":
        d = np.repeat(p["d"].astype(np.float32), SUPER_BLOCK // 32, axis=1) * p["sc"].astype(np.float32)
        dm = np.repeat(p["dmin"].astype(np.float32), SUPER_BLOCK // 32, axis=1) * p["mn"].astype(np.float32)
        return (d[..., None] * q - dm[..., None]).reshape(n, k)
    values = p["d"].astype(np.float32)[..., None] * q + p["m"].astype(np.float32)[..., None]
    return values.reshape(n, -1)[:, :k]  # int4: drop the last group's padding
