"""Integer simulation: requantization schemes (onnxruntime, ONNX reference, TFLite double/single rounding,
exact rational) shared by the integer operators in :mod:`refquant.ops.qoperators`."""

from .requant import (  # noqa: F401
    ROUNDINGS,
    SCHEMES,
    Scheme,
    as_scheme,
    exact,
    exact_multiplier,
    multiply_by_quantized_multiplier,
    ort_multiplier,
    quantize_multiplier,
    requantize,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
    tflite_multiplier,
)

# The integer program (lowering a calibrated QuantSim, running and exporting it). Imported on first use:
# refquant.ops.qoperators imports this package for the requantization schemes, and the lowering imports the ops.
_PROGRAM = ("IntSim", "qdq_gap", "GapReport", "LayerGap", "OutputGap", "sqnr")
_LOWERING = ("lower", "LoweringError", "Program", "QTensor")
_OVERFLOW = ("overflow_report", "OverflowReport", "LayerAccumulator", "AccumulatorOverflowError")


def __getattr__(name):
    if name in _PROGRAM:
        from . import program

        return getattr(program, name)
    if name in _LOWERING:
        from . import lowering

        return getattr(lowering, name)
    if name in _OVERFLOW:
        from . import overflow

        return getattr(overflow, name)
    raise AttributeError(f"module 'refquant.intsim' has no attribute {name!r}")
