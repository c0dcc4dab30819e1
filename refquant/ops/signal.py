"""Signal processing: DFT, STFT, the Hann / Hamming / Blackman windows and MelWeightMatrix.

Transforms run through NumPy's FFT in float64 (complex128) and are rounded once to the input's type.
A signal's last dim is 1 (real) or 2 (real, imaginary); transforms output [..., 2].
"""

from __future__ import annotations

import numpy as np

from .. import dtypes
from .registry import register


def _as_complex(x):
    if x.shape[-1] == 1:
        return x[..., 0].astype(np.float64)
    if x.shape[-1] == 2:
        return x[..., 0].astype(np.float64) + 1j * x[..., 1].astype(np.float64)
    raise ValueError(f"the last dim of a signal must be 1 (real) or 2 (complex), got shape {x.shape}")


def _as_pairs(z, dtype):
    return np.stack([z.real, z.imag], axis=-1).astype(dtype)


def _scalar(value, default):
    if value is None or np.asarray(value).size == 0:
        return default
    return int(np.asarray(value).reshape(-1)[0])


def _fft(z, n, inverse, axis=-1):
    """np.fft.fft (or ifft, with its 1/n) of length n along ``axis``, as onnxruntime computes it: a length
    that is not a power of two goes through Bluestein's chirp-z algorithm there, with the chirp
    exp(-+i pi k^2 / n) taken from a float32 angle. For n = 400 (Whisper's n_fft) that angle reaches
    1250 rad; its float32 rounding moves the result by up to ~1e-4 of the largest bin, so an exact DFT
    differs from onnxruntime by that much. The same chirp is used here; the convolution runs in float64."""
    if n & (n - 1) == 0:
        return np.fft.ifft(z, n=n, axis=axis) if inverse else np.fft.fft(z, n=n, axis=axis)
    z = np.moveaxis(z, axis, -1)
    f32, k = np.float32, np.arange(n, dtype=np.float32)
    angle = (((f32(1 if inverse else -1) * f32(np.pi)) * k) * k) / f32(n)  # onnxruntime's float32 order
    chirp = np.cos(angle).astype(np.float64) + 1j * np.sin(angle).astype(np.float64)
    m = 1 << (2 * n - 2).bit_length()  # a power of two >= 2n - 1
    used = min(z.shape[-1], n)
    a = np.zeros(z.shape[:-1] + (m,), np.complex128)
    a[..., :used] = z[..., :used] * chirp[:used]
    b = np.zeros(m, np.complex128)
    b[:n] = np.conj(chirp)
    b[m - n + 1:] = b[1:n][::-1]
    out = np.fft.ifft(np.fft.fft(a, axis=-1) * np.fft.fft(b), axis=-1)[..., :n] * chirp * (1 / n if inverse else 1)
    return np.moveaxis(out, -1, axis)


def _dft(x, dft_length, axis, inverse, onesided):
    """Forward: X[k] = sum_n x[n] exp(-2 pi i k n / L) along ``axis`` (zero-padded or cut to L);
    onesided keeps k <= L/2. Inverse: x[n] = 1/L sum_k X[k] exp(2 pi i k n / L); inverse onesided treats
    the input as the first L/2 + 1 bins of a Hermitian spectrum and returns the real signal [..., 1]."""
    if not -x.ndim <= axis <= x.ndim - 2 or axis == -1:
        raise ValueError(f"axis {axis} must name a signal dim of the input {x.shape} (not the last one)")
    axis %= x.ndim
    signal = _as_complex(x)
    if inverse and onesided:
        length = _scalar(dft_length, 2 * (x.shape[axis] - 1))
        half = np.take(signal, np.arange(min(signal.shape[axis], length // 2 + 1)), axis=axis)
        mirror = np.conj(np.flip(np.take(half, np.arange(1, length - half.shape[axis] + 1), axis=axis), axis))
        full = np.concatenate([half, mirror], axis=axis)  # X[n - k] = conj(X[k]): the spectrum of a real signal
        return _fft(full, length, True, axis).real[..., None].astype(x.dtype)
    length = _scalar(dft_length, x.shape[axis])
    z = _fft(signal, length, inverse, axis)
    if onesided and not inverse:
        z = np.take(z, np.arange(length // 2 + 1), axis=axis)
    return _as_pairs(z, x.dtype)


@register("DFT", since=17, shape_inputs=(1,))
def dft_17(x, dft_length=None, *, axis=1, inverse=0, onesided=0):
    """Opset 17: the axis is an attribute (default 1)."""
    return _dft(x, dft_length, axis, inverse, onesided)


@register("DFT", since=20, shape_inputs=(1, 2))
def dft(x, dft_length=None, axis=None, *, inverse=0, onesided=0):
    """Opset 20: the axis is an optional scalar input (default -2, the last signal dim)."""
    return _dft(x, dft_length, _scalar(axis, -2), inverse, onesided)


@register("STFT", since=17, shape_inputs=(1, 3))
def stft(signal, frame_step, window=None, frame_length=None, *, onesided=1):
    """y[b, f, k] = sum_n w[n] x[b, f * step + n] exp(-2 pi i k n / L), frames f = 0 .. 1 + (len - L) // step
    - 1, L = frame_length (or the window's length); onesided keeps k <= L/2."""
    step = _scalar(frame_step, None)
    if step is None or step <= 0:
        raise ValueError(f"frame_step must be a positive scalar, got {frame_step}")
    length = _scalar(frame_length, window.shape[0] if window is not None else signal.shape[1])
    if window is not None and window.shape[0] != length:
        raise ValueError(f"window length {window.shape[0]} != frame_length {length}")
    x = _as_complex(signal)  # [batch, length]
    if x.shape[1] < length:
        raise ValueError(f"signal length {x.shape[1]} is shorter than the frame length {length}")
    frames = np.lib.stride_tricks.sliding_window_view(x, length, axis=1)[:, ::step]  # [batch, frames, L]
    if window is not None:
        frames = frames * window.astype(np.float64)
    z = _fft(frames, length, False)
    if onesided:
        z = z[..., : length // 2 + 1]
    return _as_pairs(z, signal.dtype)


def _window(size, periodic, output_datatype, cosines):
    """w[n] = sum_m c_m cos(2 pi m n / N), N = size (periodic) or size - 1 (symmetric)."""
    size = _scalar(size, None)
    n = np.arange(size, dtype=np.float64)
    span = size if periodic else size - 1
    w = sum(c * np.cos(2 * np.pi * m * n / span) for m, c in enumerate(cosines))
    return w.astype(dtypes.to_numpy(int(output_datatype), "window output_datatype"))


@register("HannWindow", since=17, shape_inputs=(0,))
def hann_window(size, *, output_datatype=1, periodic=1):
    """w[n] = sin^2(pi n / N) = 1/2 - 1/2 cos(2 pi n / N)"""
    return _window(size, periodic, output_datatype, (0.5, -0.5))


@register("HammingWindow", since=17, shape_inputs=(0,))
def hamming_window(size, *, output_datatype=1, periodic=1):
    """w[n] = 25/46 - 21/46 cos(2 pi n / N)"""
    return _window(size, periodic, output_datatype, (25 / 46, -21 / 46))


@register("BlackmanWindow", since=17, shape_inputs=(0,))
def blackman_window(size, *, output_datatype=1, periodic=1):
    """w[n] = 0.42 - 0.5 cos(2 pi n / N) + 0.08 cos(4 pi n / N)"""
    return _window(size, periodic, output_datatype, (0.42, -0.5, 0.08))


@register("MelWeightMatrix", since=17, shape_inputs=(0, 1))
def mel_weight_matrix(num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz, *,
                      output_datatype=1):
    """[dft_length // 2 + 1, num_mel_bins] triangular filters, as ONNX's reference: num_mel_bins + 2 points
    evenly spaced in mel = 2595 log10(1 + f / 700) from lower to upper edge (step (high - low) /
    (num_mel_bins + 2)), mapped to spectrogram bins floor((dft_length + 1) f / sample_rate); filter i
    rises linearly from point i to point i + 1 and falls to point i + 2."""
    bins_mel, length, rate = _scalar(num_mel_bins, None), _scalar(dft_length, None), _scalar(sample_rate, None)
    low_hz = float(np.asarray(lower_edge_hertz).reshape(-1)[0])
    high_hz = float(np.asarray(upper_edge_hertz).reshape(-1)[0])
    low_mel = 2595 * np.log1p(low_hz / 700) / np.log(10)
    high_mel = 2595 * np.log1p(high_hz / 700) / np.log(10)
    points = np.arange(bins_mel + 2) * ((high_mel - low_mel) / (bins_mel + 2)) + low_mel
    hz = 700 * np.expm1(points / 2595 * np.log(10))
    edges = (((length + 1) * hz) // rate).astype(np.int64)
    lower, center, upper = edges[:-2][None, :], edges[1:-1][None, :], edges[2:][None, :]
    j = np.arange(length // 2 + 1)[:, None]
    rise, fall = center - lower, upper - center
    with np.errstate(divide="ignore", invalid="ignore"):
        rising = np.where(rise == 0, (j == center).astype(np.float64), (j - lower) / np.maximum(rise, 1))
        out = np.where((j >= lower) & (j <= center), rising, 0.0)
        out = np.where((j >= center) & (j < upper) & (fall > 0), (upper - j) / np.maximum(fall, 1), out)
    return out.astype(dtypes.to_numpy(int(output_datatype), "MelWeightMatrix output_datatype"))
