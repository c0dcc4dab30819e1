"""Sensitivity analysis (QuantAnalyzer) and its report, on the AIMET samples (refs/aimet_samples)."""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.analysis import analyze, flip_to_higher_precision, layer_groups
from refquant.analysis.engine import Score, sqnr_from
from refquant.errors import RefquantError
from refquant.quant import QuantSim
from refquant.quant.encoding import from_min_max

from .helpers import FLOAT, SAMPLE_MODELS, SAMPLES, load_sample, make_model, needs_samples, sample_inputs

MODELS = SAMPLE_MODELS
load, inputs = load_sample, sample_inputs


def calibrated(entry, graph=None, config="default", precision="w8a8"):
    sim = QuantSim(graph or load(entry), precision=precision, config=config)
    sim.compute_encodings(inputs(entry, "calib"), progress=False)
    return sim


def broken_convnet(index=(0, 11, 0, 1)):
    """The convnet with one weight of its middle conv (c2) multiplied by 1000, nothing compensated."""
    graph = load("convnet")
    weight = graph.initializers["c2.weight"].copy()
    weight[index] *= 1000.0
    graph.initializers["c2.weight"] = weight
    return graph


def naive_score(sim, batches, enabled):
    """The metric by QuantSim itself with only quantizers ``enabled`` switched on."""
    saved = {n: q.enabled for n, q in sim.quantizers.items()}
    try:
        for name, q in sim.quantizers.items():
            q.enabled = saved[name] and name in enabled
        score = Score()
        for feeds in batches:
            score.add(sim.run_float(feeds), sim.run(feeds))
        return score
    finally:
        for name, q in sim.quantizers.items():
            q.enabled = saved[name]


def batches_of(x, size=16):
    return [{"input": x[i:i + size]} for i in range(0, len(x), size)]


# ------------------------------------------------------------------------------ groups
@needs_samples
def test_groups_pair_each_weight_with_its_output_quantizer():
    groups = {g.name: g for g in layer_groups(calibrated("convnet"))}
    assert list(groups) == ["input", "/c1/Conv", "/c2/Conv", "/dw/Conv", "/pw/Conv", "/pool/GlobalAveragePool",
                            "/fc/Gemm"]
    # Conv+Relu supergroup: the conv output is not quantized, the Relu output is the layer's output
    assert groups["/c1/Conv"].weights == ["c1.weight"] and groups["/c1/Conv"].activations == ["/relu/Relu_output_0"]
    # the depthwise conv is outside supergroups; its Relu output is tied to the conv output: one group
    assert groups["/dw/Conv"].activations == ["/dw/Conv_output_0", "/relu_2/Relu_output_0"]
    assert groups["/dw/Conv"].depthwise and groups["/dw/Conv"].kind == "weighted"
    assert groups["/pool/GlobalAveragePool"].kind == "activation" and groups["input"].position == -1
    assert groups["/c1/Conv"].macs == 16 * 32 * 32 * 3 * 3 * 3  # 16 output channels on 32x32, 3x3x3 taps
    # a layer's activation function joins it even when both outputs are quantized (Conv -> PRelu, with
    # the PRelu slope, a quantized constant)
    rnet = {g.name: g for g in layer_groups(calibrated("mtcnn_rnet"))}
    assert list(rnet) == ["input", "/conv1/Conv", "/conv2/Conv", "/conv3/Conv", "/dense4/Gemm", "/dense5_2/Gemm",
                          "/dense5_1/Gemm", "/softmax5_1/Softmax"]
    assert rnet["/conv1/Conv"].weights == ["conv1.weight", "onnx::PRelu_47"]
    assert rnet["/conv1/Conv"].activations == ["/conv1/Conv_output_0", "/prelu1/PRelu_output_0"]
    assert rnet["/conv1/Conv"].roles == {"conv1.weight": "weight", "onnx::PRelu_47": "constant"}


# ------------------------------------------------------------------------------ exactness
@needs_samples
@pytest.mark.parametrize("entry", ["convnet", "mtcnn_rnet"])
def test_every_sweep_number_equals_quantsim_run_with_those_quantizers(entry):
    """The sweep starts trials from cached tensors at the layer (FP32 upstream for "only", the full
    simulation upstream for "all but"); the sums must still be QuantSim's, bit for bit."""
    sim = calibrated(entry, config="per_tensor")
    x = inputs(entry, "eval", 48)
    report = analyze(sim, x, progress=False)
    batches = batches_of(x)
    active = {n for g in layer_groups(sim) for n in g.quantizers}
    for layer in report.layers:
        mine = set(layer.weights + layer.activations)
        assert naive_score(sim, batches, mine).value == layer.only
        assert naive_score(sim, batches, active - mine).value == layer.all_but
    statics = {n for n, q in sim.quantizers.items() if q.kind != "activation"}
    assert naive_score(sim, batches, active & statics).value == report.weights_only
    assert naive_score(sim, batches, active - statics).value == report.activations_only
    assert naive_score(sim, batches, active).value == report.quantized
    # a layer's weights alone, measured at its weighted node's output on FP32 inputs
    graph = sim.graph
    for layer in report.layers:
        if layer.weights_alone_db is None:
            continue
        node = graph.node(layer.nodes[0])
        mine = {w for w in layer.weights if w in node.inputs and sim.quantizers[w].kind == "param"}
        signal = noise = 0.0
        saved = {n: q.enabled for n, q in sim.quantizers.items()}
        for name, q in sim.quantizers.items():
            q.enabled = saved[name] and name in mine
        for feeds in batches:
            ref = sim.run_float(feeds, outputs=[node.outputs[0]])[node.outputs[0]].astype(np.float64)
            out = sim.run(feeds, outputs=[node.outputs[0]])[node.outputs[0]].astype(np.float64)
            signal += float(np.sum(ref ** 2))
            noise += float(np.sum((ref - out) ** 2))
        for name, q in sim.quantizers.items():
            q.enabled = saved[name]
        assert layer.weights_alone_db == pytest.approx(sqnr_from(signal, noise), abs=1e-9)
    # SQNR along the graph: the simulation against FP32 at each quantized activation
    names = [n for n, t in report.tensors.items() if t.kind == "activation"]
    for name in names:
        signal = noise = 0.0
        for feeds in batches:
            ref = sim.run_float(feeds, outputs=[name])[name].astype(np.float64)
            out = sim.run(feeds, outputs=[name])[name].astype(np.float64)
            signal += float(np.sum(ref ** 2))
            noise += float(np.sum((ref - out) ** 2))
        assert report.tensors[name].sqnr_db == pytest.approx(sqnr_from(signal, noise), abs=1e-9)


@needs_samples
def test_analyze_leaves_the_sim_as_it_was():
    sim = calibrated("mlp")
    before = {n: (q.enabled, q.bitwidth, q.encoding) for n, q in sim.quantizers.items()}
    out = sim.run({"input": inputs("mlp", "eval", 8)})["logits"]
    analyze(sim, inputs("mlp", "eval", 32), progress=False)
    assert {n: (q.enabled, q.bitwidth, q.encoding) for n, q in sim.quantizers.items()} == before
    np.testing.assert_array_equal(sim.run({"input": inputs("mlp", "eval", 8)})["logits"], out)


# ------------------------------------------------------------------------------ ranking and flags
@needs_samples
@pytest.mark.parametrize("index", [(0, 11, 0, 1), (17, 8, 2, 0)])
@pytest.mark.parametrize("config", ["default", "per_tensor"])
def test_a_layer_with_an_outlier_weight_is_ranked_first_and_flagged(config, index):
    """Per-channel, the outlier leaves its channel's other weights on a grid ~1000x too coarse (all zero);
    per-tensor, every channel's. Either way the layer is the culprit, and a fix is to keep it out."""
    sim = calibrated("convnet", broken_convnet(index), config=config)
    report = analyze(sim, inputs("convnet", "eval", 64), progress=False)
    first = report.culprits[0]
    assert first.group == "/c2/Conv" and first.rank == 1
    assert "outlier" in first.flags and first.fix == "exclude"
    outliers = [f for f in report.findings if f.code == "outlier"]
    assert [f.tensor for f in outliers] == ["c2.weight"]
    assert report.tensors["c2.weight"].outlier_ratio > 20  # threshold 10
    # leaving the broken layer in float recovers much more than leaving any other layer in float
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["/c2/Conv"].all_but == max(layer.all_but for layer in report.layers)
    assert by_name["/c2/Conv"].all_but > report.quantized + 3
    assert by_name["/c2/Conv"].only < min(layer.only for layer in report.layers if layer.name != "/c2/Conv") - 5


@needs_samples
def test_the_intact_convnet_has_no_outlier_and_its_weights_spread_under_per_tensor():
    per_channel = analyze(calibrated("convnet"), inputs("convnet", "eval", 64), progress=False)
    assert not [f for f in per_channel.findings if f.code in ("outlier", "per_tensor_spread")]
    per_tensor = analyze(calibrated("convnet", config="per_tensor"), inputs("convnet", "eval", 64), progress=False)
    spread = {f.tensor: f.value for f in per_tensor.findings if f.code == "per_tensor_spread"}
    # the sample's first conv has deliberately imbalanced channel scales (refs/aimet_samples/README.md)
    assert "c1.weight" in spread
    c1 = per_tensor.tensors["c1.weight"]
    amax = np.maximum(np.abs(c1.channel_min), np.abs(c1.channel_max))
    assert spread["c1.weight"] == pytest.approx(amax.max() / np.median(amax))
    assert per_tensor.tensors["c1.weight"].qdq_sqnr_db < per_channel.tensors["c1.weight"].qdq_sqnr_db


def _gemm_model(bias):
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    return refquant.load(make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], [("x", FLOAT, ["n", 8])],
                                    [("y", FLOAT, ["n", 4])], {"w": w, "b": np.float32(bias)}))


def test_int32_bias_overflow_risk_is_flagged():
    """A bias of 1e4 on a 16-bit grid: b / (s_x s_w) ~ 1e9 * 2^15 leaves int32. Calibration's weight-scale guard
    (AIMET's) widens the weight scale so it just fits (a warning); with the weight encoding frozen it cannot (an error)."""
    x = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    for bias, precision, freeze, expected in [([0.1, -0.2, 0.3, 0.0], "w8a8", False, []),
                                              ([1e4, 0.0, 0.0, 0.0], "w16a16", False, ["warning"]),
                                              ([1e4, 0.0, 0.0, 0.0], "w16a16", True, ["error"])]:
        sim = QuantSim(_gemm_model(bias), precision=precision)
        if freeze:  # the plain min-max grid of the weights, frozen as a loaded encoding would be
            w = sim.graph.initializers["w"]
            sim.set_encoding("w", from_min_max(w.min(axis=0), w.max(axis=0), 16, True, axis=1))
            with pytest.warns(RuntimeWarning, match="frozen"):
                sim.compute_encodings(x, progress=False)
        else:
            sim.compute_encodings(x, progress=False)
        assert len(sim.adjusted_weight_scales) == (1 if bias[0] == 1e4 and not freeze else 0)
        report = analyze(sim, x, progress=False)
        flags = [f for f in report.findings if f.code == "bias_overflow"]
        assert [f.severity for f in flags] == expected
        sx = float(sim.encoding_of("x").scale)
        sw = np.asarray(sim.encoding_of("w").scale)
        assert report.tensors["w"].bias_ratio == pytest.approx(float(np.max(np.abs(bias) / (sx * sw))))
        if not freeze:  # the guard leaves the bias just inside int32 (2^31 - 2^15): flagged as close only
            assert np.max(np.abs(bias) / (sx * sw)) < 2.0 ** 31


def test_dead_weight_channels_are_flagged():
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    w[:, 2] = 0  # output channel 2 of a Gemm (axis 1 without transB) is all zero
    graph = refquant.load(make_model([helper.make_node("Gemm", ["x", "w"], ["y"])], [("x", FLOAT, ["n", 8])],
                                     [("y", FLOAT, ["n", 4])], {"w": w}))
    x = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    sim = QuantSim(graph)
    sim.compute_encodings(x, progress=False)
    report = analyze(sim, x, progress=False)
    dead = {f.tensor: f.value for f in report.findings if f.code == "dead_channels"}
    assert dead["w"] == 1 and dead["y"] == 1  # and so is the output channel it produces


def test_analyze_needs_a_calibrated_sim():
    with pytest.raises(RefquantError, match="compute_encodings"):
        analyze(QuantSim(_gemm_model([0, 0, 0, 0])), np.zeros((4, 8), np.float32), progress=False)


# ------------------------------------------------------------------------------ eval_fn and executors
@needs_samples
def test_a_user_metric_drives_the_ranking():
    """eval_fn(run) -> float: here face/no-face accuracy of the R-Net on the labelled LFW subset."""
    x = inputs("mtcnn_rnet", "eval")
    labels = np.r_[np.ones(100, int), np.zeros(100, int)]

    def accuracy(run):
        predictions = np.concatenate([np.argmax(run({"input": x[i:i + 50]})["prob"], axis=1)
                                      for i in range(0, len(x), 50)])
        return float(np.mean(predictions == labels))

    sim = calibrated("mtcnn_rnet", precision="w4a8")
    report = analyze(sim, x[:32], eval_fn=accuracy, progress=False)
    assert report.metric == "accuracy" and report.fp32 == 1.0
    assert report.quantized == accuracy(lambda feeds: sim.run(feeds))
    assert all(0 <= layer.only <= 1 and 0 <= layer.all_but <= 1 for layer in report.layers)
    assert len(report.culprits) == min(10, len(report.layers))


@needs_samples
def test_sweep_on_executors_gives_the_serial_numbers():
    sim = calibrated("convnet")
    x = inputs("convnet", "eval", 48)
    serial = analyze(sim, x, progress=False)
    with ThreadPoolExecutor(2) as pool:
        threaded = analyze(sim, x, progress=False, executor=pool)
    assert [(l.only, l.all_but) for l in threaded.layers] == [(l.only, l.all_but) for l in serial.layers]
    assert threaded.quantized == serial.quantized
    mlp = calibrated("mlp")
    serial = analyze(mlp, inputs("mlp", "eval"), progress=False)
    with ProcessPoolExecutor(2) as pool:  # tasks and results pickle
        processes = analyze(mlp, inputs("mlp", "eval"), progress=False, executor=pool)
    assert [(l.only, l.all_but) for l in processes.layers] == [(l.only, l.all_but) for l in serial.layers]
    assert processes.tensors["logits"].sqnr_db == serial.tensors["logits"].sqnr_db


@needs_samples
def test_the_sweep_runs_far_fewer_nodes_than_naive_reruns(monkeypatch):
    """Speed by construction: trials start at their layer. Count node outputs produced, against running
    the whole model once per evaluation (the wall time is printed, not asserted: tests do not time)."""
    import time

    import refquant.runtime as runtime

    produced = [0]
    original = runtime._apply_hooks

    def counting(hooks, name, array, node):
        if node is not None:
            produced[0] += 1
        return original(hooks, name, array, node)

    for entry in ("convnet", "mlp", "mtcnn_rnet"):
        sim = calibrated(entry)
        x = inputs(entry, "eval")
        graph = sim.graph
        per_run = sum(len([o for o in n.outputs if o]) for n in graph.nodes)
        monkeypatch.setattr(runtime, "_apply_hooks", counting)
        produced[0] = 0
        start = time.perf_counter()
        report = analyze(sim, x, progress=False)
        elapsed = time.perf_counter() - start
        monkeypatch.setattr(runtime, "_apply_hooks", original)
        batches = math.ceil(len(x) / 16)
        # naive: FP32 once + the full simulation + every evaluation, each a whole-model run
        naive = (2 + report.settings["evaluations"]) * per_run * batches
        print(f"{entry}: {report.settings['evaluations']} evaluations on {len(x)} samples in {elapsed:.2f} s, "
              f"{produced[0]} node outputs vs {naive} naive")
        # the deeper the model, the larger the saving; the MLP has 5 nodes and 4 groups
        assert produced[0] < {"mlp": 0.95, "convnet": 0.8, "mtcnn_rnet": 0.7}[entry] * naive


# ------------------------------------------------------------------------------ report files
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@needs_samples
def test_report_html_is_self_contained_with_decodable_plots_and_renders(tmp_path):
    from PIL import Image

    sim = calibrated("convnet", broken_convnet(), config="per_tensor")
    report = analyze(sim, inputs("convnet", "eval", 32), progress=False)
    paths = report.save(tmp_path / "out")
    text = Path(paths["html"]).read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # nothing fetched from anywhere: no http(s) in any src/href, no link/script elements at all
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    images = re.findall(r"<img\b[^>]*>", text)
    layers_and_tensors = 3 + len(report.tensors)  # summary, per-layer, SQNR-along-graph, one per tensor
    assert len(images) == layers_and_tensors
    for tag in images:
        src = re.search(r'src="([^"]*)"', tag).group(1)
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw.startswith(PNG_MAGIC)
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            assert image.width > 100 and image.height > 100
    # the culprit and its fix are in the page
    assert "/c2/Conv" in text and "exclude" in text
    # report.json: standard JSON with every number
    data = json.loads(Path(paths["json"]).read_text(), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    assert data["culprits"][0]["group"] == "/c2/Conv"
    assert {layer["name"] for layer in data["layers"]} == {layer.name for layer in report.layers}
    assert set(data["tensors"]) == set(report.tensors)
    assert data["whole_model"]["fp32"] == "inf"
    assert len(data["tensors"]["c2.weight"]["channel_min"]) == 32
    _render_with_chromium(Path(paths["html"]), tmp_path)


def _render_with_chromium(page: Path, tmp_path: Path) -> None:
    """Headless Debian chromium screenshot of the page: it must not be blank. Skipped only when the
    ``chromium`` binary is absent."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed: the HTML rendering check did not run")
    from PIL import Image

    shot = tmp_path / "shot.png"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--window-size=1280,2000", f"--screenshot={shot}", page.resolve().as_uri()]
    subprocess.run(command, check=True, timeout=120, capture_output=True,
                   env=dict(os.environ, HOME=str(tmp_path)))
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    non_white = np.mean(np.any(pixels < 240, axis=2))
    assert non_white > 0.02  # text, tables and plots, not an empty page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # plots bring colours


# ------------------------------------------------------------------------------ lite mixed precision
@needs_samples
def test_flip_the_most_sensitive_layer_to_16_bits():
    sim = calibrated("convnet", broken_convnet())
    x = inputs("convnet", "eval", 64)
    report = analyze(sim, x, progress=False)
    flipped = flip_to_higher_precision(sim, report, n=1)
    assert flipped == ["/c2/Conv"]
    assert sim.quantizers["c2.weight"].bitwidth == 16 and sim.encoding_of("c2.weight").bitwidth == 16
    assert sim.encoding_of("/relu_1/Relu_output_0").bitwidth == 16
    assert sim.quantizers["c1.weight"].bitwidth == 8
    after = naive_score(sim, batches_of(x), set(sim.quantizers)).value
    assert after > report.quantized + 3
    with pytest.raises(RefquantError, match="exactly one"):
        flip_to_higher_precision(sim, report)


# ------------------------------------------------------------------------------ command line
@needs_samples
def test_cli_analyze_writes_the_report(tmp_path, capsys):
    import argparse

    from refquant.analysis import add_analyze_parser

    parser = argparse.ArgumentParser()
    add_analyze_parser(parser.add_subparsers())
    model = tmp_path / "broken.onnx"
    refquant.save(broken_convnet(), model)
    np.savez(tmp_path / "calib.npz", input=inputs("convnet", "calib"))
    np.savez(tmp_path / "eval.npz", input=inputs("convnet", "eval", 32))
    args = parser.parse_args(["analyze", str(model), "--data", str(tmp_path / "calib.npz"), "--eval-data",
                              str(tmp_path / "eval.npz"), "--top", "3", "-o", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+1\s+/c2/Conv\s", out, re.M)
    assert (tmp_path / "out" / "report.html").exists()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["culprits"][0]["group"] == "/c2/Conv"
