"""Graph rewrites that prepare a model for quantization, one module per pass.

Each pass is ``run(graph, **options) -> PassResult``: it rewrites ``graph`` in place and lists what it
changed. Every pass keeps the FP32 outputs (``refquant.prepare`` checks each one on the model and skips
one that does not), keeps the names of the tensors that survive and never renames a graph output.

=========================== ================================================================
pass                        what it does
=========================== ================================================================
fold_weight_chains          a weight computed from constants (Transpose/Cast/DequantizeLinear...) -> initializer
fold_constants              every node the runtime folds at init -> initializer
remove_identity             Identity / inference Dropout removed, readers read the input
split_shared_weights        a parameter read by several nodes -> one copy per reader
fold_batchnorm              BatchNormalization folded into the layer next to it (refquant.ptq.bn_fold)
fuse_mul_add_chains         Conv/Gemm/MatMul -> constant Mul/Add chain folded into weight and bias; other
                            constant Mul/Add/Sub/Div chains merged into one Mul and one Add
fuse_matmul_add             MatMul + Add(bias) -> Gemm, for rank-2 inputs
fuse_constant_chains        x*a*b -> x*(a*b), x+a+b -> x+(a+b), with Div/Sub variants
clamp_mask_constants        huge/inf constants that reach a Softmax -> ±1e4
merge_duplicate_constants   equal non-parameter constants -> one initializer
remove_dead_code            nodes no output depends on, unused initializers
=========================== ================================================================

``apply(graph, name)`` runs one pass on ``graph`` and re-infers shapes; ``refquant.prepare`` runs a
list of them and verifies each.
"""

from __future__ import annotations

import importlib

from ..errors import RefquantError
from ..ir import Graph
from .common import PassResult, refresh  # noqa: F401

# name -> module (relative to this package)
PASSES: dict[str, str] = {
    "fold_weight_chains": "weight_chains",
    "fold_constants": "fold_constants",
    "remove_identity": "identity",
    "split_shared_weights": "split_shared",
    "fold_batchnorm": "batchnorm",
    "fuse_mul_add_chains": "mul_add_chains",
    "fuse_matmul_add": "matmul_add",
    "fuse_constant_chains": "constant_chains",
    "clamp_mask_constants": "clamp_mask",
    "merge_duplicate_constants": "merge_constants",
    "remove_dead_code": "dead_code",
}
# order matters: folding first exposes constants to the fusions; splitting before BN folding keeps a
# shared weight's other readers intact; affine chains fold after BN folding (Conv -> BN -> Mul -> Add
# becomes one Conv) and before fuse_matmul_add, which turns the MatMul + Add they leave into a Gemm;
# dead code last removes what the others left unread
DEFAULT_PASSES: list[str] = list(PASSES)


def resolve(passes="default") -> list[str]:
    """``"default"``, a comma-separated string or a list of pass names -> the list of names (checked)."""
    if passes is None or passes == "default":
        return list(DEFAULT_PASSES)
    names = [p.strip() for p in passes.split(",") if p.strip()] if isinstance(passes, str) else list(passes)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise RefquantError(f"unknown pass(es) {unknown}; the passes are: {', '.join(PASSES)}")
    return names


def get(name: str):
    """The ``run`` function of pass ``name``."""
    resolve([name])
    return importlib.import_module(f".{PASSES[name]}", __name__).run


def candidates(name: str) -> list[dict]:
    """Option sets ``prepare`` tries for pass ``name``, boldest first (a module's ``CANDIDATES``; else ``[{}]``)."""
    resolve([name])
    module = importlib.import_module(f".{PASSES[name]}", __name__)
    return [dict(c) for c in getattr(module, "CANDIDATES", [{}])]


def apply(graph: Graph, name: str, **options) -> PassResult:
    """Run pass ``name`` on ``graph`` in place (no verification) and re-infer shapes."""
    result = get(name)(graph, **options)
    if result.changes:
        refresh(graph)
    return result
