"""AIMET quantsim config JSON: built-ins, resolution order, AIMET's own files, bad files."""

from __future__ import annotations

import json

import pytest

from refquant.quant.config import ConfigError, load_config

# AIMET's default_config.json (per-tensor) as published in quic/aimet, verbatim in structure
AIMET_STYLE = {
    "defaults": {"ops": {"is_output_quantized": "True"},
                 "params": {"is_quantized": "True", "is_symmetric": "True"},
                 "strict_symmetric": "False", "unsigned_symmetric": "True", "per_channel_quantization": "False"},
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {"Squeeze": {"is_output_quantized": "False"}, "Pad": {"is_output_quantized": "False"},
                "Mean": {"is_output_quantized": "False"},
                "Conv": {"per_channel_quantization": "True", "params": {"bias": {"is_quantized": "True"}}},
                "Sigmoid": {"encoding_constraints": {"min": 0.0, "max": 1.0}}},
    "supergroups": [{"op_list": ["Conv", "Relu"]}, {"op_list": ["Gemm", "Relu"]}],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}


def test_default_is_per_channel_with_unquantized_bias():
    cfg = load_config("default")
    assert cfg.op("Conv")["per_channel_quantization"] is True
    assert cfg.param("Conv", "weight") == {"is_quantized": True, "is_symmetric": True, "per_channel_quantization": True}
    assert cfg.param("Conv", "bias")["is_quantized"] is False
    assert cfg.op("Relu")["is_output_quantized"] is True and cfg.op("Relu")["is_symmetric"] is False
    # aimet-onnx 2.42.0's default_config_per_channel.json: only Cast outputs are switched off (Squeeze outputs get
    # no quantizer as a data-movement op, placement.py); its supergroup_pass_list is left out of the built-in
    assert cfg.op("Cast")["is_output_quantized"] is False and cfg.op("Pad")["is_output_quantized"] is True
    assert cfg.supergroup_passes == []
    assert ["Conv", "Relu"] in cfg.supergroups and cfg.model_input["is_input_quantized"] is True


def test_per_tensor_builtin_differs_only_in_per_channel():
    assert load_config("per_tensor").param("Conv", "weight")["per_channel_quantization"] is False


def test_more_specific_sections_win(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(AIMET_STYLE))
    cfg = load_config(str(path))
    assert cfg.param("Gemm", "bias")["is_quantized"] is False  # params.bias
    assert cfg.param("Conv", "bias")["is_quantized"] is True  # op_type.Conv.params.bias overrides it
    assert cfg.op("Conv")["per_channel_quantization"] is True and cfg.op("Gemm")["per_channel_quantization"] is False
    assert cfg.op("Sigmoid")["encoding_constraints"] == (0.0, 1.0)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.pop("supergroups"), "missing section(s) ['supergroups']"),
    (lambda d: d["defaults"]["ops"].update(is_ouput_quantized="True"), "unknown key(s) ['is_ouput_quantized']"),
    (lambda d: d["params"]["bias"].update(is_quantized="maybe"), "params.bias.is_quantized must be"),
    (lambda d: d["supergroups"].append({"op_list": ["Conv"]}), "supergroups[2]"),
    (lambda d: d.update(extra={}), "unknown key(s) ['extra'] in top level"),
])
def test_bad_configs_name_the_file_and_key(tmp_path, mutate, fragment):
    data = json.loads(json.dumps(AIMET_STYLE))
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{ not json")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "absent.json"))
