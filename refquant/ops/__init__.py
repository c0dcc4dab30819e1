"""The op registry and the op families; importing this package registers every kernel."""

from .registry import OpDef, lookup, register, register_inplace, registered_ops  # noqa: F401  (bound before the families)

from . import (  # noqa: E402,F401  (each module registers its ops on import)
    activations,
    bitwise,
    contrib,  # onnxruntime's float com.microsoft ops (Gelu family, Skip/Simplified LayerNorm, FusedConv...)
    contrib_attention,
    control,
    detection,
    elementwise,
    generators,
    indexing,
    indexing_more,
    linalg,
    losses,
    lp_pool,
    nn,
    norm,
    qoperators,
    quant,
    quantized_rnn,
    random_generators,
    reduce,
    resize,
    rnn,
    signal,
    tensor,
    transformer,
    vision,
)
