"""docs/numerics.md: the worked examples' numbers, re-derived by hand (Python integers and Fractions) and with
refquant's requantization functions; the dump-format file names it shows."""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from refquant.intsim import requant as R
from refquant.intsim.verify import tensor_filename

DOC = Path(__file__).resolve().parent.parent / "docs" / "numerics.md"
F32 = np.float32


def block(name: str) -> dict:
    """The ``key = literal`` lines of the fenced block after ``<!-- checked: name -->``."""
    text = DOC.read_text()
    match = re.search(rf"<!-- checked: {re.escape(name)} -->\s*```text\n(.*?)```", text, re.S)
    assert match, f"block {name!r} not found in {DOC}"
    values = {}
    for line in match.group(1).strip().splitlines():
        key, value = (part.strip() for part in line.split("=", 1))
        values[key] = ast.literal_eval(value)
    return values


def round_half(x: Fraction, rule: str) -> int:
    """Nearest integer to an exact fraction with a tie rule, by hand."""
    floor = math.floor(x)
    rest = x - floor
    if rest != Fraction(1, 2):
        return floor + (rest > Fraction(1, 2))
    if rule == "half_even":
        return floor + (floor % 2)
    if rule == "half_up":
        return floor + 1
    return floor + 1 if x > 0 else floor  # half_away


def multiplier_for(scheme: str, xs, ws, ys):
    """The multiplier argument each scheme takes (as the lowering's Requantize node forms it)."""
    if scheme in ("ort", "onnx_reference"):
        return R.ort_multiplier(xs, ws, ys)
    if scheme.startswith("exact"):
        return R.exact_multiplier(xs, ws, ys)
    return R.tflite_multiplier(xs, ws, ys)


SCHEMES = ["ort", "onnx_reference", "tflite_double", "tflite_single", "exact(half_even)", "exact(half_up)",
           "exact(half_away)"]


def test_dot_product_example():
    d = block("dot-product")
    xs, ws, ys = F32(d["x_scale"]), F32(d["w_scale"]), F32(d["y_scale"])
    xz, wz, yz = d["x_zero_point"], d["w_zero_point"], d["y_zero_point"]
    sum_products = sum((x - xz) * (w - wz) for x, w in zip(d["x_codes"], d["w_codes"]))
    assert sum_products == d["sum_products"]
    bias_scale = F32(xs * ws)
    assert bias_scale == F32(d["bias_scale"]) and bias_scale != F32(8e-05)  # the float32 product is not 8e-05
    bias_code = round(Fraction(float(F32(d["bias"]))) / Fraction(float(bias_scale)))  # exact, half to even
    assert bias_code == d["bias_code"]
    assert np.round(np.float64(F32(d["bias"])) / np.float64(bias_scale)) == bias_code  # the lowering's formula
    acc = sum_products + bias_code
    assert acc == d["acc"]
    exact_m = Fraction(float(xs)) * Fraction(float(ws)) / Fraction(float(ys))
    assert float(exact_m) == d["real_multiplier"] and float(R.exact_multiplier(xs, ws, ys)) == d["real_multiplier"]
    assert R.ort_multiplier(xs, ws, ys) == F32(d["ort_multiplier"])
    assert F32(F32(xs * ws) / ys) == F32(d["ort_multiplier"])  # onnxruntime's ComputeOutputScale, by hand
    # QuantizeMultiplier by hand: frexp, round half away of q * 2^31
    q, e = math.frexp(float(R.tflite_multiplier(xs, ws, ys)))
    assert (math.floor(q * 2 ** 31 + 0.5), e) == (d["M0"], d["shift"])
    assert R.quantize_multiplier(float(R.tflite_multiplier(xs, ws, ys))) == (d["M0"], d["shift"])
    # M0 * 2^(shift - 31) is M to within half a unit of M0's last bit
    assert abs(Fraction(d["M0"]) * Fraction(2) ** (d["shift"] - 31) - exact_m) <= Fraction(2) ** (d["shift"] - 32)
    # the doc prints acc * M to 10 significant digits: within half a unit of the last digit (5e-9)
    assert abs(float(acc * exact_m) - d["acc_times_M"]) < 5e-9
    assert round_half(acc * exact_m, "half_even") == d["y"] and d["y"] + yz == d["code"]
    for scheme in SCHEMES:  # no tie: every scheme gives the same code
        got = R.requantize(np.array([acc]), multiplier_for(scheme, xs, ws, ys), yz, 0, 255, scheme)
        assert int(got[0]) == d["code"], scheme
    assert float(F32(F32(d["code"] - yz) * ys)) == d["value"]
    # the real value the codes stand for, computed exactly from the float32 scales and bias
    exact = sum(Fraction(int(x) - xz) * Fraction(float(xs)) * Fraction(int(w) - wz) * Fraction(float(ws))
                for x, w in zip(d["x_codes"], d["w_codes"])) + Fraction(float(F32(d["bias"])))
    assert float(exact) == d["float_result"]


def tie_by_hand(acc: int, scheme: str, m0: int, shift: int, zp: int) -> int:
    """The tie example's codes from the formulas of numerics.md §3, in Python integers and Fractions."""
    m = Fraction(1, 128)
    if scheme == "ort":  # f32(acc) * 2^-7 is exact in float32: only the rounding matters
        y = round_half(acc * m, "half_even")
    elif scheme == "onnx_reference":
        return min(max(round_half(acc * m + zp, "half_even"), 0), 255)
    elif scheme == "tflite_double":
        ab = acc * m0
        nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
        high = int(Fraction(ab + nudge, 1 << 31))  # C division truncates toward zero
        y = round_half(Fraction(high, 1 << -shift), "half_away")
    elif scheme == "tflite_single":
        total = 31 - shift
        y = (acc * m0 + (1 << (total - 1))) >> total
    else:
        y = round_half(acc * m, scheme[6:-1])
    return min(max(y + zp, 0), 255)


@pytest.mark.parametrize("acc, key", [(320, "codes_320"), (-320, "codes_minus_320"), (319, "codes_319")])
def test_tie_example(acc, key):
    d = block("ties")
    xs, ws, ys = F32(d["x_scale"]), F32(d["w_scale"]), F32(d["y_scale"])
    assert d["schemes"] == SCHEMES
    assert R.quantize_multiplier(float(R.tflite_multiplier(xs, ws, ys))) == (d["M0"], d["shift"])
    assert Fraction(d["M0"]) * Fraction(2) ** (d["shift"] - 31) == Fraction(1, 128)
    for scheme, code in zip(SCHEMES, d[key]):
        assert tie_by_hand(acc, scheme, d["M0"], d["shift"], d["y_zero_point"]) == code, scheme
        got = R.requantize(np.array([acc]), multiplier_for(scheme, xs, ws, ys), d["y_zero_point"], 0, 255, scheme)
        assert int(got[0]) == code, scheme


def test_srdhm_ties_go_up_and_rdbpot_ties_go_away():
    # §3: SaturatingRoundingDoublingHighMul by 2^30 halves: +-1.5 -> 2 and -1; RoundingDivideByPOT: +-1.5 -> +-2
    assert R.saturating_rounding_doubling_high_mul(np.array([3, -3]), 1 << 30).tolist() == [2, -1]
    assert R.rounding_divide_by_pot(np.array([3, -3]), 1).tolist() == [2, -2]


def test_dump_file_names_shown_in_the_doc():
    text = DOC.read_text()
    for name in ("/conv1/Conv_output_0", "input:0"):
        assert f"`{tensor_filename(name)}`" in text
