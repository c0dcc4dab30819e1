"""Tied quantizers against aimet-onnx 2.42.0 itself (refquant.quant.placement._tie).

Golden: golden/aimet/ties/ties.json, made by golden/aimet/make_tie_golden.py with aimet-onnx on six probe models
(its docstring: a Relu whose input has two readers; Resize outputs into a Concat whose input is read elsewhere; a
Relu and an AveragePool into one Concat; Concats of Sigmoids and of a Sigmoid and a Conv; htp_v73's Relu with a
fixed minimum) calibrated with min_max on the same three batches. refquant, with AIMET's placement settings, must
form the same groups (AIMET's backward pass through Concat, then its forward pass through Relu, AveragePool and
Resize, the later move winning) and give each tensor AIMET's encoding range: the sums are a handful of float32
products, so 1e-6 relative covers the summation order.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import refquant
from refquant.quant import QuantSim

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "aimet"
TIES = json.loads((GOLDEN / "ties" / "ties.json").read_text())


@pytest.mark.parametrize("case", sorted(TIES))
def test_tied_groups_and_ranges_are_aimets(case):
    want = TIES[case]
    sim = QuantSim(refquant.load(GOLDEN / "ties" / f"{case}.onnx"), precision="w8a8", quant_scheme="min_max",
                   config=str(GOLDEN / "configs" / f"{want['config']}.json"), rounding="half_up", prepare=False,
                   residual_rule=False, constant_inputs="aimet")
    batches = np.load(GOLDEN / "ties" / "ties_batches.npy")
    sim.compute_encodings([{"x": batch} for batch in batches], progress=False)
    enabled = {n for n, q in sim.quantizers.items() if q.enabled and q.kind != "param"}
    assert enabled == set(want["activations"])
    groups = {}
    for name, entry in want["activations"].items():
        groups.setdefault(entry["group"], set()).add(name)
    ours = {}
    for name in enabled:
        ours.setdefault(sim.quantizers[name].tied_to or name, set()).add(name)
    assert sorted(map(sorted, ours.values())) == sorted(map(sorted, groups.values()))
    for name, entry in want["activations"].items():
        encoding = sim.encoding_of(name)
        got = [float(np.ravel(encoding.min)[0]), float(np.ravel(encoding.max)[0])]
        np.testing.assert_allclose(got, [entry["min"], entry["max"]], rtol=1e-6, atol=1e-7, err_msg=name)
