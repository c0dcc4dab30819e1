"""onnxruntime's float contrib ops, as its transformer optimizer writes them into exported models.

com.microsoft: Gelu, BiasGelu, FastGelu, QuickGelu, BiasAdd, SkipLayerNormalization,
SkipSimplifiedLayerNormalization, EmbedLayerNormalization, FusedMatMul, FusedGemm, FusedConv (Attention and MultiHeadAttention:
:mod:`refquant.ops.contrib_attention`). Default domain (onnxruntime registers them there, at opset 1):
SimplifiedLayerNormalization, and LayerNormalization below opset 17.

The Gelu family is float32 bit for bit as onnxruntime's CPU kernels (contrib_ops/cpu/bert/bias_gelu.cc,
contrib_ops/cpu/activations.h): each step one rounded float32 operation, erf / tanh / logistic from
MLAS (:mod:`refquant.kernels.mlas`).
"""

from __future__ import annotations

import numpy as np
import scipy.special

from ..kernels import mlas
from .activations import gelu
from .linalg import gemm
from .nn import conv
from .norm import layer_normalization
from .registry import lookup, register
from .shapes import TensorInfo, same_as_first

MS = "com.microsoft"
F32 = np.float32
_HALF, _ONE = F32(0.5), F32(1.0)
_SQRT1_2 = F32(1.0) / F32(np.sqrt(2.0))  # T{1} / sqrt2_v<float>, rounded as onnxruntime divides
_FAST_B, _FAST_C = F32(0.7978845608028654), F32(0.035677408136300125)  # sqrt(2/pi), 0.044715 sqrt(2/pi)


def _float32_only(x, op):
    if x.dtype != np.float32:
        raise ValueError(f"{op}: onnxruntime defines this op for float32 only, got {x.dtype}")


@register("Gelu", since=1, domain=MS, infer=same_as_first)
def ms_gelu(x):
    """y = (0.5 x) (erf(x / sqrt 2) + 1), MLAS erf: the same kernel as ONNX Gelu-20 (approximate=none)."""
    return gelu(x)


@register("BiasGelu", since=1, domain=MS, infer=same_as_first)
def bias_gelu(a, b):
    """v = a + b (bias over the last dim); y = (v * 0.5) * (erf(v * f32(1/sqrt 2)) + 1), as onnxruntime."""
    _float32_only(a, "BiasGelu")
    with np.errstate(all="ignore"):
        v = a + b
        return (v * _HALF) * (mlas.erf(v * _SQRT1_2) + _ONE)


@register("FastGelu", since=1, domain=MS, infer=same_as_first)
def fast_gelu(x, bias=None):
    """v = x (+ bias); y = (0.5 v) (tanh(v ((C v) v + B)) + 1), B = f32(sqrt(2/pi)),
    C = f32(0.044715 sqrt(2/pi)), MLAS tanh; with a bias onnxruntime rounds v * 0.5 first (the same value)."""
    _float32_only(x, "FastGelu")
    with np.errstate(all="ignore"):
        v = x if bias is None else x + bias
        t = mlas.tanh(v * ((_FAST_C * v) * v + _FAST_B))
        return (_HALF * v) * (t + _ONE)


@register("QuickGelu", since=1, domain=MS, infer=same_as_first)
def quick_gelu(x, *, alpha=1.702):
    """y = x * sigmoid(alpha x), MLAS logistic for float32."""
    a = np.asarray(alpha, x.dtype)
    with np.errstate(all="ignore"):
        if x.dtype == np.float32:
            return x * mlas.logistic(x * a)
        return (x * scipy.special.expit(x * a)).astype(x.dtype, copy=False)


@register("BiasAdd", since=1, domain=MS, infer=same_as_first)
def bias_add(x, bias, skip):
    """y = (x + bias) + skip; x and skip [N, S, C], bias [C]."""
    return (x + bias) + skip


# ------------------------------------------------------------------------------ layer normalizations
def _skip_norm(x, skip, gamma, beta, bias, epsilon, simplified, noutputs):
    """v = x + skip (+ bias); mean and mean square over the last dim (sums in float64, rounded once);
    LayerNorm: y = (v - mean) / sqrt(msq - mean^2 + eps) * gamma (+ beta); simplified (RMS):
    y = v / sqrt(msq + eps) * gamma (its mean output is 0, as onnxruntime's). Outputs y, mean, 1 / std, v."""
    if x.ndim not in (2, 3) or x.shape[-1] != gamma.shape[-1]:
        raise ValueError(f"input {x.shape} must be [batch, seq, hidden] (or 2-D) with gamma [{x.shape[-1]}], "
                         f"got gamma {gamma.shape}")
    v = x + skip
    if bias is not None:
        v = v + bias
    v = v.astype(x.dtype, copy=False)
    width = v.shape[-1]
    mean = (np.sum(v, axis=-1, keepdims=True, dtype=np.float64) / width).astype(v.dtype)
    mean_square = (np.sum(np.square(v, dtype=np.float64), axis=-1, keepdims=True) / width).astype(v.dtype)
    eps = np.asarray(epsilon, v.dtype)
    if simplified:
        std = np.sqrt(mean_square + eps)
        y = v / std * gamma
    else:
        std = np.sqrt(mean_square - mean * mean + eps)
        y = (v - mean) / std * gamma
        if beta is not None:
            y = y + beta
    if simplified:  # onnxruntime writes zeros to the (unused) mean output of the RMS form
        mean = np.zeros_like(mean)
    outs = (y.astype(x.dtype, copy=False), mean, (1 / std).astype(v.dtype), v)
    return outs[0] if noutputs == 1 else outs[:noutputs]


@register("SkipLayerNormalization", since=1, domain=MS, infer=same_as_first)
def skip_layer_normalization(x, skip, gamma, beta=None, bias=None, *, epsilon=1e-12, noutputs=1):
    """LayerNorm over the hidden dim of x + skip (+ bias), see :func:`_skip_norm`."""
    return _skip_norm(x, skip, gamma, beta, bias, epsilon, False, noutputs)


@register("SkipSimplifiedLayerNormalization", since=1, domain=MS, infer=same_as_first)
def skip_simplified_layer_normalization(x, skip, gamma, bias=None, *, epsilon=1e-12, noutputs=1):
    """RMSNorm over the hidden dim of x + skip (+ bias), see :func:`_skip_norm`."""
    return _skip_norm(x, skip, gamma, None, bias, epsilon, True, noutputs)


@register("SimplifiedLayerNormalization", since=1, infer=same_as_first)
def simplified_layer_normalization(x, scale, *, axis=-1, epsilon=1e-5, stash_type=1, noutputs=1):
    """onnxruntime's RMSNorm (default domain): y = x / sqrt(mean(x^2 over axes from ``axis``) + eps) * scale;
    second output inv_std_var = 1 / sqrt(...) with the reduced axes kept as 1."""
    axis %= x.ndim
    stash = np.float32 if stash_type == 1 or x.dtype != np.float64 else np.float64
    xs = x.astype(stash)
    mean_square = np.mean(xs * xs, axis=tuple(range(axis, x.ndim)), keepdims=True)
    inv = 1 / np.sqrt(mean_square + np.asarray(epsilon, stash))
    y = (xs * inv * scale.astype(stash)).astype(x.dtype)
    return y if noutputs == 1 else (y, inv)


@register("LayerNormalization", since=1, infer=same_as_first)
def layer_normalization_contrib(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1, noutputs=1):
    """onnxruntime accepts LayerNormalization below opset 17 (its fusions write it at any opset): the
    same op as ONNX's LayerNormalization-17."""
    return layer_normalization(x, scale, bias, axis=axis, epsilon=epsilon, stash_type=stash_type,
                               noutputs=noutputs)


@register("EmbedLayerNormalization", since=1, domain=MS)
def embed_layer_normalization(input_ids, segment_ids=None, word_embedding=None, position_embedding=None,
                              segment_embedding=None, gamma=None, beta=None, mask=None, position_ids=None, *,
                              epsilon=1e-12, mask_index_type=1, noutputs=1):
    """BERT's embedding block: e = word[input_ids] + position[position_ids or 0..S-1] (+ segment[segment_ids]),
    y = LayerNorm(e) * gamma + beta over the hidden dim. Outputs y, mask_index (per batch item the count
    of mask values equal to 1; zeros without a mask) and e (embedding_sum)."""
    batch, seq = input_ids.shape
    vocab, positions = word_embedding.shape[0], position_embedding.shape[0]
    if np.any((input_ids < 0) | (input_ids >= vocab)):
        raise ValueError(f"input_ids outside the vocabulary [0, {vocab})")
    if position_ids is None:
        position_ids = np.arange(seq)[None, :]
    if np.any((position_ids < 0) | (position_ids >= positions)):
        raise ValueError(f"position ids outside the position table [0, {positions})")
    e = word_embedding[input_ids] + position_embedding[np.broadcast_to(position_ids, (batch, seq))]
    if segment_embedding is not None and segment_ids is not None:
        e = e + segment_embedding[segment_ids]
    e = e.astype(word_embedding.dtype, copy=False)
    width = e.shape[-1]
    mean = (np.sum(e, axis=-1, keepdims=True, dtype=np.float64) / width).astype(e.dtype)
    mean_square = (np.sum(np.square(e, dtype=np.float64), axis=-1, keepdims=True) / width).astype(e.dtype)
    y = (e - mean) / np.sqrt(mean_square - mean * mean + np.asarray(epsilon, e.dtype)) * gamma + beta
    mask_index = np.zeros(batch, np.int32) if mask is None else np.sum(mask == 1, axis=1).astype(np.int32)
    outs = (y.astype(e.dtype, copy=False), mask_index, e)
    return outs[0] if noutputs == 1 else outs[:noutputs]


# ----------------------------------------------------------------------------- fused MatMul and Conv
def _batch_transposed(t):
    """transBatch: [d0, d1, .., d(r-2), d(r-1)] -> [d1, .., d(r-2), d0, d(r-1)] (the first dim moves next
    to the last)."""
    if t.ndim < 3:
        return t
    return np.transpose(t, tuple(range(1, t.ndim - 1)) + (0, t.ndim - 1))


def _fused_matmul_rule(a, b, **attrs):
    return TensorInfo(a.dtype, None)


@register("FusedMatMul", since=1, domain=MS, infer=_fused_matmul_rule)
def fused_matmul(a, b, *, alpha=1.0, transA=0, transB=0, transBatchA=0, transBatchB=0):  # noqa: N803
    """y = alpha * op(A) @ op(B): op moves the first dim next to the last (transBatch), then swaps the last
    two dims (trans); 1-D operands as MatMul."""
    if transBatchA:
        a = _batch_transposed(a)
    if transBatchB:
        b = _batch_transposed(b)
    if transA and a.ndim >= 2:
        a = np.swapaxes(a, -1, -2)
    if transB and b.ndim >= 2:
        b = np.swapaxes(b, -1, -2)
    y = np.matmul(a, b)
    return y if alpha == 1.0 else (y * np.asarray(alpha, y.dtype)).astype(y.dtype, copy=False)


def _activation(y, name, params):
    params = list(params or [])
    if name in (None, "", "Identity"):
        return y
    if name == "Relu":
        return np.maximum(y, y.dtype.type(0))
    if name == "Tanh":
        return mlas.tanh(y) if y.dtype == np.float32 else np.tanh(y)
    if name == "Sigmoid":
        return mlas.logistic(y) if y.dtype == np.float32 else scipy.special.expit(y).astype(y.dtype)
    if name == "LeakyRelu":
        alpha = y.dtype.type(params[0] if params else 0.01)
        return np.where(y >= 0, y, y * alpha)
    if name == "Clip":
        lo, hi = (params + [-np.inf, np.inf][len(params):])[:2] if params else (-np.inf, np.inf)
        return np.clip(y, y.dtype.type(lo), y.dtype.type(hi))
    if name == "HardSigmoid":
        alpha, beta = (params + [0.2, 0.5][len(params):])[:2]
        return np.clip(y * y.dtype.type(alpha) + y.dtype.type(beta), y.dtype.type(0), y.dtype.type(1))
    raise ValueError(f"unsupported FusedConv activation {name!r} (Relu, Tanh, Sigmoid, LeakyRelu, Clip, "
                     "HardSigmoid)")


_GEMM_ACTIVATION_ATTRS = {"LeakyRelu": ("alpha",), "Elu": ("alpha",), "ThresholdedRelu": ("alpha",),
                          "HardSigmoid": ("alpha", "beta"), "Selu": ("alpha", "gamma")}
_GEMM_ACTIVATIONS = {"Relu", "Tanh", "Sigmoid", "Softplus", "Softsign", *_GEMM_ACTIVATION_ATTRS}


@register("FusedGemm", since=1, domain=MS, infer=lambda a, b, c=None, **k: TensorInfo(a.dtype, None))
def fused_gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0, activation=None,  # noqa: N803
               activation_alpha=None, activation_beta=None, activation_gamma=None):
    """y = activation(Gemm(a, b, c)): onnxruntime's Gemm with its activation fused; the activation's own
    attributes come as activation_alpha / _beta / _gamma and the activation is refquant's ONNX kernel."""
    y = gemm(a, b, c, alpha=alpha, beta=beta, transA=transA, transB=transB)
    if activation in (None, ""):
        return y
    if activation not in _GEMM_ACTIVATIONS:
        raise ValueError(f"unsupported FusedGemm activation {activation!r} ({', '.join(sorted(_GEMM_ACTIVATIONS))})")
    given = {"alpha": activation_alpha, "beta": activation_beta, "gamma": activation_gamma}
    attrs = {k: given[k] for k in _GEMM_ACTIVATION_ATTRS.get(activation, ()) if given[k] is not None}
    return lookup(activation, "", 14).kernel(y, **attrs)


@register("FusedConv", since=1, domain=MS)
def fused_conv(x, w, b=None, z=None, *, activation=None, activation_params=None, auto_pad="NOTSET",
               dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    """y = activation(Conv(x, w, b) + z): onnxruntime's Conv with its activation (and optional sum input
    z) fused; activation_params: LeakyRelu [alpha], Clip [min, max], HardSigmoid [alpha, beta]."""
    y = conv(x, w, b, auto_pad=auto_pad, dilations=dilations, group=group, kernel_shape=kernel_shape, pads=pads,
             strides=strides)
    if z is not None:
        y = (y + z).astype(y.dtype, copy=False)
    return np.ascontiguousarray(_activation(y, activation, activation_params))
