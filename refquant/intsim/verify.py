"""Verify a target's per-tensor dump against the integer program, layer by layer.

    report = verify(sim, "dump_dir", requant="ort")     # sim: a QuantSim with the target's encodings
    print(report)                                       # per tensor: exact, or how many elements by how many steps
    report.first_difference                             # the first tensor (graph order) that differs
    report.explaining                                   # schemes that reproduce every dumped tensor

The dump format (a folder; docs/numerics.md and the README show an example):

* ``NAME.npy``: one NumPy file per tensor, the file name being the tensor name escaped with
  :func:`tensor_filename` (UTF-8 percent-encoding of every character outside ``A-Z a-z 0-9 _ . - ~``, so
  ``/c1/Conv_output_0`` is ``%2Fc1%2FConv_output_0.npy`` and ``x:0`` is ``x%3A0.npy``). Integer arrays are codes,
  float arrays dequantized values.
* A graph input may be dumped as codes (compared and fed) or as the float input itself (fed to the program,
  which quantizes it; not compared).
* ``manifest.json`` (required for ``.raw`` files, optional for ``.npy``)::

      {"tensors": [{"name": "/c1/Conv_output_0", "file": "t0.raw", "dtype": "uint8", "shape": [1, 8, 6, 6],
                    "values": "codes"}, ...]}

  ``file`` is relative to the folder; ``dtype`` a NumPy type name (little-endian for .raw); ``values`` is
  ``"codes"`` or ``"dequantized"`` (default for .npy: codes when the dtype is an integer type). A .raw file is
  C-ordered with exactly ``prod(shape) * itemsize`` bytes.

Codes are compared on the program's grid: a tensor's codes must have its codes dtype (uint8/uint16, as
onnxruntime's U8 activations), or the signed type of the same width, read as ``code + 2^(bits-1)`` (the same
grid with the zero point shifted, as a target that stores asymmetric activations as int8 does). Dequantized
values are mapped back with ``round(x / scale) + zero_point`` and must lie on the grid (within 0.01 step: a
float32 product ``(q - zp) * scale`` is within ``2^-24 * 2^16 < 0.004`` steps of it).

The dump's graph inputs feed the program. With ``teacher_forcing`` (the default) every dumped tensor replaces
what the program computed before its consumers read it, so each layer is checked on the target's own inputs:
a difference is local to the layer that shows it (the first tensor that differs is the same either way).
Every differing tensor is re-checked under each requantization scheme in :data:`TRY_SCHEMES`; the report
lists the schemes that reproduce it exactly.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np

from ..errors import OpError, RefquantError
from .lowering import LoweringError, QTensor
from .overflow import AccumulatorOverflowError, raise_for_layer

TRY_SCHEMES = ("ort", "onnx_reference", "tflite_double", "tflite_single", "exact(half_even)", "exact(half_up)",
               "exact(half_away)")
MANIFEST = "manifest.json"
GRID_TOLERANCE = 0.01  # steps; float32 dequantized values are within 2^-24 * 2^16 < 0.004 steps of the grid


class DumpError(RefquantError):
    """A target dump that cannot be read or does not fit the model (names the file)."""


# ----------------------------------------------------------------------------------------------- file names
def tensor_filename(name: str, suffix: str = ".npy") -> str:
    """The file name of a tensor in a dump: UTF-8 percent-encoding of every character outside
    ``A-Z a-z 0-9 _ . - ~`` (``/`` -> ``%2F``, ``:`` -> ``%3A``, ``%`` -> ``%25``), plus ``suffix``."""
    return quote(name, safe="") + suffix


def tensor_name_from_filename(filename: str) -> str:
    """The inverse of :func:`tensor_filename` (the suffix removed)."""
    stem = filename[:-len(Path(filename).suffix)] if Path(filename).suffix else filename
    return unquote(stem)


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class DumpTensor:
    name: str
    path: Path
    array: np.ndarray
    values: str  # "codes" | "dequantized"


def write_dump(directory, tensors: dict[str, np.ndarray]) -> Path:
    """Write ``{name: array}`` as a dump of .npy files (names escaped with :func:`tensor_filename`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in tensors.items():
        np.save(directory / tensor_filename(name), np.asarray(array), allow_pickle=False)
    return directory


def read_dump(directory) -> dict[str, DumpTensor]:
    """Every tensor of a dump folder, keyed by tensor name (see the module docstring for the format)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DumpError(f"target dump {directory}: not a folder")
    tensors: dict[str, DumpTensor] = {}
    listed: set[str] = set()
    manifest = directory / MANIFEST
    if manifest.is_file():
        for entry in _manifest_entries(manifest):
            tensor = _read_entry(directory, manifest, entry)
            if tensor.name in tensors:
                raise DumpError(f"{manifest}: tensor {tensor.name!r} is listed twice")
            tensors[tensor.name] = tensor
            listed.add(tensor.path.name)
    for path in sorted(directory.iterdir()):
        if path.name in listed or path.name == MANIFEST or path.is_dir():
            continue
        if path.suffix == ".raw":
            raise DumpError(f"{path}: a .raw file needs an entry in {MANIFEST} (name, file, dtype, shape, values)")
        if path.suffix != ".npy":
            continue
        name = tensor_name_from_filename(path.name)
        array = _load_npy(path)
        if name in tensors:
            raise DumpError(f"{path}: tensor {name!r} is already given by {tensors[name].path.name}")
        tensors[name] = DumpTensor(name, path, array, "codes" if array.dtype.kind in "iu" else "dequantized")
    if not tensors:
        raise DumpError(f"target dump {directory}: no .npy files and no {MANIFEST}")
    return tensors


def _manifest_entries(manifest: Path) -> list[dict]:
    try:
        data = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DumpError(f"{manifest}: not a readable JSON file ({exc})") from None
    entries = data.get("tensors") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DumpError(f"{manifest}: expected {{\"tensors\": [{{\"name\": ..., \"file\": ..., ...}}, ...]}}")
    return entries


def _read_entry(directory: Path, manifest: Path, entry: dict) -> DumpTensor:
    where = f"{manifest} entry {entry.get('name', entry)!r}"
    for key in ("name", "file"):
        if not isinstance(entry.get(key), str):
            raise DumpError(f"{where}: {key!r} (a string) is required")
    path = directory / entry["file"]
    if not path.is_file():
        raise DumpError(f"{where}: file {path} does not exist")
    dtype = None
    if "dtype" in entry:
        try:
            dtype = np.dtype(entry["dtype"])
        except TypeError:
            raise DumpError(f"{path}: unknown dtype {entry['dtype']!r} in {manifest.name}") from None
        if dtype.kind not in "iuf":
            raise DumpError(f"{path}: dtype {dtype} is neither an integer nor a float type")
    shape = entry.get("shape")
    if shape is not None and (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)):
        raise DumpError(f"{path}: shape must be a list of non-negative integers, got {shape!r}")
    if path.suffix == ".npy":
        array = _load_npy(path)
        if dtype is not None and array.dtype != dtype:
            raise DumpError(f"{path}: holds {array.dtype} but {manifest.name} says {dtype}")
        if shape is not None and list(array.shape) != shape:
            raise DumpError(f"{path}: has shape {list(array.shape)} but {manifest.name} says {shape}")
    else:
        if dtype is None or shape is None:
            raise DumpError(f"{where}: a raw file needs 'dtype' and 'shape'")
        dtype = dtype.newbyteorder("<")
        expected = math.prod(shape) * dtype.itemsize
        size = path.stat().st_size
        if size != expected:
            raise DumpError(f"{path}: {size} bytes, but shape {shape} of {dtype.name} needs {expected}")
        array = np.fromfile(path, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    values = entry.get("values", "codes" if array.dtype.kind in "iu" else "dequantized")
    if values not in ("codes", "dequantized"):
        raise DumpError(f"{where}: 'values' must be \"codes\" or \"dequantized\", got {values!r}")
    if values == "codes" and array.dtype.kind not in "iu":
        raise DumpError(f"{path}: values are codes but the dtype is {array.dtype}")
    if values == "dequantized" and array.dtype.kind != "f":
        raise DumpError(f"{path}: values are dequantized floats but the dtype is {array.dtype}")
    return DumpTensor(entry["name"], path, array, values)


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DumpError(f"{path}: cannot read as .npy ({exc})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iuf":
        raise DumpError(f"{path}: holds {getattr(array, 'dtype', type(array))}; expected integer codes or floats")
    return array


# ----------------------------------------------------------------------------------------------- on the grid
def dump_codes(tensor: DumpTensor, q: QTensor) -> np.ndarray:
    """The dump's values as codes of the program's grid ``q`` (dtype ``q.dtype``)."""
    lo, hi = q.qrange
    bits = 8 * q.dtype.itemsize
    a = tensor.array
    if tensor.values == "codes":
        if a.dtype == q.dtype:
            return a
        if a.dtype.kind in "iu" and a.dtype.itemsize == q.dtype.itemsize:
            # the signed/unsigned counterpart: the same grid with the zero point shifted by 2^(bits-1)
            shift = (1 << (bits - 1)) * (1 if q.dtype.kind == "u" else -1)
            return (a.astype(np.int64) + shift).astype(q.dtype)
        raise DumpError(f"{tensor.path}: tensor {tensor.name!r} holds {a.dtype} codes; the model's grid is "
                        f"{q.dtype} (scale {float(q.scale):.6g}, zero point {q.zero_point}); give {q.dtype} or "
                        f"{np.dtype(q.dtype.name.lstrip('u') if q.dtype.kind == 'u' else 'u' + q.dtype.name)} codes")
    t = a.astype(np.float64) / np.float64(q.scale)
    steps = np.rint(t)
    off = np.abs(t - steps) > GRID_TOLERANCE
    codes = steps + q.zero_point
    if np.any(off) or not np.all(np.isfinite(t)):
        raise DumpError(f"{tensor.path}: {int(np.sum(off | ~np.isfinite(t)))} of {a.size} dequantized values of "
                        f"{tensor.name!r} are not on its grid (scale {float(q.scale):.6g}, zero point "
                        f"{q.zero_point}); were they dumped with other encodings?")
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise DumpError(f"{tensor.path}: dequantized values of {tensor.name!r} fall outside the {q.dtype} range "
                        f"[{lo}, {hi}] of its grid (codes {int(codes.min())}..{int(codes.max())})")
    return codes.astype(q.dtype)


# ----------------------------------------------------------------------------------------------- the report
@dataclass
class TensorCheck:
    """One dumped tensor against the program: ``steps`` counts elements by signed difference dump - ours."""

    tensor: str
    node: str
    op_type: str
    size: int
    differ: int = 0
    steps: dict = field(default_factory=dict)
    first_index: tuple | None = None
    dump_code: int | None = None
    our_code: int | None = None
    schemes: list = field(default_factory=list)  # schemes that reproduce this tensor exactly (when it differs)

    @property
    def exact(self) -> bool:
        return self.differ == 0

    def histogram(self) -> str:
        return " ".join(f"{k:+d}:{v}" for k, v in sorted(self.steps.items())) or "-"


@dataclass
class VerifyReport:
    scheme: str
    teacher_forcing: bool
    checks: list  # TensorCheck in graph order
    missing: list  # tensors the program holds as codes that the dump does not have
    not_compared: dict  # dump tensor -> why it is not compared
    fed: list = field(default_factory=list)  # graph inputs given as floats: fed to the program, not compared
    scheme_matches: dict = field(default_factory=dict)  # scheme -> tensors it reproduces (of len(checks))
    scheme_errors: dict = field(default_factory=dict)  # scheme -> why it could not be run

    @property
    def first_difference(self) -> TensorCheck | None:
        return next((c for c in self.checks if not c.exact), None)

    @property
    def exact(self) -> bool:
        return self.first_difference is None

    @property
    def explaining(self) -> list:
        """Schemes that reproduce every dumped tensor exactly."""
        if self.exact:
            return [self.scheme]
        return [s for s, n in self.scheme_matches.items() if n == len(self.checks)]

    def __str__(self) -> str:
        mode = ("teacher forcing: each layer runs on the dump's inputs" if self.teacher_forcing
                else "chained: the program runs from the dump's graph inputs")
        lines = [f"verify: {len(self.checks)} dumped tensors against the integer program "
                 f"(requant={self.scheme}; {mode})",
                 f"{'tensor':<40} {'node (op)':<36} {'size':>8} {'differ':>8}  {'steps (dump - ours)':<22} "
                 f"schemes that match"]
        for c in self.checks:
            status = "exact" if c.exact else str(c.differ)
            schemes = "" if c.exact else (", ".join(c.schemes) or "none")
            where = _tail(f"{c.node} ({c.op_type})", 36)
            lines.append(f"{_tail(c.tensor, 40):<40} {where:<36} {c.size:>8} {status:>8}  "
                         f"{'' if c.exact else c.histogram():<22} {schemes}")
        first = self.first_difference
        if first is None:
            lines.append(f"result: every dumped tensor matches exactly under {self.scheme}")
        else:
            lines.append(f"first difference: tensor {first.tensor!r} (node {first.node!r}, {first.op_type}): "
                         f"{first.differ} of {first.size} elements differ, steps {first.histogram()}; first at "
                         f"index {first.first_index}: dump {first.dump_code}, ours {first.our_code}")
            explaining = self.explaining
            lines.append("schemes that reproduce every dumped tensor: " + (", ".join(explaining) or "none"))
            if self.scheme_matches:
                lines.append("tensors reproduced per scheme: " + ", ".join(
                    f"{s} {n}/{len(self.checks)}" for s, n in self.scheme_matches.items()))
        for s, why in self.scheme_errors.items():
            lines.append(f"scheme {s} not tried: {why}")
        if self.fed:
            lines.append("graph inputs fed as floats (quantized by the program, not compared): " + ", ".join(self.fed))
        if self.missing:
            lines.append(f"not in the dump ({len(self.missing)} tensors the program holds as codes): "
                         + ", ".join(self.missing[:8]) + (" ..." if len(self.missing) > 8 else ""))
        for name, why in self.not_compared.items():
            lines.append(f"not compared: {name!r}: {why}")
        return "\n".join(lines)


def _tail(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


# ----------------------------------------------------------------------------------------------- verify
def verify(sim, dump, requant="ort", schemes=TRY_SCHEMES, teacher_forcing: bool = True,
           float_fallback: bool = False, progress: bool = True) -> VerifyReport:
    """Compare a target dump (a folder, or ``{name: DumpTensor}`` from :func:`read_dump`) with the integer
    program of ``sim`` under ``requant``; differing tensors are re-checked under each of ``schemes``."""
    from .program import IntSim
    from .requant import as_scheme

    tensors = read_dump(dump) if not isinstance(dump, dict) else dump
    isim = IntSim(sim, requant=requant, float_fallback=float_fallback)
    order = _graph_order(isim)
    graph = sim.graph
    known = set(graph.values) | set(graph.initializers) | set(graph.input_names)
    for node in graph.nodes:
        known.update(o for o in node.outputs if o)
    unknown = [t for t in tensors.values() if t.name not in known]
    if unknown:
        t = unknown[0]
        near = difflib.get_close_matches(t.name, sorted(known), n=3)
        raise DumpError(f"{t.path}: tensor {t.name!r} is not a tensor of the model"
                        + (f" (near: {', '.join(map(repr, near))})" if near else "")
                        + f"; files are named by tensor_filename(name), e.g. "
                        f"{tensor_filename(graph.input_names[0] if graph.input_names else t.name)!r}")
    feeds = _feeds(isim, tensors)
    # a graph input dumped as floats is the feed itself (the program quantizes it), not a tensor to compare
    fed_floats = {n for n in graph.input_names if n in tensors and tensors[n].values == "dequantized"}
    compared = [(name, node, op) for name, node, op in order if name in tensors and name not in fed_floats]
    not_compared = {}
    for name, t in tensors.items():
        if name not in isim.program.tensors and name not in graph.input_names:
            not_compared[name] = ("the integer program does not hold it as codes (a layer output fused into the "
                                  "next activation's clamp, an unquantized float tensor, or a non-numeric one)")
    if not compared:
        raise DumpError(f"target dump: none of its tensors ({', '.join(sorted(tensors)[:5])}) is held as integer codes "
                        "by the program, so nothing can be compared")
    forced = {name: dump_codes(tensors[name], isim.grid(name)) for name, _, _ in compared}
    ours = _run(isim, feeds, forced, tensors, teacher_forcing)
    checks = [_compare(name, node, op, forced[name], ours[name], tensors[name]) for name, node, op in compared]
    report = VerifyReport(str(as_scheme(requant)), teacher_forcing, checks,
                          [name for name, _, _ in order if name not in tensors], not_compared, sorted(fed_floats))
    if report.exact:
        return report
    others = [s for s in schemes]
    if progress:
        from tqdm import tqdm

        others = tqdm(others, desc="requantization schemes", unit="scheme", leave=False)
    by_name = {c.tensor: c for c in checks}
    for scheme in others:
        label = str(as_scheme(scheme))
        try:
            alt = isim if label == report.scheme else IntSim(sim, requant=scheme, float_fallback=float_fallback)
            result = ours if alt is isim else _run(alt, feeds, forced, tensors, teacher_forcing)
        except (LoweringError, OverflowError, OpError, AccumulatorOverflowError) as exc:
            report.scheme_errors[label] = str(exc)
            continue
        matched = 0
        for name, _, _ in compared:
            same = np.array_equal(result[name], forced[name])
            matched += same
            if same and not by_name[name].exact:
                by_name[name].schemes.append(label)
        report.scheme_matches[label] = matched
    return report


def _graph_order(isim) -> list[tuple[str, str, str]]:
    """(tensor, layer node, op type) of every tensor the program holds as codes, graph inputs first, then in
    node order; a fused activation's output is attributed to the layer it was fused into."""
    program, graph = isim.program, isim.sim.graph
    order = [(name, "input", "input") for name in graph.input_names if name in program.tensors]
    lowered = {e.node: e for e in program.lowered}
    fused = [e for e in program.lowered if e.note.startswith("fused ")]  # note: "fused Relu 'name'"
    seen = {name for name, _, _ in order}
    for node in graph.nodes:
        entry = lowered.get(node.name) or next((e for e in fused if e.note.endswith(repr(node.name))), None)
        for out in node.outputs:
            if out and out in program.tensors and out not in seen:
                seen.add(out)
                order.append((out, entry.node if entry else node.name, entry.op_type if entry else node.op_type))
    return order


def _feeds(isim, tensors: dict) -> dict:
    """Graph-input feeds from the dump: floats as given, codes dequantized (QuantizeLinear restores them)."""
    feeds = {}
    for value in isim.graph.inputs:
        t = tensors.get(value.name)
        if t is None:
            raise DumpError(f"the dump has no graph input {value.name!r} (expected file "
                            f"{tensor_filename(value.name)!r} or a manifest entry)")
        dtype = value.dtype if value.dtype is not None else np.dtype(np.float32)
        q = isim.program.tensors.get(value.name)
        if t.values == "codes":
            if q is None:
                raise DumpError(f"{t.path}: graph input {value.name!r} is not quantized; give its float values")
            codes = dump_codes(t, q)
            array = ((codes.astype(np.int64) - q.zero_point).astype(np.float32) * q.scale).astype(dtype)
        else:
            array = t.array.astype(dtype)
        if value.shape is not None:
            fixed = [(i, d) for i, d in enumerate(value.shape) if isinstance(d, int) and d > 0]
            if array.ndim != len(value.shape) or any(array.shape[i] != d for i, d in fixed):
                raise DumpError(f"{t.path}: graph input {value.name!r} has shape {list(array.shape)}; the model "
                                f"expects {list(value.shape)}")
        feeds[value.name] = array
    return feeds


def _run(isim, feeds, forced, tensors, teacher_forcing) -> dict:
    """Run the program, recording the codes it computes for every dumped tensor (and, with teacher forcing,
    replacing them with the dump's before any consumer reads them)."""
    program = isim.program
    by_codes: dict[str, list[str]] = {}
    for name in forced:
        by_codes.setdefault(program.tensors[name].name, []).append(name)
    computed: dict[str, np.ndarray] = {}

    def hook(name, array, node):
        names = by_codes.get(name)
        if not names:
            return None
        for original in names:
            want = forced[original]
            if array.shape != want.shape:
                raise DumpError(f"{tensors[original].path}: tensor {original!r} has shape {list(want.shape)}; the "
                                f"model computes {list(array.shape)}")
            computed[original] = array
        return forced[names[0]] if teacher_forcing else None

    try:
        isim.session.run(feeds, outputs=list(by_codes), hooks=[hook])
    except OpError as exc:  # an int32 accumulator overflow names the model's layer
        raise_for_layer(isim, exc)
    missing = [n for n in forced if n not in computed]
    if missing:  # tensors folded to constants never pass a hook: read them directly
        result = isim.session.run(feeds, outputs=[program.tensors[n].name for n in missing])
        for n in missing:
            computed[n] = result[program.tensors[n].name]
    return computed


def _compare(name, node, op, dump, ours, tensor) -> TensorCheck:
    if ours.shape != dump.shape:
        raise DumpError(f"{tensor.path}: tensor {name!r} has shape {list(dump.shape)}; the model computes "
                        f"{list(ours.shape)}")
    diff = dump.astype(np.int64) - ours.astype(np.int64)
    check = TensorCheck(name, node, op, int(dump.size))
    bad = np.flatnonzero(diff)
    if bad.size:
        check.differ = int(bad.size)
        values, counts = np.unique(diff.reshape(-1)[bad], return_counts=True)
        check.steps = {int(v): int(c) for v, c in zip(values, counts)}
        index = np.unravel_index(int(bad[0]), dump.shape)
        check.first_index = tuple(int(i) for i in index)
        check.dump_code, check.our_code = int(dump[index]), int(ours[index])
    return check
