"""AdaRound's default layer inputs (quantize_activations="outputs"): the activation quantizers off for every layer
but the output layers (no other layer after them) whose data has at least two samples per input of a weight row;
those are fitted last, to their quantized inputs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import refquant
from refquant.ptq import adaround as A
from refquant.quant import QuantSim

from .helpers import FLOAT, make_model


def two_head_model():
    """x [N, 3, 6, 6] -> Conv 3x3 (4 ch) -> Relu -> { Conv 1x1 (2 ch) -> Sigmoid -> "map";
    Flatten -> Gemm (144 -> 3) -> "scores" }: two output layers after a shared trunk."""
    rng = np.random.default_rng(11)
    w1 = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(size=(2, 4, 1, 1)).astype(np.float32)
    w3 = rng.normal(size=(3, 144)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="trunk"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["m"], name="map_head"),
             helper.make_node("Sigmoid", ["m"], ["map"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "w3"], ["scores"], transB=1, name="score_head")]
    return refquant.load(make_model(nodes, [("x", FLOAT, [None, 3, 6, 6])],
                                    [("map", FLOAT, None), ("scores", FLOAT, None)],
                                    {"w1": w1, "w2": w2, "w3": w3}))


def samples(count, seed=0):
    return np.random.default_rng(seed).normal(size=(count, 3, 6, 6)).astype(np.float32)


def calibrated_sim(graph, x):
    sim = QuantSim(graph.copy(), param_bw=4, output_bw=4)  # 4-bit activations: the kinds of input differ clearly
    sim.compute_encodings(x, progress=False)
    return sim


def fixed_values(sim):
    return {n: q.fixed_value for n, q in sim.quantizers.items() if q.fixed_value is not None}


def test_output_layers_are_those_with_no_layer_after_them():
    sim = calibrated_sim(two_head_model(), samples(8))
    layers, _ = A.find_layers(sim)
    assert [layer.name for layer in layers] == ["trunk", "map_head", "score_head"]
    assert [layer.name for layer in A.output_layers(sim, layers)] == ["map_head", "score_head"]


@pytest.mark.parametrize("count, expected", [(7, []), (8, ["map_head"]), (287, ["map_head"]),
                                             (288, ["map_head", "score_head"])])
def test_an_output_layer_needs_two_samples_per_weight_input(count, expected):
    """map_head reads 4 inputs per output (a 1x1 conv over 4 channels), score_head 144: the samples count, not the
    36 positions of map_head in each."""
    x = samples(count)
    sim = calibrated_sim(two_head_model(), x)
    layers, _ = A.find_layers(sim)
    chosen = A.output_layers_with_data(sim, layers, x, batch_size=16)
    assert [layer.name for layer in chosen] == expected


def test_the_default_fits_the_output_layers_last_to_their_quantized_inputs():
    """The default is the two runs it stands for: the other layers with the activation quantizers off, then the
    output layer with them on (every layer here is fitted full batch, so neither run depends on the seed)."""
    x = samples(8)
    graph = two_head_model()
    sim = calibrated_sim(graph, x)
    report = []
    A.adaround(sim, x, num_iterations=200, progress=False, report=report)
    assert [(r.layer, r.quantized_inputs) for r in report] == [("trunk", False), ("score_head", False),
                                                               ("map_head", True)]
    reference = calibrated_sim(graph, x)
    A.adaround(reference, x, num_iterations=200, progress=False, quantize_activations=False,
               nodes_to_include=["trunk", "score_head"])
    A.adaround(reference, x, num_iterations=200, progress=False, quantize_activations=True,
               nodes_to_include=["map_head"])
    got, want = fixed_values(sim), fixed_values(reference)
    assert got.keys() == want.keys() == {"w1", "w2", "w3"}
    assert all(np.array_equal(got[n], want[n]) for n in want)
    off = calibrated_sim(graph, x)
    A.adaround(off, x, num_iterations=200, progress=False, quantize_activations=False)
    assert np.array_equal(fixed_values(off)["w1"], got["w1"]) and np.array_equal(fixed_values(off)["w3"], got["w3"])
    assert not np.array_equal(fixed_values(off)["w2"], got["w2"])  # the quantized inputs do round map_head otherwise
    assert all(q.enabled == reference.quantizers[n].enabled for n, q in sim.quantizers.items())


def test_without_an_output_layer_with_data_or_activation_quantizers_the_default_is_the_inputs_off():
    x = samples(8)
    graph = two_head_model()
    runs = []
    for quantize_activations, nodes in (("outputs", ["trunk", "score_head"]), (False, ["trunk", "score_head"])):
        sim = calibrated_sim(graph, x)
        A.adaround(sim, x, num_iterations=100, progress=False, quantize_activations=quantize_activations,
                   nodes_to_include=nodes)  # score_head has 8 samples for 144 inputs
        runs.append(fixed_values(sim))
    for quantize_activations in ("outputs", False):
        sim = calibrated_sim(graph, x)
        for quantizer in sim.quantizers.values():
            quantizer.enabled = quantizer.kind == "param"
        A.adaround(sim, x, num_iterations=100, progress=False, quantize_activations=quantize_activations)
        runs.append(fixed_values(sim))
    for a, b in (runs[:2], runs[2:]):
        assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_the_default_on_an_uncalibrated_sim_calibrates_it_for_the_output_layers():
    x = samples(8)
    graph = two_head_model()
    fresh = QuantSim(graph.copy(), param_bw=4, output_bw=4)
    A.adaround(fresh, x, num_iterations=100, progress=False)
    calibrated = calibrated_sim(graph, x)
    A.adaround(calibrated, x, num_iterations=100, progress=False)
    a, b = fixed_values(fresh), fixed_values(calibrated)
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    assert fresh.encoding_of("r") == calibrated.encoding_of("r")


def test_an_interrupted_output_layer_fit_leaves_the_sim_as_it_was(monkeypatch):
    x = samples(8)
    sim = calibrated_sim(two_head_model(), x)
    before = {n: (q.enabled, q.encoding, q.frozen, q.fixed_value) for n, q in sim.quantizers.items()}
    real = A.adaround_layer

    def interrupt(sim, layer, inputs, **options):
        if layer.name == "map_head":
            raise KeyboardInterrupt
        return real(sim, layer, inputs, **options)

    monkeypatch.setattr(A, "adaround_layer", interrupt)
    with pytest.raises(KeyboardInterrupt):
        A.adaround(sim, x, num_iterations=50, progress=False)
    after = {n: (q.enabled, q.encoding, q.frozen, q.fixed_value) for n, q in sim.quantizers.items()}
    assert after == before


def test_nodes_to_include_do_not_make_the_last_included_layer_an_output_layer():
    """Output layers are those of the whole graph: the trunk alone is still followed by the two heads (64 samples:
    enough for the trunk's 27 inputs per output, were it an output layer)."""
    x = samples(64)
    report = []
    A.adaround(calibrated_sim(two_head_model(), x), x, num_iterations=20, progress=False, nodes_to_include=["trunk"],
               report=report)
    assert [(r.layer, r.quantized_inputs) for r in report] == [("trunk", False)]
    report = []
    A.adaround(calibrated_sim(two_head_model(), x), x, num_iterations=20, progress=False,
               nodes_to_include=["map_head"], report=report)
    assert [(r.layer, r.quantized_inputs) for r in report] == [("map_head", True)]
