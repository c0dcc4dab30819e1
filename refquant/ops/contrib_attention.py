"""onnxruntime's com.microsoft Attention (BERT-style, packed QKV projection) and MultiHeadAttention.

Both compute, per head, softmax(scale Q K^T + mask + attention_bias) V with onnxruntime's masking
convention: a key masked by the mask input gets ``mask_filter_value`` (default -10000) added, not -inf
(a row masked entirely still averages its keys), while the causal (unidirectional) mask excludes later
keys outright (onnxruntime fills them with the lowest float; measured: a query whose only causally
visible key is padding attends that key alone). As onnxruntime, a single query (S = 1) is never
causally masked.
"""

from __future__ import annotations

import numpy as np

from .registry import register
from .shapes import TensorInfo

MS = "com.microsoft"


def _to_heads(t, heads):
    """[B, S, N*H] -> [B, N, S, H]"""
    b, s, hidden = t.shape
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of num_heads {heads}")
    return t.reshape(b, s, heads, hidden // heads).transpose(0, 2, 1, 3)


def _key_mask(mask, batch, q_len, past_len, kv_len, filter_value, dtype):
    """The additive mask [B, 1, S, T] (or None) from onnxruntime's mask formats: key lengths [B], end and
    start positions [2B], a raw 0/1 mask [B, T] or [B, S, T] (0: masked)."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    f = dtype.type(filter_value)
    j = np.arange(kv_len)
    if mask.ndim == 1 and mask.size in (batch, 2 * batch):
        keep = j[None, :] < mask[:batch, None]
        if mask.size == 2 * batch:
            keep &= j[None, :] >= np.minimum(mask[batch:, None], kv_len)
        return np.where(keep, dtype.type(0), f)[:, None, None, :]
    if mask.ndim == 2 and mask.shape == (batch, kv_len):
        return np.where(mask > 0, dtype.type(0), f)[:, None, None, :]
    if mask.ndim == 3 and mask.shape == (batch, q_len, kv_len):
        return np.where(mask > 0, dtype.type(0), f)[:, None, :, :]
    raise ValueError(f"mask of shape {mask.shape} is not one of onnxruntime's CPU mask formats for batch {batch}, "
                     f"{q_len} queries and {kv_len} keys: [B], [2B], [B, T], [B, S, T]")


def _attend(q4, k4, v4, scale, mask, attention_bias, unidirectional, past_len, filter_value):
    """([B, N, S, Hv] = softmax(scores) v, scores = scale q k^T + mask + attention_bias with causally
    hidden keys at the lowest float) in float32."""
    q_len, kv_len = q4.shape[2], k4.shape[2]
    dtype = np.dtype(np.float32)
    scores = np.matmul(q4.astype(dtype), np.swapaxes(k4.astype(dtype), -1, -2)) * dtype.type(scale)
    # onnxruntime adds attention_bias + mask first, then the scaled product (its GEMM's beta = 1)
    additive = None
    if attention_bias is not None:
        additive = attention_bias.astype(dtype)
    if mask is not None:
        additive = mask if additive is None else additive + mask
    if additive is not None:
        scores = scores + additive
    if unidirectional and q_len > 1:  # key j after query i (at absolute position past + i): the lowest float
        later = np.arange(kv_len)[None, :] > past_len + np.arange(q_len)[:, None]
        scores = np.where(later, np.finfo(dtype).min, scores)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    return np.matmul(probs, v4.astype(dtype)), scores


def _merge_heads(y):
    b, n, s, h = y.shape
    return y.transpose(0, 2, 1, 3).reshape(b, s, n * h)


@register("Attention", since=1, domain=MS, infer=lambda x, *rest, **a: TensorInfo(x.dtype, None))
def ms_attention(x, weights, bias=None, mask_index=None, past=None, attention_bias=None, past_sequence_length=None,
                 *, num_heads, qkv_hidden_sizes=None, scale=0.0, unidirectional=0, mask_filter_value=-10000.0,
                 do_rotary=0, past_present_share_buffer=0, rotary_embedding_dim=0, noutputs=1):
    """BERT attention with the Q, K, V projections packed in one weight [D_in, q + k + v]:
    Q, K, V = x W (+ bias) split by qkv_hidden_sizes (default three equal parts); past [2, B, N, P, H] is
    prepended to K and V (output present [2, B, N, P + S, H]); scale defaults to 1/sqrt(q head size)."""
    if do_rotary or past_present_share_buffer:
        raise ValueError("do_rotary and past_present_share_buffer are not supported")
    if x.ndim != 3:
        raise ValueError(f"input must be [batch, sequence, hidden], got {x.shape}")
    sizes = list(qkv_hidden_sizes) if qkv_hidden_sizes else [weights.shape[1] // 3] * 3
    if sum(sizes) != weights.shape[1] or sizes[0] != sizes[1]:
        raise ValueError(f"qkv_hidden_sizes {sizes} do not split weights {weights.shape} into Q, K (equal) and V")
    projected = np.matmul(x, weights)
    if bias is not None:
        projected = projected + bias
    q, k, v = np.split(projected, np.cumsum(sizes)[:2], axis=-1)
    q4, k4, v4 = _to_heads(q, num_heads), _to_heads(k, num_heads), _to_heads(v, num_heads)
    past_len = 0
    if past is not None:
        past_len = past.shape[3]
        k4 = np.concatenate([past[0], k4], axis=2)
        v4 = np.concatenate([past[1], v4], axis=2)
    batch, q_len, kv_len = x.shape[0], x.shape[1], k4.shape[2]
    s = scale if scale else 1 / np.sqrt(q4.shape[-1])
    mask = _key_mask(mask_index, batch, q_len, past_len, kv_len, mask_filter_value, np.dtype(np.float32))
    y, _ = _attend(q4, k4, v4, s, mask, attention_bias, unidirectional, past_len, mask_filter_value)
    out = _merge_heads(y).astype(x.dtype)
    if noutputs == 1:
        return out
    return out, np.stack([k4, v4]).astype(x.dtype)


@register("MultiHeadAttention", since=1, domain=MS, infer=lambda q, *rest, **a: TensorInfo(q.dtype, None))
def multi_head_attention(query, key=None, value=None, bias=None, key_padding_mask=None, attention_bias=None,
                         past_key=None, past_value=None, past_sequence_length=None, cache_indirection=None, *,
                         num_heads, scale=0.0, unidirectional=0, mask_filter_value=-10000.0, noutputs=1):
    """Multi-head attention on already projected Q, K, V: query [B, S, D] with key/value [B, L, D] (bias
    [D + D + Dv] added to each) or [B, N, L, H] (already per head, no bias), packed key/value
    [B, L, N, 2, H], or packed query/key/value [B, S, N, 3, H]; past_key/past_value [B, N, P, H] are
    prepended (outputs present_key, present_value, and qk: the scores before the softmax).
    key_padding_mask: key lengths [B] or a 0/1 mask [B, T]; masked keys get mask_filter_value added."""
    if cache_indirection is not None:
        raise ValueError("cache_indirection (beam search) is not supported")
    if query.ndim == 5:  # packed QKV [B, S, N, 3, H]
        if key is not None or value is not None:
            raise ValueError("a packed QKV query [B, S, N, 3, H] takes no key or value")
        q4, k4, v4 = (np.ascontiguousarray(query[:, :, :, i].transpose(0, 2, 1, 3)) for i in range(3))
    else:
        if query.ndim != 3 or key is None:
            raise ValueError(f"query {query.shape} must be [B, S, D] with a key, or packed [B, S, N, 3, H]")
        hidden = query.shape[2]
        q = query if bias is None else query + bias[:hidden]
        q4 = _to_heads(q, num_heads)
        if key.ndim == 5:  # packed KV [B, L, N, 2, H]
            k4, v4 = (np.ascontiguousarray(key[:, :, :, i].transpose(0, 2, 1, 3)) for i in range(2))
        elif key.ndim == 4:  # already [B, N, L, H]
            k4, v4 = key, value
        else:
            k = key if bias is None else key + bias[hidden:2 * hidden]
            v = value if bias is None else value + bias[2 * hidden:]
            k4, v4 = _to_heads(k, num_heads), _to_heads(v, num_heads)
    past_len = 0
    if past_key is not None:
        past_len = past_key.shape[2]
        k4 = np.concatenate([past_key, k4], axis=2)
        v4 = np.concatenate([past_value, v4], axis=2)
    batch, q_len, kv_len = q4.shape[0], q4.shape[2], k4.shape[2]
    s = scale if scale else 1 / np.sqrt(q4.shape[-1])
    mask = _key_mask(key_padding_mask, batch, q_len, past_len, kv_len, mask_filter_value, np.dtype(np.float32))
    y, scores = _attend(q4, k4, v4, s, mask, attention_bias, unidirectional, past_len, mask_filter_value)
    dtype = query.dtype
    results = (_merge_heads(y).astype(dtype), k4.astype(dtype), v4.astype(dtype), scores.astype(dtype))
    return results[0] if noutputs == 1 else results[:noutputs]
