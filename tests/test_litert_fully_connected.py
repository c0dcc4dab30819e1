"""LiteRT's int8 FULLY_CONNECTED against refquant's requantization schemes (issue 5).

LiteRT's reference kernel (``BUILTIN_REF`` op resolver) does not use the fixed-point multiplier for int8
FULLY_CONNECTED: ``tflite/kernels/fully_connected.cc`` (``FullyConnectedInt8<kReference>``,
``FullyConnectedPerChannelInt8<kReference>``) passes the float scales to
``reference_integer_ops::FullyConnected`` / ``FullyConnectedPerChannel``
(``tflite/kernels/internal/reference/integer_ops/fully_connected.h``), which compute::

    effective_output_scale = (double)input_scale * (double)filter_scale[c] / (double)output_scale
    acc_scaled = (int32_t)round((double)acc * effective_output_scale)     // C round(): half away from zero
    q = clamp(acc_scaled + output_zero_point, act_min, act_max)

That is ``exact(half_away)`` except when ``acc * M`` lies within float64 rounding error (about 2^-52
relative) of a half-integer without being one; :func:`test_reference_kernel_rounds_in_float64_near_ties`
builds such a case. LiteRT's default kernel (``AUTO``: XNNPACK) is the ``ort`` scheme. Measured with
ai-edge-litert 2.3.0; models are built with the flatbuffer schema that ai-edge-litert ships.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from refquant.intsim import requant as R

from .helpers import litert_int8_layer

F32 = np.float32
SCHEMES = ["ort", "onnx_reference", "tflite_double", "tflite_single", "exact(half_even)", "exact(half_up)",
           "exact(half_away)"]


def _litert():
    return pytest.importorskip("ai_edge_litert.interpreter",
                               reason="ai-edge-litert is not installed (the test extra installs it)")


def _litert_fc(x, w, bias, xs, xz, ws, ys, yz) -> bytes:
    """A one-op int8 FULLY_CONNECTED LiteRT model: x (B, K) with zero point xz, symmetric weights (N, K)
    with one scale or one per output channel, int32 bias at scale xs * ws, output (B, N) with zero point yz."""
    from ai_edge_litert import schema_py_generated as S

    per_channel = np.atleast_1d(ws).size > 1  # per-channel int8 FULLY_CONNECTED is version 12
    return litert_int8_layer("FULLY_CONNECTED", 12 if per_channel else 5,
                             ("FullyConnectedOptions", S.FullyConnectedOptionsT()), x, w, bias, xs, xz, ws, ys, yz,
                             (x.shape[0], w.shape[0]))


def _run(litert, model: bytes, x, resolver):
    interpreter = litert.Interpreter(model_content=model, experimental_op_resolver_type=resolver, num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _reference_kernel_formula(acc, xs, ws, ys, yz):
    """reference_integer_ops::FullyConnected(PerChannel) as written in LiteRT's source (module docstring):
    float64 multiplier and product, C round() (half away from zero), then the zero point and the clamp."""
    m = np.float64(xs) * np.asarray(ws, np.float64) / np.float64(ys)
    p = acc.astype(np.float64) * m
    whole = np.floor(np.abs(p))
    rounded = np.sign(p) * (whole + (np.abs(p) - whole >= 0.5))  # |p| - floor(|p|) is exact in float64
    return np.clip(rounded.astype(np.int64) + yz, -128, 127)


def _scheme_codes(acc, xs, ws, ys, yz, scheme):
    """refquant's requantization of the exact accumulators, with the multiplier each scheme takes."""
    if scheme in ("ort", "onnx_reference"):
        mult = R.ort_multiplier(xs, ws, ys)  # f32(f32(xs * ws) / ys), as the lowering forms it
    elif scheme.startswith("tflite"):
        mult = R.tflite_multiplier(xs, ws, ys)
    else:
        mult = R.exact_multiplier(xs, ws, ys)
    return R.requantize(acc, mult, yz, -128, 127, scheme, axis=1 if np.ndim(ws) else None)


def _case(rng, per_channel: bool, ties: bool):
    """Random int8 codes and bias; random float32 scales, or power-of-two scales whose effective multiplier
    2^-k (k = 1..5) puts 1 in 2^k of the in-range outputs on an exact .5."""
    b, k, n = 8, int(rng.integers(8, 64)), 16
    xz, yz = int(rng.integers(-100, 100)), int(rng.integers(-100, 100))
    if ties:  # small codes around the zero points keep acc * M inside the int8 range
        x = (xz + rng.integers(-20, 21, (b, k))).astype(np.int8)
        w = rng.integers(-12, 13, (n, k)).astype(np.int8)
        bias = rng.integers(-200, 200, n).astype(np.int32)
    else:
        x = rng.integers(-128, 128, (b, k)).astype(np.int8)
        w = rng.integers(-127, 128, (n, k)).astype(np.int8)
        bias = rng.integers(-3000, 3000, n).astype(np.int32)
    acc = (x.astype(np.int64) - xz) @ w.astype(np.int64).T + bias
    if ties:
        xs = F32(2.0 ** -3)
        ws = (2.0 ** -rng.integers(2, 5, n)).astype(F32) if per_channel else F32(2.0 ** -3)
        ys = F32(2.0 ** -int(rng.integers(0, 4)))
    else:
        xs = F32(10 ** rng.uniform(-3, -1))
        ws = (10 ** rng.uniform(-3, -1, n)).astype(F32) if per_channel else F32(10 ** rng.uniform(-3, -1))
        ys = F32(np.abs(acc * (np.float64(xs) * np.asarray(ws, np.float64))).max() / 100.0)
    return x, w, bias, acc, xs, xz, ws, ys, yz


def test_reference_kernel_is_half_away_and_default_kernel_is_ort():
    """BUILTIN_REF equals the source's float64 formula everywhere and exact(half_away) on this corpus (no
    near-tie within float64 error here); AUTO (XNNPACK) equals ort. Ties tell every other scheme apart."""
    litert = _litert()
    resolvers = {"ref": litert.OpResolverType.BUILTIN_REF, "auto": litert.OpResolverType.AUTO}
    rng = np.random.default_rng(7)
    agree = {(kind, s): 0 for kind in resolvers for s in SCHEMES}
    total = ties_seen = 0
    for per_channel in (False, True):
        for ties in (False, True) * 5:
            x, w, bias, acc, xs, xz, ws, ys, yz = _case(rng, per_channel, ties)
            m = np.float64(xs) * np.asarray(ws, np.float64) / np.float64(ys)
            ties_seen += int((np.abs(acc * m) % 1 == 0.5).sum())  # power-of-two m: the product is exact
            model = _litert_fc(x, w, bias, xs, xz, ws, ys, yz)
            outputs = {kind: _run(litert, model, x, res) for kind, res in resolvers.items()}
            assert np.array_equal(outputs["ref"], _reference_kernel_formula(acc, xs, ws, ys, yz))
            for kind, y in outputs.items():
                for s in SCHEMES:
                    agree[(kind, s)] += int((_scheme_codes(acc, xs, ws, ys, yz, s) == y).sum())
            total += acc.size
    assert ties_seen > 50  # 89 exact .5 products in this corpus (seed 7)
    assert agree[("ref", "exact(half_away)")] == total and agree[("auto", "ort")] == total
    for s in SCHEMES:  # on ties every other scheme rounds some output differently
        if s != "exact(half_away)":
            assert agree[("ref", s)] < total, s
        if s not in ("ort", "exact(half_even)"):
            assert agree[("auto", s)] < total, s


def test_reference_kernel_rounds_in_float64_near_ties():
    """A product just below a tie that float64 rounds onto it: C round() then goes away from zero, one code
    past exact(half_away). The scales are float32 values; acc = bias (the input codes equal the zero point)."""
    litert = _litert()
    xs, ws, ys = F32(2.0 ** -12), F32(0.885941207408905), F32(3407.611083984375)
    assert float(ws) == 0.885941207408905 and float(ys) == 3407.611083984375  # exactly float32
    bias = np.array([575039837, -575039837, 0, 1], np.int32)
    m_exact = Fraction(float(xs)) * Fraction(float(ws)) / Fraction(float(ys))
    product = 575039837 * m_exact
    assert Fraction(73, 2) - Fraction(1, 10 ** 14) < product < Fraction(73, 2)  # 36.4999999999999957...
    assert 575039837.0 * (float(xs) * float(ws) / float(ys)) == 36.5  # the float64 product is the tie
    expected = np.array([[37, -37, 0, 0]])  # C round(+-36.5) = +-37; exact(half_away) gives +-36
    x = np.zeros((1, 4), np.int8)
    w = np.zeros((4, 4), np.int8)
    acc = bias.astype(np.int64)[None, :]
    for wsv in (ws, np.full(4, ws, F32)):  # per tensor and per channel
        model = _litert_fc(x, w, bias, xs, 0, wsv, ys, 0)
        ref = _run(litert, model, x, litert.OpResolverType.BUILTIN_REF)
        assert np.array_equal(ref, expected)
        assert np.array_equal(_reference_kernel_formula(acc, xs, wsv, ys, 0), expected)
        assert np.array_equal(_scheme_codes(acc, xs, wsv, ys, 0, "exact(half_away)"), [[36, -36, 0, 0]])
        auto = _run(litert, model, x, litert.OpResolverType.AUTO)
        assert np.array_equal(auto, _scheme_codes(acc, xs, wsv, ys, 0, "ort"))
