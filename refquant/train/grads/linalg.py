"""Backward of the products: Gemm, MatMul (BLAS calls) and Einsum (einsums of the output gradient)."""

from __future__ import annotations

import numpy as np

import string

from ... import parallel
from ..backward_registry import register_backward
from .common import input_grad, like


def _mm(a, b):
    """a @ b for 2-D operands, made C-contiguous first: OpenBLAS is up to ~100x slower on some transposed
    operand layouts (a thin [M, K] times a transposed [K, N]); the copies cost one pass over each."""
    return parallel.matmul(np.ascontiguousarray(a), np.ascontiguousarray(b))


@register_backward("Gemm")
def gemm_backward(grads_out, inputs, outputs, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    """Y = alpha A' B' + beta C:  dA' = alpha gY B'^T,  dB' = alpha A'^T gY,  dC = beta gY summed to C's shape
    (A' = A^T with transA, so dA = dA'^T; likewise B)."""
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    gy = grads_out[0]
    a2 = a.T if transA else a
    b2 = b.T if transB else b
    scaled = gy if alpha == 1.0 else gy * np.asarray(alpha, dtype=gy.dtype)
    ga = _mm(scaled, b2.T)
    gb = _mm(a2.T, scaled)
    gc = None
    if c is not None:
        gc = input_grad(gy if beta == 1.0 else gy * np.asarray(beta, dtype=gy.dtype), c)
    return [like(ga.T if transA else ga, a), like(gb.T if transB else gb, b), gc][:len(inputs)]


@register_backward("MatMul")
def matmul_backward(grads_out, inputs, outputs):
    """Y = A @ B (NumPy batching, 1-D promotion): dA = gY @ B^T, dB = A^T @ gY, each summed over the batch
    dims it was broadcast along; a promoted 1-D operand drops its inserted axis again."""
    a, b = inputs
    gy = grads_out[0]
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    g2 = gy
    if a.ndim == 1:
        g2 = np.expand_dims(g2, -2)
    if b.ndim == 1:
        g2 = np.expand_dims(g2, -1)
    if a2.ndim > 2 and b2.ndim == 2:
        # [..., M, K] @ [K, N]: dB sums over every row of every batch, one GEMM over the flattened rows
        ga = _mm(g2.reshape(-1, g2.shape[-1]), b2.T).reshape(g2.shape[:-1] + (b2.shape[0],))
        gb = _mm(a2.reshape(-1, a2.shape[-1]).T, g2.reshape(-1, g2.shape[-1]))
    elif a2.ndim == 2 and b2.ndim == 2:
        ga = _mm(g2, b2.T)
        gb = _mm(a2.T, g2)
    else:
        ga = g2 @ np.swapaxes(b2, -1, -2)
        gb = np.swapaxes(a2, -1, -2) @ g2
    ga = input_grad(ga, a2).reshape(a.shape)
    gb = input_grad(gb, b2).reshape(b.shape)
    return [like(ga, a), like(gb, b)]


def _einsum_terms(equation, inputs, out_ndim):
    """Input and output subscripts with '...' replaced by letters (right-aligned, as NumPy broadcasts it) and
    the implicit output made explicit (ellipsis letters, then the letters used once, alphabetically)."""
    equation = equation.replace(" ", "")
    lhs, rhs = equation.split("->") if "->" in equation else (equation, None)
    terms = lhs.split(",")
    pool = [c for c in string.ascii_letters if c not in equation]
    ranks = [x.ndim - (len(t) - 3) for t, x in zip(terms, inputs) if "..." in t]
    ell = "".join(pool[:max(ranks, default=0)])
    full = [t.replace("...", ell[len(ell) - (x.ndim - (len(t) - 3)):]) if "..." in t else t
            for t, x in zip(terms, inputs)]
    if rhs is None:
        letters = "".join(full)
        rhs = ell + "".join(sorted(c for c in set(letters) - set(ell) if letters.count(c) == 1))
    else:
        rhs = rhs.replace("...", ell[len(ell) - (out_ndim - (len(rhs) - 3)):] if "..." in rhs else "")
    return full, rhs


@register_backward("Einsum")
def einsum_backward(grads_out, inputs, outputs, *, equation):
    """For operand k with subscripts t_k: dL/dx_k = einsum(gy, other operands -> t_k). Letters of t_k that
    appear nowhere else were summed inside x_k alone, so the gradient is broadcast along them; a letter
    repeated in t_k (a diagonal) receives the gradient on that diagonal only; dims NumPy broadcast from 1
    are summed back."""
    terms, rhs = _einsum_terms(equation, inputs, outputs[0].ndim)
    gy = grads_out[0]
    sizes = {}
    for t, x in zip(terms, inputs):
        for c, d in zip(t, x.shape):
            sizes[c] = max(sizes.get(c, 1), d)
    grads = []
    for k, (t, x) in enumerate(zip(terms, inputs)):
        others = [(terms[j], inputs[j]) for j in range(len(inputs)) if j != k]
        reachable = set(rhs).union(*[set(u) for u, _ in others])
        unique = "".join(dict.fromkeys(t))  # t's letters, first occurrence order
        kept = "".join(c for c in unique if c in reachable)
        spec = ",".join([rhs] + [u for u, _ in others]) + "->" + kept
        g = np.einsum(spec, gy, *[a for _, a in others], optimize=len(others) > 1)
        # letters summed inside x_k alone: broadcast the gradient along them
        g = g.reshape(tuple(sizes[c] if c in kept else 1 for c in unique))
        g = np.broadcast_to(g, tuple(sizes[c] for c in unique))
        if len(unique) < len(t):  # a diagonal: write g where the repeated axes agree
            gx = np.zeros(x.shape, dtype=gy.dtype)
            grid = np.indices(g.shape, sparse=True)
            gx[tuple(grid[unique.index(c)] for c in t)] = g
        else:
            gx = g
        stretched = tuple(i for i, (c, d) in enumerate(zip(t, x.shape)) if d == 1 and gx.shape[i] != 1)
        if stretched and len(unique) == len(t):
            gx = gx.sum(axis=stretched, keepdims=True)
        grads.append(like(np.ascontiguousarray(gx), x))
    return grads
