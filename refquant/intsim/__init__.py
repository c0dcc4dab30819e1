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
