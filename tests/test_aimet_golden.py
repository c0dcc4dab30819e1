"""QuantSim's encodings against files aimet-onnx 2.42.0 wrote (golden/aimet/, made by make_aimet_golden.py).

* The weight-scale guard: AIMET raises the weight scale of a near-dead channel so that its int32 bias and its
  requantization scale stay representable (refquant.quant.scale_guard); each of its three bounds is the binding
  one on some channel of golden/aimet/scale_guard.onnx.
* MobileNetV2's weight encodings: its depthwise filters have channels whose weights are all positive; aimet-onnx's
  default configs keep those on the signed grid (offset -128), which a default of unsigned_symmetric=True got wrong.
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import refquant
from refquant.intsim import IntSim
from refquant.quant import QuantSim
from refquant.quant.encoding import from_min_max
from refquant.quant.scale_guard import guarded_weight_scale

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "aimet"
SHARED = Path(os.environ.get("REFQUANT_SHARED", "/work/shared"))
MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet.onnx"
CONFIGS = {"pc": "default", "pt": "per_tensor"}


def aimet_encodings(path: Path) -> tuple[dict, dict]:
    data = json.loads(path.read_text())
    return ({e["name"]: e for e in data["activation_encodings"]}, {e["name"]: e for e in data["param_encodings"]})


def scale_guard_sim(config: str) -> QuantSim:
    # rounding half_up: AIMET's simulation, so that the weights quantized during calibration are AIMET's
    sim = QuantSim(refquant.load(GOLDEN / "scale_guard.onnx"), config=config, rounding="half_up")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sim.compute_encodings(np.load(GOLDEN / "scale_guard_calib.npy"), batch_size=16, progress=False)
    return sim


@pytest.mark.parametrize("cfg", CONFIGS)
def test_weight_scales_equal_aimets_after_its_overflow_guard(cfg):
    activations, params = aimet_encodings(GOLDEN / f"scale_guard_{cfg}.encodings")
    sim = scale_guard_sim(CONFIGS[cfg])
    assert sorted(params) == sorted(n for n, q in sim.quantizers.items() if q.kind == "param" and q.enabled)
    for name, entry in params.items():
        encoding = sim.quantizers[name].encoding
        assert np.array_equal(np.ravel(encoding.scale), entry["scale"]), name
        assert np.array_equal(np.ravel(encoding.offset), entry["offset"]), name
    for name, entry in activations.items():
        encoding = sim.encoding_of(name)
        assert np.array_equal(np.ravel(encoding.offset), entry["offset"]), name
        # Gemm's 512-term float32 sums differ from onnxruntime's by ulps: its output range moves by < 1e-6
        np.testing.assert_allclose(np.ravel(encoding.scale), entry["scale"], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_the_guard_changed_the_near_dead_channels(cfg):
    """AIMET's file holds scales the plain min-max formula does not give: the test above tests the guard."""
    _, params = aimet_encodings(GOLDEN / f"scale_guard_{cfg}.encodings")
    sim = scale_guard_sim(CONFIGS[cfg])
    changed = set()
    for name, entry in params.items():
        weight = sim.graph.initializers[name]
        q = sim.quantizers[name]
        axis = q.axis
        reduce = tuple(i for i in range(weight.ndim) if i != axis) if axis is not None else None
        plain = from_min_max(weight.min(axis=reduce), weight.max(axis=reduce), 8, True)
        if not np.array_equal(np.ravel(plain.scale), entry["scale"]):
            changed.add(name)
    assert changed == ({"w1", "w2", "w5"} if cfg == "pc" else {"w5"})
    assert sorted(sim.adjusted_weight_scales) == (["conv1", "conv2", "matmul"] if cfg == "pc" else ["matmul"])
    assert "raised" in sim.summary().splitlines()[-1] and "matmul" in sim.summary().splitlines()[-1]


def test_guard_bounds_by_hand():
    """s_w >= |b| / (N s_x); >= 2^-23.5 s_y / s_x; >= |round(b/(s_x s_w)) + round(o_y s_y/(s_x s_w))| / N."""
    from refquant.quant.encoding import Encoding

    n = 2.0 ** 31 - 2.0 ** 15
    s_x = np.float32(0.01)
    # bias only (no output quantizer): 1000 / (N * 0.01) = 4.6566e-5 > 1e-6
    got = guarded_weight_scale(np.array([1e-6, 1e-2], np.float32), np.array([1000.0, 1000.0]), s_x, None)
    assert got[0] == np.float32(1000.0 / (n * np.float64(s_x))) and got[1] == np.float32(1e-2)
    # requantization scale: s_y = 10 -> s_w >= 2^-23.5 * 10 / 0.01 = 8.43e-5
    out = Encoding(np.float64(10.0), np.float64(0.0), 8, False, 255)
    got = guarded_weight_scale(np.array([1e-6], np.float32), None, s_x, out)
    assert got[0] == np.float32(np.float32(2.0 ** -23.5) * np.float32(10.0) / s_x)
    # per-tensor scale against a bias vector: the largest |b| decides
    got = guarded_weight_scale(np.float32(1e-6), np.array([-3000.0, 10.0]), s_x, None)
    assert got == np.float32(3000.0 / (n * np.float64(s_x)))
    # nothing to do: unchanged, bit for bit
    got = guarded_weight_scale(np.array([0.02], np.float32), np.array([0.5]), s_x, out)
    assert got[0] == np.float32(0.02)


def test_guarded_model_runs_in_integers_without_clipping_a_bias():
    """Before the guard, conv2's bias code was 5000 / (s_x s_w) = 7e9: clipped to int32 with a warning."""
    sim = scale_guard_sim("default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        isim = IntSim(sim)
        isim.run({"input": np.load(GOLDEN / "scale_guard_calib.npy")[:4]})


needs_mobilenet = pytest.mark.skipif(not MOBILENET.is_file(), reason=f"MobileNetV2 not found at {MOBILENET}")


@needs_mobilenet
@pytest.mark.parametrize("cfg,precision,config", [("w8_pc", "w8a8", "default"), ("w8_pt", "w8a8", "per_tensor"),
                                                  ("w4_pc", "w4a8", "default")])
def test_mobilenet_v2_weight_encodings_equal_aimets(cfg, precision, config):
    golden = np.load(GOLDEN / "mobilenet_v2_params.npz")
    batch = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)  # as the script
    sim = QuantSim(refquant.load(MOBILENET), precision=precision, config=config, rounding="half_up")
    sim.compute_encodings([{"input": batch}], progress=False)
    names = {key.split("/")[1] for key in golden if key.startswith(cfg + "/")}
    assert names == {n for n, q in sim.quantizers.items() if q.kind == "param" and q.enabled}
    for name in names:
        encoding = sim.quantizers[name].encoding
        assert np.array_equal(np.ravel(encoding.scale), golden[f"{cfg}/{name}/scale"]), name
        assert np.array_equal(np.ravel(encoding.offset), golden[f"{cfg}/{name}/offset"]), name
    if cfg == "w8_pc":  # the case the test exists for: all-positive depthwise channels stay signed
        offsets = np.concatenate([golden[f"{cfg}/{n}/offset"] for n in names])
        assert np.all(offsets == -128)
        weights = [sim.graph.initializers[n] for n in names]
        assert any((w.reshape(w.shape[0], -1).min(axis=1) >= 0).any() for w in weights)
