"""Session: execution order, hooks, freeing tensors after their last use, feed checks, errors."""

from __future__ import annotations

import os
import sys
import weakref

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.errors import FeedError, OpError

from .helpers import FLOAT, SHARED, make_model, ort_run

SHARED_MODELS = SHARED / "models"
needs_shared_models = pytest.mark.skipif(not (SHARED_MODELS / "mtcnn_rnet.onnx").is_file(),
                                         reason=f"missing external resource: the shared models at {SHARED_MODELS}")


def _chain():
    # y = exp((x + c) * x) - x ; a and b are intermediates, x is read by three nodes
    nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="add"),
             helper.make_node("Mul", ["a", "x"], ["b"], name="mul"),
             helper.make_node("Exp", ["b"], ["e"], name="exp"),
             helper.make_node("Sub", ["e", "x"], ["y"], name="sub")]
    return make_model(nodes, [("x", FLOAT, ["batch", 3])], [("y", FLOAT, ["batch", 3])],
                      {"c": np.array([1.0, -2.0, 0.5], np.float32)})


def test_hooks_see_every_tensor_in_order():
    seen = []
    session = refquant.Session(refquant.load(_chain()))
    session.run({"x": np.ones((2, 3), np.float32)}, hooks=[lambda n, a, node: seen.append(n)])
    assert seen == ["x", "a", "b", "e", "y"]


def test_hook_replacement_flows_downstream():
    x = np.array([[0.5, 1.0, 2.0]], np.float32)
    session = refquant.Session(refquant.load(_chain()))
    zero_b = lambda name, a, node: np.zeros_like(a) if name == "b" else None  # noqa: E731
    y = session.run({"x": x}, hooks=[zero_b])["y"]
    np.testing.assert_array_equal(y, 1.0 - x)  # exp(0) - x, exactly


def test_intermediate_tensors_are_freed_after_last_use():
    refs = {}

    def keep_weakref(name, array, node):
        refs[name] = weakref.ref(array)

    session = refquant.Session(refquant.load(_chain()))
    outputs = session.run({"x": np.ones((4, 3), np.float32)}, hooks=[keep_weakref])
    # each intermediate buffer is either freed or handed on in place to the next tensor (e becomes y)
    alive = {name: ref() for name, ref in refs.items() if ref() is not None}
    assert all(array is outputs["y"] for array in alive.values()), sorted(alive)
    assert refs["y"]() is outputs["y"] and refs["a"]() is None


def test_freeing_happens_during_the_run_not_after():
    alive_when_sub_ran = {}
    refs = {}

    def probe(name, array, node):
        refs[name] = weakref.ref(array)
        if name == "y":  # "b" (which took over a's buffer in place) was last read by "exp", before "sub"
            alive_when_sub_ran["a"] = refs["a"]() is not None
            alive_when_sub_ran["b"] = refs["b"]() is not None

    refquant.Session(refquant.load(_chain())).run({"x": np.ones((1, 3), np.float32)}, hooks=[probe])
    assert alive_when_sub_ran == {"a": False, "b": False}


def test_matches_onnxruntime_and_dynamic_batch():
    model = _chain()
    session = refquant.Session(refquant.load(model))
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 3)).astype(np.float32)
        # exp is a libm call in NumPy and a vectorized polynomial in onnxruntime: they differ by a
        # few ULP (measured: 1 ULP); 1e-6 relative is 8 float32 ULP
        np.testing.assert_allclose(session.run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-6, atol=0)


def test_any_intermediate_can_be_requested():
    x = np.full((1, 3), 2.0, np.float32)
    out = refquant.Session(refquant.load(_chain())).run({"x": x}, outputs=["a", "b"])
    np.testing.assert_array_equal(out["a"], [[3.0, 0.0, 2.5]])
    np.testing.assert_array_equal(out["b"], [[6.0, 0.0, 5.0]])


def test_nan_and_inf_propagate_like_onnxruntime():
    model = _chain()
    x = np.array([[np.nan, np.inf, -np.inf], [1e30, -1e30, 0.0]], np.float32)
    with np.errstate(all="ignore"):
        ours = refquant.Session(refquant.load(model)).run({"x": x})["y"]
    np.testing.assert_array_equal(ours, ort_run(model, {"x": x})["y"])  # NaN == NaN positionally


@pytest.mark.parametrize("feeds, message", [
    ({}, "missing feed"),
    ({"x": np.ones((1, 3), np.float32), "z": np.ones(1)}, "unknown feed"),
    ({"x": np.ones((1, 3), np.float64)}, "expected dtype float32"),
    ({"x": np.ones((3,), np.float32)}, "expected rank 2"),
    ({"x": np.ones((1, 4), np.float32)}, "dimension 1 must be 3"),
])
def test_bad_feeds_name_the_input(feeds, message):
    session = refquant.Session(refquant.load(_chain()))
    with pytest.raises(FeedError, match=message):
        session.run(feeds)


def test_kernel_failure_names_the_node():
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"], name="bad_add")],
                       [("x", FLOAT, None), ("w", FLOAT, None)], [("y", FLOAT, None)])
    session = refquant.Session(refquant.load(model))
    with pytest.raises(OpError, match="bad_add"):
        session.run({"x": np.ones((2, 3), np.float32), "w": np.ones((4,), np.float32)})


# ------------------------------------------------------------------ in-place kernels
def _aliasing_graph():
    """t = x + c; u = Reshape(t) (a view of t); v = Relu(t) is t's last reader and may run in place,
    but u still needs t's values: y = Reshape(u) + v."""
    nodes = [helper.make_node("Add", ["x", "c"], ["t"], name="add"),
             helper.make_node("Reshape", ["t", "flat"], ["u"], name="reshape"),
             helper.make_node("Relu", ["t"], ["v"], name="relu"),
             helper.make_node("Reshape", ["u", "shape"], ["w"], name="back"),
             helper.make_node("Add", ["w", "v"], ["y"], name="sum")]
    return make_model(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])],
                      {"c": np.array([1.0, -2.0, 0.5], np.float32), "flat": np.array([6], np.int64),
                       "shape": np.array([2, 3], np.int64)})


def test_in_place_kernels_never_overwrite_a_live_view():
    x = np.array([[0.5, 1.0, -2.0], [-1.0, 3.0, 0.25]], np.float32)
    t = x + np.array([1.0, -2.0, 0.5], np.float32)
    expected = t + np.maximum(t, 0)  # hand-computed: Relu in place on t would give 2 * relu(t)
    y = refquant.Session(refquant.load(_aliasing_graph())).run({"x": x})["y"]
    np.testing.assert_array_equal(y, expected)


def test_in_place_kernels_never_overwrite_what_a_hook_kept_or_a_feed():
    kept = {}
    x = np.array([[0.5, 1.0, -2.0], [-1.0, 3.0, 0.25]], np.float32)
    x_before = x.copy()
    refquant.Session(refquant.load(_chain())).run({"x": x}, hooks=[lambda n, a, node: kept.setdefault(n, a)])
    a = x + np.array([1.0, -2.0, 0.5], np.float32)
    np.testing.assert_array_equal(kept["a"], a)  # mul would have run in place on a, but the hook holds it
    np.testing.assert_array_equal(kept["b"], a * x)
    np.testing.assert_array_equal(x, x_before)


def test_in_place_kernels_do_run_when_nothing_else_sees_the_tensor():
    seen = {}

    def probe(name, array, node):
        seen[name] = id(array)  # an id, not a reference: the buffer stays private

    refquant.Session(refquant.load(_chain())).run({"x": np.ones((2, 3), np.float32)}, hooks=[probe])
    assert seen["b"] == seen["a"]  # Mul wrote into a's buffer


# ------------------------------------------------------------------ refquant.parallel
def test_parallel_for_runs_every_item_once_and_waits_for_all():
    from refquant import parallel

    for n_items in (1, 2, 7, 200):
        counts = np.zeros(n_items, np.int64)

        def body(i, counts=counts):
            counts[i] += 1  # each item is claimed by exactly one thread: no race on counts[i]
            np.dot(np.ones(2000), np.ones(2000))  # releases the GIL: other threads get to claim

        parallel.parallel_for(n_items, body, threads=3)
        assert counts.tolist() == [1] * n_items


def test_parallel_for_reraises_an_item_error():
    from refquant import parallel

    def body(i):
        if i == 5:
            raise ValueError("item 5")

    with pytest.raises(ValueError, match="item 5"):
        parallel.parallel_for(20, body, threads=2)


# ------------------------------------------------------------------ Conv epilogue fusion
def _conv_chain_model():
    """conv -> BN -> Mul(per-channel) -> Add(scalar) -> Relu, and a second conv -> Clip(0, 6) feeding a
    depthwise conv whose output the graph also returns through Mul (two readers: no fusion past it)."""
    rng = np.random.default_rng(3)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    init = {"w1": f(6, 3, 3, 3), "b1": f(6), "s": f(6) + 2, "bb": f(6), "m": f(6), "v": np.abs(f(6)) + 0.5,
            "k": f(1, 6, 1, 1), "c": np.array(0.25, np.float32), "w2": f(6, 1, 3, 3), "lo": np.array(0, np.float32),
            "hi": np.array(6, np.float32), "w3": f(4, 6, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["n1"], epsilon=1e-3, name="bn"),
             helper.make_node("Mul", ["n1", "k"], ["m1"], name="mul"),
             helper.make_node("Add", ["m1", "c"], ["a1"], name="add"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], group=6, strides=[2, 2], pads=[1, 1, 1, 1], name="dw"),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="pw"),
             helper.make_node("Mul", ["r2", "c"], ["z"], name="side")]
    return make_model(nodes, [("x", FLOAT, [2, 3, 9, 9])], [("y", FLOAT, None), ("z", FLOAT, None)], init)


def test_conv_epilogue_fusion_gives_the_same_bits_as_the_ops_one_by_one():
    graph = refquant.load(_conv_chain_model())
    session = refquant.Session(graph)
    x = np.random.default_rng(4).standard_normal((2, 3, 9, 9)).astype(np.float32)
    fused = session.run({"x": x})
    plan = session._plan(tuple(graph.output_names), fuse=True)
    assert [s.node.name for s in plan] == ["conv1+relu", "dw+relu6", "pw", "side"]
    one_by_one = session.run({"x": x}, hooks=[lambda name, array, node: None])  # hooks turn fusion off
    for name in ("y", "z"):
        assert np.array_equal(fused[name], one_by_one[name])
    expected = ort_run(_conv_chain_model(), {"x": x})
    # float32 sums in another order than onnxruntime's: a few ulp of the largest values
    for name in ("y", "z"):
        want = expected[name]
        np.testing.assert_allclose(fused[name], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_no_fusion_when_the_intermediate_tensor_is_asked_for():
    graph = refquant.load(_conv_chain_model())
    session = refquant.Session(graph)
    x = np.random.default_rng(4).standard_normal((2, 3, 9, 9)).astype(np.float32)
    out = session.run({"x": x}, outputs=["n1", "y"])
    plan = session._plan(("n1", "y"), fuse=True)
    assert [s.node.name for s in plan][:4] == ["conv1+bn", "mul", "add", "relu"]
    assert out["n1"].shape == (2, 6, 9, 9)


def test_parallel_pool_works_in_a_forked_child():
    import multiprocessing

    from refquant import parallel

    parallel.parallel_for(4, lambda i: None, threads=2)  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        assert pool.apply(_threaded_sum_in_child, ()) == sum(range(16))


def _threaded_sum_in_child():
    from refquant import parallel

    out = np.zeros(16, np.int64)

    def body(i):
        out[i] = i

    parallel.parallel_for(16, body, threads=2)
    return int(out.sum())


def _preactivation_model():
    """MaxPool -> BN -> Mul(per-channel) -> Add(per-channel) -> Relu -> Conv: a chain that starts at a BN."""
    rng = np.random.default_rng(5)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    init = {"s": f(4) + 2, "bb": f(4), "m": f(4), "v": np.abs(f(4)) + 0.5, "k": f(4, 1, 1), "c": f(1, 4, 1, 1),
            "w": f(3, 4, 1, 1)}
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("BatchNormalization", ["p", "s", "bb", "m", "v"], ["n"], name="bn"),
             helper.make_node("Mul", ["n", "k"], ["m1"], name="scale"),
             helper.make_node("Add", ["m1", "c"], ["a1"], name="shift"),
             helper.make_node("Relu", ["a1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="conv")]
    return make_model(nodes, [("x", FLOAT, [3, 4, 10, 12])], [("y", FLOAT, None)], init)


def test_channel_chain_fusion_after_a_pool_gives_the_same_bits():
    graph = refquant.load(_preactivation_model())
    session = refquant.Session(graph)
    x = np.random.default_rng(6).standard_normal((3, 4, 10, 12)).astype(np.float32)
    fused = session.run({"x": x})["y"]
    plan = session._plan(tuple(graph.output_names), fuse=True)
    assert [s.node.name for s in plan] == ["pool", "bn+relu", "conv"]
    one_by_one = session.run({"x": x}, hooks=[lambda name, array, node: None])["y"]
    assert np.array_equal(fused, one_by_one)
    want = ort_run(_preactivation_model(), {"x": x})["y"]
    # float32 sums of 4 products in another order than onnxruntime's: a few ulp of the largest values
    np.testing.assert_allclose(fused, want, rtol=0, atol=1e-5 * np.abs(want).max())


# ------------------------------------------------------------------ Concat elision
def _fire_model():
    """A SqueezeNet Fire module plus a pool branch: x -> squeeze conv+Relu -> [expand 1x1 conv+Relu,
    expand 3x3 conv (no epilogue), MaxPool, and a conv that a second node also reads] -> Concat(axis=1)
    -> 1x1 conv. The two expands write into the Concat's output, the pool and the twice-read conv are
    copied into it."""
    rng = np.random.default_rng(7)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    init = {"ws": f(4, 3, 1, 1), "bs": f(4), "w1": f(5, 4, 1, 1), "b1": f(5), "w3": f(6, 4, 3, 3),
            "w2": f(2, 4, 1, 1), "wo": f(3, 17, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "ws", "bs"], ["s"], name="squeeze"),
             helper.make_node("Relu", ["s"], ["sr"], name="squeeze_relu"),
             helper.make_node("Conv", ["sr", "w1", "b1"], ["e1"], name="expand1"),
             helper.make_node("Relu", ["e1"], ["e1r"], name="expand1_relu"),
             helper.make_node("Conv", ["sr", "w3"], ["e3"], pads=[1, 1, 1, 1], name="expand3"),
             helper.make_node("MaxPool", ["sr"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="pool"),
             helper.make_node("Conv", ["sr", "w2"], ["side"], name="side_conv"),
             helper.make_node("Sigmoid", ["side"], ["z"], name="side_reader"),
             helper.make_node("Concat", ["e1r", "e3", "p", "side"], ["cat"], axis=1, name="concat"),
             helper.make_node("Conv", ["cat", "wo"], ["y"], name="out")]
    return make_model(nodes, [("x", FLOAT, ["batch", 3, 6, 7])], [("y", FLOAT, None), ("z", FLOAT, None)], init)


@pytest.mark.parametrize("threads", [1, 2])
def test_concat_elision_gives_the_same_bits_as_the_ops_one_by_one(threads):
    from refquant.runtime import _concat_into

    graph = refquant.load(_fire_model())
    session = refquant.Session(graph, threads=threads)
    x = np.random.default_rng(8).standard_normal((3, 3, 6, 7)).astype(np.float32)
    elided = session.run({"x": x})
    plan = session._plan(tuple(graph.output_names), fuse=True)
    writers = {s.node.name: s.into[1:] for s in plan if s.into is not None}
    assert writers == {"expand1+expand1_relu": (0, 17), "expand3": (5, 17)}  # (channel offset, channels)
    assert [s.kernel for s in plan if s.node.name == "concat"] == [_concat_into]
    one_by_one = session.run({"x": x}, hooks=[lambda name, array, node: None])  # hooks turn elision off
    assert all(s.into is None for s in session._plan(tuple(graph.output_names), fuse=False))
    for name in ("y", "z"):
        assert np.array_equal(elided[name], one_by_one[name])
    both = session.run({"x": x}, outputs=["cat", "y"])  # the Concat's output is the assembled buffer
    assert np.array_equal(both["y"], elided["y"])
    expected = ort_run(_fire_model(), {"x": x})
    # float32 sums of at most 36 products in another order than onnxruntime's: a few ulp of the largest values
    for name in ("y", "z"):
        np.testing.assert_allclose(elided[name], expected[name], rtol=0, atol=1e-5 * np.abs(expected[name]).max())


def test_concat_into_falls_back_to_a_plain_concatenation_when_shapes_disagree():
    from refquant.runtime import _concat_into

    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((2, 3, 4, 4)).astype(np.float32), rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    want = np.concatenate([a, b], axis=1)
    assert np.array_equal(_concat_into(a, b, axis=1, offsets=(0, 3, 5), buffer=None), want)
    wrong_channels = np.zeros((2, 6, 4, 4), np.float32)  # the plan expected 6 channels, the inputs have 5
    assert np.array_equal(_concat_into(a, b, axis=1, offsets=(0, 3, 6), buffer=wrong_channels), want)
    wrong_size = np.zeros((2, 5, 4, 3), np.float32)
    assert np.array_equal(_concat_into(a, b, axis=1, offsets=(0, 3, 5), buffer=wrong_size), want)
    right = np.empty((2, 5, 4, 4), np.float32)
    right[:, :3] = a  # as a producer would have written it
    out = _concat_into(right[:, :3], b, axis=1, offsets=(0, 3, 5), buffer=right)
    assert out is right and np.array_equal(out, want)


# ------------------------------------------------------------------ residual Add + Relu
def _residual_model():
    """conv -> Add(conv, x) -> Relu -> conv, a two-input Sum -> Clip(0, 6), and an Add that broadcasts a
    [1, C, 1, 1] graph input (the fused step's fallback: the Add kernel, then the chain)."""
    rng = np.random.default_rng(13)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    init = {"w1": f(4, 4, 3, 3), "w2": f(4, 4, 1, 1), "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Add", ["c1", "x"], ["a1"], name="residual"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Sum", ["c2", "r1"], ["s2"], name="sum"),
             helper.make_node("Clip", ["s2", "lo", "hi"], ["y"], name="relu6"),
             helper.make_node("Add", ["y", "shift"], ["a3"], name="broadcast_add"),
             helper.make_node("Relu", ["a3"], ["z"], name="relu3")]
    return make_model(nodes, [("x", FLOAT, ["batch", 4, 5, 6]), ("shift", FLOAT, [1, 4, 1, 1])],
                      [("y", FLOAT, None), ("z", FLOAT, None)], init)


@pytest.mark.parametrize("threads", [1, 2])
def test_residual_add_and_relu_fusion_gives_the_same_bits(threads):
    graph = refquant.load(_residual_model())
    session = refquant.Session(graph, threads=threads)
    rng = np.random.default_rng(14)
    feeds = {"x": rng.standard_normal((3, 4, 5, 6)).astype(np.float32),
             "shift": rng.standard_normal((1, 4, 1, 1)).astype(np.float32)}
    feeds["x"][0, 0, 0, :2] = [np.nan, -0.0]  # NaN propagates through both paths alike
    fused = session.run(feeds)
    plan = session._plan(tuple(graph.output_names), fuse=True)
    assert [s.node.name for s in plan] == ["conv1", "residual+relu", "conv2", "sum+relu6", "broadcast_add+relu3"]
    one_by_one = session.run(feeds, hooks=[lambda name, array, node: None])
    for name in ("y", "z"):
        assert np.array_equal(fused[name], one_by_one[name], equal_nan=True)
        assert np.array_equal(np.signbit(fused[name]), np.signbit(one_by_one[name]))
    expected = ort_run(_residual_model(), feeds)
    # float32 sums of at most 36 products in another order than onnxruntime's: a few ulp of the largest values
    for name in ("y", "z"):
        want = expected[name]
        scale = np.nanmax(np.abs(np.where(np.isinf(want), 0, want)))
        np.testing.assert_allclose(fused[name], want, rtol=0, atol=1e-5 * scale)


def test_parallel_split_covers_the_range_in_near_equal_parts():
    from refquant import parallel

    assert parallel.split(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]  # edges round(i * 10 / 4): 2.5 -> 2, 7.5 -> 8
    assert parallel.split(3, 8) == [(0, 1), (1, 2), (2, 3)]  # never more parts than items
    assert parallel.split(0, 3) == []
    for length in range(1, 60):
        for parts in range(1, 12):
            ranges = parallel.split(length, parts)
            assert [i for a, b in ranges for i in range(a, b)] == list(range(length))
            sizes = [b - a for a, b in ranges]
            assert len(ranges) == min(parts, length) and max(sizes) - min(sizes) <= 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings (Linux only)")
@pytest.mark.parametrize("keep", [False, True])
def test_sessions_keep_freed_memory_mapped_unless_told_not_to(keep):
    """After the first Session, a freed 64 MB array stays mapped for the next allocation (RSS does not fall back),
    as onnxruntime's arena keeps it; REFQUANT_KEEP_MALLOC=1 leaves glibc's default (the array is unmapped)."""
    import subprocess

    code = """
import numpy as np, refquant
from onnx import TensorProto, helper
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
    opset_imports=[helper.make_opsetid("", 17)])
refquant.Session(refquant.load(model))
a = np.ones(16 << 20, np.float32)
high = rss()
del a
print(high - rss())
"""
    env = dict(os.environ, REFQUANT_KEEP_MALLOC="1" if keep else "0")
    released = int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True).stdout.split()[-1])
    if keep:
        assert released > 48 << 20  # glibc's default: a block above the mmap threshold is unmapped on free
    else:
        assert released < 8 << 20  # kept for reuse


def test_small_convs_run_on_one_thread_by_their_multiply_adds():
    """N * |W| * input pixels / prod(strides) multiply-adds (8x for depthwise) against SMALL_CONV_MACS (16 Mi)."""
    from refquant.ir import Node
    from refquant.runtime import SMALL_CONV_MACS, _small_conv

    def small(x_shape, w_shape, strides=None, op="Conv"):
        node = Node(op, ["x", "w"], ["y"], {"strides": strides} if strides else {})
        return _small_conv(node, [np.empty(x_shape, np.float32), np.empty(w_shape, np.float32)])

    assert SMALL_CONV_MACS == 16 << 20
    assert small((1, 16, 32, 32), (32, 16, 3, 3))  # 4608 * 1024 = 4.7 M
    assert not small((8, 64, 56, 56), (64, 64, 3, 3))  # 925 M
    assert not small((1, 256, 64, 64), (256, 256, 1, 1))  # 65536 * 4096 = 268 M
    assert not small((1, 256, 64, 64), (256, 256, 1, 1), strides=[4, 4])  # / 16 = exactly 16 Mi: not below
    assert small((1, 256, 64, 64), (256, 256, 1, 1), strides=[8, 8])  # / 64 = 4.2 M
    assert not small((1, 32, 112, 112), (32, 1, 3, 3))  # depthwise: 288 * 12544 = 3.6 M, counted 8x = 28.9 M
    assert small((1, 32, 56, 56), (32, 1, 3, 3))  # 7.2 M counted
    assert not small((1, 16, 32, 32), (32, 16, 3, 3), op="ConvTranspose")  # only Conv is judged


def test_a_gemm_gives_the_same_bits_on_every_thread_budget():
    """parallel.matmul cuts a GEMM by its shape alone: a BLAS kernel may sum a row differently in a block of another
    shape (OpenBLAS 0.3.31's Haswell kernels do), so blocks that followed the thread count changed the last bits."""
    from refquant import parallel

    rng = np.random.default_rng(3)
    for m, k, n in [(256, 300, 370), (32, 144, 4096), (1200, 96, 120)]:  # cut into 6, 4 and 3 blocks
        a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
        results = []
        for threads in (1, 2, 5):
            with parallel.thread_budget(threads), parallel.single_threaded_blas():
                results.append(parallel.matmul(a, b))
        assert all(np.array_equal(results[0], r) for r in results[1:]), (m, k, n)
        np.testing.assert_allclose(results[0], a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)  # float32 sums of <= 300


@needs_shared_models
def test_a_model_gives_the_same_bits_on_every_thread_count_and_in_any_python_thread():
    """MTCNN R-Net differed between threads=1 and 2 by refquant's GEMM blocks, and a Session run in a worker thread
    ran its GEMMs on OpenBLAS's two threads (threadpoolctl limits BLAS from one controlling thread only)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    from refquant import parallel

    graph = refquant.load(SHARED_MODELS / "mtcnn_rnet.onnx")
    x = np.random.default_rng(0).standard_normal((48, 3, 24, 24)).astype(np.float32)
    outs = [refquant.Session(graph, threads=t).run({"input": x}) for t in (1, 2, 3)]
    with ThreadPoolExecutor(1) as pool:
        outs.append(pool.submit(lambda: refquant.Session(graph, threads=2).run({"input": x})).result())

        def blas_threads_inside():
            with parallel.single_threaded_blas():
                return threadpool_info()[0]["num_threads"]

        assert pool.submit(blas_threads_inside).result() == 1
    for out in outs[1:]:
        assert all(np.array_equal(outs[0][k], out[k]) for k in outs[0])
