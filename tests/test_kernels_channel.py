"""The Numba per-channel chain (refquant.kernels.channel) against the NumPy ops it replaces, bit for bit:
the conv epilogue and the BN-led channel chains must give exactly what the ops one after the other give,
NaN, infinities and signed zeros included."""

import numpy as np
import pytest

from refquant.kernels import channel
from refquant.ops.nn import _epilogue


def _special_values(rng, shape, dtype):
    x = rng.standard_normal(shape).astype(dtype) * 4
    flat = x.reshape(-1)
    flat[::7] = 0.0
    flat[1::11] = -0.0
    flat[2::13] = np.nan
    flat[3::17] = np.inf
    flat[4::19] = -np.inf
    flat[5::23] = 6.0  # exactly a clip bound
    return x


def _numpy_steps(x, bias, steps):
    """The ops one after the other, as the unfused graph computes them (Add, Mul, BatchNormalization's x * a + b,
    Relu = maximum(x, 0), Clip = minimum(maximum(x, lo), hi))."""
    y = x.copy()
    if bias is not None:
        y = y + bias.reshape(-1, 1)
    for kind, *values in steps:
        if kind == "relu":
            y = np.maximum(y, y.dtype.type(0))
        elif kind == "clip":
            lo, hi = values
            if lo is not None:
                y = np.maximum(y, lo)
            if hi is not None:
                y = np.minimum(y, hi)
        elif kind == "mul":
            y = y * values[0].reshape(-1, 1)
        elif kind == "add":
            y = y + values[0].reshape(-1, 1)
        else:
            y = y * values[0].reshape(-1, 1)
            y = y + values[1].reshape(-1, 1)
    return y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channel_steps_match_the_numpy_ops_bit_for_bit(dtype):
    rng = np.random.default_rng(11)
    c = 6
    x = _special_values(rng, (3, c, 37), dtype)
    vec = lambda: rng.standard_normal(c).astype(dtype)  # noqa: E731
    bias = vec()
    steps = [("bn", vec(), vec()), ("mul", vec()), ("add", np.array([0.5], dtype)), ("relu",),
             ("clip", dtype(-1.5), dtype(6)), ("clip", None, dtype(3)), ("clip", dtype(-2), None)]
    want = _numpy_steps(x, bias, steps)
    encoded = channel.encode_steps([("add", bias)] + steps, c, dtype)
    out = np.empty_like(x)
    channel.apply_steps(x, out, 0, encoded)
    assert np.array_equal(out, want, equal_nan=True)
    assert np.array_equal(np.signbit(out), np.signbit(want))  # -0.0 stays -0.0 where maximum keeps it
    in_place = x.copy()
    channel.apply_steps(in_place, in_place, 0, encoded)
    assert np.array_equal(in_place, want, equal_nan=True)
    # a block of channels 2..5 of a strided 2-D view (a GEMM output block), through the conv epilogue
    big = np.concatenate([x[0], x[0]], axis=1)  # [C, 74]: rows are strided when cut to 37 columns
    block = big[2:5, :37]
    finish = _epilogue(bias, steps, dtype, c)
    finish(block, slice(2, 5))
    assert np.array_equal(block, want[0, 2:5], equal_nan=True)
    assert np.array_equal(big[:, 37:], x[0], equal_nan=True)  # nothing outside the block is touched


def test_epilogue_without_a_channel_count_takes_the_numpy_path():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 4, 9)).astype(np.float16)  # a dtype the Numba loop does not take
    steps = [("relu",)]
    finish = _epilogue(None, steps, np.float16, 4)
    block = x.copy()
    finish(block, slice(0, 4))
    assert np.array_equal(block, np.maximum(x, np.float16(0)))
