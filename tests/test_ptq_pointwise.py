"""Activation subgraphs after a layer (refquant.ptq.pointwise): which ops trace finds, f(y) against
onnxruntime running the same ops, f'(y) against central differences."""

import math

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.ptq.pointwise import IN_LOSS_BY_DEFAULT, Pointwise, trace

from .helpers import FLOAT, make_model, ort_run

C = {"c0": np.float32(0), "c1": np.float32(1), "c3": np.float32(3), "c6": np.float32(6), "half": np.float32(0.5),
     "sqrt2": np.float32(math.sqrt(2)), "k": np.float32(1.702), "two": np.float32(2)}
N = helper.make_node

# name: (nodes from "y" to "out", opset)
ACTIVATIONS = {
    "Sigmoid": ([N("Sigmoid", ["y"], ["out"])], 17),
    "Tanh": ([N("Tanh", ["y"], ["out"])], 17),
    "HardSigmoid": ([N("HardSigmoid", ["y"], ["out"], alpha=0.3, beta=0.4)], 17),
    "HardSwish": ([N("HardSwish", ["y"], ["out"])], 17),
    "LeakyRelu": ([N("LeakyRelu", ["y"], ["out"], alpha=0.2)], 17),
    "Elu": ([N("Elu", ["y"], ["out"], alpha=0.7)], 17),
    "Softplus": ([N("Softplus", ["y"], ["out"])], 17),
    "Gelu": ([N("Gelu", ["y"], ["out"])], 20),
    "Gelu tanh": ([N("Gelu", ["y"], ["out"], approximate="tanh")], 20),
    "SiLU as Mul(y, Sigmoid(y))": ([N("Sigmoid", ["y"], ["s"]), N("Mul", ["y", "s"], ["out"])], 17),
    "HardSwish as y relu6(y + 3) / 6": ([N("Add", ["y", "c3"], ["a"]), N("Clip", ["a", "c0", "c6"], ["b"]),
                                         N("Mul", ["y", "b"], ["m"]), N("Div", ["m", "c6"], ["out"])], 17),
    "GELU as y (1 + erf(y / sqrt 2)) / 2": ([N("Div", ["y", "sqrt2"], ["d"]), N("Erf", ["d"], ["e"]),
                                             N("Add", ["e", "c1"], ["f"]), N("Mul", ["y", "f"], ["g"]),
                                             N("Mul", ["g", "half"], ["out"])], 17),
    "QuickGELU y sigmoid(1.702 y)": ([N("Mul", ["k", "y"], ["a"]), N("Sigmoid", ["a"], ["s"]),
                                      N("Mul", ["s", "y"], ["out"])], 17),
    "1 - tanh(y) ^ 2 / 2 - y": ([N("Tanh", ["y"], ["t"]), N("Mul", ["t", "t"], ["tt"]), N("Div", ["tt", "two"], ["h"]),
                                 N("Sub", ["c1", "h"], ["r"]), N("Sub", ["r", "y"], ["out"])], 17),
    "Clip(Neg(y), -1, 2)": ([N("Neg", ["y"], ["n"]), N("Clip", ["n", "m1", "two"], ["out"])], 17),
}


def activation_model(nodes, opset, extra_outputs=()):
    inits = {name: value for name, value in {**C, "m1": np.float32(-1)}.items()
             if any(name in n.input for n in nodes)}
    outputs = [("out", FLOAT, None)] + [(name, FLOAT, None) for name in extra_outputs]
    return make_model(nodes, [("y", FLOAT, [2, 3, 241])], outputs, inits, opset=opset,
                      ir_version=9 if opset >= 20 else None)


def traced(nodes, opset=17, extra_outputs=()) -> Pointwise | None:
    graph = refquant.load(activation_model(nodes, opset, extra_outputs))
    return trace(graph, "y", graph.consumers(), set(graph.output_names) - {"out"})


def _points():
    """y from -6 to 6, kept 0.003 or more from every kink of the activations above."""
    return (np.linspace(-6, 6, 241) + 0.0137).reshape(1, 1, -1).repeat(2, axis=0).repeat(3, axis=1)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_the_traced_function_is_what_onnxruntime_computes(name):
    nodes, opset = ACTIVATIONS[name]
    pointwise = traced(nodes, opset)
    assert pointwise is not None and pointwise.result == "out"
    assert [n.op_type for n in pointwise.nodes] == [n.op_type for n in nodes]
    y = _points().astype(np.float32) * np.array([1, 0.5, 1.5], np.float32).reshape(1, 3, 1)
    expected = ort_run(activation_model(nodes, opset), {"y": y})["out"]
    value, _ = pointwise(y)
    assert value.dtype == np.float32
    alone, none = pointwise(y, derivative=False)  # the value without the derivative: the same bits
    assert np.array_equal(alone, value) and none is None
    # float32 ops, each within a few ulps of onnxruntime's own (MLAS approximates the logistic and tanh):
    # |y| reaches 9, where an ulp is 1e-6, and the products y s(y) carry that absolute error to small values
    np.testing.assert_allclose(value, expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_the_derivative_is_the_central_difference(name):
    pointwise = traced(*ACTIVATIONS[name])
    y = _points()  # float64: the difference quotient needs it
    eps = 1e-6
    numeric = (pointwise(y + eps)[0] - pointwise(y - eps)[0]) / (2 * eps)
    # truncation O(eps^2 f''') and rounding O(1e-16 / eps) are both below 1e-8 here
    np.testing.assert_allclose(pointwise(y)[1], numeric, rtol=1e-7, atol=1e-7)


def test_trace_stops_where_something_else_reads():
    """Sigmoid(y) scaling another tensor (an SE gate): f is the Sigmoid alone."""
    nodes = [N("Sigmoid", ["y"], ["s"]), N("Mul", ["s", "x"], ["out"])]
    graph = refquant.load(make_model(nodes, [("y", FLOAT, [1, 4]), ("x", FLOAT, [1, 4])], [("out", FLOAT, None)]))
    pointwise = trace(graph, "y", graph.consumers(), set(graph.output_names))
    assert pointwise.result == "s" and pointwise.describe() == "Sigmoid"


@pytest.mark.parametrize("case", ["linear", "source read twice", "inner tensor is an output", "per-channel constant",
                                  "source is an output"])
def test_no_activation_when_f_is_not_a_function_of_y_alone_or_is_linear(case):
    if case == "linear":  # a scale and shift: no activation, the layer keeps its quadratic loss
        assert traced([N("Mul", ["y", "half"], ["a"]), N("Add", ["a", "c1"], ["out"])]) is None
    elif case == "source read twice":  # y also goes to Relu -> r, a second output
        assert traced([N("Sigmoid", ["y"], ["out"]), N("Relu", ["y"], ["r"])], extra_outputs=["r"]) is None
    elif case == "inner tensor is an output":  # the Sigmoid's output is a graph output, and SiLU needs it
        assert traced([N("Sigmoid", ["y"], ["s"]), N("Mul", ["y", "s"], ["out"])], extra_outputs=["s"]) is None
    elif case == "per-channel constant":
        nodes = [N("Mul", ["y", "scale"], ["a"]), N("Sigmoid", ["a"], ["out"])]
        graph = refquant.load(make_model(nodes, [("y", FLOAT, [1, 3])], [("out", FLOAT, None)],
                                         {"scale": np.ones((1, 3), np.float32)}))
        assert trace(graph, "y", graph.consumers(), set()) is None
    else:
        graph = refquant.load(activation_model([N("Sigmoid", ["y"], ["out"])], 17))
        assert trace(graph, "y", graph.consumers(), {"y"}) is None


def test_allowed_subgraphs_take_the_largest_allowed_prefix():
    """SiLU then a scale (PP-LCNet's learnable affine after its activation): with the default set the SiLU
    alone, f = y s(y); without a set all three ops, f = 2 y s(y)."""
    nodes = [N("Sigmoid", ["y"], ["s"]), N("Mul", ["y", "s"], ["m"]), N("Mul", ["m", "two"], ["out"])]
    graph = refquant.load(activation_model(nodes, 17))
    everything = trace(graph, "y", graph.consumers(), set())
    default = trace(graph, "y", graph.consumers(), set(), IN_LOSS_BY_DEFAULT)
    assert everything.describe() == "Sigmoid > Mul > Mul" and default.describe() == "Sigmoid > Mul"
    y = _points()
    np.testing.assert_allclose(default(y)[0], y / (1 + np.exp(-y)), rtol=1e-12)
    np.testing.assert_allclose(everything(y)[0], 2 * y / (1 + np.exp(-y)), rtol=1e-7)  # the float32 constant 2
    assert trace(graph, "y", graph.consumers(), set(), {"Tanh"}) is None
