"""Read and write AIMET encodings JSON files (refs/aimet.md §4).

Readable versions: 0.6.1, 1.0.0, 2.0.0, 2.1.0. Writable: 1.0.0 and 2.0.0, byte for byte as
aimet-onnx 2.42.0 writes them (``json.dump(indent=4, sort_keys=True)``, no trailing newline, floats as
Python's shortest repr of the float64 value), apart from the ``producer`` block.

What the files hold, and what reading makes of it:

* 0.6.1: ``activation_encodings`` / ``param_encodings`` map a name to a list with one dict per channel
  (``min, max, scale, offset, bitwidth, dtype "int", is_symmetric "True"/"False"``); FP16 is
  ``[{"bitwidth": 16, "dtype": "float"}]``. A one-element list is per tensor.
* 1.0.0: the same two sections as lists of ``{name, dtype "INT", bw, is_sym, scale [..], offset [..],
  enc_type PER_TENSOR|PER_CHANNEL|PER_BLOCK|LPBQ}`` (+ ``block_size``); FP16 is
  ``{name, dtype "FLOAT", bw 16, enc_type "PER_TENSOR"}``. Offsets are on the unsigned grid, i.e.
  :attr:`Encoding.offset`. Entries are in AIMET's quantizer order (graph order), not sorted by name.
* 2.0.0 / 2.1.0: one ``encodings`` list of ``{name, output_dtype, y_scale, y_zero_point, axis,
  block_size}`` (ONNX QuantizeLinear terms; ``y_zero_point`` omitted when all zero). AIMET writes the
  params first (each weight followed by its int32 bias), then the activations (forced unsigned), then
  the outputs of data-movement ops, which copy their input's entry. FP16 quantizers are not written.
  LPBQ entries carry ``per_channel_float_scale`` and ``per_block_int_scale`` (2.0.0) or
  ``y_scale = {"x": int scales, "x_scale": float scales, "axis": channel axis}`` (2.1.0); reading turns
  them into the effective per-block grid ``scale = per_block_int_scale * per_channel_float_scale``
  (AIMET's ``LPBQEncoding.scale``), computed in float64.

Axes. 1.0.0 and 0.6.1 files do not say which axis a per-channel encoding runs along: reading puts
``axis=0`` there as a placeholder (QuantSim re-derives the axis from the consuming op when it loads a
file; :func:`fit_to_tensor` does it given the tensor's shape). 1.0.0 PER_BLOCK (and LPBQ) scales come
back flat, in file order, with ``axis=None``: :func:`fit_to_tensor` reshapes them.

Offsets are kept exactly as a 0.6.1/1.0.0 file writes them, sign of zero included: aimet-onnx sometimes
writes ``-0.0`` (mtcnn_rnet ``/prelu4/PRelu_output_0``), and ``write(read(file))`` reproduces it.

Grids a file cannot tell apart: strict symmetric is recognised from its offset (``-(2^(bw-1) - 1)``
with ``is_sym``, or ``y_zero_point = -1`` for a signed dtype); a 2.0.0 activation that was symmetric
is indistinguishable from an asymmetric one (activations are written unsigned).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ..fileio import atomic_path
from .encoding import Encoding, EncodingError, fp16_encoding

VERSIONS = ("0.6.1", "1.0.0", "2.0.0", "2.1.0")
WRITABLE_VERSIONS = ("1.0.0", "2.0.0")

ENC_TYPES = ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK", "LPBQ")
_KEYS_0_6_1 = {"min", "max", "scale", "offset", "bitwidth", "dtype", "is_symmetric"}
_KEYS_1_0_0 = {"name", "dtype", "bw", "is_sym", "scale", "offset", "enc_type", "block_size",
               "compressed_bw", "per_block_int_scale", "zero_point_shift"}
_KEYS_1_0_0_FLOAT = {"name", "dtype", "bw", "enc_type"}
_KEYS_2_0_0 = {"name", "output_dtype", "y_scale", "y_zero_point", "axis", "block_size",
               "per_channel_float_scale", "per_block_int_scale"}
_KEYS_2_1_0_META = {"x", "x_scale", "x_zero_point", "axis", "block_size", "input_dtype"}
_INT_DTYPE = re.compile(r"^(u?)int(\d+)$")


class EncodingsFileError(EncodingError):
    """An encodings file that cannot be read or written; the message names the file, and the entry and
    key when there is one."""

    def __init__(self, path, message: str, entry: str | None = None, key: str | None = None):
        self.path, self.entry, self.key = str(path), entry, key
        where = str(path)
        if entry is not None:
            where += f": entry {entry!r}"
        if key is not None:
            where += f", key {key!r}"
        super().__init__(f"{where}: {message}")


@dataclass
class EncodingsFile:
    """The contents of an encodings file.

    ``encodings`` holds every entry by tensor name (activations and params together, file order).
    ``activation_names`` / ``param_names`` say which section a name came from (0.6.1, 1.0.0); 2.x files
    have one list and do not say, so both sets are empty for them."""

    version: str
    encodings: dict[str, Encoding]
    activation_names: set[str] = field(default_factory=set)
    param_names: set[str] = field(default_factory=set)
    quantizer_args: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# reading


def read_encodings(path) -> EncodingsFile:
    """Parse an AIMET encodings file of any version in :data:`VERSIONS` into :class:`Encoding` objects.
    Anything malformed raises :class:`EncodingsFileError` naming the file, entry and key."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise EncodingsFileError(path, f"the top level is a JSON {type(data).__name__}, not an object")
    if "version" not in data:
        raise EncodingsFileError(path, "missing key 'version'", key="version")
    version = data["version"]
    if version not in VERSIONS:
        raise EncodingsFileError(path, f"unknown version {version!r}; readable: {', '.join(VERSIONS)}",
                                 key="version")
    reader = _Reader(path)
    if version in ("2.0.0", "2.1.0"):
        entries = _section(path, data, "encodings", list)
        for i, entry in enumerate(entries):
            reader.add(*_read_entry_2_x(path, entry, i), section=None)
        return EncodingsFile(version, reader.encodings)
    parse, kind = (_read_section_0_6_1, dict) if version == "0.6.1" else (_read_section_1_0_0, list)
    for section, is_param in (("activation_encodings", False), ("param_encodings", True)):
        for name, encoding in parse(path, _section(path, data, section, kind), is_param):
            reader.add(name, encoding, section="param" if is_param else "activation")
    quantizer_args = data.get("quantizer_args", {})
    if not isinstance(quantizer_args, dict):
        raise EncodingsFileError(path, "'quantizer_args' is not an object", key="quantizer_args")
    return EncodingsFile(version, reader.encodings, reader.activations, reader.params, dict(quantizer_args))


class _Reader:
    """Collects entries, refusing a name that appears twice."""

    def __init__(self, path: Path):
        self.path = path
        self.encodings: dict[str, Encoding] = {}
        self.activations: set[str] = set()
        self.params: set[str] = set()

    def add(self, name: str, encoding: Encoding, section: str | None) -> None:
        if name in self.encodings:
            raise EncodingsFileError(self.path, "the name appears more than once", entry=name, key="name")
        self.encodings[name] = encoding
        if section == "param":
            self.params.add(name)
        elif section == "activation":
            self.activations.add(name)


def _load_json(path: Path):
    """The parsed JSON of ``path``; unreadable files and invalid JSON raise EncodingsFileError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EncodingsFileError(path, f"cannot read the file: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EncodingsFileError(path, f"not valid JSON: {exc}") from None


def _section(path: Path, data: dict, key: str, kind: type):
    if key not in data:
        raise EncodingsFileError(path, f"missing key {key!r} (version {data['version']})", key=key)
    if not isinstance(data[key], kind):
        raise EncodingsFileError(path, f"{key!r} must be a JSON {'array' if kind is list else 'object'}, "
                                 f"not {type(data[key]).__name__}", key=key)
    return data[key]


class _Entry:
    """Checks one entry's keys and values; every failure names the file, entry and key."""

    def __init__(self, path: Path, name: str, raw: dict, context: str = ""):
        self.path, self.name, self.raw, self.context = path, name, raw, context

    def fail(self, message: str, key: str | None = None):
        message = f"{self.context}: {message}" if self.context else message
        raise EncodingsFileError(self.path, message, entry=self.name, key=key)

    def check_keys(self, allowed: set, required: Iterable[str]) -> None:
        unknown = sorted(set(self.raw) - allowed)
        if unknown:
            self.fail(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}",
                      key=unknown[0])
        for key in required:
            if key not in self.raw:
                self.fail("missing key", key=key)

    def integer(self, key: str, value=None) -> int:
        value = self.raw[key] if value is None else value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"must be an integer, not {value!r}", key=key)
        return value

    def number(self, key: str) -> float:
        value = self.raw[key]
        if not _is_number(value):
            self.fail(f"must be a number, not {value!r}", key=key)
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.raw[key]
        if not isinstance(value, bool):
            self.fail(f"must be true or false, not {value!r}", key=key)
        return value

    def string(self, key: str, choices: Iterable[str] | None = None) -> str:
        value = self.raw[key]
        if not isinstance(value, str):
            self.fail(f"must be a string, not {value!r}", key=key)
        if choices is not None and value not in choices:
            self.fail(f"{value!r} is not one of {', '.join(choices)}", key=key)
        return value

    def numbers(self, key: str, value=None, scalar_ok: bool = False) -> np.ndarray:
        """A list (possibly nested, rectangular) of JSON numbers, or a single number if scalar_ok."""
        value = self.raw[key] if value is None else value
        if not isinstance(value, list) and not (scalar_ok and _is_number(value)):
            self.fail(f"must be a list of numbers{' or a number' if scalar_ok else ''}, not {value!r}", key=key)
        if not _all_numbers(value):
            self.fail("contains something that is not a number", key=key)
        try:
            array = np.array(value, dtype=np.float64)
        except ValueError:
            self.fail("is not a rectangular list of numbers", key=key)
        if array.size == 0:
            self.fail("is empty", key=key)
        return array

    def scale(self, key: str, value=None, scalar_ok: bool = False) -> np.ndarray:
        array = self.numbers(key, value, scalar_ok)
        if not np.all(np.isfinite(array)) or not np.all(array > 0):
            bad = float(array[~(np.isfinite(array) & (array > 0))].ravel()[0])
            self.fail(f"scales must be finite and > 0; found {bad!r}", key=key)
        return array

    def integral(self, key: str, value=None, scalar_ok: bool = False) -> np.ndarray:
        array = self.numbers(key, value, scalar_ok)
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            self.fail("must hold whole numbers (refquant has no non-integer offsets)", key=key)
        return array


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _all_numbers(value) -> bool:
    if isinstance(value, list):
        return all(_all_numbers(v) for v in value)
    return _is_number(value)


def _check_bitwidth(entry: _Entry, key: str, bitwidth: int, allow_32: bool) -> int:
    if not (2 <= bitwidth <= 16 or (allow_32 and bitwidth == 32)):
        entry.fail(f"bitwidth {bitwidth} is outside 2..16" + (" (32 only for a symmetric param, i.e. int32 bias)"
                                                              if not allow_32 else " and is not 32"), key=key)
    return bitwidth


def _int_grid(entry: _Entry, key: str, scale: np.ndarray, offset: np.ndarray, bitwidth: int, symmetric: bool,
              axis: int | None = None, block_size: int | None = None) -> Encoding:
    """The Encoding of a file's integer grid; ``offset`` on the unsigned grid. Strict symmetric is
    recognised from its offset -(2^(bw-1) - 1)."""
    scale, offset = np.asarray(scale, dtype=np.float64), np.asarray(offset, dtype=np.float64)
    strict = symmetric and bool(np.all(offset == -((1 << (bitwidth - 1)) - 1)))
    steps = (1 << bitwidth) - 1 - (1 if strict else 0)
    if np.any(offset > 0) or np.any(offset < -steps):
        entry.fail(f"offset {offset.ravel()[np.argmax((offset > 0) | (offset < -steps))]:g} is outside "
                   f"[-{steps}, 0], the range of the {bitwidth}-bit grid", key=key)
    return Encoding(scale, offset, bitwidth, symmetric, steps, axis, block_size)


# ---- 0.6.1


def _read_section_0_6_1(path: Path, section: dict, is_param: bool):
    """(name, Encoding) for each ``name: [per-channel dicts]`` of a 0.6.1 section."""
    for name, channels in section.items():
        entry = _Entry(path, name, {})
        if not isinstance(channels, list) or not channels:
            entry.fail("must be a non-empty list of per-channel objects")
        yield name, _read_entry_0_6_1(path, name, channels, is_param)


def _read_entry_0_6_1(path: Path, name: str, channels: list, is_param: bool) -> Encoding:
    scales, offsets, settings = [], [], set()
    for i, raw in enumerate(channels):
        entry = _Entry(path, name, raw if isinstance(raw, dict) else {}, f"channel {i}" if len(channels) > 1 else "")
        if not isinstance(raw, dict):
            entry.fail(f"{raw!r} is not an object")
        entry.check_keys(_KEYS_0_6_1, ("dtype", "bitwidth"))
        dtype = entry.string("dtype", ("int", "float"))
        bitwidth = entry.integer("bitwidth")
        if dtype == "float":
            if raw != {"bitwidth": 16, "dtype": "float"} or len(channels) != 1:
                entry.fail("only float16 ([{\"bitwidth\": 16, \"dtype\": \"float\"}]) is supported", key="bitwidth")
            return fp16_encoding()
        entry.check_keys(_KEYS_0_6_1, ("scale", "offset", "is_symmetric"))
        symmetric = entry.string("is_symmetric", ("True", "False")) == "True"
        _check_bitwidth(entry, "bitwidth", bitwidth, allow_32=is_param and symmetric)
        for key in ("min", "max", "scale", "offset"):
            if key in raw:
                entry.number(key)
        scales.append(entry.scale("scale", [raw["scale"]])[0])
        offsets.append(entry.integral("offset", [raw["offset"]])[0])
        settings.add((bitwidth, symmetric))
    entry = _Entry(path, name, {})
    if len(settings) > 1:
        entry.fail(f"channels disagree on bitwidth/is_symmetric: {sorted(settings)}", key="bitwidth")
    (bitwidth, symmetric), = settings
    if len(channels) == 1:
        return _int_grid(entry, "offset", np.float64(scales[0]), np.float64(offsets[0]), bitwidth, symmetric)
    return _int_grid(entry, "offset", np.array(scales), np.array(offsets), bitwidth, symmetric, axis=0)


# ---- 1.0.0


def _read_section_1_0_0(path: Path, section: list, is_param: bool):
    """(name, Encoding) for each entry of a 1.0.0 section."""
    for i, raw in enumerate(section):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str):
            raise EncodingsFileError(path, f"entry #{i} has no string 'name'", entry=f"#{i}", key="name")
        yield name, _read_entry_1_0_0(_Entry(path, name, raw), is_param)


def _read_entry_1_0_0(entry: _Entry, is_param: bool) -> Encoding:
    raw = entry.raw
    entry.check_keys(_KEYS_1_0_0, ("dtype", "bw", "enc_type"))
    dtype = entry.string("dtype", ("INT", "FLOAT"))
    enc_type = entry.string("enc_type", ENC_TYPES)
    bitwidth = entry.integer("bw")
    if dtype == "FLOAT":
        entry.check_keys(_KEYS_1_0_0_FLOAT, ())
        if bitwidth != 16 or enc_type != "PER_TENSOR":
            entry.fail("only float16 (bw 16, PER_TENSOR) FLOAT encodings are supported", key="bw")
        return fp16_encoding()
    entry.check_keys(_KEYS_1_0_0, ("is_sym", "scale", "offset"))
    if "zero_point_shift" in raw:
        entry.fail("non-integer offsets (zero_point_shift) are not supported by refquant", key="zero_point_shift")
    if enc_type == "LPBQ":
        return _read_lpbq_1_0_0(entry)
    for key in ("compressed_bw", "per_block_int_scale"):
        if key in raw:
            entry.fail(f"only allowed with enc_type LPBQ, not {enc_type}", key=key)
    symmetric = entry.boolean("is_sym")
    _check_bitwidth(entry, "bw", bitwidth, allow_32=is_param and symmetric)
    scale, offset = entry.scale("scale"), entry.integral("offset")
    if offset.shape != scale.shape:
        entry.fail(f"has {offset.size} value(s) but 'scale' has {scale.size}", key="offset")
    if (enc_type == "PER_BLOCK") != ("block_size" in raw):
        entry.fail("block_size goes with enc_type PER_BLOCK (and only with it)", key="block_size")
    if enc_type == "PER_TENSOR":
        if scale.size != 1:
            entry.fail(f"PER_TENSOR has {scale.size} scales", key="scale")
        return _int_grid(entry, "offset", scale[0], offset[0], bitwidth, symmetric)
    if enc_type == "PER_CHANNEL":
        return _int_grid(entry, "offset", scale, offset, bitwidth, symmetric, axis=0)
    block_size = _block_size(entry)
    return _int_grid(entry, "offset", scale, offset, bitwidth, symmetric, axis=None, block_size=block_size)


def _block_size(entry: _Entry) -> int:
    block_size = entry.integer("block_size")
    if block_size < 1:
        entry.fail(f"must be >= 1, not {block_size}", key="block_size")
    return block_size


def _read_lpbq_1_0_0(entry: _Entry) -> Encoding:
    """1.0.0 LPBQ: ``scale`` per channel, ``per_block_int_scale`` flat in (channel, block) order,
    ``compressed_bw`` the grid's bitwidth (``bw`` is the decompressed one). Effective per-block scale
    = int scale * channel scale, flat, axis None (see :func:`fit_to_tensor`)."""
    entry.check_keys(_KEYS_1_0_0, ("compressed_bw", "per_block_int_scale", "block_size"))
    if entry.boolean("is_sym") is not True:
        entry.fail("LPBQ is symmetric", key="is_sym")
    bitwidth = _check_bitwidth(entry, "compressed_bw", entry.integer("compressed_bw"), allow_32=False)
    channel_scale = entry.scale("scale")
    int_scale = entry.integral("per_block_int_scale")
    if entry.integral("offset").size != channel_scale.size:
        entry.fail("must have one value per channel scale", key="offset")
    if channel_scale.ndim != 1 or int_scale.ndim != 1 or int_scale.size % channel_scale.size:
        entry.fail(f"{int_scale.size} block scales do not split into {channel_scale.size} channels",
                   key="per_block_int_scale")
    scale = (int_scale.reshape(channel_scale.size, -1) * channel_scale[:, None]).ravel()
    entry.scale("per_block_int_scale", scale.tolist())
    offset = np.full(scale.shape, -float(1 << (bitwidth - 1)))
    return _int_grid(entry, "offset", scale, offset, bitwidth, True, axis=None, block_size=_block_size(entry))


# ---- 2.0.0 / 2.1.0


def _read_entry_2_x(path: Path, raw, index: int) -> tuple[str, Encoding]:
    name = raw.get("name") if isinstance(raw, dict) else None
    if not isinstance(name, str):
        raise EncodingsFileError(path, f"entry #{index} has no string 'name'", entry=f"#{index}", key="name")
    entry = _Entry(path, name, raw)
    entry.check_keys(_KEYS_2_0_0, ("output_dtype",))
    dtype = entry.string("output_dtype")
    if dtype.startswith("float") or dtype.startswith("bfloat"):
        entry.check_keys({"name", "output_dtype"}, ())
        if dtype != "float16":
            entry.fail(f"only float16 float encodings are supported, not {dtype}", key="output_dtype")
        return name, fp16_encoding()
    match = _INT_DTYPE.match(dtype)
    if not match:
        entry.fail(f"{dtype!r} is not an integer ONNX type (int8, uint16, ...) or float16", key="output_dtype")
    signed, bitwidth = not match.group(1), int(match.group(2))
    _check_bitwidth(entry, "output_dtype", bitwidth, allow_32=signed)
    if "per_block_int_scale" in raw or "per_channel_float_scale" in raw:
        scale, axis, block_size = _lpbq_2_0_0_scale(entry)
    else:
        entry.check_keys(_KEYS_2_0_0 - {"per_channel_float_scale", "per_block_int_scale"}, ("y_scale",))
        scale, axis, block_size = _y_scale(entry)
    zero_point = np.zeros(scale.shape)
    if "y_zero_point" in raw:
        zero_point = entry.integral("y_zero_point", scalar_ok=True)
        if zero_point.shape != scale.shape:
            entry.fail(f"shape {zero_point.shape} differs from y_scale's {scale.shape}", key="y_zero_point")
        low, high = (-(1 << (bitwidth - 1)), (1 << (bitwidth - 1)) - 1) if signed else (0, (1 << bitwidth) - 1)
        if np.any(zero_point < low) or np.any(zero_point > high):
            bad = zero_point.ravel()[np.argmax((zero_point < low) | (zero_point > high))]
            entry.fail(f"{bad:g} is outside {dtype}'s range [{low}, {high}]", key="y_zero_point")
    offset = 0.0 - zero_point - ((1 << (bitwidth - 1)) if signed else 0)  # 0.0 - 0 is +0.0
    # AIMET: a signed dtype <=> a symmetric quantizer (QcQuantizeOp.use_symmetric_encodings = signed)
    return name, _int_grid(entry, "y_zero_point", scale, offset, bitwidth, signed, axis, block_size)


def _y_scale(entry: _Entry) -> tuple[np.ndarray, int | None, int | None]:
    """(scale, axis, block_size) of a plain or 2.1.0-LPBQ ``y_scale``."""
    raw = entry.raw
    block_size = _block_size(entry) if "block_size" in raw else None
    if isinstance(raw["y_scale"], dict):
        if block_size is None:
            entry.fail("a y_scale object (LPBQ) needs block_size", key="block_size")
        scale = _lpbq_2_1_0_scale(entry, raw["y_scale"])
    else:
        scale = entry.scale("y_scale", scalar_ok=True)
    axis = entry.integer("axis") if "axis" in raw else None
    if scale.ndim == 0:
        if axis is not None or block_size is not None:
            entry.fail("a single y_scale (per tensor) takes no axis/block_size", key="axis")
        return scale, None, None
    if block_size is None:
        if scale.ndim != 1:
            entry.fail(f"a {scale.ndim}-D y_scale needs block_size", key="y_scale")
        if axis is None:
            if scale.size == 1:  # AIMET squeezes a one-element list without axis to per tensor
                return scale.reshape(()), None, None
            entry.fail(f"{scale.size} scales (per channel) need an axis", key="axis")
        return scale, axis, None
    if axis is None:
        entry.fail("a per-block encoding needs an axis", key="axis")
    if not -scale.ndim <= axis < scale.ndim:
        entry.fail(f"axis {axis} is out of range for a {scale.ndim}-D y_scale", key="axis")
    return scale, axis % scale.ndim, block_size


def _lpbq_2_0_0_scale(entry: _Entry) -> tuple[np.ndarray, int, int]:
    """2.0.0 LPBQ: ``per_block_int_scale`` (blocks along ``axis``) times ``per_channel_float_scale``
    (same rank with 1 on the block axis, or 1-D for a 2-D weight)."""
    entry.check_keys(_KEYS_2_0_0 - {"y_scale"}, ("per_channel_float_scale", "per_block_int_scale", "axis",
                                                "block_size"))
    int_scale = entry.integral("per_block_int_scale")
    channel_scale = entry.scale("per_channel_float_scale")
    block_axis = entry.integer("axis")
    if not -int_scale.ndim <= block_axis < int_scale.ndim:
        entry.fail(f"axis {block_axis} is out of range for {int_scale.ndim}-D per_block_int_scale", key="axis")
    block_axis %= int_scale.ndim
    if channel_scale.ndim == 1 and int_scale.ndim == 2:
        shape = [1, 1]
        shape[1 - block_axis] = -1
        channel_scale = channel_scale.reshape(shape)
    try:
        scale = int_scale * channel_scale
    except ValueError:
        entry.fail(f"shape {channel_scale.shape} does not broadcast against per_block_int_scale "
                   f"{int_scale.shape}", key="per_channel_float_scale")
    if scale.shape != int_scale.shape:
        entry.fail(f"shape {channel_scale.shape} is not a per-channel shape for {int_scale.shape}",
                   key="per_channel_float_scale")
    entry.scale("per_block_int_scale", scale.tolist())
    return scale, block_axis, _block_size(entry)


def _lpbq_2_1_0_scale(entry: _Entry, meta: dict) -> np.ndarray:
    """2.1.0 double quantization: ``y_scale = (x - x_zero_point) * x_scale``, ``x_scale`` (and
    ``x_zero_point``) running along the meta ``axis``, repeated ``block_size`` times if given, as AIMET's
    ``_parse_meta_encoding`` + ``_dequantize_const``."""
    unknown = sorted(set(meta) - _KEYS_2_1_0_META)
    if unknown:
        entry.fail(f"unknown key(s) {', '.join(map(repr, unknown))} in y_scale", key=f"y_scale.{unknown[0]}")
    for key in ("x", "x_scale"):
        if key not in meta:
            entry.fail("missing key", key=f"y_scale.{key}")
    sub = _Entry(entry.path, entry.name, {f"y_scale.{k}": v for k, v in meta.items()})
    x = sub.integral("y_scale.x")
    x_scale = sub.scale("y_scale.x_scale").ravel()
    x_zero_point = sub.integral("y_scale.x_zero_point", scalar_ok=True).ravel() if "x_zero_point" in meta else 0.0
    if "axis" not in meta:
        if x_scale.size != 1 or np.size(x_zero_point) > 1:
            entry.fail(f"{x_scale.size} x_scale values need an axis", key="y_scale.axis")
        return (x - x_zero_point) * x_scale[0]
    axis = sub.integer("y_scale.axis")
    if not -x.ndim <= axis < x.ndim:
        entry.fail(f"axis {axis} is out of range for a {x.ndim}-D x", key="y_scale.axis")
    per_axis = [x_scale, np.broadcast_to(x_zero_point, x_scale.shape)]
    if "block_size" in meta:
        per_axis = [np.repeat(a, sub.integer("y_scale.block_size"))[: x.shape[axis]] for a in per_axis]
    if per_axis[0].size != x.shape[axis]:
        entry.fail(f"{per_axis[0].size} values for axis {axis} of size {x.shape[axis]}", key="y_scale.x_scale")
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - per_axis[1].reshape(shape)) * per_axis[0].reshape(shape)


# --------------------------------------------------------------------------------------------------
# fitting a file's encoding to its tensor


def fit_to_tensor(encoding: Encoding, shape, channel_axis: int, block_axis: int | None = None) -> Encoding:
    """The encoding with the axes of the tensor (of ``shape``) it quantizes, as QuantSim needs it.

    Per channel: checks the number of scales against ``shape[channel_axis]`` and sets ``axis``. Per block:
    returns the scale in refquant's layout (``shape`` with ``block_axis`` divided into blocks). A 1.0.0
    file's flat PER_BLOCK/LPBQ scales are in (channel, block) order, which AIMET writes transposed for a
    2-D weight with ``channel_axis`` 1 (MatMul); a 2.x file's per-block scale may have 1s on the other axes
    (AIMET's conv layout ``(O, I/bs, 1, 1)``) and is broadcast. Per tensor and FP16: unchanged."""
    shape = tuple(int(d) for d in shape)
    if encoding.kind != "int" or (encoding.axis is None and encoding.block_size is None):
        return encoding
    rank = len(shape)
    channel_axis %= rank
    scale = np.asarray(encoding.scale, dtype=np.float64)
    offset = np.broadcast_to(np.asarray(encoding.offset, dtype=np.float64), scale.shape)
    if encoding.block_size is None:
        if scale.size != shape[channel_axis]:
            raise EncodingError(f"{scale.size} per-channel scales for axis {channel_axis} of a tensor of shape "
                                f"{shape}")
        return Encoding(scale.reshape(-1), offset.reshape(-1), encoding.bitwidth, encoding.symmetric,
                        encoding.steps, channel_axis)
    if encoding.axis is not None and scale.ndim > 1:
        if block_axis is not None and block_axis % rank != encoding.axis % rank:
            raise EncodingError(f"the encoding's blocks run along axis {encoding.axis}, not {block_axis}")
        block_axis = encoding.axis
    if block_axis is None:
        raise EncodingError("a flat (1.0.0) per-block encoding needs block_axis")
    block_axis %= rank
    blocks = -(-shape[block_axis] // encoding.block_size)
    full = list(shape)
    full[block_axis] = blocks
    if scale.ndim == 1:
        compact = [d if a == channel_axis else blocks if a == block_axis else 1 for a, d in enumerate(shape)]
        if scale.size != math.prod(compact):
            raise EncodingError(f"{scale.size} block scales do not fit a tensor of shape {shape} with block_size "
                                f"{encoding.block_size} on axis {block_axis}")
        if rank == 2 and channel_axis == 1:
            scale, offset = (a.reshape(compact[::-1]).T for a in (scale, offset))
        else:
            scale, offset = scale.reshape(compact), offset.reshape(compact)
    try:
        scale, offset = (np.broadcast_to(a, full).copy() for a in (scale, offset))
    except ValueError:
        raise EncodingError(f"block scale shape {scale.shape} does not fit {tuple(full)} (tensor {shape}, "
                            f"block_size {encoding.block_size} on axis {block_axis})") from None
    return Encoding(scale, offset, encoding.bitwidth, encoding.symmetric, encoding.steps, block_axis,
                    encoding.block_size)


# --------------------------------------------------------------------------------------------------
# writing


def write_encodings(path, activations: Mapping[str, Encoding], params: Mapping[str, Encoding],
                    version: str = "1.0.0", quantizer_args: dict | None = None,
                    extra_2_0_0: Mapping[str, Encoding] | None = None,
                    order: Iterable[str] | None = None) -> None:
    """Write an AIMET encodings file (atomically; the parent directory is created).

    1.0.0: ``activation_encodings`` and ``param_encodings`` in the mappings' order, plus ``quantizer_args``
    (``{}`` if None); ``extra_2_0_0`` is ignored (1.0.0 files have no such entries).
    2.0.0: one ``encodings`` list: params (signed dtype iff symmetric, as AIMET), activations (forced
    unsigned), then ``extra_2_0_0``: int32 biases (bitwidth 32 -> ``int32``) and outputs of data-movement
    ops (written like activations, unsigned). FP16 encodings are left out, as AIMET does.
    ``order``: names in the order to write them (AIMET's quantizer order puts each int32 bias right
    after its weight); names not listed keep the default order, after the listed ones.
    Errors (version, a name twice, an impossible encoding, an unwritable path) raise EncodingsFileError."""
    path = Path(path)
    if version not in WRITABLE_VERSIONS:
        raise EncodingsFileError(path, f"cannot write version {version!r}; refquant writes "
                                 f"{' and '.join(WRITABLE_VERSIONS)}", key="version")
    extra = dict(extra_2_0_0 or {}) if version == "2.0.0" else {}
    groups = {"activation": dict(activations), "param": dict(params), "extra": extra}
    _check_names(path, groups)
    for group in groups.values():
        for name, encoding in group.items():
            _check_for_writing(path, name, encoding)
            if version == "2.0.0" and encoding.block_size is not None and encoding.axis is None:
                raise EncodingsFileError(path, "a per-block encoding without axis (read flat from a 1.0.0 file) "
                                         "cannot be written as 2.0.0; place it with fit_to_tensor first",
                                         entry=name, key="axis")
    rank = {name: i for i, name in enumerate(order or ())}
    doc = {"version": version, "producer": _producer()}
    if version == "1.0.0":
        doc["activation_encodings"] = _ordered([_entry_1_0_0(n, e) for n, e in groups["activation"].items()], rank)
        doc["param_encodings"] = _ordered([_entry_1_0_0(n, e) for n, e in groups["param"].items()], rank)
        doc["quantizer_args"] = dict(quantizer_args or {})
    else:
        entries = [_entry_2_0_0(n, e, signed=e.symmetric) for n, e in groups["param"].items()]
        entries += [_entry_2_0_0(n, e, signed=False) for n, e in groups["activation"].items()]
        entries += [_entry_2_0_0(n, e, signed=e.bitwidth == 32) for n, e in extra.items()]
        doc["encodings"] = _ordered([e for e in entries if e is not None], rank)
    _write_json(path, doc)


def _producer() -> dict:
    import refquant

    return {"package": "refquant", "version": getattr(refquant, "__version__", "0.1.0")}


def _check_names(path: Path, groups: dict) -> None:
    seen: dict[str, str] = {}
    for group, encodings in groups.items():
        for name in encodings:
            if not isinstance(name, str):
                raise EncodingsFileError(path, f"tensor names must be strings, not {name!r}", entry=repr(name))
            if name in seen:
                raise EncodingsFileError(path, f"given both as {seen[name]} and as {group}", entry=name, key="name")
            seen[name] = group


def _check_for_writing(path: Path, name: str, encoding: Encoding) -> None:
    """Refuse an encoding that would make an invalid file."""
    if not isinstance(encoding, Encoding):
        raise EncodingsFileError(path, f"not an Encoding: {type(encoding).__name__}", entry=name)
    if encoding.kind == "float":
        return
    if not (2 <= encoding.bitwidth <= 16 or (encoding.bitwidth == 32 and encoding.symmetric)):
        raise EncodingsFileError(path, f"bitwidth {encoding.bitwidth} is outside 2..16 (32: symmetric bias only)",
                                 entry=name, key="bw")
    scale = np.asarray(encoding.scale, dtype=np.float64)
    if scale.size == 0 or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        raise EncodingsFileError(path, "scales must be finite and > 0", entry=name, key="scale")
    offset = np.asarray(encoding.offset, dtype=np.float64)
    try:
        offset = np.broadcast_to(offset, scale.shape)
    except ValueError:
        raise EncodingsFileError(path, f"offset shape {offset.shape} does not match scale shape {scale.shape}",
                                 entry=name, key="offset") from None
    if not np.all(offset == np.round(offset)) or np.any(offset > 0) or np.any(offset < -encoding.steps):
        raise EncodingsFileError(path, f"offsets must be whole numbers in [-{encoding.steps}, 0]", entry=name,
                                 key="offset")
    if encoding.block_size is None and encoding.axis is None and scale.size != 1:
        raise EncodingsFileError(path, f"{scale.size} scales but no axis", entry=name, key="scale")
    if encoding.block_size is None and encoding.axis is not None and scale.ndim != 1:
        raise EncodingsFileError(path, f"a per-channel scale must be 1-D, not {scale.shape}", entry=name,
                                 key="scale")


def _scale_offset(encoding: Encoding) -> tuple[np.ndarray, np.ndarray]:
    scale = np.asarray(encoding.scale, dtype=np.float64)
    offset = np.broadcast_to(np.asarray(encoding.offset, dtype=np.float64), scale.shape)
    return scale, offset


def _entry_1_0_0(name: str, encoding: Encoding) -> dict:
    """AIMET's ``_to_1_0_0``: unsigned-grid offsets as floats, flat scale lists."""
    if encoding.kind == "float":
        return {"name": name, "dtype": "FLOAT", "bw": 16, "enc_type": "PER_TENSOR"}
    scale, offset = _scale_offset(encoding)
    entry = {"name": name, "dtype": "INT", "bw": int(encoding.bitwidth), "is_sym": bool(encoding.symmetric)}
    if encoding.block_size is not None:
        if scale.ndim == 2 and encoding.axis == 0:  # blocks along axis 0, channels along 1: AIMET writes (C, blocks)
            scale, offset = scale.T, offset.T
        entry.update(enc_type="PER_BLOCK", block_size=int(encoding.block_size))
    else:
        entry["enc_type"] = "PER_TENSOR" if encoding.axis is None else "PER_CHANNEL"
    entry.update(scale=scale.ravel().tolist(), offset=offset.ravel().tolist())
    return entry


def _entry_2_0_0(name: str, encoding: Encoding, signed: bool) -> dict | None:
    """AIMET's ``_to_2_0_0`` (+ ``_to_unsigned_encoding`` for activations): y_zero_point = minus the
    offset in the dtype written, as ints, left out when all zero. None for FP16 (not written)."""
    if encoding.kind == "float":
        return None
    scale, offset = _scale_offset(encoding)
    zero_point = (-offset - ((1 << (encoding.bitwidth - 1)) if signed else 0)).astype(np.int64)
    entry = {"name": name, "output_dtype": f"{'' if signed else 'u'}int{encoding.bitwidth}"}
    if encoding.block_size is not None:
        entry.update(axis=int(encoding.axis), block_size=int(encoding.block_size))
    elif encoding.axis is not None:
        entry["axis"] = int(encoding.axis)
    else:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    entry["y_scale"] = scale.tolist()
    if np.any(zero_point != 0):
        entry["y_zero_point"] = zero_point.tolist()
    return entry


def _ordered(entries: list[dict], rank: dict[str, int]) -> list[dict]:
    """Entries sorted by their position in ``rank``; unlisted ones after, in their given order."""
    return sorted(entries, key=lambda e: rank.get(e["name"], len(rank))) if rank else entries


def _write_json(path: Path, doc: dict) -> None:
    """``doc`` as AIMET's save_json_yaml formats it (indent 4, sorted keys, no trailing newline)."""
    try:
        text = json.dumps(doc, indent=4, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EncodingsFileError(path, f"cannot be written as JSON: {exc}") from None
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise EncodingsFileError(path, f"cannot write the file: {exc.strerror or exc}") from None
