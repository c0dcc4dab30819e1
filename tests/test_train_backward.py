"""Every registered backward against central finite differences of its own forward kernel, in float64.

For a case (op, attributes, inputs) the harness runs the forward kernel exactly as the runtime calls it,
draws a random cotangent c_k for each float output y_k, and checks, for every element of every
differentiable input, that the backward's gradient of L = sum_k <y_k, c_k> matches
(L(x + h e_j) - L(x - h e_j)) / 2h with relative error ||g - g_fd||_inf / ||g_fd||_inf <= 1e-4.

Step: h = 1e-6 unless a case says otherwise. In float64 the central difference's truncation error is
h^2/6 * |L'''| ~ 1e-13 for these O(1) inputs, and its rounding error is ~ eps * |L| / h ~ 1e-16 * 30 / 1e-6
~ 3e-9 (|L| <= ~30 for a few hundred O(1) terms), both far below 1e-4 of gradients of size O(1); the ops
that are linear in each input (Conv, Gemm, shapes, pads) make the difference exact up to rounding.
Kinks: inputs of piecewise ops are drawn at least 0.05 away from every kink (Relu/PRelu/LeakyRelu at 0,
Clip and HardSigmoid/HardSwish bounds, Abs at 0), and inputs of max-type ops (MaxPool, GlobalMaxPool,
Max/Min, ReduceMax/Min) are distinct values spaced >= 0.05 apart, so the +-h steps never cross a kink
or change an argmax (h = 1e-6 << 0.05).
Forward kernels that compute in float32 whatever the input (LayerNormalization and GroupNormalization
with their default stash_type=1) are run with stash_type=0, where they keep the input's float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

import refquant.ops as ops
import refquant.train.grads as grads
from refquant import onnx_io
from refquant.train.backward_registry import lookup_backward

TOLERANCE = 1e-4  # the target for float64 finite differences


@dataclass
class Case:
    op: str
    inputs: list  # float64 arrays are differentiated unless listed in ``fixed``; None: an omitted input
    attrs: dict = field(default_factory=dict)
    noutputs: int = 1
    fixed: tuple = ()  # float inputs that are parameters, not data (scales, ratios): their gradient is None
    zero: tuple = ()  # inputs the output does not depend on (locally): gradient and differences both all 0
    seeded: tuple | None = None  # outputs that reach the loss (None: every float output); others get None
    version: int | None = None
    step: float = 1e-6
    name: str = ""

    def __str__(self):
        return self.name or self.op


# ----------------------------------------------------------------------------- input generators
_rng = np.random.default_rng(20261126)


def normal(*shape):
    return _rng.standard_normal(shape)


def away(*shape, margin=0.05, scale=1.0, center=0.0):
    """Values with |x - center| in [margin, margin + scale], random signs: far from a kink at ``center``."""
    return center + _rng.choice([-1.0, 1.0], size=shape) * (margin + scale * _rng.random(shape))


def avoiding(*shape, kinks=(0.0,), low=-2.0, high=2.0, margin=0.05):
    """Uniform values in [low, high] redrawn until each is >= ``margin`` away from every kink."""
    x = low + (high - low) * _rng.random(shape)
    near = np.zeros(shape, dtype=bool)
    for k in kinks:
        near |= np.abs(x - k) < margin
    while near.any():
        x[near] = low + (high - low) * _rng.random(int(near.sum()))
        near[:] = False
        for k in kinks:
            near |= np.abs(x - k) < margin
    return x


def distinct(*shape, spacing=0.05):
    """Distinct values spaced >= ``spacing`` apart in random order: no ties for a max or min to break."""
    n = int(np.prod(shape))
    return (_rng.permutation(n) * spacing - n * spacing / 2).reshape(shape) + _rng.random(shape) * spacing * 0.2


def positive(*shape, low=0.5, high=2.0):
    return low + (high - low) * _rng.random(shape)


def i64(*values):
    return np.array(values, dtype=np.int64)


def f64(*values):
    return np.array(values, dtype=np.float64)


# ----------------------------------------------------------------------------- the cases
CORE = [
    # Conv: dense, padded/strided, 1-D and 3-D, grouped, depthwise (with a multiplier), dilated, 1x1, SAME
    Case("Conv", [normal(2, 3, 7, 6), normal(4, 3, 3, 3), normal(4)], dict(pads=[1, 0, 2, 1], strides=[2, 1]),
         name="conv_pads_strides"),
    Case("Conv", [normal(2, 3, 9), normal(5, 3, 2), None], dict(strides=[2], dilations=[2]), name="conv1d_dil"),
    Case("Conv", [normal(1, 2, 4, 5, 4), normal(3, 2, 2, 3, 2), normal(3)], dict(pads=[1, 0, 1, 0, 1, 1]),
         name="conv3d"),
    Case("Conv", [normal(2, 4, 6, 6), normal(6, 2, 3, 3), normal(6)], dict(group=2, pads=[1, 1, 1, 1]),
         name="conv_grouped"),
    Case("Conv", [normal(2, 4, 7, 7), normal(4, 1, 3, 3), normal(4)], dict(group=4, strides=[2, 2],
                                                                          pads=[1, 1, 1, 1]), name="depthwise3x3_s2"),
    Case("Conv", [normal(2, 3, 6, 5), normal(6, 1, 3, 2), normal(6)], dict(group=3, dilations=[2, 1],
                                                                          pads=[2, 0, 1, 1]), name="depthwise_mult2"),
    Case("Conv", [normal(2, 5, 6, 5), normal(5, 1, 3, 3), None], dict(group=5, pads=[1, 1, 1, 1]),
         name="depthwise3x3_s1"),
    Case("Conv", [normal(2, 3, 4, 5), normal(3, 1, 1, 2), normal(3)], dict(group=3, pads=[1, 2, 1, 0]),
         name="depthwise_pad_wider_than_kernel"),
    Case("Conv", [normal(3, 4, 9), normal(4, 1, 3), normal(4)], dict(group=4, strides=[2], pads=[1, 0]),
         name="depthwise1d_s2"),
    Case("Conv", [normal(2, 4, 5, 5), normal(3, 4, 1, 1), normal(3)], dict(strides=[2, 2]), name="conv1x1_s2"),
    Case("Conv", [normal(2, 4, 4, 3), normal(6, 2, 1, 1), None], dict(group=2), name="conv1x1_grouped"),
    Case("Conv", [normal(1, 2, 5, 6), normal(3, 2, 3, 3), normal(3)], dict(auto_pad="SAME_UPPER", strides=[2, 2]),
         name="conv_same_upper"),
    Case("Gemm", [normal(3, 4), normal(5, 4), normal(5)], dict(transB=1), name="gemm_transB"),
    Case("Gemm", [normal(4, 3), normal(4, 5), normal(3, 1)], dict(transA=1, alpha=0.7, beta=1.3),
         name="gemm_transA_alpha_beta"),
    Case("Gemm", [normal(3, 4), normal(4, 5), None], dict(alpha=2.0), name="gemm_no_c"),
    Case("MatMul", [normal(3, 4), normal(4, 5)], name="matmul_2d"),
    Case("MatMul", [normal(2, 1, 3, 4), normal(3, 4, 5)], name="matmul_batch_broadcast"),
    Case("MatMul", [normal(2, 3, 4), normal(4, 2)], name="matmul_3d_2d"),
    Case("MatMul", [normal(4), normal(2, 4, 3)], name="matmul_vec_left"),
    Case("MatMul", [normal(2, 3, 4), normal(4)], name="matmul_vec_right"),
    Case("BatchNormalization", [normal(2, 3, 4, 3), normal(3), normal(3), normal(3), positive(3)],
         dict(epsilon=1e-3), name="bn_inference"),
    Case("BatchNormalization", [normal(3, 3, 4, 2), normal(3), normal(3), normal(3), positive(3)],
         dict(epsilon=1e-3, training_mode=1, momentum=0.8), noutputs=3, name="bn_training"),
    Case("BatchNormalization", [normal(3, 2, 5), normal(2), normal(2), normal(2), positive(2)],
         dict(training_mode=1, momentum=0.7), noutputs=3, seeded=(1, 2), zero=(1, 2),
         name="bn_training_running_stats_only"),
    Case("Relu", [away(3, 4, 5)]),
    Case("Clip", [avoiding(4, 5, kinks=(0.0, 6.0), low=-3, high=9), f64(0.0), f64(6.0)], name="clip_relu6"),
    Case("Clip", [avoiding(4, 5, kinks=(0.2,)), None, f64(0.2)], name="clip_max_only"),
    Case("Clip", [avoiding(4, 5, kinks=(-0.3,)), f64(-0.3)], name="clip_min_only"),
    Case("Clip", [avoiding(4, 5, kinks=(0.5, -0.5)), f64(0.5), f64(-0.5)], zero=(0, 1), name="clip_crossed_bounds"),
    Case("PRelu", [away(2, 3, 4, 4), normal(3, 1, 1)], name="prelu_channel"),
    Case("PRelu", [away(2, 5), normal(1)], name="prelu_scalar"),
    Case("Add", [normal(2, 3, 4), normal(3, 1)], name="add_broadcast"),
    Case("Mul", [normal(2, 1, 4), normal(3, 4)], name="mul_broadcast"),
    Case("MaxPool", [distinct(2, 3, 6, 6)], dict(kernel_shape=[2, 2], strides=[2, 2]), name="maxpool_2x2"),
    Case("MaxPool", [distinct(2, 2, 7, 8)], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
         name="maxpool_3x3_ceil"),
    Case("MaxPool", [distinct(1, 2, 6, 7)], dict(kernel_shape=[2, 3], pads=[1, 1, 0, 1], dilations=[2, 1]),
         noutputs=2, name="maxpool_pads_dil_indices"),
    Case("AveragePool", [normal(2, 2, 7, 6)], dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1]),
         name="avgpool_pads"),
    Case("AveragePool", [normal(2, 2, 7, 6)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                                     count_include_pad=1), name="avgpool_count_pad"),
    Case("AveragePool", [normal(1, 3, 8, 7)], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
         name="avgpool_ceil"),
    Case("GlobalAveragePool", [normal(2, 3, 4, 5)]),
    Case("Flatten", [normal(2, 3, 4)], dict(axis=2)),
    Case("Reshape", [normal(2, 3, 4), i64(0, -1, 2)]),
    Case("Softmax", [normal(2, 3, 4)], dict(axis=1), version=13, name="softmax13_axis1"),
    Case("Softmax", [normal(2, 3, 4)], dict(axis=1), version=11, name="softmax11_coerced"),
    Case("Softmax", [normal(2, 3, 4)], version=13, name="softmax13_default"),
    Case("Softmax", [normal(2, 3, 4)], version=11, name="softmax11_default_coerced"),
]


def _between_column_values(a, rank):
    """A row vector b with b[k] halfway between the rank-th and next smallest of a[:, k]: no tie with a
    (a's values are distinct, >= 0.05 apart)."""
    ordered = np.sort(a, axis=0)
    return (ordered[rank] + ordered[rank + 1]) / 2


# Max(a [3, 4], b [4], c [3, 1]) with every input winning somewhere and no ties: b sits between the middle
# and the largest value of each column of a (it beats a except at the column's maximum); c wins one whole
# row, one that does not hold column 0's maximum, so a still wins there and b wins in the remaining row.
_a = distinct(3, 4)
_b_max = _between_column_values(_a, 1)
_c_max = np.full((3, 1), _a.min() - 1.0)
_c_max[(int(np.argmax(_a[:, 0])) + 1) % 3] = _a.max() + 1.0
# Min(a, b): b sits between the two smallest values of each column: a wins at the minima, b elsewhere.
_b_min = _between_column_values(_a, 0)
ELEMENTWISE = [
    Case("Sub", [normal(2, 3, 4), normal(4)], name="sub_broadcast"),
    Case("Div", [normal(3, 4), away(2, 1, 4, margin=0.5)], name="div_broadcast"),
    Case("Pow", [positive(3, 4), normal(4)], name="pow"),
    Case("Sqrt", [positive(3, 4)]),
    Case("Exp", [normal(3, 4)]),
    Case("Log", [positive(3, 4)]),
    Case("Neg", [normal(3, 4)]),
    Case("Abs", [away(3, 4)]),
    Case("Reciprocal", [away(3, 4, margin=0.5)]),
    Case("Tanh", [normal(3, 4)]),
    Case("Erf", [normal(3, 4)]),
    Case("Sin", [normal(3, 4)]),
    Case("Atan", [normal(3, 4)]),
    Case("Cos", [normal(3, 4)]),
    Case("Tan", [normal(3, 4) * 0.5]),
    Case("Sinh", [normal(3, 4)]),
    Case("Cosh", [normal(3, 4)]),
    Case("Asin", [_rng.uniform(-0.9, 0.9, (3, 4))]),
    Case("Acos", [_rng.uniform(-0.9, 0.9, (3, 4))]),
    Case("Atanh", [_rng.uniform(-0.9, 0.9, (3, 4))]),
    Case("Asinh", [normal(3, 4)]),
    Case("Acosh", [positive(3, 4, low=1.1, high=3.0)]),
    Case("Max", [_a, _b_max, _c_max], name="max_3_broadcast"),
    Case("Min", [_a, _b_min], name="min_broadcast"),
    Case("Sum", [normal(2, 3), normal(3), normal(2, 1)], name="sum_3_broadcast"),
    Case("Mean", [normal(2, 3), normal(3)], name="mean_broadcast"),
    Case("Where", [_rng.random((3, 4)) > 0.5, normal(3, 4), normal(4)], name="where_broadcast"),
    Case("Identity", [normal(3, 4)]),
    Case("Cast", [normal(3, 4)], dict(to=11), name="cast_to_double"),
    Case("CastLike", [normal(3, 4), np.zeros(1)], fixed=(1,), name="castlike_double"),
]

ACTIVATIONS = [
    Case("LeakyRelu", [away(3, 5)], dict(alpha=0.1)),
    Case("Sigmoid", [normal(3, 5)]),
    Case("HardSigmoid", [avoiding(3, 5, kinks=(-2.5, 2.5), low=-4, high=4)]),
    Case("HardSigmoid", [avoiding(3, 5, kinks=(-1.0, 2.0), low=-3, high=3)], dict(alpha=1 / 3, beta=1 / 3),
         name="hardsigmoid_attrs"),
    Case("HardSwish", [avoiding(3, 5, kinks=(-3.0, 3.0), low=-5, high=5)]),
    Case("Elu", [away(3, 5)], dict(alpha=0.7)),
    Case("Selu", [away(3, 5)]),
    Case("Celu", [away(3, 5)], dict(alpha=1.5)),
    Case("Softplus", [normal(3, 5)]),
    Case("Softsign", [away(3, 5)]),
    Case("Mish", [normal(3, 5)]),
    Case("ThresholdedRelu", [avoiding(3, 5, kinks=(1.0,))]),
    Case("Gelu", [normal(3, 5)], name="gelu_erf"),
    Case("Gelu", [normal(3, 5)], dict(approximate="tanh"), name="gelu_tanh"),
    Case("Softmax", [normal(2, 3, 4, 2)], dict(axis=1), version=13, name="softmax13_4d_axis1"),
    Case("LogSoftmax", [normal(2, 3, 4)], dict(axis=-1), version=13, name="logsoftmax13"),
    Case("LogSoftmax", [normal(2, 3, 4)], dict(axis=1), version=11, name="logsoftmax11_coerced"),
    Case("LogSoftmax", [normal(2, 2, 3)], version=11, name="logsoftmax11_default_coerced"),
    Case("LogSoftmax", [normal(2, 3, 2)], version=13, name="logsoftmax13_default"),
]

NN = [
    Case("ConvTranspose", [normal(2, 4, 3, 4), normal(4, 3, 3, 3), normal(3)],
         dict(strides=[2, 2], pads=[1, 0, 1, 1], output_padding=[1, 1]), name="convT_s2_pads_outpad"),
    Case("ConvTranspose", [normal(2, 4, 3, 3), normal(4, 2, 2, 3), None], dict(group=2, dilations=[2, 1]),
         name="convT_grouped_dil"),
    Case("ConvTranspose", [normal(2, 3, 5), normal(3, 2, 4), normal(2)], dict(strides=[3], pads=[1, 2]),
         name="convT_1d"),
    Case("ConvTranspose", [normal(1, 2, 3, 3), normal(2, 3, 3, 3), None], dict(strides=[2, 2], output_shape=[7, 8]),
         name="convT_output_shape"),
    Case("ConvTranspose", [normal(1, 2, 3, 4), normal(2, 2, 2, 3), normal(2)],
         dict(strides=[2, 2], auto_pad="SAME_UPPER"), name="convT_same_upper"),
    Case("GlobalMaxPool", [distinct(2, 3, 3, 4)]),
    Case("MaxPool", [distinct(2, 3, 9)], dict(kernel_shape=[3], strides=[2], pads=[1, 1]), name="maxpool_1d"),
    Case("AveragePool", [normal(2, 3, 9)], dict(kernel_shape=[3], strides=[2], pads=[1, 2], count_include_pad=1),
         name="avgpool_1d"),
    Case("AveragePool", [normal(1, 2, 5, 6)], dict(kernel_shape=[2, 2], auto_pad="SAME_UPPER", strides=[2, 2]),
         name="avgpool_same"),
    Case("AveragePool", [normal(1, 2, 7, 6)], dict(kernel_shape=[2, 2], dilations=[2, 1], pads=[1, 1, 1, 0]),
         name="avgpool_dilated"),
    Case("LRN", [normal(2, 5, 3, 2)], dict(size=3, alpha=0.3, beta=0.75, bias=1.5), name="lrn_odd"),
    Case("LRN", [normal(2, 5, 3)], dict(size=4, alpha=0.5, beta=0.6, bias=1.0), name="lrn_even"),
]

LINALG = [
    Case("Einsum", [normal(3, 4), normal(4, 2)], dict(equation="ij,jk->ik"), name="einsum_matmul"),
    Case("Einsum", [normal(2, 3, 4), normal(2, 4, 2)], dict(equation="bij, bjk -> bik"), name="einsum_batch"),
    Case("Einsum", [normal(2, 1, 3, 4), normal(5, 4, 2)], dict(equation="...ij,...jk->...ik"),
         name="einsum_ellipsis_broadcast"),
    Case("Einsum", [normal(3, 4), normal(4, 2)], dict(equation="ij,jk"), name="einsum_implicit"),
    Case("Einsum", [normal(3, 4)], dict(equation="ij->i"), name="einsum_sum"),
    Case("Einsum", [normal(3, 3)], dict(equation="ii->i"), name="einsum_diagonal"),
    Case("Einsum", [normal(3, 2), normal(2), normal(3)], dict(equation="ij,j,i->"), name="einsum_three"),
]

NORM = [
    Case("LayerNormalization", [normal(2, 3, 4), normal(3, 4), normal(3, 4)], dict(axis=-2, stash_type=0),
         name="layernorm_axis-2"),
    Case("LayerNormalization", [normal(3, 5), normal(5)], dict(stash_type=0, epsilon=1e-3), noutputs=3,
         name="layernorm_mean_invstd_outputs"),
    Case("LayerNormalization", [normal(3, 5), normal(5)], dict(stash_type=0), noutputs=3, seeded=(2,), zero=(1,),
         name="layernorm_invstd_only"),
    Case("InstanceNormalization", [normal(2, 3, 4, 3), normal(3), normal(3)]),
    Case("GroupNormalization", [normal(2, 4, 3, 2), normal(4), normal(4)], dict(num_groups=2, stash_type=0),
         version=21, name="groupnorm21"),
    Case("GroupNormalization", [normal(2, 6, 3), normal(3), normal(3)], dict(num_groups=3, stash_type=0),
         version=18, name="groupnorm18_per_group"),
    Case("Dropout", [normal(3, 4), np.array(0.3)], fixed=(1,), noutputs=2, name="dropout_inference"),
    Case("Dropout", [normal(3, 4), np.array(0.3), np.array(True)], dict(seed=3), fixed=(1,),
         name="dropout_training_seed"),
    Case("Dropout", [normal(3, 4), np.array(0.3), np.array(True)], dict(seed=5), fixed=(1,), noutputs=2,
         name="dropout_training_mask"),
]

TENSOR = [
    Case("Squeeze", [normal(2, 1, 3, 1), i64(1, -1)]),
    Case("Unsqueeze", [normal(2, 3), i64(0, 3)]),
    Case("Transpose", [normal(2, 3, 4)], dict(perm=[2, 0, 1])),
    Case("Concat", [normal(2, 1, 3), normal(2, 3, 3), normal(2, 2, 3)], dict(axis=-2)),
    Case("Split", [normal(2, 7), i64(2, 4, 1)], dict(axis=1), noutputs=3, name="split_sizes"),
    Case("Split", [normal(6, 2)], dict(num_outputs=3), noutputs=3, name="split_even"),
    Case("Slice", [normal(5, 6, 3), i64(-1, 1), i64(-6, 100), i64(0, 1), i64(-2, 2)], name="slice_steps"),
    Case("Gather", [normal(3, 5, 2), i64(4, -1, 0, 2, 4, 1).reshape(2, 3)], dict(axis=1), name="gather_repeats"),
    Case("GatherElements", [normal(3, 4), i64(0, 2, 2, -1, 1, 1, 0, 3, 3, 3, 0, 1).reshape(3, 4)], dict(axis=1)),
    Case("Pad", [normal(2, 3, 4), i64(0, 1, -1, 0, 2, 1), f64(0.5)], name="pad_constant_crop_value"),
    Case("Pad", [normal(2, 4, 5), i64(0, 2, 3, 0, 3, 2)], dict(mode="reflect"), name="pad_reflect"),
    Case("Pad", [normal(2, 3, 4), i64(0, 2, 3, 1, 0, 2)], dict(mode="edge"), name="pad_edge"),
    Case("Pad", [normal(3, 4), i64(2, 3), None, i64(-1)], dict(mode="wrap"), name="pad_wrap_axes"),
    Case("Resize", [normal(1, 2, 3, 4), None, f64(1, 1, 2, 1.5)], dict(mode="nearest"), fixed=(2,),
         name="resize_nearest_up"),
    Case("Resize", [normal(1, 2, 5, 4), None, None, i64(1, 2, 3, 7)], dict(mode="linear"), name="resize_linear"),
    Case("Resize", [normal(1, 2, 4, 4), None, None, i64(1, 2, 6, 3)],
         dict(mode="cubic", coordinate_transformation_mode="align_corners"), name="resize_cubic_align"),
    Case("Resize", [normal(1, 2, 6, 5), None, f64(1, 1, 0.5, 0.6)], dict(mode="linear", antialias=1),
         fixed=(2,), name="resize_linear_antialias_down"),
    Case("Resize", [normal(1, 2, 3, 3), f64(1, 1, 2, 2)], dict(mode="linear"), version=10, fixed=(1,),
         name="resize10_linear"),
    Case("Upsample", [normal(1, 2, 2, 3), f64(1, 1, 2, 2)], dict(mode="nearest"), version=9, fixed=(1,)),
    Case("Expand", [normal(3, 1), i64(2, 3, 4)]),
    Case("Tile", [normal(2, 3), i64(2, 3)]),
    Case("DepthToSpace", [normal(1, 8, 2, 3)], dict(blocksize=2, mode="DCR"), name="depth_to_space_dcr"),
    Case("DepthToSpace", [normal(1, 8, 2, 3)], dict(blocksize=2, mode="CRD"), name="depth_to_space_crd"),
    Case("SpaceToDepth", [normal(1, 2, 4, 6)], dict(blocksize=2)),
]

_x_scatter = distinct(4, 3)
INDEXING = [
    Case("CumSum", [normal(3, 4), i64(1)], name="cumsum"),
    Case("CumSum", [normal(3, 4), i64(0)], dict(exclusive=1), name="cumsum_exclusive"),
    Case("CumSum", [normal(3, 4), i64(-1)], dict(reverse=1), name="cumsum_reverse"),
    Case("CumSum", [normal(5), i64(0)], dict(exclusive=1, reverse=1), name="cumsum_exclusive_reverse"),
    Case("TopK", [distinct(3, 5), i64(3)], dict(axis=1), noutputs=2, name="topk"),
    Case("TopK", [distinct(4, 3), i64(2)], dict(axis=0, largest=0), noutputs=2, name="topk_smallest"),
    Case("GatherND", [normal(3, 4, 2), i64(0, 1, 2, -1, 0, 1).reshape(3, 2)], name="gathernd_repeat"),
    Case("GatherND", [normal(2, 3, 4), i64(1, 0, 2, 2).reshape(2, 2, 1)], dict(batch_dims=1),
         name="gathernd_batch"),
    Case("ScatterND", [normal(4, 3), i64(1, 3, 1).reshape(3, 1), normal(3, 3)], name="scatternd_duplicates"),
    Case("ScatterND", [normal(4, 3), i64(1, 3, 1).reshape(3, 1), normal(3, 3)], dict(reduction="add"),
         name="scatternd_add"),
    Case("ScatterND", [away(4, 3, margin=0.3), i64(1, -1, 1).reshape(3, 1), away(3, 3, margin=0.3)],
         dict(reduction="mul"), name="scatternd_mul"),
    Case("ScatterND", [_x_scatter, i64(1, 2, 1).reshape(3, 1),
                       np.stack([_x_scatter[1] + 0.1, _x_scatter[2] - 0.1, _x_scatter[1] + 0.2])],
         dict(reduction="max"), name="scatternd_max"),  # write 1 wins, 2 loses, 3 beats write 1
]

REDUCE = [
    Case("ReduceSum", [normal(2, 3, 4), i64(0, 2)], dict(keepdims=0), name="reducesum_keepdims0"),
    Case("ReduceMean", [normal(2, 3, 4)], name="reducemean_all"),
    Case("ReduceMean", [normal(2, 3, 4), i64(-1)], name="reducemean_last"),
    Case("ReduceSum", [normal(2, 3), i64()], dict(noop_with_empty_axes=1), name="reducesum_noop"),
    Case("ReduceMax", [distinct(2, 3, 4), i64(1)], dict(keepdims=0)),
    Case("ReduceMin", [distinct(2, 3, 4), i64(0, 2)]),
    Case("ReduceL2", [normal(2, 3, 4), i64(1)]),
    Case("ReduceL1", [away(2, 3, 4), i64(2)]),
    Case("ReduceSumSquare", [normal(2, 3, 4), i64(1)]),
    Case("ReduceLogSumExp", [normal(2, 3, 4), i64(1)]),
    Case("ReduceLogSum", [positive(2, 3, 4), i64(2)]),
    Case("ReduceProd", [away(2, 3, 4, margin=0.5), i64(1)]),
]


def _cases_of(cases, group):
    return [pytest.param(c, id=f"{group}-{c}") for c in cases]


ALL_CASES = (_cases_of(CORE, "core") + _cases_of(ELEMENTWISE, "elementwise") + _cases_of(ACTIVATIONS, "act")
             + _cases_of(NN, "nn") + _cases_of(NORM, "norm") + _cases_of(TENSOR, "tensor")
             + _cases_of(REDUCE, "reduce") + _cases_of(INDEXING, "indexing") + _cases_of(LINALG, "linalg"))


# ----------------------------------------------------------------------------- the harness
def _forward(case, inputs):
    opdef = ops.lookup(case.op, version=case.version)
    kwargs = dict(case.attrs)
    if "noutputs" in opdef.special:
        kwargs["noutputs"] = case.noutputs
    out = opdef.kernel(*inputs, **kwargs)
    return list(out) if isinstance(out, tuple) else [out]


def _backward_attrs(case):
    opdef = ops.lookup(case.op, version=case.version)
    kwargs = dict(case.attrs)
    if "noutputs" in opdef.special:
        kwargs["noutputs"] = case.noutputs
    return kwargs


def _differentiable(case):
    return [i for i, x in enumerate(case.inputs)
            if x is not None and x.dtype == np.float64 and i not in case.fixed]


def _loss(outputs, cotangents):
    return sum(float(np.sum(y * c)) for y, c in zip(outputs, cotangents) if c is not None)


@pytest.mark.parametrize("case", ALL_CASES)
def test_backward_matches_central_differences(case):
    outputs = _forward(case, case.inputs)
    for y in outputs:  # the forward must run in float64, or the differences measure float32 rounding
        assert y.dtype != np.float32, f"{case.op} forward returned float32 on float64 inputs"
    rng = np.random.default_rng(7)
    cotangents = [rng.standard_normal(y.shape) if y.dtype == np.float64 and (case.seeded is None or k in case.seeded)
                  else None for k, y in enumerate(outputs)]
    backward = lookup_backward(case.op)
    got = backward(cotangents, list(case.inputs), outputs, **_backward_attrs(case))
    assert len(got) == len(case.inputs)
    h = case.step
    for i in _differentiable(case):
        x = case.inputs[i]
        numeric = np.empty(x.shape)
        for j in np.ndindex(x.shape):
            shifted = [a if k != i else a.copy() for k, a in enumerate(case.inputs)]
            shifted[i][j] = x[j] + h
            plus = _loss(_forward(case, shifted), cotangents)
            shifted[i][j] = x[j] - h
            minus = _loss(_forward(case, shifted), cotangents)
            numeric[j] = (plus - minus) / (2 * h)
        assert got[i] is not None, f"input {i}: no gradient"
        assert got[i].shape == x.shape
        if i in case.zero:
            assert np.array_equal(numeric, np.zeros_like(numeric)) and np.array_equal(got[i], np.zeros_like(x))
            continue
        scale = np.max(np.abs(numeric))
        assert scale > 0, f"input {i}: the finite differences are all zero, the case tests nothing"
        error = np.max(np.abs(got[i] - numeric)) / scale
        assert error <= TOLERANCE, f"input {i}: relative error {error:.2e}"


@pytest.mark.parametrize("case", ALL_CASES)
def test_backward_shapes_types_and_none(case):
    """float32 in, float32 out, with each input's exact shape; None for index/shape/parameter inputs."""
    inputs = [x.astype(np.float32) if x is not None and x.dtype == np.float64 else x for x in case.inputs]
    outputs = _forward(case, inputs)
    cotangents = [np.ones(y.shape, dtype=y.dtype) if y.dtype.kind == "f" else None for y in outputs]
    got = lookup_backward(case.op)(cotangents, inputs, outputs, **_backward_attrs(case))
    assert len(got) == len(inputs)
    differentiable = _differentiable(case)
    for i, (x, g) in enumerate(zip(inputs, got)):
        if i in differentiable:
            assert g is not None and g.shape == x.shape and g.dtype == np.float32, f"input {i}"
        else:
            assert g is None, f"input {i} ({'omitted' if x is None else x.dtype}) must get no gradient"


# ----------------------------------------------------------------------------- ops without a gradient
@pytest.mark.parametrize("op", ["Ceil", "Floor", "Round", "Sign"])
def test_piecewise_constant_ops_have_zero_gradient(op):
    """Away from their jumps these ops are locally constant: the gradient is exactly 0 (so is the FD)."""
    x = away(3, 4, margin=0.1) + 0.25  # off integers, half-integers and 0 except by chance of measure zero
    y = _forward(Case(op, [x]), [x])
    (g,) = lookup_backward(op)([np.ones_like(y[0])], [x], y)
    assert g.shape == x.shape and np.array_equal(g, np.zeros_like(x))


def test_hardmax_has_zero_gradient():
    x = distinct(2, 5)
    y = _forward(Case("Hardmax", [x], dict(axis=-1), version=13), [x])
    (g,) = lookup_backward("Hardmax")([np.ones_like(y[0])], [x], y, axis=-1)
    assert np.array_equal(g, np.zeros_like(x))


@pytest.mark.parametrize("op", ["Shape", "Size"])
def test_shape_queries_pass_no_gradient(op):
    x = normal(2, 3)
    y = _forward(Case(op, [x]), [x])
    assert lookup_backward(op)([None], [x], y) == [None]


def test_dropout_training_without_seed_or_mask_is_an_error():
    from refquant.errors import RefquantError

    x = normal(3, 4)
    y = ops.lookup("Dropout").kernel(x, np.array(0.5), np.array(True))
    with pytest.raises(RefquantError, match="seed"):
        lookup_backward("Dropout")([np.ones_like(y)], [x, np.array(0.5), np.array(True)], [y])


# ----------------------------------------------------------------------------- coverage
MODELS = ["mobilenet_v2_imagenet", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"]


@pytest.mark.parametrize("model", MODELS)
def test_every_op_of_the_shipped_models_has_a_backward(model):
    from pathlib import Path

    path = Path("/work/shared/models") / f"{model}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    graph = onnx_io.load(str(path))
    used = {node.op_type for node in graph.walk() if node.domain in ("", "ai.onnx")}
    registered = {op for domain, op in ops.registered_ops() if domain == ""}
    assert used <= registered  # the forward exists for each (else the model could not even run)
    missing = sorted(used - set(grads.differentiable_ops()))
    assert missing == [], f"{model}: no backward for {missing}"


def test_every_case_op_is_registered_and_every_differentiable_op_has_a_case():
    """The finite-difference cases cover each registered backward (the zero/no-gradient ops by the tests above)."""
    tested = {p.values[0].op for p in ALL_CASES} | {"Ceil", "Floor", "Round", "Sign", "Hardmax", "Shape", "Size"}
    untested = sorted(set(grads.differentiable_ops()) - tested)
    assert untested == [], f"backwards without a finite-difference case: {untested}"


# ----------------------------------------------------------------------------- parallel blocks
PARALLEL_CASES = [p for p in ALL_CASES if p.values[0].op in ("Conv", "ConvTranspose", "MaxPool", "Clip")] + [
    pytest.param(Case("Clip", [avoiding(4, 8, 64, 40, kinks=(0.0, 6.0), low=-3, high=9), f64(0.0), f64(6.0)],
                      name="clip_large"), id="clip_large"),
]


@pytest.mark.parametrize("case", PARALLEL_CASES)
def test_backward_with_two_threads_matches_one_thread(case):
    """The kernels split images/planes/elements into blocks over refquant.parallel's thread budget, each
    block summing its own partial weight gradient: two threads must give one thread's result up to the
    order of those float64 sums (relative 1e-12)."""
    from refquant import parallel

    outputs = _forward(case, case.inputs)
    rng = np.random.default_rng(11)
    cotangents = [rng.standard_normal(y.shape) if y.dtype == np.float64 else None for y in outputs]
    backward = lookup_backward(case.op)
    serial = backward(cotangents, list(case.inputs), outputs, **_backward_attrs(case))
    with parallel.thread_budget(2):
        threaded = backward(cotangents, list(case.inputs), outputs, **_backward_attrs(case))
    for a, b in zip(serial, threaded):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12 * np.max(np.abs(a)))


def test_every_backward_accepts_its_forwards_attributes():
    """The engine passes a node's attributes to the backward exactly as to the forward kernel: each backward
    must accept every attribute (and ``noutputs``) of every registered version of its forward, and must not
    require one the forward can omit. Defaults must agree, except Softmax-family ``axis``, whose default
    changed at opset 13 and which the backward reads from the output (see grads/activations.py)."""
    import inspect

    from refquant.ops.registry import _REGISTRY

    version_dependent = {("Softmax", "axis"), ("LogSoftmax", "axis"), ("Hardmax", "axis")}
    for op in grads.differentiable_ops():
        params = inspect.signature(lookup_backward(op)).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        keywords = {n: p for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        for opdef in _REGISTRY[("", op)]:
            forward = {n: p for n, p in inspect.signature(opdef.kernel).parameters.items()
                       if p.kind is p.KEYWORD_ONLY and n != "ctx"}
            if not takes_any:
                assert set(forward) <= set(keywords), f"{op}-{opdef.since}: {set(forward) - set(keywords)}"
            for name, p in keywords.items():
                if p.default is inspect.Parameter.empty:
                    assert name in forward and forward[name].default is inspect.Parameter.empty, (op, name)
                elif name in forward and (op, name) not in version_dependent:
                    assert forward[name].default == p.default, (op, opdef.since, name)


# ----------------------------------------------------------------------------- whole models
def _run_graph(graph, feeds):
    """Every tensor of ``graph`` (float initializers in float64), node by node as the runtime calls kernels."""
    values = {name: (a.astype(np.float64) if a.dtype.kind == "f" else a) for name, a in graph.initializers.items()}
    values.update(feeds)
    for node in graph.nodes:
        opdef = ops.lookup(node.op_type, node.domain, node.version)
        kwargs = dict(node.attrs)
        if "noutputs" in opdef.special:
            kwargs["noutputs"] = len(node.outputs)
        out = opdef.kernel(*[values[i] if i else None for i in node.inputs], **kwargs)
        for name, array in zip(node.outputs, out if isinstance(out, tuple) else (out,)):
            values[name] = array
    return values


def _backprop(graph, values, seeds):
    """Reverse-mode over the graph with the registered backwards: gradient of sum <output, seed>."""
    grad = dict(seeds)
    for node in reversed(graph.nodes):
        outs = [grad.get(name) for name in node.outputs]
        if all(g is None for g in outs):
            continue
        opdef = ops.lookup(node.op_type, node.domain, node.version)
        kwargs = dict(node.attrs)
        if "noutputs" in opdef.special:
            kwargs["noutputs"] = len(node.outputs)
        inputs = [values[i] if i else None for i in node.inputs]
        for name, g in zip(node.inputs, lookup_backward(node.op_type)(outs, inputs, [values[o] for o in node.outputs],
                                                                       **kwargs)):
            if g is not None and name and values[name].dtype.kind == "f":
                grad[name] = g if name not in grad else grad[name] + g
    return grad


def _kink_pattern(graph, values):
    """Which side of its kinks every Relu/PRelu/Clip input is on (bool arrays, concatenated)."""
    sides = []
    for node in graph.nodes:
        if node.op_type in ("Relu", "PRelu", "LeakyRelu"):
            sides.append(values[node.inputs[0]].ravel() < 0)
        elif node.op_type == "Clip":
            x = values[node.inputs[0]].ravel()
            for bound in node.inputs[1:3]:
                if bound:
                    sides.append(x < values[bound])
    return np.concatenate(sides) if sides else np.zeros(0, dtype=bool)


@pytest.mark.parametrize("model, shape, h", [("mtcnn_rnet", (2, 3, 24, 24), 1e-6), ("mtcnn_pnet", (1, 3, 14, 16), 1e-6),
                                             ("mobilenet_v2_imagenet", (2, 3, 32, 32), 1e-9)])
def test_whole_model_gradient_matches_a_directional_difference(model, shape, h):
    """Chained through every node of a shipped model (Conv incl. depthwise, PRelu, Clip, Add, MaxPool with
    ceil_mode, Transpose, the Shape/Gather/Concat/Reshape integer path, GlobalAveragePool, Flatten, Gemm,
    Softmax) in float64: <grad, v> for the input and for the first conv's weight matches
    (L(p + h v) - L(p - h v)) / 2h. The difference is only valid if no Relu/PRelu/Clip input changes side
    of its kink between p - h v and p + h v, which the test checks (MobileNetV2's ~10^5 ReLU6 inputs come
    within ~1e-6 of 0, hence its smaller h; its rounding error ~1e-16 * |L| / h stays ~1e-5 relative).
    MaxPool ties: a few thousand continuous values almost surely have none."""
    from pathlib import Path

    path = Path("/work/shared/models") / f"{model}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    graph = onnx_io.load(str(path))
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    name = graph.inputs[0].name
    values = _run_graph(graph, {name: x})
    seeds = {o: rng.standard_normal(values[o].shape) for o in graph.output_names}
    grad = _backprop(graph, values, seeds)
    weight = next(n.inputs[1] for n in graph.nodes if n.op_type == "Conv")

    def run(x_in, w_in):
        saved = graph.initializers[weight]
        graph.initializers[weight] = w_in
        try:
            out = _run_graph(graph, {name: x_in})
        finally:
            graph.initializers[weight] = saved
        return sum(float(np.sum(out[o] * seeds[o])) for o in graph.output_names), _kink_pattern(graph, out)

    w0 = graph.initializers[weight].astype(np.float64)
    for which in ("input", "weight"):
        v = rng.standard_normal(x.shape if which == "input" else w0.shape)
        dx, dw = (v, 0) if which == "input" else (0, v)
        plus, plus_sides = run(x + h * dx, w0 + h * dw)
        minus, minus_sides = run(x - h * dx, w0 - h * dw)
        assert np.array_equal(plus_sides, minus_sides), f"{which}: the step crosses a kink, the difference is invalid"
        numeric = (plus - minus) / (2 * h)
        analytic = float(np.sum(grad[name if which == "input" else weight] * v))
        assert abs(analytic - numeric) <= TOLERANCE * abs(numeric), (which, analytic, numeric)


@pytest.mark.parametrize("op", ["Add", "Mul", "Sub", "Div"])
def test_integer_operands_get_no_gradient(op):
    """Shape arithmetic (int64 operands) is never differentiated: such inputs get None, not a cast gradient."""
    a, b = np.array([6, 4], dtype=np.int64), np.array([2, 2], dtype=np.int64)
    y = _forward(Case(op, [a, b]), [a, b])
    assert lookup_backward(op)([np.ones(2)], [a, b], y) == [None, None]
