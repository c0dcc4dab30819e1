"""Mixed precision (AIMET AMP's greedy Pareto search) on the AIMET samples."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import refquant
from refquant.analysis import layer_groups, mixed_precision
from refquant.analysis.amp import Candidate, calibrate_candidate, group_cost, parse_candidate
from refquant.errors import RefquantError
from refquant.model_info import node_macs
from refquant.quant import QuantSim

from .helpers import SAMPLE_MODELS, SAMPLES, load_sample, needs_samples, sample_inputs

MODELS = SAMPLE_MODELS
load, inputs = load_sample, sample_inputs


def independent_sqnr(sim, x, batch=16):
    """Mean output SQNR of the sim, recomputed here from QuantSim.run / run_float (noise-power average)."""
    signal, noise = {}, {}
    for i in range(0, len(x), batch):
        feeds = {"input": x[i:i + batch]}
        ref, out = sim.run_float(feeds), sim.run(feeds)
        for name in ref:
            r = ref[name].astype(np.float64)
            signal[name] = signal.get(name, 0.0) + float(np.sum(r ** 2))
            noise[name] = noise.get(name, 0.0) + float(np.sum((r - out[name]) ** 2))
    ratios = [noise[n] / signal[n] for n in signal]
    return -10 * np.log10(np.mean(ratios))


def test_candidates_parse_every_spelling():
    assert parse_candidate(("int4", "int8")) == Candidate(4, "int", 8, "int")
    assert parse_candidate("w8a16") == parse_candidate((8, 16)) == parse_candidate(("int8", "int16"))
    assert parse_candidate(("fp16", "fp16")).label == "Wfp16Afp16"
    with pytest.raises(RefquantError, match="candidate"):
        parse_candidate("int8")
    with pytest.raises(RefquantError, match="bitwidth"):
        parse_candidate(("int32", "int8"))


@needs_samples
def test_candidate_calibration_leaves_the_sim_untouched():
    sim = QuantSim(load("convnet"), precision="w4a8")
    sim.compute_encodings(inputs("convnet", "calib"), progress=False)
    before = {n: (q.bitwidth, q.encoding) for n, q in sim.quantizers.items()}
    out = sim.run({"input": inputs("convnet", "eval", 4)})["logits"]
    config = calibrate_candidate(sim, parse_candidate("w8a16"), inputs("convnet", "calib"), 16, None)
    assert config.acts["/relu/Relu_output_0"].bitwidth == 16 and config.consts["c1.weight"].dtype == np.float32
    assert {n: (q.bitwidth, q.encoding) for n, q in sim.quantizers.items()} == before
    np.testing.assert_array_equal(sim.run({"input": inputs("convnet", "eval", 4)})["logits"], out)


@needs_samples
def test_bitop_cost_is_macs_times_weight_and_activation_bits():
    sim = QuantSim(load("convnet"))
    sim.compute_encodings(inputs("convnet", "calib"), progress=False)
    groups = {g.name: g for g in layer_groups(sim)}
    c1 = groups["/c1/Conv"]
    assert c1.macs == node_macs(sim.graph, sim.graph.node("/c1/Conv"))
    assert group_cost(c1, parse_candidate("w4a8")) == c1.macs * 4 * 8
    assert group_cost(c1, parse_candidate("w8a16"), "memory") == c1.parameters * 8 + c1.output_elements * 16
    pool = groups["/pool/GlobalAveragePool"]  # no MACs: one op per output element
    assert group_cost(pool, parse_candidate("w4a16")) == pool.output_elements * 16 == 32 * 16


@needs_samples
@pytest.mark.parametrize("entry", ["convnet", "mtcnn_rnet"])
def test_target_is_met_as_reported_and_the_pareto_curve_is_monotone(entry, tmp_path):
    sim = QuantSim(load(entry), precision="w4a8")
    calib, x = inputs(entry, "calib"), inputs(entry, "eval", 96)
    result = mixed_precision(sim, x, calib_data=calib, target="w8a8", progress=False)
    w8a8 = result.uniform["W8A8"]
    assert result.target == w8a8["metric"]
    assert result.target_met is True and result.final_metric >= result.target
    # re-evaluated here, from scratch, on the sim mixed_precision left behind
    assert independent_sqnr(sim, x) == pytest.approx(result.final_metric, abs=1e-9)
    assert independent_sqnr(sim, x) >= result.target
    # the chosen point is the first on the path meeting the target, cheaper than uniform W4A8's next step up
    assert result.uniform["W4A8"]["cost"] <= result.cost <= result.uniform["W8A16"]["cost"]
    # Pareto curve: cost increasing, metric increasing; the path's cost never decreases
    costs = [p.cost for p in result.pareto]
    metrics = [p.metric for p in result.pareto]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert all(b > a for a, b in zip(metrics, metrics[1:]))
    assert all(b.cost >= a.cost for a, b in zip(result.path, result.path[1:]))
    assert result.path[0].metric == pytest.approx(result.uniform["W4A8"]["metric"])
    # the sim carries the assignment: every quantizer at its group's candidate
    groups = {g["name"]: g for g in result.groups}
    for name, label in result.assignment.items():
        cand = parse_candidate(label.lower())
        for tensor in groups[name]["quantizers"]:
            q = sim.quantizers[tensor]
            if q.role == "bias":
                continue
            assert q.bitwidth == (cand.param_bits if q.kind == "param" else cand.act_bits)
            assert sim.encoding_of(tensor).bitwidth == q.bitwidth
    png = result.plot(tmp_path / "pareto.png")
    assert Path(png).read_bytes().startswith(b"\x89PNG")
    data = json.loads(Path(result.save(tmp_path / "amp.json")).read_text())
    assert data["target_met"] is True and len(data["pareto"]) == len(result.pareto)


@needs_samples
def test_convnet_reaches_uniform_w8a8_quality_for_fewer_bit_operations():
    sim = QuantSim(load("convnet"), precision="w4a8")
    result = mixed_precision(sim, inputs("convnet", "eval"), calib_data=inputs("convnet", "calib"), target="w8a8",
                             progress=False)
    assert result.target_met and result.cost < result.uniform["W8A8"]["cost"]
    assert "W4A8" in result.assignment.values()  # some layer stays at 4-bit weights


@needs_samples
def test_budget_gives_the_best_measured_point_within_it():
    sim = QuantSim(load("mlp"), precision="w4a8")
    x = inputs("mlp", "eval")
    probe = mixed_precision(sim, x, calib_data=inputs("mlp", "calib"), progress=False)
    budget = (probe.uniform["W4A8"]["cost"] + probe.uniform["W8A8"]["cost"]) / 2
    result = mixed_precision(QuantSim(load("mlp"), precision="w4a8"), x, calib_data=inputs("mlp", "calib"),
                             budget=budget, progress=False)
    assert result.cost <= budget and result.target_met is None
    within = [p for p in result.path if p.metric is not None and p.cost <= budget]
    assert len(within) == len(result.path)  # the search never buys past the budget
    assert result.search_metric == max(p.metric for p in within)
    with pytest.raises(RefquantError, match="below the cost"):
        mixed_precision(QuantSim(load("mlp")), x, budget=1.0, progress=False)


@needs_samples
def test_exported_encodings_carry_each_quantizers_bitwidth(tmp_path):
    sim = QuantSim(load("mtcnn_rnet"), precision="w4a8")
    result = mixed_precision(sim, inputs("mtcnn_rnet", "eval", 64), calib_data=inputs("mtcnn_rnet", "calib"),
                             target="w8a8", progress=False)
    assert len(set(result.assignment.values())) > 1  # a mixed result
    sim.export(tmp_path, "rnet")
    data = json.loads((tmp_path / "rnet.encodings").read_text())
    entries = {e["name"]: e["bw"] for e in data["activation_encodings"] + data["param_encodings"]}
    expected = {n: q.bitwidth for n, q in sim.quantizers.items() if q.enabled and sim.encoding_of(n) is not None}
    assert entries == expected
    assert len(set(entries.values())) > 1


@needs_samples
def test_a_user_metric_and_a_thread_pool():
    from concurrent.futures import ThreadPoolExecutor

    x = inputs("mlp", "eval")
    reference = load("mlp")
    from refquant.runtime import Session

    fp32 = Session(reference).run({"input": x})["logits"]

    def agreement(run):
        """Top-1 agreement with FP32 (higher is better)."""
        return float(np.mean(np.argmax(run({"input": x})["logits"], axis=1) == np.argmax(fp32, axis=1)))

    sim = QuantSim(load("mlp"), precision="w4a8")
    with ThreadPoolExecutor(2) as pool:
        result = mixed_precision(sim, x, calib_data=inputs("mlp", "calib"), eval_fn=agreement, target=0.95,
                                 executor=pool, progress=False)
    assert result.metric == "agreement" and result.fp32 == 1.0
    assert result.final_metric == agreement(lambda feeds: sim.run(feeds))
    if result.target_met:
        assert result.final_metric >= 0.95


@needs_samples
def test_cli_amp_exports_mixed_encodings(tmp_path, capsys):
    import argparse

    from refquant.analysis import add_amp_parser

    parser = argparse.ArgumentParser()
    add_amp_parser(parser.add_subparsers())
    np.savez(tmp_path / "calib.npz", input=inputs("convnet", "calib"))
    np.savez(tmp_path / "eval.npz", input=inputs("convnet", "eval", 64))
    args = parser.parse_args(["amp", str(SAMPLES / "convnet" / MODELS["convnet"]), "--data",
                              str(tmp_path / "calib.npz"), "--eval-data", str(tmp_path / "eval.npz"),
                              "--candidates", "w4a8,w8a8,w8a16", "--target", "w8a8", "--prefix", "convnet",
                              "-o", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "target" in out and "met" in out
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"convnet.encodings", "amp.json", "pareto.png", "convnet.onnx"} <= files
    data = json.loads((tmp_path / "out" / "convnet.encodings").read_text())
    assert {e["bw"] for e in data["param_encodings"]} <= {4, 8}


@needs_samples
def test_top1_agreement_counts_argmax_matches_with_onnxruntime_fp32():
    import onnxruntime as ort

    from refquant.analysis.amp import top1_agreement

    x = inputs("mtcnn_rnet", "eval", 48)
    path = SAMPLES / "mtcnn_rnet" / MODELS["mtcnn_rnet"]
    prob = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["prob"], {"input": x})[0]
    agreement = top1_agreement(refquant.load(path), x, output="prob")
    rows = {}

    def run(feeds):  # onnxruntime's FP32 probabilities, in each batch of 16 rows 0, 3, ..., 15 reversed
        i = len(rows)
        rows[i] = out = prob[16 * i:16 * i + len(feeds["input"])].copy()
        out[::3] = out[::3, ::-1]
        return {"prob": out}

    # hand-computed: a reversed row of 2 classes changes its argmax (no exact ties here); 6 rows of each
    # of the 3 batches reversed -> 30 of 48 agree
    assert not np.any(prob[:, 0] == prob[:, 1])
    assert agreement(run) == pytest.approx(100.0 * 30 / 48, abs=1e-12)
    with pytest.raises(RefquantError, match="not an output"):
        top1_agreement(refquant.load(path), x, output="logits")


@needs_samples
def test_a_top1_agreement_target_is_met_at_the_cheapest_measured_point():
    from refquant.analysis.amp import top1_agreement

    graph, calib, x = load("mtcnn_rnet"), inputs("mtcnn_rnet", "calib"), inputs("mtcnn_rnet", "eval")
    agreement = top1_agreement(graph, x, output="prob")
    sim = QuantSim(graph, precision="w4a8")
    result = mixed_precision(sim, x, candidates=("w4a8", "w8a8", "w8a16"), calib_data=calib, target=99.0,
                             target_fn=agreement, progress=False)
    # re-evaluated here on the sim it left behind, against onnxruntime's FP32 argmax
    import onnxruntime as ort

    path = SAMPLES / "mtcnn_rnet" / MODELS["mtcnn_rnet"]
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["prob"], {"input": x})[0]
    ours = np.concatenate([sim.run({"input": x[i:i + 16]})["prob"] for i in range(0, len(x), 16)])
    independent = 100.0 * np.mean(ours.argmax(axis=1) == fp32.argmax(axis=1))
    assert result.target_fn == "top1_agreement_pct" and result.target == 99.0
    assert result.final_target_metric == pytest.approx(independent, abs=1e-12)
    assert result.target_met is True and independent >= 99.0
    # bisection: few points measured; the chosen one meets the target and every cheaper measured one misses
    measured = [p for p in result.path if p.target_metric is not None]
    assert len(measured) <= int(np.ceil(np.log2(len(result.path)))) + 1 < len(result.path)
    chosen = result.path[result.chosen_step]
    assert chosen.target_metric >= 99.0 and result.cost == chosen.cost
    assert all(p.target_metric < 99.0 for p in measured if p.cost < chosen.cost)
    assert result.cost < result.uniform["W8A16"]["cost"]
    assert "top1_agreement_pct" in result.format()
    with pytest.raises(RefquantError, match="target must be a number"):
        mixed_precision(QuantSim(graph, precision="w4a8"), x, target="w8a8", target_fn=agreement, progress=False)


@needs_samples
def test_uniform_points_are_the_model_calibrated_at_that_candidate():
    # convnet's GlobalAveragePool group quantizes only an activation: at W8A8 it must keep the encoding
    # of the W8A8 calibration, not that of the W4A8 one (the cheapest candidate with the same bitwidths)
    calib, x = inputs("convnet", "calib"), inputs("convnet", "eval", 64)
    result = mixed_precision(QuantSim(load("convnet"), precision="w4a8"), x, calib_data=calib,
                             candidates=("w4a8", "w8a8", "w8a16"), progress=False)
    for precision in ("w4a8", "w8a8", "w8a16"):
        fresh = QuantSim(load("convnet"), precision=precision)
        fresh.compute_encodings(calib, progress=False)
        # the engine and QuantSim.run sum the same float64 powers per batch: equal to rounding
        assert result.uniform[precision.upper()]["metric"] == pytest.approx(independent_sqnr(fresh, x), abs=1e-9)


@needs_samples
def test_cli_amp_reaches_a_top1_agreement_target(tmp_path, capsys):
    import argparse

    import onnxruntime as ort

    from refquant.analysis import add_amp_parser

    parser = argparse.ArgumentParser()
    add_amp_parser(parser.add_subparsers())
    path = SAMPLES / "mtcnn_rnet" / MODELS["mtcnn_rnet"]
    x = inputs("mtcnn_rnet", "eval")
    np.savez(tmp_path / "calib.npz", input=inputs("mtcnn_rnet", "calib"))
    np.savez(tmp_path / "eval.npz", input=x)
    common = [str(path), "--data", str(tmp_path / "calib.npz"), "--eval-data", str(tmp_path / "eval.npz"),
              "--candidates", "w4a8,w8a8,w8a16", "--precision", "w4a8", "--prefix", "rnet"]
    args = parser.parse_args(["amp", *common, "--target-top1", "99", "--top1-output", "prob",
                              "-o", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert "top1_agreement_pct" in capsys.readouterr().out
    # the exported mixed-precision encodings, loaded into a fresh sim, agree with onnxruntime's FP32 argmax
    saved = json.loads((tmp_path / "out" / "amp.json").read_text())
    assert saved["target_fn"] == "top1_agreement_pct" and saved["target"] == 99.0
    fp32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["prob"], {"input": x})[0]
    sim = QuantSim(refquant.load(path), precision="w4a8")
    sim.load_encodings(tmp_path / "out" / "rnet.encodings")
    ours = np.concatenate([sim.run({"input": x[i:i + 16]})["prob"] for i in range(0, len(x), 16)])
    assert 100.0 * np.mean(ours.argmax(axis=1) == fp32.argmax(axis=1)) >= 99.0
    for bad in (["--target", "w8a8", "--target-top1", "99"], ["--top1-output", "prob"]):
        args = parser.parse_args(["amp", *common, *bad, "-o", str(tmp_path / "bad")])
        with pytest.raises(RefquantError, match="target-top1"):
            args.func(args)
