"""Quantization encodings, exactly as AIMET computes and stores them (refs/aimet.md §5.1).

An integer encoding is a uniform grid ``x' = scale * (q + offset)`` with ``q`` in ``[0, num_steps]``
(the "unsigned grid") and ``offset <= 0`` an integer, so zero is always exactly representable.
``num_steps = 2^bw - 1`` (``2^bw - 2`` for strict symmetric). ``scale`` and ``offset`` are float64
arrays: shape ``()`` per tensor, ``(C,)`` per channel along ``axis``, or the tensor's shape with
dimension ``axis`` divided into ``ceil(D / block_size)`` blocks per block.

An FP16 encoding (``kind="float"``) is a cast to half precision and back; it has no scale.

ONNX stores ``(y_scale, y_zero_point)`` of a signed or unsigned integer type instead: the one
conversion between the two is :meth:`Encoding.to_onnx` / :func:`from_onnx`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RefquantError

FLT_MAX = float(np.finfo(np.float32).max)
# AIMET's smallest step: an all-zero tensor gets scale 2^-23 (float32 epsilon), not a division by zero
MIN_SCALE = float(np.finfo(np.float32).eps)


class EncodingError(RefquantError):
    """An encoding that cannot exist: a bitwidth outside 2..16 (32 for bias), a non-positive scale..."""


def check_bitwidth(bitwidth: int, allow_32: bool = False, where: str = "") -> int:
    """The bitwidth as an int, or an EncodingError naming ``where``."""
    ok = isinstance(bitwidth, (int, np.integer)) and (2 <= bitwidth <= 16 or (allow_32 and bitwidth == 32))
    if not ok:
        allowed = "2..16 (or 32 for bias)" if allow_32 else "2..16"
        raise EncodingError(f"{where + ': ' if where else ''}bitwidth {bitwidth!r} is outside {allowed}")
    return int(bitwidth)


def num_steps(bitwidth: int, symmetric: bool, strict_symmetric: bool = False) -> int:
    """Number of steps of the grid: 2^bw - 1, one fewer for strict symmetric (e.g. int8 [-127, 127])."""
    return (1 << bitwidth) - 1 - (1 if symmetric and strict_symmetric else 0)


def _round_half_away(x):
    """C's round(): ties away from zero (AIMET's C++ uses it for offsets)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


@dataclass(frozen=True)
class Encoding:
    """One quantizer's grid. ``min``/``max`` are the representable range ``scale*offset``,
    ``scale*(offset + num_steps)``."""

    scale: np.ndarray
    offset: np.ndarray
    bitwidth: int
    symmetric: bool
    steps: int
    axis: int | None = None
    block_size: int | None = None
    kind: str = "int"  # "int" or "float" (FP16 cast)

    @property
    def min(self) -> np.ndarray:
        return self.scale * self.offset

    @property
    def max(self) -> np.ndarray:
        return self.scale * (self.offset + self.steps)

    @property
    def per_channel(self) -> bool:
        return self.axis is not None and self.block_size is None

    @property
    def strict_symmetric(self) -> bool:
        return self.kind == "int" and self.symmetric and self.steps == (1 << self.bitwidth) - 2

    @property
    def signed_symmetric(self) -> bool:
        """A symmetric grid centred on zero (offset = -numNeg), as opposed to an unsigned-symmetric one."""
        return self.kind == "int" and self.symmetric and bool(np.all(self.offset < 0))

    def to_onnx(self, signed: bool | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """``(y_scale float32, y_zero_point, onnx type name)``. Unsigned: ``zp = -offset``; signed:
        ``zp = -offset - 2^(bw-1)`` (0 for a symmetric grid). ``signed=None``: signed iff symmetric."""
        if self.kind != "int":
            raise EncodingError("an FP16 encoding has no ONNX scale/zero point (it is a cast)")
        if signed is None:
            signed = self.signed_symmetric
        if self.bitwidth not in (2, 4, 8, 16, 32):
            raise EncodingError(f"{self.bitwidth}-bit grids have no ONNX integer type (2, 4, 8, 16 do)")
        name = f"{'int' if signed else 'uint'}{self.bitwidth}"
        if not signed:
            zero_point = -self.offset
        elif self.signed_symmetric:
            zero_point = np.zeros_like(self.offset)
        else:
            zero_point = -self.offset - (1 << (self.bitwidth - 1))
        storage = {"int2": np.int8, "uint2": np.uint8, "int4": np.int8, "uint4": np.uint8, "int8": np.int8,
                   "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32}[name]
        return self.scale.astype(np.float32), np.asarray(zero_point).astype(storage), name

    def with_scale(self, scale) -> "Encoding":
        return Encoding(np.asarray(scale, dtype=np.float64), self.offset, self.bitwidth, self.symmetric,
                        self.steps, self.axis, self.block_size, self.kind)


def fp16_encoding() -> Encoding:
    """FP16 as a quantizer kind: x' = float32(float16(x))."""
    return Encoding(np.float64(0.0), np.float64(0.0), 16, True, 0, kind="float")


def from_min_max(min_value, max_value, bitwidth: int, symmetric: bool, strict_symmetric: bool = False,
                 unsigned_symmetric: bool = False, axis: int | None = None,
                 block_size: int | None = None) -> Encoding:
    """AIMET's getComputedEncodings (refs/aimet.md §5.1), elementwise over channels/blocks.

    min, max are widened to include 0. Symmetric: ``scale = max(max/numPos, -min/numNeg)``,
    ``offset = -numNeg`` (scale rounded to float32 as AIMET stores it); asymmetric (and unsigned symmetric on data >= 0):
    ``scale = (max-min)/numSteps``, ``offset = clamp(round(min/scale), -numSteps, 0)``.
    """
    bitwidth = check_bitwidth(bitwidth, allow_32=True)
    lo = np.clip(np.asarray(min_value, dtype=np.float64), -0.99 * FLT_MAX, 0.0)
    hi = np.clip(np.asarray(max_value, dtype=np.float64), 0.0, 0.99 * FLT_MAX)
    if lo.shape != hi.shape:
        raise EncodingError(f"min and max have different shapes {lo.shape} and {hi.shape}")
    steps = num_steps(bitwidth, symmetric, strict_symmetric)
    use_symmetric = symmetric & ~(unsigned_symmetric & (lo >= 0)) if symmetric else np.zeros(lo.shape, bool)

    num_pos = steps // 2
    num_neg = steps - num_pos
    # AIMET stores symmetric scales as float32 (measured: all per-channel and per-tensor weight scales
    # of aimet_samples are float32(double formula)); asymmetric ones keep double precision
    sym_scale = np.maximum(hi / (num_pos + (1 if steps == 3 else 0)), -lo / num_neg)
    sym_scale = sym_scale.astype(np.float32).astype(np.float64)
    asym_scale = (hi - lo) / steps
    scale = np.maximum(np.where(use_symmetric, sym_scale, asym_scale), MIN_SCALE)
    asym_offset = np.clip(_round_half_away(lo / scale), -steps, 0)
    offset = np.where(use_symmetric, -float(num_neg), asym_offset) + 0.0  # + 0.0: no -0.0 offsets
    return Encoding(scale, offset, bitwidth, bool(symmetric), steps, axis, block_size)


def from_onnx(scale, zero_point, type_name: str, axis: int | None = None, block_size: int | None = None,
              symmetric: bool | None = None) -> Encoding:
    """The encoding of an ONNX ``(y_scale, y_zero_point)`` of type ``type_name`` ('int8', 'uint16', ...)."""
    signed = type_name.startswith("int")
    bitwidth = check_bitwidth(int(type_name.lstrip("uint")), allow_32=True)
    zero_point = np.asarray(zero_point, dtype=np.float64)
    offset = -zero_point - (1 << (bitwidth - 1)) if signed else -zero_point
    if symmetric is None:
        symmetric = bool(signed and np.all(zero_point == 0))
    scale = np.asarray(scale, dtype=np.float64)
    offset = np.broadcast_to(offset, scale.shape).astype(np.float64) + 0.0
    return Encoding(scale, offset, bitwidth, symmetric, (1 << bitwidth) - 1, axis, block_size)


def bias_encoding(input_scale, weight_scale, axis: int | None = 0) -> Encoding:
    """int32 bias grid: ``scale = input_scale * weight_scale`` (per output channel), zero point 0,
    multiplied in float32 as AIMET does (exact on every aimet_samples bias)."""
    scale = (np.asarray(input_scale, dtype=np.float32) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float64)
    offset = np.full(scale.shape, -float(1 << 31))
    return Encoding(scale, offset, 32, True, (1 << 32) - 1, axis if scale.ndim else None)
