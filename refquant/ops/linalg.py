"""Linear algebra: MatMul, Gemm, Einsum, Det. The products run in BLAS (np.matmul on float32 is sgemm)."""

from __future__ import annotations

import numpy as np

from .. import parallel
from .registry import register
from .shapes import TensorInfo, broadcast_shapes


def _matmul_rule(a, b):
    if a.shape is None or b.shape is None:
        return TensorInfo(a.dtype, None)
    sa, sb = list(a.shape), list(b.shape)
    squeeze_a, squeeze_b = len(sa) == 1, len(sb) == 1
    if squeeze_a:
        sa = [1] + sa
    if squeeze_b:
        sb = sb + [1]
    batch = broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))
    out = list(batch) + [sa[-2], sb[-1]]
    if squeeze_a:
        out.pop(-2)
    if squeeze_b:
        out.pop(-1)
    return TensorInfo(a.dtype, tuple(out))


@register("MatMul", since=1, infer=_matmul_rule)
def matmul(a, b):
    """Y = A @ B with NumPy's batching and 1-D promotion rules (those of ONNX)."""
    if a.ndim > 2 and b.ndim == 2 and a.flags.c_contiguous:
        # [..., K] @ [K, N] is one GEMM over all rows: one BLAS call instead of one per leading index
        return parallel.matmul(a.reshape(-1, a.shape[-1]), b).reshape(a.shape[:-1] + (b.shape[1],))
    if a.ndim == 2 and b.ndim == 2:
        return parallel.matmul(a, b)
    return np.matmul(a, b)


def _gemm_rule(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    m = a.shape[1] if transA else a.shape[0]
    n = b.shape[0] if transB else b.shape[1]
    return TensorInfo(a.dtype, (m, n))


@register("Gemm", since=7, infer=_gemm_rule)
def gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    """Y = alpha * A' @ B' + beta * C, A' = A^T if transA, B' = B^T if transB, C broadcast to [M, N]."""
    a = a.T if transA else a
    b = b.T if transB else b
    y = parallel.matmul(a, b)
    if alpha != 1.0:
        y *= np.asarray(alpha, dtype=y.dtype)
    if c is not None:
        y += c.astype(y.dtype, copy=False) if beta == 1.0 else np.asarray(beta, dtype=y.dtype) * c
    return y


@register("Einsum", since=12)
def einsum(*xs, equation):
    """Einstein summation as ``np.einsum(equation, *xs)``, contraction order optimized."""
    result = np.einsum(equation.replace(" ", ""), *xs, optimize=len(xs) > 1)
    return np.asarray(result, dtype=xs[0].dtype)


@register("Det", since=11, infer=lambda x: TensorInfo(x.dtype, None if x.shape is None else tuple(x.shape[:-2])))
def det(x):
    """The determinant of each square matrix in the last two axes (LU in float64, rounded to x's type)."""
    return np.asarray(np.linalg.det(x.astype(np.float64))).astype(x.dtype)
