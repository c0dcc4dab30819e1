"""AdaRound's shrinkage of the reconstruction loss toward uncorrelated inputs (``adaround(shrinkage=...)``).

The intensity is Schaefer & Strimmer's (2005) for shrinking ``H = mean_p x_p x_p^T`` to its diagonal, checked
against the formula written out with loops; the shrunk losses are ``(1 - alpha) L + alpha sum_{o,k} H_kk dW_ok^2``
in both forms (checked against that sum computed from its definition); a diagonal loss makes AdaRound's result
nearest rounding (each weight is then alone in the loss, and nearest is its minimum).
"""

import numpy as np
import pytest

import refquant
from refquant.errors import RefquantError
from refquant.ptq import adaround as A

from .test_ptq_qdrop import gemm_sim


def intensity_by_loops(x: np.ndarray) -> float:
    """``sum_{i != j} Var(h_ij) / sum_{i != j} h_ij^2``, ``h_ij = mean_p x_pi x_pj``, ``Var(h_ij) =
    (mean_p (x_pi x_pj)^2 - h_ij^2) / (n - 1)``, clipped to [0, 1]; ``x`` is ``[K, n]``."""
    k, n = x.shape
    variance = squares = 0.0
    for i in range(k):
        for j in range(k):
            if i != j:
                products = x[i] * x[j]
                h = products.mean()
                variance += (np.mean(products ** 2) - h * h) / (n - 1)
                squares += h * h
    return min(1.0, max(0.0, variance / squares))


@pytest.mark.parametrize("samples", [5, 40, 400])
def test_the_intensity_is_schaefer_and_strimmers(samples):
    rng = np.random.default_rng(samples)
    mixing = rng.normal(size=(6, 6))
    cols = np.stack([mixing @ rng.normal(size=(6, samples)), rng.normal(size=(6, samples))])  # [G=2, K, n]
    h = np.matmul(cols, cols.transpose(0, 2, 1)) / samples
    alpha = A.shrinkage_intensity(h, A.fourth_moments(cols), samples)
    expected = [intensity_by_loops(cols[g]) for g in range(2)]
    np.testing.assert_allclose(alpha, expected, rtol=1e-12)  # the same sums in another order
    # and the cached-columns path of the sampled loss computes the same
    np.testing.assert_allclose(A._cached_intensity(cols.astype(np.float32), "auto"),
                               [intensity_by_loops(cols[g].astype(np.float32).astype(np.float64)) for g in range(2)],
                               rtol=1e-9)


def test_the_intensity_tells_noise_from_correlation():
    """Independent inputs on few samples: their sample correlations are noise, shrink all the way (alpha near 1);
    inputs that are one signal and a little noise: keep the correlations (alpha near 0)."""
    rng = np.random.default_rng(0)
    independent = rng.normal(size=(1, 64, 32))
    signal = rng.normal(size=(1, 1, 32)) * np.ones((1, 64, 1)) + 0.05 * rng.normal(size=(1, 64, 32))
    for cols, low, high in ((independent, 0.8, 1.0), (signal, 0.0, 0.1)):
        h = np.matmul(cols, cols.transpose(0, 2, 1)) / cols.shape[2]
        alpha = A.shrinkage_intensity(h, A.fourth_moments(cols), cols.shape[2])[0]
        assert low <= alpha <= high


def test_streamed_fourth_moments_add_up():
    rng = np.random.default_rng(1)
    cols = rng.normal(size=(3, 4, 50))
    moments = A._Moments(fourth=True)
    for part in (slice(0, 17), slice(17, 50)):
        moments.add(cols[:, :, part], None)
    whole = A.fourth_moments(cols)
    np.testing.assert_allclose(moments.fourth[0], whole[0], rtol=1e-12)
    np.testing.assert_allclose(moments.fourth[1], whole[1], rtol=1e-12)


def problem(activation=None, seed=2):
    g, m, k, b = 2, 3, 5, 40
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(g, m, k))
    cols = rng.normal(size=(g, k, b)).astype(np.float32)
    z = rng.normal(size=(g, m, b)).astype(np.float32)
    t = rng.normal(size=(g, m, b)).astype(np.float32)
    return w, cols, z, t, rng


def ridge(cols, dw):
    """``sum_{o,k} mean_p x_pk^2 dW_ok^2`` per group."""
    diagonal = np.mean(cols.astype(np.float64) ** 2, axis=2)
    return np.array([np.sum(diagonal[g][None, :] * dw[g] ** 2) for g in range(dw.shape[0])])


def per_group_loss(cols, z, t, dw, f):
    y = z.astype(np.float64) + np.matmul(dw, cols.astype(np.float64))
    return np.sum((f(t.astype(np.float64)) - f(y)) ** 2, axis=(1, 2)) / cols.shape[2]


@pytest.mark.parametrize("activation", [None, (0.0, np.inf)])
def test_the_shrunk_sampled_loss_is_the_mixture(activation):
    w, cols, z, t, rng = problem(activation)
    f = (lambda y: y) if activation is None else (lambda y: np.maximum(y, 0))
    alpha = np.array([0.3, 0.8])
    loss = A.SampledLoss(cols, z, t, w, activation)
    loss.shrink(alpha)
    w_new = w + rng.normal(size=w.shape) * 0.2
    dw = w_new - w
    expected = (1 - alpha) * per_group_loss(cols, z, t, dw, f) + alpha * ridge(cols, dw)
    # float32 layer outputs in the loss: relative 1e-5
    assert loss(w_new, grad=False) == pytest.approx(expected.sum(), rel=1e-5)
    np.testing.assert_allclose(loss.per_channel(w_new).sum(axis=1), expected, rtol=1e-5)
    # the gradient: central differences of that value (float32 outputs: 1e-3 of the largest entry)
    _, grad = loss(w_new)
    numeric = np.zeros_like(w_new)
    for i in np.ndindex(w_new.shape):
        step = np.zeros_like(w_new)
        step[i] = 1e-3
        numeric[i] = (loss(w_new + step, grad=False) - loss(w_new - step, grad=False)) / 2e-3
    assert np.abs(grad - numeric).max() <= 1e-3 * np.abs(numeric).max()


def test_the_shrunk_quadratic_form_is_the_mixture():
    w, cols, z, t, rng = problem()
    moments = A._Moments()
    moments.add(cols, t.astype(np.float64) - z)  # the residual in float64, as per_group_loss takes it
    alpha = np.array([0.25, 1.0])
    shrunk = A.QuadraticLoss(moments, w, alpha)
    w_new = w + rng.normal(size=w.shape) * 0.2
    dw = w_new - w
    expected = (1 - alpha) * per_group_loss(cols, z, t, dw, lambda y: y) + alpha * ridge(cols, dw)
    assert shrunk(w_new, grad=False) == pytest.approx(expected.sum(), rel=1e-9)  # float64 moments of float32 data
    np.testing.assert_allclose(shrunk.per_channel(w_new).sum(axis=1), expected, rtol=1e-9)
    plain = A.QuadraticLoss(moments, w)
    assert plain(w_new, grad=False) == pytest.approx(per_group_loss(cols, z, t, dw, lambda y: y).sum(), rel=1e-9)


def shrink_sim(samples, relu=False):
    """A Gemm of 32 inputs and 8 outputs (-> Relu) on ``samples`` N(0, 1) samples, W4A8."""
    sim, x, inits = gemm_sim(relu, samples=samples, features=32, outputs=8, seed=3)
    return sim, x, inits["W"]


def nearest_weights(sim, w):
    encoding = sim.encoding_of("W")
    scale, offset = A.grid_arrays(encoding, w.shape)
    codes = np.clip(np.floor(w.astype(np.float64) / scale + 0.5), offset, offset + encoding.steps)
    return (codes.astype(np.float32) * scale).astype(np.float32)


@pytest.mark.parametrize("relu", [False, True])
def test_full_shrinkage_gives_nearest_rounding(relu):
    """``shrinkage=1``: the loss is ``sum H_kk dW_ok^2``, each weight alone, minimized by nearest rounding."""
    sim, x, w = shrink_sim(6, relu)
    report = []
    refquant.adaround(sim, x, num_iterations=200, shrinkage=1.0, progress=False, report=report)
    assert np.array_equal(sim.quantizers["W"].fixed_value, nearest_weights(sim, w))
    # without shrinkage, six samples of 32 inputs let AdaRound move weights off nearest
    sim, x, w = shrink_sim(6, relu)
    refquant.adaround(sim, x, num_iterations=200, shrinkage=0, progress=False)
    assert not np.array_equal(sim.quantizers["W"].fixed_value, nearest_weights(sim, w))


def test_auto_shrinks_few_independent_samples_and_not_many_correlated_ones():
    sim, x, _ = shrink_sim(6)
    report = []
    refquant.adaround(sim, x, num_iterations=10, progress=False, report=report)
    assert report[0].shrinkage == 0  # off by default
    report = []
    refquant.adaround(sim, x, num_iterations=10, shrinkage="auto", progress=False, report=report)
    assert report[0].shrinkage > 0.5
    rng = np.random.default_rng(4)
    sim, _, _ = shrink_sim(6)
    x = (rng.normal(size=(512, 1)) * np.ones((1, 32)) + 0.1 * rng.normal(size=(512, 32))).astype(np.float32)
    report = []
    refquant.adaround(sim, x, num_iterations=10, shrinkage="auto", progress=False, report=report)
    assert report[0].shrinkage < 0.05


@pytest.mark.parametrize("bad", [-0.1, 1.5, "yes", None])
def test_bad_shrinkage_is_an_error(bad):
    sim, x, _ = shrink_sim(6)
    with pytest.raises(RefquantError, match="shrinkage"):
        refquant.adaround(sim, x, num_iterations=10, shrinkage=bad, progress=False)
