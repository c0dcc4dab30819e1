"""Session: execution order, hooks, freeing tensors after their last use, feed checks, errors."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.errors import FeedError, OpError

from .helpers import FLOAT, make_model, ort_run


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
    assert refs["a"]() is None and refs["b"]() is None and refs["e"]() is None
    assert refs["y"]() is outputs["y"]


def test_freeing_happens_during_the_run_not_after():
    alive_when_exp_ran = {}
    refs = {}

    def probe(name, array, node):
        refs[name] = weakref.ref(array)
        if name == "e":  # "a" was last read by "mul", which ran before "exp"
            alive_when_exp_ran["a"] = refs["a"]() is not None

    refquant.Session(refquant.load(_chain())).run({"x": np.ones((1, 3), np.float32)}, hooks=[probe])
    assert alive_when_exp_ran == {"a": False}


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
