"""Transformer building blocks of the default domain: RMSNormalization, Swish, RotaryEmbedding, Attention."""

from __future__ import annotations

import numpy as np
import scipy.special

from .. import dtypes
from ..kernels import mlas
from .registry import register
from .shapes import TensorInfo, same_as_first


def _compute_dtype(x):
    """float16 inputs compute in float32 (one rounding at the end); float32/float64 in their own type."""
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)


@register("RMSNormalization", since=23, infer=same_as_first)
def rms_normalization(x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    """y = x / sqrt(mean(x^2 over the axes from ``axis`` on) + epsilon) * scale; statistics in float32
    (stash_type=1) or in x's type."""
    axis %= x.ndim
    stash = np.float32 if stash_type == 1 else _compute_dtype(x)
    xs = x.astype(stash)
    mean_square = np.mean(xs * xs, axis=tuple(range(axis, x.ndim)), keepdims=True)
    inv_rms = 1 / np.sqrt(mean_square + np.asarray(epsilon, stash))
    return (xs * inv_rms * scale.astype(stash)).astype(x.dtype)


@register("Swish", since=24, infer=same_as_first)
def swish(x, *, alpha=1.0):
    """y = x * sigmoid(alpha * x); float32's sigmoid is onnxruntime's (MLAS logistic)."""
    a = np.asarray(alpha, x.dtype)
    if x.dtype == np.float32:
        return x * mlas.logistic(x * a)
    return (x * scipy.special.expit(x * a)).astype(x.dtype, copy=False)


# ------------------------------------------------------------------------------------ RotaryEmbedding
@register("RotaryEmbedding", since=23, infer=same_as_first)
def rotary_embedding(x, cos_cache, sin_cache, position_ids=None, *, interleaved=0, num_heads=0,
                     rotary_embedding_dim=0):
    """Rotate pairs (x1, x2) of the first rotary_embedding_dim features of each head by the cached angle:
    (x1 cos - x2 sin, x1 sin + x2 cos). Pairs are (2i, 2i+1) when interleaved, else (i, i + dim/2).
    X is [B, H, S, D] or [B, S, H*D] (num_heads given); the caches are [max_pos, dim/2] indexed by
    position_ids [B, S], or already [B, S, dim/2]."""
    shape = x.shape
    if x.ndim == 4:
        heads = np.transpose(x, (0, 2, 1, 3))  # [B, S, H, D]
    elif x.ndim == 3:
        if not num_heads:
            raise ValueError("a 3-D input needs the num_heads attribute")
        heads = x.reshape(shape[0], shape[1], num_heads, shape[2] // num_heads)
    else:
        raise ValueError(f"X must be 3-D or 4-D, got {shape}")
    dim = rotary_embedding_dim or heads.shape[-1]
    if position_ids is not None:
        cos_cache, sin_cache = cos_cache[position_ids], sin_cache[position_ids]
    if cos_cache.shape[-1] != dim // 2 or sin_cache.shape[-1] != dim // 2:
        raise ValueError(f"cos/sin caches {cos_cache.shape}/{sin_cache.shape} must end in rotary dim / 2 = "
                         f"{dim // 2}")
    cos, sin = cos_cache[:, :, None, :], sin_cache[:, :, None, :]
    rotated = heads[..., :dim]
    x1, x2 = (rotated[..., 0::2], rotated[..., 1::2]) if interleaved else np.split(rotated, 2, axis=-1)
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if interleaved:
        rotated = np.stack([real, imag], axis=-1).reshape(rotated.shape)
    else:
        rotated = np.concatenate([real, imag], axis=-1)
    out = np.concatenate([rotated, heads[..., dim:]], axis=-1).astype(x.dtype, copy=False)
    return np.transpose(out, (0, 2, 1, 3)) if x.ndim == 4 else out.reshape(shape)


# ------------------------------------------------------------------------------------------ Attention
def _split_heads(t, heads, name):
    if t.ndim == 4:
        return t
    if t.ndim != 3 or not heads:
        raise ValueError(f"{name} {t.shape}: 3-D inputs need q_num_heads and kv_num_heads")
    b, s, hidden = t.shape
    return t.reshape(b, s, heads, hidden // heads).transpose(0, 2, 1, 3)


def _additive_bias(attn_mask, is_causal, offset, nonpad_kv_seqlen, windows, q_len, kv_len, dtype):
    """The bias added to the scores [B?, H?, q, kv]: the mask (bool: 0 / -inf; float: itself, its last dim
    padded to kv with False / -inf), the bottom-right causal frontier j <= i + offset, the sliding window
    and the padding j < nonpad_kv_seqlen[b], all composed additively."""
    neg = dtype.type(-np.inf)
    bias = np.zeros((q_len, kv_len), dtype)
    if attn_mask is not None:
        short = kv_len - attn_mask.shape[-1]
        if short > 0:
            attn_mask = np.pad(attn_mask, [(0, 0)] * (attn_mask.ndim - 1) + [(0, short)],
                               constant_values=False if attn_mask.dtype == bool else -np.inf)
        bias = bias + (np.where(attn_mask, dtype.type(0), neg) if attn_mask.dtype == bool
                       else attn_mask.astype(dtype))
    i = np.arange(q_len).reshape(q_len, 1)
    j = np.arange(kv_len).reshape(1, kv_len)
    per_batch = np.ndim(offset) > 0
    offset = np.reshape(offset, (-1, 1, 1, 1)) if per_batch else offset
    diff = i + offset - j  # >= 0: key j is at or before query i
    if is_causal:
        bias = bias + np.where(diff >= 0, dtype.type(0), neg)
    left, right = windows
    if left >= 0:
        bias = bias + np.where(diff <= left, dtype.type(0), neg)
    if right >= 0:
        bias = bias + np.where(-diff <= right, dtype.type(0), neg)
    if nonpad_kv_seqlen is not None:
        keep = j.reshape(1, 1, 1, kv_len) < np.asarray(nonpad_kv_seqlen).reshape(-1, 1, 1, 1)
        bias = bias + np.where(keep, dtype.type(0), neg)
    return bias


def _softmax_guarded(scores, fully_masked):
    """Softmax over the last axis; rows whose bias masks every key give 0, not NaN."""
    top = np.max(scores, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    e = np.exp(scores - top)
    total = np.sum(e, axis=-1, keepdims=True)
    p = e / np.where(total == 0, 1, total)
    return np.where(fully_masked, 0, p)


def _attention(q, k, v, attn_mask, past_key, past_value, nonpad_kv_seqlen, *, scale, is_causal, q_num_heads,
               kv_num_heads, softmax_precision, softcap, qk_matmul_output_mode, windows, noutputs):
    if (past_key is None) != (past_value is None):
        raise ValueError("past_key and past_value must be given together")
    if nonpad_kv_seqlen is not None and past_key is not None:
        raise ValueError("nonpad_kv_seqlen cannot be combined with past_key/past_value")
    if not (q.ndim == k.ndim == v.ndim) or q.ndim not in (3, 4):
        raise ValueError(f"Q {q.shape}, K {k.shape}, V {v.shape} must all be 3-D or all 4-D")
    three_d = q.ndim == 3
    q4 = _split_heads(q, q_num_heads, "Q")
    k4 = _split_heads(k, kv_num_heads, "K")
    v4 = _split_heads(v, kv_num_heads, "V")
    if past_key is not None:
        k4 = np.concatenate([past_key, k4], axis=2)
        v4 = np.concatenate([past_value, v4], axis=2)
    present_key, present_value = k4, v4
    batch, q_heads, q_len, head_size = q4.shape
    kv_heads, kv_len = k4.shape[1], k4.shape[2]
    if q_heads != kv_heads:
        if q_heads % kv_heads:
            raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
        k4 = np.repeat(k4, q_heads // kv_heads, axis=1)
        v4 = np.repeat(v4, q_heads // kv_heads, axis=1)
    dtype = _compute_dtype(q)
    s = dtype.type(1 / np.sqrt(head_size) if scale is None else scale)
    qk = np.matmul(q4.astype(dtype, copy=False), np.swapaxes(k4.astype(dtype, copy=False), -1, -2)) * s
    capped = softcap * np.tanh(qk / dtype.type(softcap)) if softcap and softcap > 0 else qk
    if past_key is not None:
        offset = past_key.shape[2]
    elif nonpad_kv_seqlen is not None:
        offset = np.asarray(nonpad_kv_seqlen).reshape(-1).astype(np.int64) - q_len
    else:
        offset = 0
    bias = _additive_bias(attn_mask, is_causal, offset, nonpad_kv_seqlen, windows, q_len, kv_len, dtype)
    scores = capped + bias
    soft_dtype = dtypes.to_numpy(int(softmax_precision), "Attention softmax_precision") \
        if softmax_precision else dtype
    fully_masked = np.isneginf(np.max(bias, axis=-1, keepdims=True))
    probs = _softmax_guarded(scores.astype(soft_dtype), fully_masked).astype(dtype)
    y = np.matmul(probs, v4.astype(dtype, copy=False))
    if three_d:
        y = y.transpose(0, 2, 1, 3).reshape(batch, q_len, -1)
    results = [y.astype(q.dtype, copy=False), present_key, present_value]
    if noutputs > 3:
        chosen = {0: qk, 1: capped, 2: scores, 3: probs}.get(qk_matmul_output_mode)
        if chosen is None:
            raise ValueError(f"qk_matmul_output_mode must be 0..3, got {qk_matmul_output_mode}")
        results.append(np.broadcast_to(chosen, (batch, q_heads, q_len, kv_len)).astype(q.dtype))
    return tuple(results[:noutputs]) if noutputs > 1 else results[0]


def _attention_rule(q, k, v, *rest, **attrs):
    if q.shape is None or v.shape is None:
        return None
    if len(q.shape) == 4:
        return TensorInfo(q.dtype, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
    heads_q, heads_kv = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
    if not heads_q or not heads_kv or not isinstance(v.shape[2], int):
        return TensorInfo(q.dtype, (q.shape[0], q.shape[1], None))
    return TensorInfo(q.dtype, (q.shape[0], q.shape[1], heads_q * (v.shape[2] // heads_kv)))



@register("Attention", since=23, infer=_attention_rule)
def attention_23(q, k, v, attn_mask=None, past_key=None, past_value=None, *, is_causal=0, kv_num_heads=0,
                 q_num_heads=0, qk_matmul_output_mode=0, scale=None, softcap=0.0, softmax_precision=0,
                 noutputs=1):
    """Opset 23: scaled dot-product attention without nonpad_kv_seqlen (see :func:`attention`)."""
    return _attention(q, k, v, attn_mask, past_key, past_value, None, scale=scale, is_causal=is_causal,
                      q_num_heads=q_num_heads, kv_num_heads=kv_num_heads, softmax_precision=softmax_precision,
                      softcap=softcap, qk_matmul_output_mode=qk_matmul_output_mode, windows=(-1, -1),
                      noutputs=noutputs)


@register("Attention", since=24, infer=_attention_rule)
def attention_24(q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, *, is_causal=0,
                 kv_num_heads=0, q_num_heads=0, qk_matmul_output_mode=0, scale=None, softcap=0.0,
                 softmax_precision=0, noutputs=1):
    """Opset 24: adds nonpad_kv_seqlen (an external KV cache's valid lengths per batch item)."""
    return _attention(q, k, v, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale=scale,
                      is_causal=is_causal, q_num_heads=q_num_heads, kv_num_heads=kv_num_heads,
                      softmax_precision=softmax_precision, softcap=softcap,
                      qk_matmul_output_mode=qk_matmul_output_mode, windows=(-1, -1), noutputs=noutputs)


@register("Attention", since=25, infer=_attention_rule)
def attention(q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, *, is_causal=0,
              kv_num_heads=0, q_num_heads=0, qk_matmul_output_mode=0, scale=None, softcap=0.0,
              softmax_precision=0, left_window_size=-1, right_window_size=-1, noutputs=1):
    """Y = softmax(softcap(scale * Q K^T) + bias) V per head; bias from attn_mask, is_causal (bottom-right:
    key j visible to query i iff j <= i + offset, offset = past length or nonpad_kv_seqlen - q_len),
    the sliding window (i + offset - left <= j <= i + offset + right) and nonpad_kv_seqlen; K/V heads
    repeated for grouped-query attention; past K/V concatenated in front (outputs present_key/value).
    A query row with every key masked gives zeros. qk_matmul_output: 0 scaled QK^T, 1 after softcap,
    2 with the bias, 3 the softmax. Opset 25 adds the sliding window and forbids head counts for 4-D."""
    if q.ndim == 4 and (q_num_heads or kv_num_heads):
        raise ValueError("q_num_heads and kv_num_heads must not be given for 4-D inputs")
    return _attention(q, k, v, attn_mask, past_key, past_value, nonpad_kv_seqlen, scale=scale,
                      is_causal=is_causal, q_num_heads=q_num_heads, kv_num_heads=kv_num_heads,
                      softmax_precision=softmax_precision, softcap=softcap,
                      qk_matmul_output_mode=qk_matmul_output_mode,
                      windows=(left_window_size, right_window_size), noutputs=noutputs)
