"""Calibration observers: hand-computed cases, AIMET goldens (aimet-onnx 2.42.0 encodings of the sample
models' input), onnxruntime's own entropy calibrator, and the properties that make calibration streamable
(running statistics, exact merges, growth without losing values)."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from refquant.errors import RefquantError
from refquant.quant.observers import (SCHEMES, MinMaxObserver, ObserverError, check_finite, expected_mse,
                                      make_observer)

SAMPLES = Path("/work/shared/refs/aimet_samples")
ENTRIES = ["convnet", "mlp", "mtcnn_rnet"]
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="AIMET samples not available")


def calib_batches(entry):
    """The calibration set as AIMET saw it: 4 batches of 16, in file order."""
    x = np.load(SAMPLES / entry / "calib.npz")["input"]
    return [x[i:i + 16] for i in range(0, len(x), 16)]


def golden_input_encoding(entry, cfg):
    data = json.loads((SAMPLES / entry / cfg / "model.encodings").read_text())
    (enc,) = [e for e in data["activation_encodings"] if e["name"] == "input"]
    return enc


def aimet_asym(lo, hi, bw=8):
    """refs/aimet.md §5.1 for an asymmetric grid, written out here independently of refquant:
    widen to include 0, delta = (max-min)/(2^bw-1), offset = clamp(round(min/delta), -(2^bw-1), 0)
    with C's round (ties away from zero)."""
    n = 2 ** bw - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    delta = (hi - lo) / n
    r = lo / delta
    offset = np.sign(r) * np.floor(abs(r) + 0.5)
    return delta, float(np.clip(offset, -n, 0))


# ---------------------------------------------------------------------------------------------- basics
def test_check_finite_reports_first_bad_element_in_c_order():
    x = np.zeros((3, 4), dtype=np.float32)
    assert check_finite(x) is None
    x[2, 1] = np.inf
    x[1, 3] = np.nan
    assert check_finite(x) == 1 * 4 + 3  # (1, 3) comes before (2, 1) in C order
    assert check_finite(x.T) == 1 * 3 + 2  # x.T[1, 2] = x[2, 1] = inf is the first in x.T's own order
    assert check_finite(np.arange(5)) is None  # integers are always finite


def test_make_observer_schemes_and_errors():
    assert set(SCHEMES) == {"min_max", "tf", "tf_enhanced", "percentile", "mse", "entropy"}
    assert type(make_observer("tf")) is MinMaxObserver
    for scheme in SCHEMES:
        assert make_observer(scheme).empty
    with pytest.raises(ObserverError, match="unknown calibration scheme"):
        make_observer("kl")
    with pytest.raises(ObserverError, match="'min_max'"):
        make_observer("min_max", percentile=99.0)
    with pytest.raises(RefquantError, match="no data"):
        make_observer("percentile").range(8, False)


def test_misuse_raises():
    a, b = make_observer("min_max", axis=1), make_observer("percentile", axis=1)
    a.update(np.ones((2, 3)))
    b.update(np.ones((2, 3)))
    with pytest.raises(ObserverError, match="cannot merge"):
        a.merge(b)
    with pytest.raises(ObserverError, match="4 channels"):
        a.update(np.ones((2, 4)))
    with pytest.raises(ObserverError, match="cannot merge"):
        make_observer("percentile", percentile=99.0).merge(make_observer("percentile", percentile=99.9))


# ---------------------------------------------------------------------------------------------- min_max
def test_min_max_running_over_batches():
    o = make_observer("min_max")
    o.update(np.array([1.0, -2.0, 3.0], dtype=np.float32))
    o.update(np.array([[0.5]], dtype=np.float32))
    o.update(np.array([-7.0, 4.0], dtype=np.float32))
    lo, hi = o.range(8, False)
    assert lo.shape == () and hi.shape == () and lo.dtype == np.float64
    assert (lo, hi) == (-7.0, 4.0)


def test_min_max_per_channel():
    x = np.array([[[1, 5], [-1, 0], [2, 2]],
                  [[0, 9], [-3, 4], [2, 2]]], dtype=np.float32)  # (batch 2, channel 3, 2)
    o = make_observer("min_max", axis=1)
    o.update(x)
    lo, hi = o.range(8, False)
    np.testing.assert_array_equal(lo, [0, -3, 2])
    np.testing.assert_array_equal(hi, [9, 4, 2])
    last = make_observer("min_max", axis=-1)
    last.update(x)
    np.testing.assert_array_equal(last.range(8, True)[0], [-3, 0])
    np.testing.assert_array_equal(last.range(8, True)[1], [2, 9])


def test_min_max_merge_is_exact():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 3, 5)).astype(np.float32) * (i + 1) for i in range(6)]
    whole, left, right = (make_observer("min_max", axis=1) for _ in range(3))
    for i, b in enumerate(batches):
        whole.update(b)
        (left if i % 2 else right).update(b)
    left.merge(right)
    for got, want in zip(left.range(8, False), whole.range(8, False)):
        assert np.array_equal(got, want)


@needs_samples
@pytest.mark.parametrize("entry", ENTRIES)
def test_min_max_matches_aimet_golden(entry):
    o = make_observer("min_max")
    for b in calib_batches(entry):
        o.update(b)
    delta, offset = aimet_asym(*o.range(8, False))
    golden = golden_input_encoding(entry, "w8a8_minmax")
    assert golden["bw"] == 8 and golden["is_sym"] is False
    np.testing.assert_allclose(delta, golden["scale"][0], rtol=1e-12, atol=0)
    assert offset == golden["offset"][0]


# ---------------------------------------------------------------------------------------------- tf_enhanced
@needs_samples
@pytest.mark.parametrize("entry", ENTRIES)
def test_tf_enhanced_matches_aimet_golden(entry):
    """AIMET computed these from the same 4 batches. Tolerance: none. The observer reproduces AIMET's
    float32 arithmetic, and its range is delta*offset, delta*(offset+255) in float64, so the scale comes
    back bit-exactly; one histogram bucket of difference anywhere would change the candidate costs and
    typically the chosen delta by a whole candidate step (>= 1/16 of a grid step's worth, ~1e-3 relative)."""
    o = make_observer("tf_enhanced")
    for b in calib_batches(entry):
        o.update(b)
    lo, hi = o.range(8, False)
    scale = (hi - lo) / 255
    golden = golden_input_encoding(entry, "w8a8_tfe")
    assert scale == golden["scale"][0]
    assert lo / scale == golden["offset"][0]


def synth(n, seed, kind):
    """Deterministic test data without an RNG stream: Box-Muller on two Weyl sequences, then shaped."""
    k = np.arange(n, dtype=np.float64)
    u1 = (k * 0.6180339887498949 + seed * 0.1234567 + 0.5 / n) % 1.0
    u2 = (k * 0.4142135623730951 + seed * 0.7654321) % 1.0
    z = np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * np.pi * u2)
    if kind == "relu":
        z = np.maximum(z, 0.0)
    elif kind == "exp":
        z = np.exp(0.8 * z) - 1.0
    elif kind == "neg":
        z = -np.abs(z) * 2.0
    elif kind == "outlier":
        z = z.copy()
        z[::997] *= 6.0
    return z.astype(np.float32)


# (data kind, batch sizes, batch scales, bitwidth, symmetric, strict, unsigned) -> AIMET (delta, offset).
# The goldens were computed by aimet-onnx 2.42.0 itself (its _libpymo BlockTensorQuantizer with
# QUANTIZATION_TF_ENHANCED, setStrictSymmetric/setUnsignedSymmetric, updateStats per batch,
# computeEncodings(symmetric)) on exactly these batches; they pin down the parts the three model
# inputs above do not exercise: symmetric/strict/unsigned candidates, 2/4/16 bits, outliers, one-sided data.
AIMET_TFE = [
    ("gauss", (4000, 2500, 3000), (1.0, 1.0, 1.3), 8, False, False, False, 0.03791440278291702, -129),
    ("gauss", (4000, 2500, 3000), (1.0, 1.0, 1.3), 8, True, False, False, 0.035167399793863297, -128),
    ("gauss", (4000, 2500, 3000), (1.0, 1.0, 1.3), 8, True, True, False, 0.03908010572195053, -127),
    ("gauss", (5000,), (0.01,), 4, False, False, False, 0.0041349586099386215, -8),
    ("gauss", (5000,), (0.01,), 4, True, False, False, 0.0038229082711040974, -8),
    ("outlier", (6000, 6000), (1.0, 1.0), 4, False, False, False, 0.555651843547821, -5),
    ("outlier", (6000, 6000), (1.0, 1.0), 8, False, False, False, 0.06334052234888077, -134),
    ("outlier", (6000, 6000), (1.0, 1.0), 8, True, False, False, 0.0798381045460701, -128),
    ("relu", (3000, 3000), (2.0, 2.0), 8, True, False, True, 0.028944719582796097, 0),
    ("relu", (3000, 3000), (2.0, 2.0), 8, False, False, False, 0.03135538473725319, 0),
    ("exp", (2000, 2000, 2000), (1.0, 2.0, 0.5), 8, False, False, False, 0.1438884437084198, -13),
    ("exp", (2000, 2000, 2000), (1.0, 2.0, 0.5), 16, False, False, False, 0.00042294696322642267, -4589),
    ("neg", (3000,), (1.0,), 8, False, False, False, 0.030206803232431412, -255),
    ("gauss", (3000,), (3.0,), 2, False, False, False, 4.048769950866699, -2),
    ("gauss", (3000,), (1e-4,), 8, False, False, False, 3.008457952091703e-06, -130),  # range < 0.01
    ("relu", (3000,), (1e-4,), 8, True, False, True, 1.5686274537074496e-06, 0),
]


@pytest.mark.parametrize("case", range(len(AIMET_TFE)))
def test_tf_enhanced_matches_aimet_library(case):
    kind, sizes, scales, bw, sym, strict, unsigned, delta, offset = AIMET_TFE[case]
    o = make_observer("tf_enhanced")
    for j, (n, scale) in enumerate(zip(sizes, scales)):
        o.update(synth(n, case * 10 + j, kind) * np.float32(scale))
    lo, hi = o.range(bw, sym, strict, unsigned)
    steps = 2 ** bw - 1 - (1 if sym and strict else 0)
    assert (hi - lo) / steps == delta  # exact, as above
    assert lo / delta == offset


def test_tf_enhanced_histogram_layout():
    """First batch [-1, 1]: range widened 3x to [-3, 3], 1536 buckets of 6/1536 = 2^-8, edges on
    multiples of the bucket size; -1 falls in bucket (-1 - -3)/2^-8 = 512, +1 in bucket 1024."""
    o = make_observer("tf_enhanced")
    o.update(np.array([-1.0, 1.0], dtype=np.float32))
    assert o.xleft[0, 0] == -3.0
    assert o.xleft[0, 1] - o.xleft[0, 0] == 2.0 ** -8
    assert o.xleft.shape == (1, 1536)
    np.testing.assert_array_equal(np.flatnonzero(o.pdf[0]), [512, 1024])
    np.testing.assert_array_equal(o.pdf[0][[512, 1024]], [0.5, 0.5])
    # a second batch of 2 values, one beyond 3: the running mean of the two PDFs (0.5 + 0.5)/2 at the
    # bucket of 1, and the outlier is dropped (the PDF now sums to 0.75)
    o.update(np.array([1.0, 40.0], dtype=np.float32))
    assert o.pdf[0][1024] == 0.5 and o.pdf[0][512] == 0.25
    assert o.pdf[0].sum() == 0.75


def test_tf_enhanced_drops_values_outside_the_first_range():
    """A later batch adds nothing inside the first batch's buckets except a dropped outlier: every
    bucket's probability is halved, every candidate's cost halves, the chosen grid stays the same."""
    rng = np.random.default_rng(1)
    first = rng.standard_normal(1000).astype(np.float32)
    alone, with_outlier = make_observer("tf_enhanced"), make_observer("tf_enhanced")
    alone.update(first)
    with_outlier.update(first)
    with_outlier.update(np.array([100.0], dtype=np.float32))
    for sym in (False, True):
        assert np.array_equal(with_outlier.range(8, sym), alone.range(8, sym))


def test_tf_enhanced_zero_tensor_fallback():
    """AIMET gives an all-zero tensor delta = 2/255, offset = floor(-1/delta) = -128."""
    o = make_observer("tf_enhanced")
    o.update(np.zeros((2, 3), dtype=np.float32))
    lo, hi = o.range(8, False)
    assert lo == -128 * (2 / 255) and hi == pytest.approx(127 * 2 / 255, rel=1e-15)


def test_tf_enhanced_constant_far_from_zero_falls_back_to_min_max():
    """All 1e6: the first batch's range [1e6, 1e6 + 0.01] is [1e6, 1e6] in float, the bucket size is 0,
    and AIMET's search returns delta = -1 (min 1, max -254). refquant returns the observed range."""
    o = make_observer("tf_enhanced")
    o.update(np.full(100, 1e6, dtype=np.float32))
    assert o.range(8, False) == (0.0, 1e6)


def test_tf_enhanced_symmetric_grids():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(5000).astype(np.float32)
    o = make_observer("tf_enhanced")
    o.update(x)
    lo, hi = o.range(8, True)
    scale = hi / 127
    assert lo == -128 * scale  # offset -128, 255 steps
    lo, hi = o.range(8, True, strict_symmetric=True)
    assert lo == -hi  # offset -127, 254 steps
    pos = make_observer("tf_enhanced")
    pos.update(np.abs(x))
    lo, hi = pos.range(8, True, unsigned_symmetric=True)
    assert lo == 0 and hi > 0
    assert pos.range(8, True)[0] < 0  # without unsigned symmetric the grid stays signed


def test_tf_enhanced_per_channel_is_one_analyzer_per_channel():
    rng = np.random.default_rng(3)
    scales = np.array([0.1, 1.0, 10.0, 3.0], dtype=np.float32)[None, :, None]
    batches = [(rng.standard_normal((5, 4, 30)) * scales).astype(np.float32) for _ in range(3)]
    batches[0][:, 3] = 0  # channel 3 starts its histogram at the second batch
    per_channel = make_observer("tf_enhanced", axis=1)
    singles = [make_observer("tf_enhanced") for _ in range(4)]
    for b in batches:
        per_channel.update(b)
        for c, s in enumerate(singles):
            s.update(b[:, c])
    lo, hi = per_channel.range(8, False)
    assert lo.shape == (4,)
    for c, s in enumerate(singles):
        assert (lo[c], hi[c]) == tuple(s.range(8, False))


# ---------------------------------------------------------------------------------------------- percentile
def test_percentile_of_uniform_integers():
    x = np.arange(10000, dtype=np.float32)
    o = make_observer("percentile", percentile=99.0)
    o.update(x)
    lo, hi = o.range(8, False)
    # a 2048-bin histogram has bins of 9999/2048 = 4.9; inside a bin the data are evenly spread (spacing
    # 1), so interpolating inside the bin is right to within that spacing
    assert abs(hi - np.percentile(x, 99)) <= 1.0  # 9899.01
    assert abs(lo - np.percentile(x, 1)) <= 1.0   # 99.99
    exact = make_observer("percentile", percentile=100)
    exact.update(x)
    assert exact.range(8, False) == (0.0, 9999.0)


def test_percentile_streaming_growth_loses_nothing():
    rng = np.random.default_rng(4)
    batches = [rng.uniform(0, 1, 3000), rng.uniform(-10, 3, 3000), rng.uniform(50, 100, 3000),
               rng.uniform(-0.5, 0.5, 3000)]
    o = make_observer("percentile", percentile=99.0)
    for b in batches:
        o.update(b.astype(np.float32))
    h = o.hist
    assert h.counts.sum() == 12000
    assert h.lo[0] <= min(b.min() for b in batches) and h.hi[0] >= max(b.max() for b in batches)
    allx = np.concatenate(batches).astype(np.float32)
    width = (h.hi[0] - h.lo[0]) / h.bins
    lo, hi = o.range(8, False)
    assert abs(hi - np.percentile(allx, 99)) <= width and abs(lo - np.percentile(allx, 1)) <= width
    assert (h.min[0], h.max[0]) == (allx.min(), allx.max())
    # the grown histogram is the histogram of all the data on the final edges, except for the first
    # batch's maximum: it sat in the old last bin (closed), and in the grown one its value opens a bin
    direct, _ = np.histogram(allx.astype(np.float64), bins=h.edges(0))
    assert np.abs(direct - h.counts[0]).sum() <= 2


# ---------------------------------------------------------------------------------------------- mse
def test_expected_mse_closed_form_against_sampling():
    """One bin [a, b] with uniform data: the closed form equals the mean of (x - qdq(x))^2 over a fine
    uniform sample, with clipping on both sides and rounding inside."""
    scale, offset, steps = 0.25, -3.0, 15  # grid -0.75 .. 3.0
    for a, b in [(-2.0, 4.5), (0.1, 0.2), (-1.0, -0.8), (3.1, 3.3)]:
        x = np.linspace(a, b, 2_000_001)
        q = np.clip(np.floor(x / scale - offset + 0.5), 0, steps)
        sampled = np.mean((x - scale * (q + offset)) ** 2)
        got = expected_mse(np.array([1.0]), np.array([a]), np.array([b]), [scale], [offset], steps)[0]
        np.testing.assert_allclose(got, sampled, rtol=1e-5)


def _grid_mse(x, lo, hi, steps):
    """MSE of quantize-dequantize on the grid (scale, offset) that §5.1 derives from [lo, hi]."""
    scale = (hi - lo) / steps
    offset = np.round(lo / scale)
    q = np.clip(np.floor(x / scale - offset + 0.5), 0, steps)
    return np.mean((x - scale * (q + offset)) ** 2)


def test_mse_clip_on_gaussian_4bit():
    """The MSE-optimal clipping of a 4-bit uniform quantizer for N(0, 1) is about 2.5 sigma (Banner et
    al., ACIQ), far inside max|x| (~4.9 sigma for 10^6 samples)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(1_000_000).astype(np.float32)
    o = make_observer("mse")
    o.update(x)
    lo, hi = o.range(4, True)
    scale = hi / 7  # 15 steps: 7 positive, 8 negative
    assert lo == pytest.approx(-8 * scale, rel=1e-12)
    assert 2.0 < hi < 3.0 and hi < 0.65 * np.abs(x).max()
    x64 = x.astype(np.float64)

    def sym_mse(s):  # symmetric 4-bit grid with step s: q in [-8, 7]
        return np.mean((x64 - s * np.clip(np.floor(x64 / s + 0.5), -8, 7)) ** 2)

    minmax_scale = max(x64.max() / 7, -x64.min() / 8)
    assert sym_mse(scale) < 0.5 * sym_mse(minmax_scale)
    alo, ahi = o.range(4, False)
    assert _grid_mse(x64, alo, ahi, 15) < _grid_mse(x64, x64.min(), x64.max(), 15)


# ---------------------------------------------------------------------------------------------- entropy
def _ort_entropy(batches, bins=2048, quantized_bins=128):
    from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector("entropy", False, bins, quantized_bins, 99.99, "same")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress
        collector.collect({"t": batches})
        lo, hi = collector.compute_collection_result()["t"][:2]
    return float(lo), float(hi)


@pytest.mark.parametrize("kind", ["gaussian", "relu", "shifted"])
def test_entropy_equals_onnxruntime(kind):
    """onnxruntime bins the whole calibration set at once; this observer streams it. With the largest
    |x| in the first batch both hold the same histogram, and the thresholds are equal (no tolerance)."""
    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((8, 500)).astype(np.float32) for _ in range(3)]
    if kind == "relu":
        batches = [np.maximum(b, 0) for b in batches]
    if kind == "shifted":
        batches = [2 * b + 1 for b in batches]
    amax = max(np.abs(b).max() for b in batches)
    batches[0].flat[0] = amax if kind != "shifted" else -amax
    o = make_observer("entropy")
    for b in batches:
        o.update(b)
    assert o.range(8, False) == _ort_entropy(batches)
    if kind == "relu":
        assert o.range(8, False)[0] == 0.0


def test_entropy_equals_onnxruntime_calibrator(tmp_path):
    """The same through onnxruntime's EntropyCalibrater on an Identity model fed 3 batches."""
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(7)
    batches = [rng.laplace(size=(16, 64)).astype(np.float32) for _ in range(3)]
    batches[0][0, 0] = max(np.abs(b).max() for b in batches) + 0.5

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    with contextlib.redirect_stdout(io.StringIO()):
        cal = create_calibrator(tmp_path / "m.onnx", augmented_model_path=str(tmp_path / "aug.onnx"),
                                calibrate_method=CalibrationMethod.Entropy,
                                extra_options={"num_bins": 512, "num_quantized_bins": 128})
        cal.collect_data(Reader())
        ort_lo, ort_hi = cal.compute_data()["y"].range_value
    o = make_observer("entropy", bins=512)
    for b in batches:
        o.update(b)
    assert o.range(8, False) == (float(ort_lo), float(ort_hi))


def test_entropy_after_growth_is_onnxruntimes_search_on_the_grown_histogram():
    """When a later batch exceeds the first range the histogram doubles its range (onnxruntime would
    append bins instead, so the histograms differ). The threshold search itself still equals
    onnxruntime's on the histogram held, and no value is lost."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(8)
    batches = [rng.standard_normal(20000).astype(np.float32) * s for s in (1, 1, 1.8)]
    o = make_observer("entropy")
    for b in batches:
        o.update(b)
    h = o.hist
    t0 = np.abs(batches[0]).max()
    assert h.hi[0] == 2 * t0 and 2 * t0 >= np.abs(batches[2]).max()  # one doubling
    assert h.counts.sum() == 60000
    edges = h.edges(0)
    # what the doubling means, computed with numpy: the first two batches on the first edges, adjacent
    # pairs summed into the middle half of the new bins, plus the third batch on the new edges
    first_edges = np.linspace(-t0, t0, h.bins + 1, dtype=np.float32)
    old, _ = np.histogram(np.concatenate(batches[:2]), bins=first_edges)
    expected, _ = np.histogram(batches[2], bins=edges)
    expected[h.bins // 4: 3 * h.bins // 4] += old.reshape(-1, 2).sum(axis=1)
    assert np.array_equal(h.counts[0], expected)
    ort = HistogramCollector("entropy", False, h.bins, 128, 99.99, "same")
    with contextlib.redirect_stdout(io.StringIO()):
        lo, hi = ort.get_entropy_threshold((h.counts[0], edges, h.min[0], h.max[0], np.float32(h.hi[0])), 128)
    assert o.range(8, False) == (float(lo), float(hi))


# ---------------------------------------------------------------------------------------------- merges
def _four_batches(seed):
    """Batches 0 and 2 share their min and max, so the first batch of either half fixes the same
    histogram range as the first batch of the whole stream."""
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((4, 3, 50)).astype(np.float32) for _ in range(4)]
    for b in batches:
        np.clip(b, -3.5, 3.5, out=b)
    for i in (0, 2):
        batches[i][0, :, 0], batches[i][0, :, 1] = -4.0, 4.5
    return batches


@pytest.mark.parametrize("scheme", ["tf_enhanced", "percentile", "mse", "entropy"])
@pytest.mark.parametrize("axis", [None, 1])
def test_histogram_merge_of_parts_equals_one_observer(scheme, axis):
    """Observer A sees batch 0, observer B batches 2, 1, 3 (B starts with batch 2, whose min and max
    equal batch 0's): A.merge(B) holds what one observer over batches 0..3 holds. The parts have 1 and
    3 batches, so tf_enhanced's PDF average must weight them 1:3."""
    batches = _four_batches(9)
    batches[1] *= 0.3  # batches of different spread, so that the weighting shows
    batches[3] *= 0.5
    whole, first, second = (make_observer(scheme, axis=axis) for _ in range(3))
    for b in batches:
        whole.update(b)
    first.update(batches[0])
    for i in (2, 1, 3):
        second.update(batches[i])
    first.merge(second)
    assert first.batches == 4
    if scheme != "tf_enhanced":  # integer counts: the merged histogram is the same histogram
        assert np.array_equal(first.hist.counts, whole.hist.counts)
    for sym in (False, True):
        got, want = first.range(8, sym), whole.range(8, sym)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("scheme", ["percentile", "mse", "entropy"])
def test_histogram_merge_with_different_ranges_keeps_every_count(scheme):
    rng = np.random.default_rng(10)
    xa, xb = rng.uniform(-1, 1, 1000).astype(np.float32), rng.uniform(-7, 20, 500).astype(np.float32)
    a, b = make_observer(scheme), make_observer(scheme)
    a.update(xa)
    b.update(xb)
    a.merge(b)
    assert a.hist.counts.sum() == 1500
    assert a.hist.lo[0] <= xb.min() and a.hist.hi[0] >= xb.max()
    assert (a.hist.min[0], a.hist.max[0]) == (xb.min(), xb.max())


def test_merge_into_empty_observer_copies():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    for scheme in ("min_max", "tf_enhanced", "percentile"):
        full, empty = make_observer(scheme, axis=0), make_observer(scheme, axis=0)
        full.update(x)
        empty.merge(full)
        assert not empty.empty and empty.channels == 3
        assert np.array_equal(empty.range(8, False), full.range(8, False))


# ---------------------------------------------------------------------------------------------- split calibration
def _split_batches(channels):
    """Seven batches of different sizes whose range grows twice after the first (so the histograms
    re-lay / double while parts are calibrated), with values exactly on edges: the first batch's max|x|
    (2.0, entropy's T0 and its closed last bin), 4.0 = 2*T0 (reached, then exceeded), lattice edges
    (powers of two, 0), and values beyond tf_enhanced's first-batch buckets (dropped)."""
    rng = np.random.default_rng(21)
    sizes, spreads = (40, 25, 40, 33, 40, 17, 40), (0.5, 0.4, 1.0, 0.7, 0.3, 2.0, 0.5)
    batches = []
    for n, spread in zip(sizes, spreads):
        b = (rng.standard_normal((n, channels, 6)) * spread).astype(np.float32)
        batches.append(b)
    for b in batches:
        np.clip(b, -1.9, 1.9, out=b)
    b0, b2, b5 = batches[0], batches[2], batches[5]
    b0[0, :, 0], b0[0, :, 1], b0[1, :, :3] = 2.0, -1.5, [0.0, 0.5, -0.25]
    b2[0, :, 0], b2[1, :, 0], b2[2, :, 0] = 4.0, 2.0, -4.0
    b5[0, :, 0], b5[0, :, 1], b5[1, :, 0] = 7.5, -6.0, 4.0
    batches[3][0, :, :2] = [-2.0, 1.0]
    return batches


ALL_SCHEMES = [("min_max", None), ("min_max", 1), ("tf_enhanced", None), ("tf_enhanced", 1),
               ("percentile", None), ("percentile", 1), ("mse", None), ("mse", 1),
               ("entropy", None), ("entropy", 1)]


def _encodings(observer):
    """(scale, offset) of every grid kind the quantizers ask for."""
    from refquant.quant.encoding import from_min_max

    out = []
    for bw, sym, strict, unsigned in [(8, False, False, False), (8, True, False, False), (4, True, True, False),
                                      (8, True, False, True), (16, False, False, False)]:
        lo, hi = observer.range(bw, sym, strict, unsigned)
        enc = from_min_max(lo, hi, bw, sym, strict, unsigned)
        out.append((np.asarray(enc.scale), np.asarray(enc.offset), lo, hi))
    return out


@pytest.mark.parametrize("scheme,axis", ALL_SCHEMES)
def test_split_calibration_merges_to_one_observer_exactly(scheme, axis):
    """Calibrating three parts of the data separately and merging them (in a tree: the last two first)
    gives the encodings of one observer over all the batches in order: np.array_equal on scale, offset
    and the range itself, for every grid kind. The parts are made with ``spawn()`` from the observer
    that saw the first batch (tf_enhanced's buckets and entropy's T0 come from it); the others need no
    anchor (spawn gives a fresh observer). The data grows past the first batch's range inside parts."""
    batches = _split_batches(channels=3 if axis is None else 4)
    whole = make_observer(scheme, axis=axis)
    for b in batches:
        whole.update(b)
    first = make_observer(scheme, axis=axis)
    first.update(batches[0])
    second, third = first.spawn(), first.spawn()
    assert second.empty and third.empty
    first.update(batches[1])
    for b in batches[2:5]:
        second.update(b)
    for b in batches[5:]:
        third.update(b)
    second.merge(third)
    first.merge(second)
    assert first.batches == whole.batches == 7
    for got, want in zip(_encodings(first), _encodings(whole)):
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
    if scheme in ("percentile", "mse", "entropy"):
        assert np.array_equal(first.hist.counts, whole.hist.counts)  # the same histogram, count for count
    if scheme == "tf_enhanced":
        assert first.counts.keys() == whole.counts.keys()
        for n in whole.counts:
            assert np.array_equal(first.counts[n], whole.counts[n])


@pytest.mark.parametrize("scheme", ["min_max", "percentile", "mse"])
@pytest.mark.parametrize("axis", [None, 1])
def test_order_free_schemes_merge_exactly_without_anchors(scheme, axis):
    """min_max and the lattice histograms of percentile/mse depend on the data only: fresh observers
    over any parts, merged in any order, and one observer over the batches in any order, all agree."""
    batches = _split_batches(channels=1 if axis is None else 3)
    whole = make_observer(scheme, axis=axis)
    for b in batches:
        whole.update(b)
    shuffled = make_observer(scheme, axis=axis)
    for i in (5, 3, 0, 6, 1, 4, 2):
        shuffled.update(batches[i])
    parts = [make_observer(scheme, axis=axis) for _ in range(3)]
    for i, b in enumerate(batches):
        parts[(i * 5) % 3].update(b)  # interleaved, not contiguous
    parts[2].merge(parts[0])
    parts[1].merge(parts[2])
    for other in (shuffled, parts[1]):
        for got, want in zip(_encodings(other), _encodings(whole)):
            for g, w in zip(got, want):
                assert np.array_equal(g, w)


def test_lattice_histogram_is_the_histogram_of_all_data_on_its_edges():
    """After growth in both directions the counts equal numpy.histogram of all the data on the final
    edges (integers times a power of two, so float64 edges are exact), values on edges included; the
    window starts at floor(min / width) and the data span more than half of the bins."""
    rng = np.random.default_rng(22)
    batches = [rng.uniform(0, 1, 999), rng.uniform(-3, 0.5, 1000), np.array([0.0, 1.0, -3.0, 0.25, 6.0])]
    o = make_observer("percentile")
    for b in batches:
        o.update(b.astype(np.float32))
    h = o.hist
    allx = np.concatenate(batches).astype(np.float32).astype(np.float64)
    edges = h.edges(0)
    width = edges[1] - edges[0]
    assert width == 2.0 ** np.floor(np.log2(width))  # a power of two
    assert edges[0] == np.floor(allx.min() / width) * width
    assert (allx.max() - allx.min()) / width > h.bins / 2
    direct, _ = np.histogram(allx, bins=edges)
    assert allx.max() < edges[-1]  # so numpy's closed last bin changes nothing
    assert np.array_equal(direct, h.counts[0])


def test_entropy_growth_moves_values_equal_to_the_old_threshold_up():
    """T0 = 2 from the first batch; a value of exactly 2.0 sits in the closed last bin. When a later batch
    doubles T to 4, numpy's rule on the new edges puts 2.0 in the bin that starts at 2.0: the counts after
    the doubling equal numpy.histogram of all the data on the new edges, not just the old pairs summed."""
    o = make_observer("entropy", bins=16, quantized_bins=4)
    o.update(np.array([2.0, 2.0, -2.0, 0.0, 1.0, 1.9], dtype=np.float32))
    assert o.hist.top[0] == 2 and o.hist.counts[0, 15] == 3  # the two 2.0s and 1.9
    o.update(np.array([3.0, -0.1], dtype=np.float32))
    edges = o.hist.edges(0)
    assert edges[0] == -4.0 and edges[-1] == 4.0 and edges[12] == 2.0
    allx = np.array([2.0, 2.0, -2.0, 0.0, 1.0, 1.9, 3.0, -0.1], dtype=np.float32)
    assert np.array_equal(o.hist.counts[0], np.histogram(allx, bins=edges)[0])


def test_spawned_parts_of_tf_enhanced_use_the_first_batchs_buckets():
    """A part made by spawn() bins a batch on the first batch's buckets (and drops what is outside them),
    where a fresh observer would take that batch's own range."""
    a = make_observer("tf_enhanced")
    a.update(np.array([-1.0, 1.0], dtype=np.float32))
    part = a.spawn()
    part.update(np.array([0.5, 10.0], dtype=np.float32))  # 10 is outside [-3, 3]: dropped, as by AIMET
    assert np.array_equal(part.xleft, a.xleft)
    assert part.counts[2][0].sum() == 1
    a.merge(part)
    one = make_observer("tf_enhanced")
    for b in ([-1.0, 1.0], [0.5, 10.0]):
        one.update(np.array(b, dtype=np.float32))
    assert np.array_equal(a.pdf, one.pdf)
    assert np.array_equal(a.range(8, False), one.range(8, False))


def test_tf_enhanced_pdf_is_the_mean_of_batch_pdfs():
    """pdf = mean over batches of counts / batch size, formed from integer counts kept per batch size:
    batches of 2, 4 and 2 values give (c2/2 + c4/4) / 3 bucket by bucket."""
    o = make_observer("tf_enhanced")
    o.update(np.array([-1.0, 1.0], dtype=np.float32))
    o.update(np.array([1.0, 1.0, 1.0, -1.0], dtype=np.float32))
    o.update(np.array([1.0, 1.0], dtype=np.float32))
    assert o.pdf[0][1024] == (0.5 + 0.75 + 1.0) / 3 and o.pdf[0][512] == (0.5 + 0.25) / 3


# ---------------------------------------------------------------------------------------------- kernels
def test_edge_histogram_is_numpys_rule_on_edge_values():
    """Every edge value, its float32 neighbours on both sides, both ends and random data: counts equal
    numpy.histogram's on the same float32 edges (onnxruntime's entropy histogram), per tensor (the data
    cut into chunks) and per channel."""
    from refquant.kernels.histogram import edge_histogram

    rng = np.random.default_rng(23)
    t = np.float32(2.7182817)
    edges = np.linspace(-t, t, 2049, dtype=np.float32)
    inside = edges.copy()
    x = np.concatenate([inside, np.nextafter(inside[1:], np.float32(-np.inf)),
                        np.nextafter(inside[:-1], np.float32(np.inf)),
                        rng.uniform(-t, t, 200_000).astype(np.float32), np.zeros(5, np.float32)])
    x = np.clip(x, -t, t).astype(np.float32)
    counts = np.zeros((1, 2048), dtype=np.int64)
    top = edge_histogram(x.reshape(1, 1, -1), edges[None], counts)
    assert np.array_equal(counts[0], np.histogram(x, bins=edges)[0])
    assert top[0] == np.sum(x == t)
    per_channel = x[: 3 * (x.size // 3)].reshape(1, 3, -1)
    edges3 = np.stack([edges, edges, edges])
    counts3 = np.zeros((3, 2048), dtype=np.int64)
    edge_histogram(per_channel, edges3, counts3)
    for c in range(3):
        assert np.array_equal(counts3[c], np.histogram(per_channel[0, c], bins=edges)[0])


def test_lattice_histogram_bins_by_floor_of_the_scaled_value():
    """Lattice bin = floor(x * 2^-L) - start, checked against exact rational arithmetic on values that sit
    exactly on bin edges, next to them, and tiny (subnormal) values."""
    from fractions import Fraction

    from refquant.kernels.histogram import lattice_histogram

    level, start = -3, -40
    x = np.array([0.0, -0.0, 0.125, -0.125, 1.0, -5.0, 4.875, np.nextafter(np.float32(0.125), np.float32(0)),
                  np.nextafter(np.float32(-0.125), np.float32(-1)), 1e-45, -1e-45, 3.1, -4.99],
                 dtype=np.float32)
    counts = np.zeros((1, 128), dtype=np.int64)
    lattice_histogram(x.reshape(1, 1, -1), np.array([2.0 ** -level]), np.array([start]), counts)
    want = np.zeros(128, dtype=np.int64)
    for v in x:
        k = int((Fraction(float(v)) / Fraction(2) ** level).__floor__()) - start
        want[k] += 1
    assert np.array_equal(counts[0], want)


def test_pairwise_sum_is_numpys_float32_sum():
    from refquant.kernels.histogram import pairwise_sum_f32

    rng = np.random.default_rng(24)
    for n in list(range(1, 140)) + [255, 256, 257, 1000, 2049, 4097]:
        a = (rng.standard_normal(n) * 1000).astype(np.float32)
        assert np.float32(pairwise_sum_f32(a, 0, n)) == np.sum(a)


def test_entropy_kernels_equal_the_reference_search():
    """The Numba threshold search returns the same window as ``entropy_threshold`` (numpy, onnxruntime's
    arithmetic) on histograms of different shapes: Gaussian, one-sided, heavy-tailed, with an outlier, with
    empty bins, and of 512 and 2048 bins."""
    from refquant.kernels.histogram import entropy_window
    from refquant.quant.observers import entropy_threshold

    rng = np.random.default_rng(25)
    for trial in range(8):
        bins = (2048, 512)[trial % 2]
        x = [rng.standard_normal(50_000), np.maximum(rng.standard_normal(50_000), 0),
             rng.laplace(size=50_000) * 3, np.append(rng.standard_normal(50_000), 30.0)][trial % 4]
        t = np.float32(np.abs(x).max())
        hist, edges = np.histogram(x.astype(np.float32), bins, range=(-t, t))
        if trial >= 4:
            hist[::3] = 0
        assert entropy_window(hist, 128) == entropy_threshold(hist, edges, 128)
