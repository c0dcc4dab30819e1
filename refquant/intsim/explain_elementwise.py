"""Explanations of one output element of the element-wise integer layers (docs/numerics.md §5):

* ``QLinearAdd``: onnxruntime's x86 formula ``t = fma(a, rA, fma(b, rB, F))``, ``F = zc - (rA za + rB zb)``,
  ``rA = sa / sc``, ``rB = sb / sc`` in float32, rounded half to even (the broadcast operand decides the order);
* ``QLinearMul``: ``t = f32(f32((a - za)(b - zb)) * f32(f32(sa sb) / sc)) + zc``, rounded half to even;
* ``QLinearGlobalAveragePool``: ``acc = sum x - N x_zp``, ``m = f32(x_scale / f32(y_scale N))``, the ``ort``
  requantization;
* lookup tables (``QLinearSigmoid``, ``QLinearLeakyRelu``, and refquant's ``Gather`` tables): the input code,
  the real value it stands for, the table entry.

Each returns an :class:`ElementExplanation` whose ``code`` the caller checks against the program's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ops import qoperators as Q
from .requant import requantize

F32 = np.float32
ELEMENTWISE_OPS = {"QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
                   "Gather"}


@dataclass
class ElementExplanation:
    node: str
    op_type: str
    program_ops: list
    scheme: str
    output: str
    index: tuple
    shape: tuple
    lines: list
    requantized: int
    code: int
    y_scale: float
    y_zp: int
    value: float = 0.0
    clamp: tuple | None = None
    feeds_note: str = ""
    inputs: dict = field(default_factory=dict)  # input name -> the code(s) read

    def __str__(self) -> str:
        idx = ",".join(map(str, self.index))
        head = [f"explain: node {self.node!r} ({self.op_type} -> {' + '.join(self.program_ops)}), requant="
                f"{self.scheme} (element-wise ops follow onnxruntime's kernels)",
                f"output {self.output!r} element [{idx}] of shape {list(self.shape)}"]
        if self.feeds_note:
            head.append(f"feeds: {self.feeds_note}")
        tail = []
        if self.clamp is not None:
            tail.append(f"fused activation clamp [{self.clamp[0]}, {self.clamp[1]}] -> {self.code}")
        tail.append(f"result  code {self.code} stands for (code - y_zp) * y_scale = ({self.code} - {self.y_zp}) * "
                    f"{self.y_scale:.9g} = {self.value:.9g}")
        return "\n".join(head + self.lines + tail)


def _text(index) -> str:
    return ",".join(map(str, index))


def _at(array, index):
    """The element of a broadcast operand that output ``index`` reads (NumPy broadcasting, right-aligned)."""
    array = np.asarray(array)
    tail = index[len(index) - array.ndim:] if array.ndim else ()
    return tuple(i if d > 1 else 0 for i, d in zip(tail, array.shape))


def explain_elementwise(node, get, producers, index, label=lambda name: name) -> tuple[list, int, dict]:
    """(lines, code, inputs read) of output ``index`` of program node ``node``; ``label`` names a program
    tensor for the reader (the model's tensor name of a codes tensor)."""
    op = node.op_type
    if op in ("QLinearAdd", "QLinearMul"):
        return _binary(node, get, index, label)
    if op == "QLinearGlobalAveragePool":
        return _global_average(node, get, index, label)
    if op in ("QLinearSigmoid", "QLinearLeakyRelu"):
        return _lut(node, get, index, label)
    return _gather_table(node, get, producers, index, label)


def _binary(node, get, index, label):
    A, sa, za, B, sb, zb, sc, zc = (get(n) for n in node.inputs[:8])
    sa, sb, sc = F32(np.asarray(sa).reshape(())), F32(np.asarray(sb).reshape(())), F32(np.asarray(sc).reshape(()))
    za, zb = int(np.asarray(za).reshape(())), int(np.asarray(zb).reshape(()))
    zc_int = int(np.asarray(zc).reshape(()))
    ia, ib = _at(A, index), _at(B, index)
    a, b = int(A[ia]), int(B[ib])
    lines = [f"input A {label(node.inputs[0])!r}[{_text(ia)}] = {a}  (scale {float(sa):.9g}, zero point {za})",
             f"input B {label(node.inputs[3])!r}[{_text(ib)}] = {b}  (scale {float(sb):.9g}, zero point {zb})",
             f"output scale {float(sc):.9g}, zero point {zc_int}"]
    info = np.iinfo(A.dtype)
    one = lambda v, dt: np.asarray([v], dtype=dt)  # noqa: E731
    if node.op_type == "QLinearAdd":
        mode = Q.ort_broadcast_mode(A.shape, B.shape)
        exact = float(sa) / float(sc) * (a - za) + float(sb) / float(sc) * (b - zb) + zc_int
        lines.append(f"real  (sa/sc)(a - za) + (sb/sc)(b - zb) + zc = {exact:.9g}")
        r_ac, r_bc = F32(sa / sc), F32(sb / sc)
        s = Q.fma32(r_ac, F32(za), F32(r_bc * F32(zb))) if Q.QLADD_FIXED_PART_FMA else \
            F32(F32(r_ac * F32(za)) + F32(r_bc * F32(zb)))
        fixed = F32(F32(zc_int) - F32(s))
        lines.append(f"float32 (onnxruntime x86 AVX2 QLinearAdd): rA = sa/sc = {float(r_ac):.9g}, rB = sb/sc = "
                     f"{float(r_bc):.9g}, F = zc - (rA za + rB zb) = {float(fixed):.9g}")
        vec, scal = (b, a) if mode == "a_scalar" else (a, b)
        r_v, r_s = (r_bc, r_ac) if mode == "a_scalar" else (r_ac, r_bc)
        if mode == "general":
            t = Q.fma32(F32(vec), r_v, Q.fma32(F32(scal), r_s, fixed))
            lines.append(f"t = fma(a, rA, fma(b, rB, F)) = {float(t):.9g}")
        else:
            inner = Q.fma32(F32(scal), r_s, fixed) if Q.QLADD_SCALAR_FMA else F32(fixed + F32(F32(scal) * r_s))
            t = Q.fma32(F32(vec), r_v, inner)
            lines.append(f"broadcast: {'A' if mode == 'a_scalar' else 'B'} is the kernel's scalar operand; "
                         f"t = fma(vector, r, F + scalar * r') = {float(t):.9g}")
        code = int(Q.qlinear_add(one(a, A.dtype), sa, za, one(b, B.dtype), sb, zb, sc,
                                 np.asarray(zc).reshape(()))[0])
    else:
        ratio = F32(F32(sa * sb) / sc)
        product = (a - za) * (b - zb)
        t = F32(F32(F32(product) * ratio) + F32(zc_int))
        lines.append(f"integer product (a - za)(b - zb) = ({a} - {za})({b} - {zb}) = {product}")
        lines.append(f"float32 multiplier m = f32(f32(sa * sb) / sc) = {float(ratio):.9g}; t = f32(product * m) + zc "
                     f"= {float(t):.9g}")
        code = int(Q.qlinear_mul(one(a, A.dtype), sa, za, one(b, B.dtype), sb, zb, sc,
                                 np.asarray(zc).reshape(()))[0])
    lines.append(f"rounding  round half to even, saturate to [{info.min}, {info.max}] -> code {code}")
    return lines, code, {label(node.inputs[0]): a, label(node.inputs[3]): b}


def _global_average(node, get, index, label):
    X, xs, xz, ys, yz = (get(n) for n in node.inputs[:5])
    xs, ys = F32(np.asarray(xs).reshape(())), F32(np.asarray(ys).reshape(()))
    xz, yz = int(np.asarray(xz).reshape(())), int(np.asarray(yz).reshape(()))
    window = X[index[:2]].astype(np.int64)
    n = int(window.size)
    total = int(window.sum())
    acc = total - xz * n
    m = F32(xs / F32(ys * F32(n)))
    info = np.iinfo(X.dtype)
    code = int(requantize(np.array([acc]), m, yz, int(info.min), int(info.max), scheme="ort")[0])
    f = F32(F32(acc) * m)
    lines = [f"input {label(node.inputs[0])!r}[{index[0]},{index[1]},...]: {n} codes (scale {float(xs):.9g}, zero "
             f"point "
             f"{xz}), sum {total}",
             f"accumulator  acc = sum x - N x_zp = {total} - {n} * {xz} = {acc}",
             f"float32 multiplier m = f32(x_scale / f32(y_scale * N)) = {float(m):.9g}",
             f"float32 product  f32(acc) * m = {float(f):.9g}; round half to even, + y_zp {yz}, saturate -> {code}"]
    return lines, code, {label(node.inputs[0]): total}


def _lut(node, get, index, label):
    X, xs, xz, ys, yz = (get(n) for n in node.inputs[:5])
    xs, ys = F32(np.asarray(xs).reshape(())), F32(np.asarray(ys).reshape(()))
    xz, yz = int(np.asarray(xz).reshape(())), int(np.asarray(yz).reshape(()))
    q = int(X[index])
    deq = F32(xs * F32(q - xz))
    if node.op_type == "QLinearSigmoid":
        fn, name = Q.mlas_logistic, "MLAS logistic (Eigen rational approximation, float32)"
    else:
        alpha = F32(node.attrs.get("alpha", 0.01))
        fn, name = (lambda v: np.where(v >= 0, v, (alpha * v).astype(F32)).astype(F32)), f"LeakyRelu(alpha={alpha})"
    y = F32(np.asarray(fn(np.asarray([deq], F32)))[0])
    table = Q.lookup_table(xs, xz, ys, yz, X.dtype, fn)
    code = int(table[np.asarray([q], X.dtype).view(np.uint8)[0]])
    lines = [f"input {label(node.inputs[0])!r}[{_text(index)}] = code {q} (scale {float(xs):.9g}, zero point "
             f"{xz}) -> x = f32(x_scale * (q - x_zp)) = {float(deq):.9g}",
             f"{name}: f(x) = {float(y):.9g}",
             f"256-entry table: code = saturate(round_half_even(f(x) / y_scale) + y_zp) = {code}"]
    return lines, code, {label(node.inputs[0]): q}


def _gather_table(node, get, producers, index, label):
    """refquant's lookup tables (lowering.lower_lookup): Gather(table, Cast(codes) [+ row offset])."""
    table = np.asarray(get(node.inputs[0]))
    rows = None
    source = producers[node.inputs[1]]
    if source.op_type == "Add":
        rows = np.asarray(get(source.inputs[1]))
        source = producers[source.inputs[0]]
    codes_name = source.inputs[0]
    X = get(codes_name)
    q = int(X[index])
    n_codes = 1 << (8 * X.dtype.itemsize)
    offset = int(rows[_at(rows, index)]) if rows is not None else 0
    code = int(table[q + offset])  # Gather's index (a negative one counts from the end, as in NumPy)
    lines = [f"input {label(codes_name)!r}[{','.join(map(str, index))}] = code {q} (Cast to int32: the table index)",
             f"lookup table of {table.size} entries ({table.size // n_codes} rows of {n_codes}): entry "
             f"{q + offset} = Q_out(op(DQ_in(code))), the simulation's own arithmetic -> code {code}"]
    return lines, code, {label(codes_name): q}
