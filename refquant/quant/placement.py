"""Where QuantSim puts quantizers, following AIMET's rules (refs/aimet.md §6-§7).

* Activation quantizers go on the float graph inputs and on every float node output, except the
  outputs of data-movement ops, which keep their input's grid (Reshape, Flatten, Transpose, Squeeze,
  ...: AIMET's ``op_outputs_to_ignore`` and grid-preserving ops). Whether one is enabled comes from
  the config: ``model_input`` for graph inputs, the op type's ``is_output_quantized`` otherwise.
* Constant float inputs of ops that have no parameter roles (a PRelu slope, a Mul by a constant)
  get an activation-style quantizer too, as in AIMET, where they are not recognised as parameters.
* Parameter quantizers go on the constant inputs that have a role (weight, bias, running stats),
  per-channel along the op's output-channel axis where the config asks for it.
* Supergroups (Conv+Relu, Gemm+Relu, ...): when the pattern matches a chain where each op feeds only
  the next, every output quantizer but the last is disabled. Depthwise and 3-D convs are excluded,
  as in AIMET.
* The config's "supergroup_pass_list": MatMul + bias Add is one linear layer; a decomposed LayerNormalization or
  RMSNormalization is one op of that type (:mod:`refquant.quant.norm_fusion`), outside every supergroup.
* If/Loop subgraphs: their nodes get quantizers by these same rules (weights may be outer-scope
  initializers, supergroups match within one subgraph); If/Loop outputs and Loop body inputs get none.
* Tied quantizers, as AIMET ties them (:func:`_tie`): a Concat's inputs share its output's encoding, and a Relu,
  AveragePool or Resize output its input's, so the op is exact on the integer grid (data-movement ops such as
  MaxPool have no quantizer of their own).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..ir import Graph, Node
from .config import QuantsimConfig
from .norm_fusion import FLOAT_TYPES, NormGroup, fused_norms, pass_effects
from .subgraphs import all_producers, ambiguous_names, scoped

# outputs on their input's grid: no quantizer of their own
GRID_PRESERVING = {
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Gather", "GatherElements",
    "GatherND", "Slice", "Split", "Tile", "Expand", "Pad", "MaxPool", "GlobalMaxPool", "DepthToSpace",
    "SpaceToDepth", "Compress", "Dropout", "If", "Loop", "ReduceMax", "ReduceMin", "TopK",
}
NON_FLOAT_OUTPUT = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "Equal", "Greater", "Less",
                    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Not", "Xor"}
# constant float inputs that are settings, not data (clip bounds, pad value, resize scales, qparams)
# (a Pow exponent too: a quantized 2.0 that becomes 1.99 turns x^2 of negative x into NaN)
CONSTANT_INPUTS_IGNORED = {"Clip", "Pad", "Resize", "Upsample", "QuantizeLinear", "DequantizeLinear",
                           "Dropout", "ConstantOfShape", "Range", "Pow"}
# outputs that share the encoding of their (first) input's quantizer
TIED_TO_INPUT = {"Relu", "Concat", "AveragePool", "Resize", "Upsample"}

# parameter roles by input index, and the output-channel axis of the weight
PARAM_ROLES: dict[str, dict[int, str]] = {
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "Gemm": {1: "weight", 2: "bias"},
    "MatMul": {1: "weight"},
    "BatchNormalization": {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"},
    "InstanceNormalization": {1: "weight", 2: "bias"},
    "LayerNormalization": {1: "weight", 2: "bias"},
    "GroupNormalization": {1: "weight", 2: "bias"},
    "LSTM": {1: "weight", 2: "recurrent_weight", 3: "bias"},
    "GRU": {1: "weight", 2: "recurrent_weight", 3: "bias"},
    "FusedConv": {1: "weight", 2: "bias"},
    "FusedGemm": {1: "weight", 2: "bias"},
    "SkipLayerNormalization": {2: "weight", 3: "bias"},
    "SkipSimplifiedLayerNormalization": {2: "weight"},
    "EmbedLayerNormalization": {5: "weight", 6: "bias"},
}
PER_CHANNEL_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm"}
# onnxruntime's float contrib ops (com.microsoft) are ordinary float ops here; other contrib ops (QLinear*,
# QGemm, DynamicQuantizeLSTM, ...) compute on integers and get no quantizers
FLOAT_CONTRIB_OPS = {"Gelu", "BiasGelu", "FastGelu", "QuickGelu", "BiasAdd", "SkipLayerNormalization",
                     "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization", "FusedMatMul", "FusedGemm",
                     "FusedConv", "Attention", "MultiHeadAttention"}


@dataclass
class QuantizerSpec:
    """One quantizer: which tensor, what kind, and its settings before calibration."""

    tensor: str
    kind: str  # "activation" or "param"
    enabled: bool
    symmetric: bool
    role: str | None = None  # parameter role (weight, bias, ...)
    op_type: str | None = None  # the producing op (activations) or the consuming op (params)
    axis: int | None = None  # per-channel axis, None for per-tensor
    tied_to: str | None = None  # tensor whose quantizer's encoding this one shares
    constraints: tuple[float, float] | None = None  # fixed (min, max) from encoding_constraints


def weight_axis(node: Node, rank: int) -> int:
    """Output-channel axis of a weight: Conv 0, ConvTranspose 1, Gemm 0 if transB else 1, MatMul -1."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type in ("Gemm", "FusedGemm"):
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1
    return 0


def is_depthwise(node: Node, graph: Graph) -> bool:
    if node.op_type != "Conv" or node.inputs[1] not in graph.initializers:
        return False
    group = node.attrs.get("group", 1)
    weight = graph.initializers[node.inputs[1]]
    return group > 1 and weight.shape[1] == 1 and group == weight.shape[0] // max(1, weight.shape[0] // group)


def place_quantizers(graph: Graph, config: QuantsimConfig, constant_inputs: str = "data") -> dict[str, QuantizerSpec]:
    """The quantizers AIMET would place on ``graph`` under ``config``, keyed by tensor name.

    ``constant_inputs``: which float constants without a parameter role get an activation-style quantizer.
    ``"data"`` (refquant's default): those an op computes with (a PRelu slope, a Mul or Add constant), not the
    settings in ``CONSTANT_INPUTS_IGNORED`` (Clip bounds, a Pow exponent...) nor the data of a data-movement op (a
    Gather's embedding table). ``"aimet"``: every one, as aimet-onnx 2.42.0 (its ``_is_tensor_quantizable`` skips only
    the non-first inputs of Resize); measured on MobileNetV2 (Clip bounds), PP-OCR (Clip bounds, Pow exponents,
    constants fed to Reshape) and MiniLM (its three embedding tables, quantized per tensor).

    Nodes inside If/Loop subgraphs get quantizers by the same rules, keyed by their (model-unique) tensor
    names, right after the node that holds the subgraph; their weights may be subgraph or outer-scope
    initializers (:mod:`refquant.quant.subgraphs`). Subgraph inputs (a Loop's iteration count and carried
    values) get none: their values are quantized where they are produced."""
    specs: dict[str, QuantizerSpec] = {}
    is_float = _float_checker(graph)
    for value in graph.inputs:
        if is_float(value.name):
            specs[value.name] = QuantizerSpec(value.name, "activation",
                                              bool(config.model_input.get("is_input_quantized", False)),
                                              bool(config.defaults_ops.get("is_symmetric", False)))
    ambiguous = ambiguous_names(graph)
    if ambiguous:
        warnings.warn(f"QuantSim: tensor name(s) defined more than once across the model's subgraphs get no "
                      f"quantizer (a quantizer is keyed by the tensor name): {sorted(ambiguous)[:10]}", stacklevel=3)
    if constant_inputs not in ("data", "aimet"):
        raise ValueError(f"constant_inputs {constant_inputs!r}: expected 'data' or 'aimet'")
    _place_nodes(graph, config, specs, ambiguous, constant_inputs == "aimet")
    norms = fused_norms(graph, config.supergroup_passes)
    _apply_fused_norms(graph, config, specs, norms)
    _apply_model_output(graph, config, specs)
    if "MatmulAdd" in config.supergroup_passes:
        _apply_matmul_add(graph, specs)
    effects = pass_effects(graph, config.supergroup_passes, norms)
    for name in effects.disabled & specs.keys():
        specs[name].enabled = False
    _apply_supergroups(graph, config, specs, {id(n) for g in norms for n in g.nodes}, effects.matched)
    _apply_split_clips(graph, specs)
    _tie(graph, specs)
    return specs


def _place_nodes(graph: Graph, config: QuantsimConfig, specs: dict[str, QuantizerSpec], ambiguous: set[str],
                 all_constants: bool = False) -> None:
    """Parameter and output quantizers of ``graph``'s nodes, recursing into subgraphs (whose supergroups and
    split clips are matched within the subgraph)."""
    is_float = _float_checker(graph)
    for node in graph.nodes:
        _place_node(node, graph, config, specs, is_float, ambiguous, all_constants)
        for sub in node.subgraphs():
            view = scoped(sub, graph)
            _place_nodes(view, config, specs, ambiguous, all_constants)
            _apply_supergroups(view, config, specs)
            _apply_split_clips(view, specs)


def _place_node(node: Node, graph: Graph, config: QuantsimConfig, specs, is_float, ambiguous,
                all_constants: bool = False) -> None:
    if node.domain and not (node.domain == "com.microsoft" and node.op_type in FLOAT_CONTRIB_OPS):
        return
    roles = PARAM_ROLES.get(node.op_type, {})
    for index, name in enumerate(node.inputs):
        if (not name or name not in graph.initializers or name in specs or name in ambiguous
                or not is_float(name)):
            continue
        if index in roles:
            setting = config.param(node.op_type, roles[index])
            weight = graph.initializers[name]
            axis = None
            if (setting["per_channel_quantization"] and roles[index] == "weight"
                    and node.op_type in PER_CHANNEL_OPS and weight.ndim >= 2):
                axis = weight_axis(node, weight.ndim)
            specs[name] = QuantizerSpec(name, "param", setting["is_quantized"], setting["is_symmetric"],
                                        roles[index], node.op_type, axis)
        elif all_constants or (node.op_type not in GRID_PRESERVING and node.op_type not in CONSTANT_INPUTS_IGNORED):
            if all_constants and any(user.op_type == "Resize" and user.inputs[0] != name
                                     for user in graph.consumers().get(name, [])):
                continue  # AIMET's op_params_to_ignore: Resize's roi and scales
            op = config.op(node.op_type)
            specs[name] = QuantizerSpec(name, "activation", True, op["is_symmetric"], None, node.op_type)
    if node.op_type in GRID_PRESERVING or node.op_type in NON_FLOAT_OUTPUT:
        return
    for out in node.outputs:
        if out and out not in ambiguous and is_float(out):
            specs[out] = _output_spec(out, node.op_type, config)


def _output_spec(name: str, op_type: str, config: QuantsimConfig) -> QuantizerSpec:
    """The output quantizer of an op of ``op_type``, as the config sets it."""
    op = config.op(op_type)
    fixed = op.get("encoding_constraints")
    # a fixed range centred on zero (Tanh [-1, 1]) makes the quantizer symmetric, as in AIMET's config handling
    symmetric = op["is_symmetric"] or (fixed is not None and fixed[1] is not None and fixed[0] == -fixed[1])
    return QuantizerSpec(name, "activation", op["is_output_quantized"], symmetric, None, op_type, constraints=fixed)


def _float_checker(graph: Graph):
    def is_float(name: str) -> bool:
        value = graph.values.get(name)
        if name in graph.initializers:
            return graph.initializers[name].dtype.kind == "f"
        return value is not None and value.dtype is not None and np.dtype(value.dtype).kind == "f"

    return is_float


def _apply_model_output(graph: Graph, config: QuantsimConfig, specs) -> None:
    if "is_output_quantized" not in config.model_output:
        return
    for name in graph.output_names:
        if name in specs:
            specs[name].enabled = bool(config.model_output["is_output_quantized"])


def matmul_bias(node: Node, graph: Graph, consumers) -> tuple[Node, str] | None:
    """AIMET's MatmulAdd rule (``_get_matmul_add_bias_idx``): a MatMul with a constant weight whose output is read
    only by an Add whose other input is a constant of rank 1 -> (that Add, the bias name); else None."""
    if node.op_type != "MatMul" or node.inputs[1] not in graph.initializers:
        return None
    users = consumers.get(node.outputs[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or node.outputs[0] in graph.output_names:
        return None
    add = users[0]
    others = [name for name in add.inputs if name != node.outputs[0]]
    if len(others) != 1 or others[0] not in graph.initializers or graph.initializers[others[0]].ndim != 1:
        return None
    return add, others[0]


def _apply_matmul_add(graph: Graph, specs) -> None:
    """The config's "supergroup_pass_list": ["MatmulAdd"] (AIMET's packaged default configs have it): MatMul + bias
    Add is one linear layer. The MatMul output is not quantized and the Add's constant is the layer's bias, a
    parameter (role "bias", symmetric, disabled as AIMET's pass leaves it), not a quantized constant input."""
    consumers = graph.consumers()
    for node in graph.nodes:
        found = matmul_bias(node, graph, consumers)
        if found is None:
            continue
        add, bias = found
        if node.outputs[0] in specs:
            specs[node.outputs[0]].enabled = False
        specs[bias] = QuantizerSpec(bias, "param", False, True, "bias", "MatMul", None)


def _apply_fused_norms(graph: Graph, config: QuantsimConfig, specs, norms: list[NormGroup]) -> None:
    """Each fused normalization as one op of its type (AIMET quantizes the node its fusion made): no quantizer on
    the tensors inside it or on the constants only it reads, its scale and bias initializers that op's weight and
    bias parameters, its output that op's output quantizer."""
    consumers = graph.consumers()
    is_float = _float_checker(graph)
    for group in norms:
        members = {id(n) for n in group.nodes}
        for node in group.nodes:
            for out in node.outputs:
                if out != group.output:
                    specs.pop(out, None)
            for name in node.inputs:
                if (name in graph.initializers and name not in (group.scale, group.bias)
                        and all(id(user) in members for user in consumers.get(name, []))):
                    specs.pop(name, None)
        for role, name in (("weight", group.scale), ("bias", group.bias)):
            if name and name in graph.initializers and is_float(name):
                setting = config.param(group.op_type, role)
                specs[name] = QuantizerSpec(name, "param", setting["is_quantized"], setting["is_symmetric"], role,
                                            group.op_type)
        if group.output in specs:
            specs[group.output] = _output_spec(group.output, group.op_type, config)


def apply_exception_rules(quantizers: dict, graph: Graph, config: QuantsimConfig) -> None:
    """AIMET's rules applied after the config (``QuantizationSimModel._apply_param_symmetry_to_inputs`` and
    ``_apply_exception_rules``), on QuantSim's quantizers (bitwidths known):

    * a Conv/ConvTranspose/Gemm/MatMul whose weight is computed (not a constant): the enabled quantizer that feeds
      the weight input takes the weight's symmetry from the config (attention's K and V are symmetric);
    * normalization parameters (Batch/Layer/Group/Instance/RMS): at least 8 bits; Batch/LayerNormalization weights
      are symmetric only at >= 16 bits (8 bits on hw V66-V69); Group/Instance/RMSNormalization parameters take the
      output quantizer's symmetry and bitwidth;
    * with a hw_version, a computed MatMul weight: V66-V69 symmetric 8 bits; later versions, when it has 16 bits,
      symmetric with a 16-bit first input.
    """
    producers = all_producers(graph)
    norms = {"BatchNormalization", "LayerNormalization", "GroupNormalization", "RMSNormalization",
             "InstanceNormalization"}
    old_hw = config.hw_version in ("V66", "V68", "V69")

    def enabled_feeding(name: str):
        source = _feeding_quantizer(name, producers, quantizers)
        quantizer = quantizers.get(source) if source else None
        return quantizer if quantizer is not None and quantizer.enabled else None

    for node in graph.walk():
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.inputs) > 1 \
                and node.inputs[1] and node.inputs[1] not in graph.initializers:
            weight_input = enabled_feeding(node.inputs[1])
            if weight_input is not None and weight_input.kind != "param":
                weight_input.symmetric = bool(config.param(node.op_type, "weight")["is_symmetric"])

    def normalization_parameters(op_type: str, output: str | None, names) -> None:
        out = quantizers.get(output) if output else None
        out = out if out is not None and out.enabled else None
        for name in names:
            q = quantizers.get(name)
            if q is None or q.kind != "param" or not q.enabled or q.data_type != "int":
                continue
            q.bitwidth = max(q.bitwidth, 8)
            if op_type in ("GroupNormalization", "InstanceNormalization", "RMSNormalization"):
                q.symmetric = out.symmetric if out is not None else False
                if out is not None:
                    q.bitwidth = out.bitwidth
            else:
                if old_hw:
                    q.bitwidth = 8
                q.symmetric = q.bitwidth >= 16

    fused = fused_norms(graph, config.supergroup_passes)
    for group in fused:
        normalization_parameters(group.op_type, group.output, [group.scale, group.bias])
    for name in pass_effects(graph, config.supergroup_passes, fused).symmetric_at_16:
        if name in quantizers and quantizers[name].bitwidth == 16:  # AIMET's LayerNormalization pass: gamma
            quantizers[name].symmetric = True
    for node in graph.walk():
        if node.op_type in norms:
            normalization_parameters(node.op_type, node.outputs[0] if node.outputs else None, node.inputs[1:])
        elif node.op_type == "MatMul" and config.hw_version is not None and node.inputs[1] not in graph.initializers:
            first, second = enabled_feeding(node.inputs[0]), enabled_feeding(node.inputs[1])
            if first is None or second is None or "float" in (first.data_type, second.data_type):
                continue
            if old_hw:
                second.symmetric, second.bitwidth = True, 8
            elif second.bitwidth == 16:
                second.symmetric, first.bitwidth = True, 16


def _apply_supergroups(graph: Graph, config: QuantsimConfig, specs, fused: set[int] = frozenset(),
                       pass_matched: set[int] = frozenset()) -> None:
    """The config's "supergroups". A chain through a fused normalization (``fused``: its nodes' ids) does not match,
    since AIMET fuses it into one node first; nor does one starting at a node a normalization graph pass matched
    (``pass_matched``: AIMET's supergroup_pass_list ranks above its supergroups)."""
    consumers = graph.consumers()
    outputs = set(graph.output_names)
    for pattern in config.supergroups:
        for node in graph.nodes:
            chain = _match(node, pattern, consumers, outputs, graph)
            if chain is None or id(chain[0]) in pass_matched or any(id(member) in fused for member in chain):
                continue
            for member in chain[:-1]:
                for out in member.outputs:
                    if out in specs:
                        specs[out].enabled = False


def _apply_split_clips(graph: Graph, specs) -> None:
    """CLE writes a ReLU6 whose bound became per-channel as Relu -> Min(x, constant): together they are
    one clip, so the Relu output (whose range is the unclipped one) gets no quantizer of its own, and the
    bound is a setting like Clip's max input, not data to quantize."""
    consumers = graph.consumers()
    outputs = set(graph.output_names)
    for node in graph.nodes:
        if node.op_type != "Relu" or node.outputs[0] in outputs:
            continue
        users = consumers.get(node.outputs[0], [])
        if (len(users) == 1 and users[0].op_type == "Min" and len(users[0].inputs) == 2
                and users[0].inputs[1] in graph.initializers and node.outputs[0] in specs):
            specs[node.outputs[0]].enabled = False
            if users[0].inputs[1] in specs:
                specs[users[0].inputs[1]].enabled = False


def _match(first: Node, pattern: list[str], consumers, outputs, graph: Graph):
    chain = [first]
    node = first
    if node.op_type != pattern[0] or is_depthwise(node, graph) or _is_3d_conv(node, graph):
        return None
    for op_type in pattern[1:]:
        out = node.outputs[0]
        users = consumers.get(out, [])
        if out in outputs or len(users) != 1 or users[0].op_type != op_type:
            return None
        node = users[0]
        chain.append(node)
    return chain


def _is_3d_conv(node: Node, graph: Graph) -> bool:
    weight = graph.initializers.get(node.inputs[1]) if node.op_type in ("Conv", "ConvTranspose") else None
    return weight is not None and weight.ndim == 5


def _tie(graph: Graph, specs) -> None:
    """Quantizers that share one encoding, as aimet-onnx 2.42 ties them (``_tie_quantizers_for_op_types``); every
    member's ``tied_to`` names its group's first quantizer in graph order.

    AIMET moves quantizer objects between tensors in two passes. First, from the last op back, a Concat (or Scatter)
    hands its output's quantizer to each input whose effective quantizer (the enabled one reached back through
    data-movement ops, disabled quantizers and float casts) has no other reader on the way, continuing through
    inputs made by such ops; inputs with a fixed range (Softmax, Sigmoid) stay apart unless all share one range,
    which the output then takes. Then, in graph order, a Relu, AveragePool, Resize or Upsample output takes its
    input's quantizer, with the output's fixed range merged in, unless that range differs and a tensor on the way
    has another reader. A later move wins: a Relu output handed to a Concat goes back to the Relu's input."""
    producers = all_producers(graph)  # subgraph nodes read outer-scope tensors by name
    is_float = _float_checker(graph)
    nodes = list(graph.walk())
    readers: dict[str, list[Node]] = {}
    reads: dict[str, int] = {}
    for node in nodes:
        for name in node.inputs:
            reads[name] = reads.get(name, 0) + 1
            if all(node is not other for other in readers.setdefault(name, [])):
                readers[name].append(node)
    holder = {name: name for name in specs}  # the tensor whose quantizer object this tensor's node now uses

    def enabled(name: str) -> bool:
        return specs[holder[name]].enabled

    def effective(name: str):
        """(tensor whose quantizer node is the effective one, the nodes on the way) or (None, [])."""
        path = []
        while name:
            if name in specs and enabled(name):
                return name, path
            node = producers.get(name)
            is_cast = (node is not None and node.op_type == "Cast" and node.attrs.get("to") in FLOAT_TYPES
                       and is_float(node.inputs[0]))  # a float-to-float Cast
            if node is None or not (node.op_type in GRID_PRESERVING or is_cast) or not node.inputs:
                return None, []
            path.append(node)
            name = node.inputs[0]
        return None, []

    backward = {"Concat", "Scatter", "ScatterElements", "ScatterND"}
    visited: set[int] = set()
    for op in reversed(nodes):
        if op.op_type not in backward or not op.outputs or op.outputs[0] not in specs:
            continue
        out = op.outputs[0]
        sources: dict[str, str | None] = {}
        fixed_ranges = set()
        stack = [op]
        while stack:
            node = stack.pop()
            if id(node) in visited:
                continue
            visited.add(id(node))
            for name in node.inputs:
                if not name or not is_float(name):
                    continue
                source, path = effective(name)
                if source is not None:
                    fixed_ranges.add(specs[holder[source]].constraints)
                source_name = source if source is not None else name
                users = {id(user) for user in readers.get(source_name, [])}
                users |= {id(user) for step in path for out_name in step.outputs for user in readers.get(out_name, [])}
                users -= {id(step) for step in path}
                if len(users) > 1:
                    continue
                sources[source_name] = source
                maker = producers.get(name)
                if maker is not None and (maker.op_type in backward or maker.op_type in GRID_PRESERVING):
                    stack.append(maker)
        if len(fixed_ranges) == 1:
            specs[holder[out]].constraints = fixed_ranges.pop()
        else:
            sources = {k: v for k, v in sources.items() if v is None or specs[holder[v]].constraints is None}
        for source_name, source in sources.items():
            if source is not None:
                holder[source_name] = holder[out]
    for op in nodes:
        if op.op_type not in TIED_TO_INPUT - backward or not op.inputs:
            continue
        source, path = effective(op.inputs[0])
        if source is None:
            continue
        for out in op.outputs:
            if out not in specs or not enabled(out):
                continue
            mine, theirs = specs[holder[source]], specs[holder[out]]
            if theirs.constraints is not None and theirs.constraints != mine.constraints:
                steps = [op.inputs[0]] + [step.inputs[0] for step in path]
                if any(reads.get(tensor, 0) != 1 for tensor in steps):
                    continue  # a constrained output whose input is read elsewhere keeps its own quantizer
            _merge_constraints(mine, theirs)
            holder[out] = holder[source]
    first: dict[str, str] = {}
    for name in specs:  # specs are in graph order
        first.setdefault(holder[name], name)
    for name in specs:
        specs[name].tied_to = first[holder[name]] if first[holder[name]] != name else None


def _merge_constraints(into: QuantizerSpec, other: QuantizerSpec) -> None:
    """AIMET's ``_merge_constraints``: the quantizer an output joins is symmetric if either was, and keeps its fixed
    range or takes the output's (made symmetric about zero if the quantizer is symmetric)."""
    into.symmetric = into.symmetric or other.symmetric
    fixed = into.constraints or other.constraints
    if into.symmetric and fixed is not None and fixed[0] is not None and fixed[1] is not None:
        bound = max(abs(fixed[0]), abs(fixed[1]))
        fixed = (-bound, bound)
    into.constraints = fixed


def feeding_quantizer(sim, name: str, producers=None) -> str | None:
    """The tensor whose *enabled* quantizer defines the grid ``name`` is on, looking back through data-movement ops
    past disabled quantizers (AIMET's ``_get_enabled_quantizer``); None if a computing op comes first.
    ``producers``: :func:`all_producers` of ``sim.graph``, when the caller already has it."""
    producers = all_producers(sim.graph) if producers is None else producers
    return grid_source(name, producers, lambda n: n in sim.quantizers and sim.quantizers[n].enabled)


def _feeding_quantizer(name: str, producers, specs) -> str | None:
    """The tensor whose quantizer (enabled or not) defines the grid of ``name`` (looking through grid-preserving
    ops)."""
    return grid_source(name, producers, specs.__contains__)


def grid_source(name: str, producers, accept) -> str | None:
    """The first tensor ``accept`` takes, from ``name`` back through grid-preserving ops; None past another op."""
    while name:
        if accept(name):
            return name
        node = producers.get(name)
        if node is None or node.op_type not in GRID_PRESERVING:
            return None
        name = node.inputs[0]
    return None
