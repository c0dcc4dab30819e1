"""The op registry and the op families; importing this package registers every kernel."""

from .registry import OpDef, lookup, register, register_inplace, registered_ops  # noqa: F401  (bound before the families)

from . import (  # noqa: E402,F401  (each module registers its ops on import)
    activations,
    control,
    elementwise,
    generators,
    indexing,
    linalg,
    nn,
    norm,
    qoperators,
    quant,
    quantized_rnn,
    reduce,
    resize,
    rnn,
    tensor,
)
