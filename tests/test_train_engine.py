"""The reverse-mode engine (refquant.train.autograd), quantizer gradients (refquant.train.quantizers)
and optimizers (refquant.train.optim): against central finite differences and written formulas."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import refquant
from refquant.quant.encoding import from_min_max
from refquant.quant.qdq import quantize_dequantize
from refquant.train.autograd import GradientEngine, GradientError
from refquant.train.optim import SGD, Adam, schedule
from refquant.train.quantizers import QDQ, LearnedRangeQDQ, lsq_grads, minmax_grads, ste_grad

from .helpers import make_model

DOUBLE = TensorProto.DOUBLE


def conv_bn_relu_gemm(rng, dtype=np.float64):
    """x[2,3,8,8] -> Conv(3x3, stride 2, pad 1) -> BatchNormalization -> Relu -> Flatten -> Gemm -> y[2,5]."""
    inits = {"W": rng.normal(size=(4, 3, 3, 3)), "B": rng.normal(size=4), "gamma": rng.uniform(0.5, 1.5, 4),
             "beta": rng.normal(size=4), "mean": rng.normal(size=4) * 0.1, "var": rng.uniform(0.5, 2, 4),
             "Wf": rng.normal(size=(5, 64)) * 0.3, "bf": rng.normal(size=5)}
    inits = {k: v.astype(dtype) for k, v in inits.items()}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "Wf", "bf"], ["y"], transB=1)]
    elem = DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    return refquant.load(make_model(nodes, [("x", elem, [2, 3, 8, 8])], [("y", elem, [2, 5])], inits))


def test_whole_graph_gradient_matches_central_differences_float64():
    rng = np.random.default_rng(0)
    graph = conv_bn_relu_gemm(rng)
    names = ["W", "B", "gamma", "beta", "Wf", "bf"]
    engine = GradientEngine(graph, names)
    params = {n: graph.initializers[n].copy() for n in names}
    x = rng.normal(size=(2, 3, 8, 8))
    weights = rng.normal(size=(2, 5))  # loss L = sum(weights * y): dL/dy = weights

    def loss(p, xx):
        return float(np.sum(weights * engine.forward({"x": xx}, p, record=False).outputs["y"]))

    tape = engine.forward({"x": x}, params, wrt=["x"])
    grads = engine.backward(tape, {"y": weights}, wrt=["x"])
    eps = 1e-6
    checked = 0
    for name in names + ["x"]:
        analytic = grads.tensors["x"] if name == "x" else grads.params[name]
        base = x if name == "x" else params[name]
        numeric = np.zeros_like(base)
        for i in range(base.size):
            plus, minus = base.copy(), base.copy()
            plus.flat[i] += eps
            minus.flat[i] -= eps
            if name == "x":
                numeric.flat[i] = (loss(params, plus) - loss(params, minus)) / (2 * eps)
            else:
                numeric.flat[i] = (loss({**params, name: plus}, x) - loss({**params, name: minus}, x)) / (2 * eps)
        # central differences in float64 have truncation error O(eps^2 f''') and rounding O(1e-16/eps):
        # ~1e-10 relative here; 1e-4 is the bound, far above both and far below any real bug
        rel = np.linalg.norm(analytic - numeric) / max(np.linalg.norm(numeric), 1e-12)
        assert rel <= 1e-4, (name, rel)
        checked += base.size
    assert checked == 108 + 4 + 4 + 4 + 320 + 5 + 384


def test_gradients_accumulate_over_readers_and_unused_outputs_get_nothing():
    # y = x * w + x (x read twice): dL/dx = w + 1, dL/dw = x
    nodes = [helper.make_node("Mul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "x"], ["y"]),
             helper.make_node("Relu", ["x"], ["unused"])]
    graph = refquant.load(make_model(nodes, [("x", DOUBLE, [3])], [("y", DOUBLE, [3]), ("unused", DOUBLE, [3])],
                                     {"w": np.array([2.0, -1.0, 0.5])}))
    engine = GradientEngine(graph, ["w"])
    x = np.array([1.0, 2.0, -3.0])
    tape = engine.forward({"x": x}, {"w": graph.initializers["w"]}, wrt=["x"])
    grads = engine.backward(tape, {"y": np.ones(3)}, wrt=["x"])
    np.testing.assert_array_equal(grads.tensors["x"], np.array([3.0, 0.0, 1.5]))
    np.testing.assert_array_equal(grads.params["w"], x)
    assert tape.records == []  # every record was consumed and freed


def test_missing_backward_is_reported_with_the_node(monkeypatch):
    from refquant.train import backward_registry

    monkeypatch.delitem(backward_registry._BACKWARD, "Erf", raising=False)  # an op without a backward
    nodes = [helper.make_node("Mul", ["x", "w"], ["t"]), helper.make_node("Erf", ["t"], ["y"], name="the_erf"),
             helper.make_node("Relu", ["x"], ["z"])]
    graph = refquant.load(make_model(nodes, [("x", DOUBLE, [3])], [("y", DOUBLE, [3]), ("z", DOUBLE, [3])],
                                     {"w": np.ones(3)}))
    engine = GradientEngine(graph, ["w"])
    assert [n.name for n in engine.missing_backwards()] == ["the_erf"]
    assert engine.missing_backwards(outputs=["z"]) == []  # not on the path from w to z
    tape = engine.forward({"x": np.ones(3)}, {"w": np.ones(3)})
    with pytest.raises(GradientError, match="the_erf"):
        engine.backward(tape, {"y": np.ones(3)})


def test_qdq_transform_forward_is_the_sims_and_backward_is_ste():
    enc = from_min_max(-1.0, 1.0, 4, symmetric=False)
    x = np.linspace(-2, 2, 41).astype(np.float32)
    y, saved = QDQ("t", enc).forward(x)
    np.testing.assert_array_equal(y, quantize_dequantize(x, enc))
    g = np.arange(41, dtype=np.float32)
    gx, own = QDQ("t", enc).backward(g, saved)
    assert own == {}
    # inside [min - s/2, max + s/2] (round-half-even of x/s lands on the grid) the gradient passes, else 0
    s, o = float(enc.scale), float(enc.offset)
    inside = (np.rint(x / np.float32(s)) - o >= 0) & (np.rint(x / np.float32(s)) - o <= 15)
    np.testing.assert_array_equal(gx, np.where(inside, g, 0))
    assert inside[20] and not inside[0] and not inside[-1]


def test_lsq_scale_and_offset_gradients_follow_the_formulas_per_channel():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, 2)) * 2
    g = rng.normal(size=(3, 5, 2))
    enc = from_min_max(np.array([-1.0, -0.5, -2.0]), np.array([1.5, 0.5, 1.0]), 4, False, axis=0)
    gx, g_scale, g_offset = lsq_grads(x, g, enc)
    for c in range(3):
        s, o = enc.scale[c], enc.offset[c]
        r = np.rint(x[c] / s)
        inside = (r - o >= 0) & (r - o <= 15)
        q = np.clip(r - o, 0, 15)
        # written formulas (module docstring): dy/ds = round(x/s) - x/s inside, the clamped level (q + o)
        # outside; dy/do = s outside, 0 inside; dy/dx = 1 inside, 0 outside
        want_s = np.sum(np.where(inside, r - x[c] / s, q + o) * g[c])
        want_o = np.sum(np.where(inside, 0.0, s) * g[c])
        assert g_scale[c] == pytest.approx(want_s, rel=1e-12)
        assert g_offset[c] == pytest.approx(want_o, rel=1e-12)
        np.testing.assert_array_equal(gx[c], np.where(inside, g[c], 0))


def test_clamped_region_scale_gradient_matches_finite_differences():
    # outside the range y = s * (o + n) (or s * o) is differentiable in s: the LSQ term is its derivative
    enc = from_min_max(-1.0, 2.0, 8, symmetric=False)
    x = np.array([5.0, 7.0, -4.0])  # all clamped
    g = np.array([1.0, 2.0, -0.5])
    _, g_scale, _ = lsq_grads(x, g, enc)
    eps = 1e-7

    def f(scale):
        return float(np.sum(g * quantize_dequantize(x.astype(np.float32), enc.with_scale(scale)).astype(np.float64)))

    numeric = (f(enc.scale + eps) - f(enc.scale - eps)) / (2 * eps)
    # float32 forward (the QDQ kernel): differences of ~1e-7 relative rounding over 2 eps -> 1e-2 relative
    assert float(g_scale) == pytest.approx(numeric, rel=2e-2)
    # and outside the range the input gradient is exactly zero, as the forward's derivative
    np.testing.assert_array_equal(ste_grad(x, g, enc), np.zeros(3))


def test_minmax_chain_rule_matches_finite_differences_of_the_parametrization():
    # s = (max - min) / n and o = min / s: dL/dmin, dL/dmax from (G_s, G_o) by the chain rule
    n, lo, hi, gs, go = 15, -0.7, 1.9, 0.3, -1.2

    def loss(a, b):
        s = (b - a) / n
        return gs * s + go * (a / s)

    d_lo, d_hi = minmax_grads(gs, go, lo, hi, n)
    eps = 1e-6
    assert d_lo == pytest.approx((loss(lo + eps, hi) - loss(lo - eps, hi)) / (2 * eps), rel=1e-7)
    assert d_hi == pytest.approx((loss(lo, hi + eps) - loss(lo, hi - eps)) / (2 * eps), rel=1e-7)


def test_learned_range_starts_at_the_encoding_and_symmetric_grad_is_gs_over_k():
    enc = from_min_max(-2.0, 2.0, 8, symmetric=True)  # offset -128, 127 positive steps
    t = LearnedRangeQDQ("w", enc)
    assert t.params["max"] == pytest.approx(float(enc.scale) * 127)
    x = np.array([0.3, -1.1, 5.0], dtype=np.float32)
    y, saved = t.forward(x)
    np.testing.assert_array_equal(y, quantize_dequantize(x, enc))
    g = np.array([1.0, 1.0, 1.0], dtype=np.float32)
    _, own = t.backward(g, saved)
    _, g_scale, _ = lsq_grads(x, g, enc)
    assert own["max"] == pytest.approx(g_scale / 127)
    t.set_params({"max": np.array(4.0)})
    assert float(t.encoding.scale) == pytest.approx(4.0 / 127, rel=1e-7) and float(t.encoding.offset) == -128
    asym = LearnedRangeQDQ("a", from_min_max(-1.0, 3.0, 8, symmetric=False))
    asym.set_params({"min": np.array(0.5), "max": np.array(2.0)})  # min projected to 0: zero stays on the grid
    assert float(asym.encoding.min) == 0.0 and float(asym.encoding.max) == pytest.approx(2.0)


def test_adam_and_sgd_follow_their_update_rules():
    p = {"w": np.array([1.0, -2.0])}
    g = {"w": np.array([0.5, -0.1])}
    adam = Adam(0.1)
    adam.step(p, g)
    # first Adam step: m_hat = g, v_hat = g^2 -> update lr * g / (|g| + eps) = lr * sign(g)
    np.testing.assert_allclose(p["w"], [1.0 - 0.1, -2.0 + 0.1], rtol=1e-7)
    q = {"w": np.array([1.0])}
    sgd = SGD(0.1, momentum=0.9)
    sgd.step(q, {"w": np.array([1.0])})  # b = 1, w = 0.9
    sgd.step(q, {"w": np.array([1.0])})  # b = 1.9, w = 0.71
    np.testing.assert_allclose(q["w"], [0.71], rtol=1e-12)
    restored = SGD(0.1, momentum=0.9)
    restored.load_state_dict(sgd.state_dict())
    r = dict(q)
    restored.step(r, {"w": np.array([1.0])})
    sgd.step(q, {"w": np.array([1.0])})
    np.testing.assert_array_equal(q["w"], r["w"])
    cosine = schedule("cosine", 1.0, 10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
    assert schedule("step", 1.0, 9, step_size=3, gamma=0.5)(7) == 0.25


def test_engine_through_quantizers_is_the_chain_rule_with_ste_masks():
    # y = qdq_y(qdq_x(x) @ qdq_w(W)); L = sum(G * y):
    # dL/dW = m_w * (qdq_x(x)^T (G * m_y)), dL/dx = m_x * ((G * m_y) qdq_w(W)^T)  (m: inside-range masks)
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    W = (rng.normal(size=(6, 3)) * 0.8).astype(np.float32)
    graph = refquant.load(make_model(nodes, [("x", TensorProto.FLOAT, [4, 6])], [("y", TensorProto.FLOAT, [4, 3])],
                                     {"W": W}))
    enc_x = from_min_max(-1.0, 1.0, 4, False)
    enc_w = from_min_max(-0.7, 0.7, 4, True)  # clamps some weights
    enc_y = from_min_max(-1.5, 1.5, 4, False)  # clamps some outputs
    transforms = {"x": QDQ("x", enc_x), "W": QDQ("W", enc_w), "y": QDQ("y", enc_y)}
    engine = GradientEngine(graph, ["W"], transforms)
    x = (rng.normal(size=(4, 6)) * 1.2).astype(np.float32)
    G = rng.normal(size=(4, 3)).astype(np.float32)
    tape = engine.forward({"x": x}, {"W": W}, wrt=["x"])
    xq, wq = quantize_dequantize(x, enc_x), quantize_dequantize(W, enc_w)
    pre = xq @ wq
    np.testing.assert_array_equal(tape.outputs["y"], quantize_dequantize(pre, enc_y))
    grads = engine.backward(tape, {"y": G}, wrt=["x"])
    m_y = ste_grad(pre, np.ones_like(pre), enc_y)
    m_w = ste_grad(W, np.ones_like(W), enc_w)
    m_x = ste_grad(x, np.ones_like(x), enc_x)
    assert 0 < m_y.sum() < m_y.size and 0 < m_w.sum() < m_w.size and 0 < m_x.sum() < m_x.size
    # float32 matmuls in a different association order: a few ULPs
    np.testing.assert_allclose(grads.params["W"], m_w * (xq.T @ (G * m_y)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads.tensors["x"], m_x * ((G * m_y) @ wq.T), rtol=1e-5, atol=1e-6)


def test_half_up_rounding_mask_and_per_block_ste():
    # AIMET's rounding: q = floor(x/s + 0.5) - o; x = 7.75 with s = 0.5, o = 0, 15 steps: 15.5 -> 16, clamped
    enc = from_min_max(0.0, 7.5, 4, False)
    x = np.array([7.74, 7.75, -0.25, -0.26], dtype=np.float32)
    g = np.ones(4, dtype=np.float32)
    np.testing.assert_array_equal(ste_grad(x, g, enc, "half_up"), [1, 0, 1, 0])
    # half-even keeps 7.75 (rint(15.5) = 16 -> outside too) but -0.25 -> rint(-0.5) = -0 -> inside
    np.testing.assert_array_equal(ste_grad(x, g, enc, "half_even"), [1, 0, 1, 0])
    # per-block encodings (block 2 on axis 1): each element judged against its block's grid
    from refquant.quant.encoding import Encoding

    block = Encoding(np.array([[1.0, 0.1]]), np.array([[-8.0, -8.0]]), 4, True, 15, axis=1, block_size=2)
    xb = np.array([[5.0, -7.0, 5.0, -0.7]], dtype=np.float32)
    np.testing.assert_array_equal(ste_grad(xb, np.ones_like(xb), block), [[1, 1, 0, 1]])
