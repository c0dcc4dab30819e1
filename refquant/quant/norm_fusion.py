"""AIMET's normalization supergroups: a decomposed LayerNormalization or RMSNormalization quantized as one op.

A config whose ``"supergroup_pass_list"`` names ``"LayerNormalization"`` or ``"RMSNormalization"`` (the htp configs
do) makes aimet-onnx 2.42 fuse those decompositions into single nodes before it places quantizers (its
``graph_passes/fusions``: onnxscript rewrite rules tried node by node in graph order, the first that matches wins):

* RMSNormalization, ``y = x / Sqrt(ReduceMean(x^2) + eps)``: the square as ``x * x`` or ``Pow(x, 2)``; the division
  as ``x / Sqrt(v)``, ``x * Reciprocal(Sqrt(v))``, ``x * (1 / Sqrt(v))`` or ``x * Pow(v, -0.5)`` (the Mul in either
  order); eps a constant >= 0; the mean over one constant axis or over all. Affine when a Mul by a scale follows,
  through a Cast only when x itself comes from a Cast (both to float, float16 or bfloat16).
* LayerNormalization: that normalization of ``x - ReduceMean(x)``, times a scale, plus an optional bias (an Add in
  either order). The first ReduceMean must hold its axes as an attribute of one axis (opset < 18: AIMET's pattern
  has no input form for it); the second reduces over the same axis (not axis 0) or has no axes.

A match needs every value computed inside the group to be read only inside it and to be no graph output (the
rewriter's rule), so a group never hides a tensor another op reads. QuantSim then treats a group as one op of its
type (:func:`refquant.quant.placement.place_quantizers`): no quantizer inside it, its scale and bias (when they are
initializers) that op's weight and bias parameters, and its output that op type's output settings.

After the fusion AIMET's graph passes of the same names run on what is left (:func:`pass_disabled`): a decomposed
LayerNormalization ``Div(x - mean, Sqrt(mean((x - mean)^2) + eps)) [* gamma [+ beta]]`` or RMSNormalization the
fusion did not take keeps only its input's and last op's output quantizers and gamma's; an RMSNormalization fused
without its scale (a Cast on the way that the fusion refuses) loses its output quantizer when a Mul follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ir import Graph, Node

NORM_PASSES = ("LayerNormalization", "RMSNormalization")
# TensorProto FLOAT, FLOAT16, BFLOAT16: the float types AIMET quantizes (its Casts between them keep a tensor's grid)
FLOAT_TYPES = {1, 10, 16}


@dataclass
class NormGroup:
    """One fused normalization: its op type, the nodes it replaces, and the tensors of the fused op."""

    op_type: str  # "LayerNormalization" or "RMSNormalization"
    nodes: list[Node]
    input: str
    output: str
    scale: str | None = None
    bias: str | None = None
    eps: str | None = field(default=None, repr=False)  # the Add's eps operand
    axes: str | None = field(default=None, repr=False)  # the mean-of-squares ReduceMean's axes input, if any


@dataclass
class _Core:
    """A matched non-affine RMS normalization x / Sqrt(mean(x^2) + eps)."""

    x: str
    nodes: list[Node]
    eps: str
    axes: str | None
    fused: bool = False  # an RMSNormalization AIMET has fused already: its axis attribute is set (-1 if none)


def fused_norms(graph: Graph, passes) -> list[NormGroup]:
    """The decomposed normalizations AIMET fuses for a config whose supergroup_pass_list is ``passes``, in graph
    order (top-level graph only, as AIMET)."""
    wanted = [p for p in passes if p in NORM_PASSES]
    if not wanted:
        return []
    return _Matcher(graph, "LayerNormalization" in wanted, "RMSNormalization" in wanted).run()


class _Matcher:
    def __init__(self, graph: Graph, layer_norm: bool, rms_norm: bool):
        self.graph = graph
        self.layer_norm, self.rms_norm = layer_norm, rms_norm
        self.producers = graph.producers()
        self.consumers = graph.consumers()
        self.graph_outputs = set(graph.output_names)
        self.opset = graph.opset.get("", graph.opset.get("ai.onnx", 0))
        self.groups: dict[str, NormGroup] = {}  # by output tensor
        self.grouped: set[int] = set()  # id() of the nodes inside a group: they no longer exist on their own

    def run(self) -> list[NormGroup]:
        for node in list(self.graph.nodes):
            if node.domain not in ("", "ai.onnx") or id(node) in self.grouped:
                continue
            group = None
            if node.op_type == "Mul" and self.layer_norm:
                group = self._layer_norm(node)
            if group is None and node.op_type == "Mul" and self.rms_norm:
                group = self._rms_affine(node)
            if group is None and node.op_type in ("Div", "Mul") and self.rms_norm:
                group = self._rms_plain(node)
            if group is None and node.op_type == "Add" and self.layer_norm:
                group = self._layer_norm_bias(node)
            if group is not None:
                self._keep(group)
        order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        return sorted(self.groups.values(), key=lambda g: order[id(g.nodes[-1])])

    # -- the rules ---------------------------------------------------------------------------------------------------
    def _rms_plain(self, node: Node) -> NormGroup | None:
        core = self._normalize(node.outputs[0])
        if core is None or not self._rms_settings_ok(core):
            return None
        return self._valid(NormGroup("RMSNormalization", core.nodes, core.x, node.outputs[0], eps=core.eps,
                                     axes=core.axes))

    def _rms_affine(self, node: Node) -> NormGroup | None:
        for normalized, scale in _operand_orders(node):
            for core, casts in self._normalized(normalized):
                if not self._rms_settings_ok(core):
                    continue
                stash = self._cast_to(core.x)
                if stash is not None and stash not in FLOAT_TYPES:
                    continue
                if casts and (stash is None or casts[0].attrs.get("to") not in FLOAT_TYPES):
                    continue
                group = self._valid(NormGroup("RMSNormalization", [*core.nodes, *casts, node], core.x,
                                              node.outputs[0], scale, eps=core.eps, axes=core.axes))
                if group is None:
                    continue
                if self.layer_norm:  # an affine RMSNormalization of x - mean(x) is a LayerNormalization (AIMET's
                    fused = _Core(core.x, core.nodes, core.eps, core.axes, fused=True)  # pattern 2)
                    return self._as_layer_norm(group, fused) or group
                return group
        return None

    def _layer_norm(self, node: Node) -> NormGroup | None:
        for normalized, scale in _operand_orders(node):
            for core, casts in self._normalized(normalized):
                group = NormGroup("LayerNormalization", [*core.nodes, *casts, node], core.x, node.outputs[0], scale,
                                  eps=core.eps, axes=core.axes)
                found = self._as_layer_norm(group, core)
                if found:
                    return found
        return None

    def _layer_norm_bias(self, node: Node) -> NormGroup | None:
        if len(node.inputs) != 2:
            return None
        for norm_out, bias in ((node.inputs[1], node.inputs[0]), (node.inputs[0], node.inputs[1])):
            inner = self.groups.get(norm_out)
            if inner is None or inner.op_type != "LayerNormalization" or inner.bias is not None:
                continue
            group = self._valid(NormGroup("LayerNormalization", [*inner.nodes, node], inner.input, node.outputs[0],
                                          inner.scale, bias, inner.eps, inner.axes))
            if group:
                return group
        return None

    def _as_layer_norm(self, group: NormGroup, core: _Core) -> NormGroup | None:
        """``group`` with its input centered (x - ReduceMean(x)) as the LayerNormalization of x, if AIMET's checks
        pass: the centering mean over one axis given as an attribute, the same axis (not 0) or none for the other
        mean, eps not a negative constant."""
        sub = self._node(core.x, "Sub")
        if sub is None or len(sub.inputs) != 2:
            return None
        mean = self._node(sub.inputs[1], "ReduceMean")
        if mean is None or mean.inputs[0] != sub.inputs[0] or self.opset >= 18 or len(mean.inputs) != 2:
            return None  # opset >= 18: axes is an input, which AIMET's pattern does not match
        centering_axes = self.graph.initializers.get(mean.inputs[1])
        if centering_axes is None or centering_axes.size != 1:
            return None
        axis = _singleton(self.graph.initializers.get(core.axes)) if core.axes else None
        if core.fused and axis is None:
            axis = -1.0  # the fused node's default
        if (core.axes or core.fused) and (not axis or int(axis) != int(centering_axes.reshape(-1)[0])):
            return None
        eps = _singleton(self.graph.initializers.get(core.eps))
        if eps is not None and eps < 0:
            return None
        return self._valid(NormGroup("LayerNormalization", [mean, sub, *group.nodes], sub.inputs[0], group.output,
                                     group.scale, group.bias, core.eps, core.axes))

    # -- the pieces ----------------------------------------------------------------------------------------------------
    def _normalized(self, tensor: str):
        """``tensor`` as a non-affine normalization, directly or through a Cast: (core, [the Cast]) pairs."""
        found = []
        core = self._normalize_or_group(tensor)
        if core:
            found.append((core, []))
        cast = self._node(tensor, "Cast")
        if cast is not None:
            core = self._normalize_or_group(cast.inputs[0])
            if core:
                found.append((core, [cast]))
        return found

    def _normalize_or_group(self, tensor: str) -> _Core | None:
        group = self.groups.get(tensor)
        if group is not None and group.op_type == "RMSNormalization" and group.scale is None:
            return _Core(group.input, list(group.nodes), group.eps, group.axes, fused=True)
        return self._normalize(tensor)

    def _normalize(self, tensor: str) -> _Core | None:
        """x / Sqrt(v), x * Reciprocal(Sqrt(v)), x * (1 / Sqrt(v)), x * Pow(v, -0.5) (either order), v = mean(x^2)
        + eps."""
        node = self._node(tensor)
        if node is None or len(node.inputs) != 2:
            return None
        if node.op_type == "Div":
            sqrt = self._node(node.inputs[1], "Sqrt")
            core = sqrt and self._mean_eps(sqrt.inputs[0], node.inputs[0])
            return _Core(core.x, [*core.nodes, sqrt, node], core.eps, core.axes) if core else None
        if node.op_type == "Mul":
            for x, inverse in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
                found = self._inverse_sqrt(inverse)
                if found is None:
                    continue
                value, inverse_nodes = found
                core = self._mean_eps(value, x)
                if core:
                    return _Core(x, [*core.nodes, *inverse_nodes, node], core.eps, core.axes)
        return None

    def _inverse_sqrt(self, tensor: str):
        node = self._node(tensor)
        if node is None:
            return None
        if node.op_type == "Reciprocal":
            sqrt = self._node(node.inputs[0], "Sqrt")
            return (sqrt.inputs[0], [sqrt, node]) if sqrt else None
        if node.op_type == "Div" and len(node.inputs) == 2 and self._is_constant(node.inputs[0], 1.0):
            sqrt = self._node(node.inputs[1], "Sqrt")
            return (sqrt.inputs[0], [sqrt, node]) if sqrt else None
        if node.op_type == "Pow" and len(node.inputs) == 2 and self._is_constant(node.inputs[1], -0.5):
            return node.inputs[0], [node]
        return None

    def _mean_eps(self, tensor: str, x: str) -> _Core | None:
        """``tensor`` = ReduceMean(x * x or Pow(x, 2)) + eps, the Add in either order."""
        add = self._node(tensor, "Add")
        if add is None or len(add.inputs) != 2:
            return None
        for mean_out, eps in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            mean = self._node(mean_out, "ReduceMean")
            if mean is None or len(mean.inputs) > 2:
                continue
            square = self._node(mean.inputs[0])
            if square is None or len(square.inputs) != 2:
                continue
            if (square.op_type == "Mul" and square.inputs[0] == x and square.inputs[1] == x) or (
                    square.op_type == "Pow" and square.inputs[0] == x and self._is_constant(square.inputs[1], 2.0)):
                axes = mean.inputs[1] if len(mean.inputs) == 2 and mean.inputs[1] else None
                return _Core(x, [square, mean, add], eps, axes)
        return None

    def _rms_settings_ok(self, core: _Core) -> bool:
        """AIMET's RMSNormalization checks: a one-element constant axes (or none), a constant eps >= 0."""
        if core.axes and _singleton(self.graph.initializers.get(core.axes)) is None:
            return False
        eps = _singleton(self.graph.initializers.get(core.eps))
        return eps is not None and eps >= 0

    # -- graph helpers -------------------------------------------------------------------------------------------------
    def _node(self, tensor: str, op_type: str | None = None) -> Node | None:
        """The node producing ``tensor`` (of ``op_type``), if it exists outside every group."""
        node = self.producers.get(tensor)
        if node is None or id(node) in self.grouped or node.domain not in ("", "ai.onnx"):
            return None
        return node if op_type is None or node.op_type == op_type else None

    def _cast_to(self, tensor: str) -> int | None:
        producer = self.producers.get(tensor)
        return producer.attrs.get("to") if producer is not None and producer.op_type == "Cast" else None

    def _is_constant(self, name: str, value: float) -> bool:
        """A one-element constant equal to ``value`` (onnxscript's Constant pattern: rel 1e-5, abs 1e-8)."""
        found = _singleton(self.graph.initializers.get(name))
        return found is not None and bool(np.isclose(found, value, rtol=1e-5, atol=1e-8))

    def _valid(self, group: NormGroup) -> NormGroup | None:
        """The group, if every tensor computed inside it but its output is read only inside it and is no graph
        output."""
        members = {id(n) for n in group.nodes}
        if len(members) != len(group.nodes):
            return None
        for node in group.nodes:
            for out in node.outputs:
                if not out or out == group.output:
                    continue
                if out in self.graph_outputs:
                    return None
                if any(id(user) not in members for user in self.consumers.get(out, [])):
                    return None
        return group

    def _keep(self, group: NormGroup) -> None:
        members = {id(n) for n in group.nodes}
        for tensor in [t for t, g in self.groups.items() if any(id(n) in members for n in g.nodes)]:
            del self.groups[tensor]  # a group absorbed into a larger one
        self.groups[group.output] = group
        self.grouped.update(id(n) for n in group.nodes)


def _operand_orders(node: Node):
    """(normalized, scale) candidates of a Mul: AIMET's ``normalized * scale`` and ``scale * normalized``."""
    if len(node.inputs) != 2:
        return []
    return [(node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])]


def _singleton(array) -> float | None:
    if array is None or np.size(array) != 1 or np.asarray(array).dtype.kind not in "fiu":
        return None
    return float(np.asarray(array).reshape(-1)[0])


@dataclass
class PassEffects:
    """What AIMET's normalization graph passes do to the quantizers the fusion left."""

    disabled: set[str] = field(default_factory=set)  # tensors whose quantizers they disable
    symmetric_at_16: set[str] = field(default_factory=set)  # constants made symmetric at 16 bits (a LayerNorm's gamma)
    matched: set[int] = field(default_factory=set)  # id() of the nodes they matched: no supergroup starts there


def pass_effects(graph: Graph, passes, groups: list[NormGroup]) -> PassEffects:
    """AIMET's "LayerNormalization" and "RMSNormalization" graph passes, run after the fusion."""
    effects = PassEffects()
    disabled, symmetric_at_16 = effects.disabled, effects.symmetric_at_16
    if not any(p in NORM_PASSES for p in passes):
        return effects
    group_of = {id(n): g for g in groups for n in g.nodes}
    consumers = graph.consumers()
    producers = graph.producers()

    def users(node_or_group) -> list:
        """The ops reading an op's outputs, a fused group standing for its nodes (AIMET's output_ops)."""
        found = []
        for out in _outputs(node_or_group):
            for user in consumers.get(out, []):
                op = group_of.get(id(user), user)
                if all(op is not seen for seen in found):
                    found.append(op)
        return found

    def chain(start, op_types, check_last=True):
        """AIMET's check_consecutive_ops: start, then single consumers, of op_types."""
        ops, op = [], start
        for op_type in op_types[:-1]:
            if op.op_type != op_type or len(users(op)) != 1:
                return None
            ops.append(op)
            op = users(op)[0]
        if op.op_type != op_types[-1] or (check_last and len(users(op)) > 1):
            return None
        return [*ops, op]

    def constants(ops) -> set[str]:
        return {name for op in ops for name in _inputs(op) if name in graph.initializers and not _is_param(op, name)}

    def outputs_of(ops) -> set[str]:
        return {out for op in ops for out in _outputs(op)}

    ops = [*groups, *(n for n in graph.nodes if id(n) not in group_of)]
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    ops.sort(key=lambda op: order[id(op.nodes[-1] if isinstance(op, NormGroup) else op)])
    for op in ops if "LayerNormalization" in passes else []:
        if op.op_type == "ReduceMean" and len(users(op)) == 1:
            sub = users(op)[0]
            if sub.op_type != "Sub" or len(users(sub)) != 2 or _inputs(sub)[0] != _inputs(op)[0]:
                continue
            pow_ = next((u for u in users(sub) if u.op_type == "Pow"), None)
            div = next((u for u in users(sub) if u.op_type == "Div"), None)
            denominator = pow_ and div and chain(pow_, ["Pow", "ReduceMean", "Add", "Sqrt"])
            if not denominator or producers.get(_inputs(div)[0]) is not sub \
                    or producers.get(_inputs(div)[1]) is not denominator[-1]:
                continue
            core = [op, sub, *denominator, div]
            disabled |= outputs_of(core[:-1]) | constants(core)
            matched = list(core)
            scaled = chain(div, ["Div", "Mul"])
            if scaled:
                mul = scaled[1]
                symmetric_at_16.update(name for name in _inputs(mul) if producers.get(name) is not div)
                disabled |= outputs_of([div])
                matched.append(mul)
                shifted = chain(mul, ["Mul", "Add"], check_last=False)
                if shifted:
                    disabled |= outputs_of([mul]) | constants(shifted[1:])
                    matched.append(shifted[1])
            effects.matched.update(id(node) for node in matched if isinstance(node, Node))
    for op in ops if "RMSNormalization" in passes else []:
        found = [op] if op.op_type == "RMSNormalization" else _rms_decomposed(op, graph, users)
        if not found:
            continue
        casts, last = [], found[-1]
        while len(users(last)) == 1 and users(last)[0].op_type == "Cast":
            last = users(last)[0]
            casts.append(last)
        affine = len(users(last)) == 1 and users(last)[0].op_type == "Mul"
        if affine:
            found = [*found, *casts, users(last)[0]]
        disabled |= outputs_of(found[:-1]) | constants(found[:-1] if affine else found)
        effects.matched.update(id(node) for node in found if isinstance(node, Node))
    return effects


def _rms_decomposed(op, graph: Graph, users) -> list | None:
    """AIMET's match_rms_norm_pattern on unfused nodes: Mul(x, x) or Pow(x, 2) -> ReduceMean -> Add, then
    Div(x, Sqrt(.)), x * Div(1, Sqrt(.)), x * Reciprocal(Sqrt(.)) or x * Pow(., -0.5)."""
    if isinstance(op, NormGroup) or len(op.inputs) != 2:
        return None
    x = op.inputs[0]
    is_square = (op.op_type == "Mul" and op.inputs[1] == x) or (op.op_type == "Pow" and _scalar(graph, op.inputs[1], 2))
    if not is_square or len(users(op)) != 1:
        return None
    mean = users(op)[0]
    if mean.op_type != "ReduceMean" or len(users(mean)) != 1 or users(mean)[0].op_type != "Add":
        return None
    add = users(mean)[0]
    if len(users(add)) != 1:
        return None
    after = users(add)[0]
    if after.op_type == "Sqrt" and len(users(after)) == 1:
        divide = users(after)[0]
        if divide.op_type == "Div" and divide.inputs == [x, after.outputs[0]]:
            return [op, mean, add, after, divide]
        if len(users(divide)) == 1 and ((divide.op_type == "Div" and divide.inputs[1] == after.outputs[0]
                                         and _scalar(graph, divide.inputs[0], 1))
                                        or (divide.op_type == "Reciprocal")):
            mul = users(divide)[0]
            if mul.op_type == "Mul" and x in _inputs(mul):
                return [op, mean, add, after, divide, mul]
    if after.op_type == "Pow" and _scalar(graph, after.inputs[1], -0.5) and len(users(after)) == 1:
        mul = users(after)[0]
        if mul.op_type == "Mul" and x in _inputs(mul):
            return [op, mean, add, after, mul]
    return None


def _scalar(graph: Graph, name: str, value: float) -> bool:
    """AIMET's is_constant_scalar: a 0-d constant equal to ``value``."""
    array = graph.initializers.get(name)
    return array is not None and np.ndim(array) == 0 and float(array) == value


def _inputs(op) -> list[str]:
    if isinstance(op, NormGroup):
        return [name for name in (op.input, op.scale, op.bias) if name]
    return list(op.inputs)


def _outputs(op) -> list[str]:
    return [op.output] if isinstance(op, NormGroup) else [out for out in op.outputs if out]


def _is_param(op, name: str) -> bool:
    """A fused normalization's scale and bias are parameters, not constants (AIMET's set_as_param)."""
    return isinstance(op, NormGroup) and name in (op.scale, op.bias)
