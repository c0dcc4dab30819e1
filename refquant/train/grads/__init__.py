"""The backward of every op that can appear in a trainable model, one module per op family (as refquant/ops/).

Importing this package registers them all in :mod:`refquant.train.backward_registry`.
"""

from ..backward_registry import differentiable_ops, lookup_backward  # noqa: F401

from . import activations, elementwise, indexing, linalg, nn, norm, reduce, tensor  # noqa: E402,F401  (register)
