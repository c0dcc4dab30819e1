"""Mixed precision: AIMET's AMP greedy Pareto search, and its "lite" variant (flip the most sensitive
layers to 16 bits).

``mixed_precision(sim, data, candidates, target=..., budget=...)``:

1. each candidate (param type, activation type), e.g. ``("int4", "int8")``, is calibrated once on the
   whole model (``sim.compute_encodings`` with every quantizer at that candidate; the sim is restored
   afterwards), which gives every quantizer's encoding at every candidate;
2. per-group sensitivity (AIMET's phase 1): for each quantizer group (:func:`~.groups.layer_groups`: a
   layer's weight and output quantizers, or an activation-only group) and each of its candidates, the
   metric with that group at the candidate and every other group at its highest candidate (the
   evaluation starts from the cached state at the group's first node, see :mod:`.engine`). A group's
   loss at a candidate is the drop from the all-highest metric; losses are taken as additive (in noise
   power for the default SQNR metric, in metric units for an ``eval_fn``);
3. greedy search: start from the cheapest candidate everywhere; repeatedly upgrade the group whose
   upgrade has the largest estimated loss reduction per unit of added cost (upgrades that reduce no loss
   are never bought); measure the metric of every configuration on the way. The path's measured points
   that improve on all cheaper ones form the Pareto curve (cost increasing, metric increasing);
4. stop when the measured metric meets ``target`` (the lowest-cost point meeting it) or when no upgrade
   fits in ``budget`` (then the best point within it); with neither, the best point overall;
5. apply the chosen configuration to the sim (bitwidths set per quantizer, encodings recomputed with
   ``sim.compute_encodings``) and re-evaluate it from scratch: ``result.final_metric``,
   ``result.target_met``. If the recomputed encodings miss the target, the next points of the path are
   tried (up to ``retries``).

Cost (``cost=``): ``"bitops"`` (default) counts per group ``MACs x weight bits x activation bits``
(MACs per run at the inferred shapes, symbolic dims as 1, from :func:`refquant.model_info.node_macs`);
groups without MACs (Add, pooling, inputs...) count one operation per output element:
``elements x activation bits``. The activation bits are the group's own (its output quantizer's).
``"memory"`` counts ``parameters x weight bits + output elements x activation bits``.

The sim's exported encodings then carry each quantizer's bitwidth (``bw``).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import RefquantError
from ..progress import bar as progress_bar
from .engine import BASE, Config, Engine, SimState, Trial, mean_sqnr, sim_config
from .groups import QuantGroup, layer_groups

DEFAULT_CANDIDATES = (("int8", "int8"), ("int8", "int16"), ("int4", "int8"))


# ------------------------------------------------------------------------------ candidates
@dataclass(frozen=True)
class Candidate:
    """A precision pair: (bits, "int" or "float") for parameters and for activations."""

    param_bits: int
    param_type: str
    act_bits: int
    act_type: str

    @property
    def label(self) -> str:
        w = f"{self.param_bits}" if self.param_type == "int" else "fp16"
        a = f"{self.act_bits}" if self.act_type == "int" else "fp16"
        return f"W{w}A{a}"


def _dtype(value) -> tuple[int, str]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value), "int"
    text = str(value).strip().lower()
    if text in ("fp16", "float16"):
        return 16, "float"
    match = re.fullmatch(r"(?:int)?(\d+)", text)
    if not match:
        raise RefquantError(f"mixed precision candidate type {value!r}: expected 'int4', 'int8', 'int16', "
                            f"'fp16' or a bitwidth")
    bits = int(match.group(1))
    if not 2 <= bits <= 16:
        raise RefquantError(f"mixed precision candidate type {value!r}: bitwidth outside 2..16")
    return bits, "int"


def parse_candidate(candidate) -> Candidate:
    """``("int8", "int16")``, ``(8, 16)``, ``"w8a16"`` or ``"W8A16"`` -> Candidate."""
    if isinstance(candidate, Candidate):
        return candidate
    if isinstance(candidate, str):
        match = re.fullmatch(r"w(\d+|fp16)a(\d+|fp16)", candidate.strip().lower())
        if not match:
            raise RefquantError(f"mixed precision candidate {candidate!r}: expected e.g. 'w8a16' or "
                                f"('int8', 'int16')")
        candidate = match.groups()
    try:
        param, act = candidate
    except (TypeError, ValueError):
        raise RefquantError(f"mixed precision candidate {candidate!r}: expected "
                            f"(param type, activation type)") from None
    return Candidate(*_dtype(param), *_dtype(act))


# ------------------------------------------------------------------------------ result
@dataclass
class PathPoint:
    step: int
    cost: float
    metric: float | None  # measured (None: not evaluated, past the stopping point)
    estimate: float  # the additive estimate the search ranked with
    group: str | None = None  # the group upgraded at this step
    candidate: str | None = None
    target_metric: float | None = None  # target_fn's value where measured (mixed_precision(target_fn=...))


@dataclass
class MixedPrecisionResult:
    """What :func:`mixed_precision` chose. ``path``: every configuration of the greedy search in order
    (cost increasing); ``pareto``: its measured points that beat every cheaper one; ``assignment``:
    group -> candidate label of the applied configuration; ``final_metric``: measured on the sim after
    applying it and recomputing encodings."""

    metric: str
    cost_model: str
    candidates: list[str]
    groups: list[dict]
    high_metric: float  # every group at its highest candidate
    uniform: dict[str, dict]
    path: list[PathPoint]
    pareto: list[PathPoint]
    chosen_step: int
    assignment: dict[str, str]
    cost: float
    search_metric: float | None
    final_metric: float
    target: float | None
    budget: float | None
    target_met: bool | None
    fp32: float | None = None
    timings: dict = field(default_factory=dict)
    target_fn: str | None = None  # the target's metric when it is not ``metric`` (target_fn's name)
    final_target_metric: float | None = None  # target_fn on the final sim

    def to_dict(self) -> dict:
        from .report import _plain

        data = asdict(self)
        return _plain(data)

    def save(self, path) -> str:
        import json

        from ..fileio import atomic_path

        from .report import readable

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
            readable(tmp)
        return str(path)

    def format(self) -> str:
        from .report import _num

        lines = [f"mixed precision ({self.cost_model} cost, metric {self.metric}, higher is better)"]
        for label, u in self.uniform.items():
            lines.append(f"  uniform {label:<8} cost {u['cost']:.4g}  metric {_num(u['metric'])}")
        lines.append(f"  search: {len(self.path)} configurations, {len(self.pareto)} on the Pareto curve")
        goal = []
        if self.target is not None:
            reached = "" if self.target_fn is None else f"{self.target_fn} {_num(self.final_target_metric)}, "
            goal.append(f"{reached}target {_num(self.target)} {'met' if self.target_met else 'NOT met'}")
        if self.budget is not None:
            goal.append(f"budget {self.budget:.4g}")
        lines.append(f"  chosen: step {self.chosen_step}, cost {self.cost:.4g}, metric {_num(self.final_metric)} "
                     f"(search {_num(self.search_metric)})" + (f"; {', '.join(goal)}" if goal else ""))
        counts: dict[str, int] = {}
        for label in self.assignment.values():
            counts[label] = counts.get(label, 0) + 1
        lines.append("  groups per candidate: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return "\n".join(lines)

    def plot(self, path) -> str:
        """The Pareto curve as a PNG: every searched configuration, the curve, the uniform candidates,
        the chosen point, the target and the budget."""
        from ..fileio import atomic_path
        from .report import figure, readable

        fig = figure(7.0, 4.5)
        ax = fig.add_subplot()
        measured = [p for p in self.path if p.metric is not None and math.isfinite(p.metric)]
        ax.plot([p.cost for p in measured], [p.metric for p in measured], ".", color="#bbbbbb",
                label="searched configurations")
        curve = [p for p in self.pareto if math.isfinite(p.metric)]
        ax.plot([p.cost for p in curve], [p.metric for p in curve], "o-", color="#4c72b0", label="Pareto curve")
        for label, u in self.uniform.items():
            if math.isfinite(u["metric"]):
                ax.plot([u["cost"]], [u["metric"]], "D", color="#55a868")
                ax.annotate(f"uniform {label}", (u["cost"], u["metric"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
        if math.isfinite(self.final_metric):
            ax.plot([self.cost], [self.final_metric], "*", color="red", markersize=14, label="chosen (final)")
        if self.target is not None and math.isfinite(self.target) and self.target_fn is None:
            ax.axhline(self.target, color="red", linestyle="--", linewidth=1, label="target")
        if self.budget is not None:
            ax.axvline(self.budget, color="orange", linestyle="--", linewidth=1, label="budget")
        ax.set_xlabel(f"cost ({self.cost_model})")
        ax.set_ylabel(self.metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                fig.savefig(f, format="png", metadata={"Software": None})
            readable(tmp)
        return str(path)


# ------------------------------------------------------------------------------ the search
def mixed_precision(sim, data, candidates=DEFAULT_CANDIDATES, eval_fn=None, target=None, budget=None,
                    batch_size: int = 16, progress: bool = True, executor=None, cost: str = "bitops",
                    calib_data=None, preprocess=None, retries: int = 3, target_fn=None) -> MixedPrecisionResult:
    """Greedy mixed-precision search (see the module docstring) applied to ``sim``.

    ``data``: evaluation data (and calibration data unless ``calib_data`` is given); ``eval_fn(run) ->
    float`` (higher is better) replaces the default SQNR-vs-FP32 metric; ``target``: a metric value, or a
    candidate (``"w8a8"``, ``("int8", "int8")``) meaning that candidate's uniform metric; ``budget``: a
    cost, or a candidate meaning its uniform cost.

    ``target_fn(run) -> float`` (e.g. :func:`top1_agreement`): the metric ``target`` (then a number in
    its units) applies to, when it is not the search metric. The search ranks and measures its path with
    the search metric as above; ``target_fn`` is measured on path points found by bisection (the path
    improves the search metric step by step, so ``target_fn`` is taken to rise along it), and the chosen
    point is the cheapest measured one meeting ``target``; ``result.final_target_metric`` is
    ``target_fn`` on the final sim and decides ``result.target_met``."""
    from ..data import iter_feeds

    start = time.perf_counter()
    if cost not in ("bitops", "memory"):
        raise RefquantError(f"mixed precision cost {cost!r}: expected 'bitops' or 'memory'")
    cands = list(dict.fromkeys(parse_candidate(c) for c in candidates))
    if not cands:
        raise RefquantError("mixed precision needs at least one candidate")
    for value, what in ((target, "target"), (budget, "budget")):  # a named candidate must be one of them
        if value is not None and not isinstance(value, (int, float, np.integer, np.floating)):
            _goal(value, cands, {c.label: {} for c in cands}, "metric", what)
    if target_fn is not None and (isinstance(target, bool) or not isinstance(target, (int, float, np.integer,
                                                                                       np.floating))):
        raise RefquantError(f"mixed precision target_fn: target must be a number in target_fn's units, "
                            f"got {target!r}")
    calib = data if calib_data is None else calib_data
    timings = {}

    # 1. every quantizer's encoding at every candidate
    t0 = time.perf_counter()
    enabled = [n for n, q in sim.quantizers.items() if q.enabled]
    bar = progress_bar(len(cands), progress, "mixed precision: calibrating", "candidate")
    configs: dict[Candidate, Config] = {}
    for cand in cands:
        configs[cand] = calibrate_candidate(sim, cand, calib, batch_size, preprocess)
        bar.update(1)
    bar.close()
    timings["calibration_s"] = time.perf_counter() - t0
    present = [n for n in enabled if any(n in c.acts or n in c.consts for c in configs.values())]
    groups = layer_groups(sim, present)
    if not groups:
        raise RefquantError("mixed precision: the QuantSim quantizes nothing")

    # per group: its distinct candidates, cheapest first, and their costs
    options: dict[str, list[Candidate]] = {}
    costs: dict[str, dict[Candidate, float]] = {}
    for g in groups:
        seen: dict[tuple, Candidate] = {}
        for cand in sorted(cands, key=lambda c: (group_cost(g, c, cost), c.param_bits + c.act_bits)):
            seen.setdefault(_signature(sim, g, cand), cand)
        options[g.name] = list(seen.values())
        costs[g.name] = {c: group_cost(g, c, cost) for c in cands}

    def assemble(assignment: dict[str, Candidate]) -> Config:
        config = Config()
        for g in groups:
            config = config.replaced(g.quantizers, configs[assignment[g.name]])
        return config

    def total_cost(assignment) -> float:
        return float(sum(costs[g.name][assignment[g.name]] for g in groups))

    state = SimState.of(sim)
    batches = list(iter_feeds(data, sim.graph, batch_size=batch_size, preprocess=preprocess))
    engine = Engine(state, batches, executor=executor, progress=progress)
    from ..scale import shared

    sharing = shared(executor, state, *configs.values())  # candidates' weights to each worker once, if it can
    sharing.__enter__()
    cheapest = {g.name: options[g.name][0] for g in groups}
    highest = {g.name: options[g.name][-1] for g in groups}
    high = assemble(highest)

    # 2. sensitivity of each group at each of its candidates, every other group at its highest candidate
    #    (AIMET's phase 1: each group's loss measured against the same clean background), + uniform points
    t0 = time.perf_counter()
    trials = {}
    for g in groups:
        for cand in options[g.name][:-1]:
            trials[(g.name, cand)] = Trial(f"{g.name}@{cand.label}", high.replaced(g.quantizers, configs[cand]),
                                           g.position, "base")
    uniform_assign = {c: {g.name: _equivalent(sim, g, c, options[g.name]) for g in groups} for c in cands}
    # a uniform point is the model as calibrated at that candidate: not assemble(uniform_assign[c]), which
    # takes an activation-only group's encodings from its cheapest equivalent candidate's calibration
    everything = [n for g in groups for n in g.quantizers]
    uniform_configs = {f"uniform:{c.label}": Config().replaced(everything, configs[c]) for c in cands}
    fp32 = None
    if eval_fn is None:
        scores, _ = engine.scores(list(trials.values()) + [Trial(k, v) for k, v in uniform_configs.items()],
                                  base=high, desc="mixed precision: sensitivity")
        values = {k: s.value for k, s in scores.items()}
        metric_name = "sqnr_db"
    else:
        fn_configs = {"fp32": Config(), BASE: high, **uniform_configs}
        fn_configs.update({t.key: t.config for t in trials.values()})
        values = engine.fn_scores(eval_fn, fn_configs, desc="mixed precision: sensitivity")
        fp32 = values["fp32"]
        metric_name = getattr(eval_fn, "__name__", "eval_fn")
    high_metric = values[BASE]
    sens = {g.name: {options[g.name][-1]: high_metric} for g in groups}
    for (name, cand), trial in trials.items():
        sens[name][cand] = values[trial.key]
    uniform = {c.label: {"cost": total_cost(uniform_assign[c]), "metric": values[f"uniform:{c.label}"]}
               for c in cands}
    timings["sensitivity_s"] = time.perf_counter() - t0

    target_value = _goal(target, cands, uniform, "metric", "target")
    budget_value = _goal(budget, cands, uniform, "cost", "budget")
    # losses add up: in noise power for the SQNR metric, in metric units for an eval_fn
    additive, back = (_noise, _from_noise) if eval_fn is None else (lambda v: v, lambda v: v)
    loss = {g.name: {c: additive(high_metric) - additive(v) for c, v in sens[g.name].items()} for g in groups}

    def estimate(assignment) -> float:
        return back(additive(high_metric) - sum(loss[g.name][assignment[g.name]] for g in groups))

    # 3. the greedy path (decided by the estimates alone: cheapest everywhere, then the upgrade with the
    #    largest estimated loss reduction per unit of added cost), then measured
    t0 = time.perf_counter()
    assignment = dict(cheapest)
    if budget_value is not None and total_cost(assignment) > budget_value * (1 + 1e-12):
        raise RefquantError(f"mixed precision budget {budget_value:.6g} is below the cost of the cheapest "
                            f"configuration ({total_cost(assignment):.6g}, every group at its cheapest candidate)")
    path = [PathPoint(0, total_cost(assignment), None, estimate(assignment))]
    assignments = [dict(assignment)]
    while True:
        best = None
        current_cost = total_cost(assignment)
        for g in groups:
            now = assignment[g.name]
            for cand in options[g.name]:
                extra = costs[g.name][cand] - costs[g.name][now]
                gain = loss[g.name][now] - loss[g.name][cand]
                if cand == now or extra < 0 or not gain > 0:
                    continue
                if budget_value is not None and current_cost + extra > budget_value * (1 + 1e-12):
                    continue
                ratio = math.inf if extra == 0 else gain / extra
                key = (ratio, -extra, gain)
                if best is None or key > best[0]:
                    best = (key, g, cand)
        if best is None:
            break
        _, g, cand = best
        assignment[g.name] = cand
        path.append(PathPoint(len(path), total_cost(assignment), None, estimate(assignment), g.name, cand.label))
        assignments.append(dict(assignment))
    chunk = 1 if executor is None else max(1, getattr(executor, "_max_workers", None) or getattr(executor, "width", 4))
    todo = list(range(len(path))) if target_fn is None else []  # target_fn: bisection below
    bar = progress_bar(len(todo), progress, "mixed precision: pareto search", "config")
    engine.progress = False  # one bar for the whole search, not one per step
    stop = False
    while todo and not stop:
        batch, todo = todo[:chunk], todo[chunk:]
        measured = engine.evaluate({f"step{i}": assemble(assignments[i]) for i in batch}, eval_fn)
        for i in batch:
            path[i].metric = measured[f"step{i}"]
            bar.update(1)
            if target_value is not None and path[i].metric >= target_value:
                stop = True
    bar.close()
    if target_fn is not None:
        _bisect_path(path, lambda i: assemble(assignments[i]), engine, eval_fn, target_fn, target_value,
                     budget_value, progress)
    timings["search_s"] = time.perf_counter() - t0
    sharing.__exit__(None, None, None)

    # 4. choose, 5. apply and re-evaluate
    t0 = time.perf_counter()
    reached = "metric" if target_fn is None else "target_metric"  # what the target applies to
    chosen = _choose(path, target_value, budget_value, reached)
    final_target = None
    tried = 0
    while True:
        final_assign = assignments[chosen.step]
        apply_assignment(sim, groups, final_assign, calib, batch_size, preprocess)
        final = measure(sim, batches, eval_fn)
        if target_fn is not None:
            final_target = float(target_fn(lambda feeds: sim.run(feeds)))
        met = None if target_value is None else (final if target_fn is None else final_target) >= target_value
        tried += 1
        if met is not False or tried > retries:
            break
        later = [p for p in path[chosen.step + 1:]
                 if (budget_value is None or p.cost <= budget_value)
                 and (getattr(p, reached) is None or getattr(p, reached) >= target_value)]
        if not later:
            break
        chosen = later[0]
        if chosen.metric is None:
            chosen.metric = engine.evaluate({"retry": assemble(assignments[chosen.step])}, eval_fn)["retry"]
        if target_fn is not None and chosen.target_metric is None:
            chosen.target_metric = engine.evaluate({"retry": assemble(assignments[chosen.step])}, target_fn)["retry"]
    timings["apply_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    pareto = []  # the measured points that beat every cheaper one
    for p in path:
        if p.metric is not None and (not pareto or p.metric > pareto[-1].metric):
            pareto.append(p)
    group_rows = [{"name": g.name, "kind": g.kind, "position": g.position, "macs": g.macs,
                   "parameters": g.parameters, "output_elements": g.output_elements,
                   "quantizers": g.quantizers, "options": [c.label for c in options[g.name]],
                   "cost": {c.label: costs[g.name][c] for c in options[g.name]},
                   "sensitivity": {c.label: sens[g.name][c] for c in options[g.name]},
                   "chosen": final_assign[g.name].label} for g in groups]
    return MixedPrecisionResult(
        metric=metric_name, cost_model=cost, candidates=[c.label for c in cands], groups=group_rows,
        high_metric=high_metric, uniform=uniform, path=path, pareto=pareto, chosen_step=chosen.step,
        assignment={name: c.label for name, c in final_assign.items()}, cost=total_cost(final_assign),
        search_metric=chosen.metric, final_metric=final, target=target_value, budget=budget_value,
        target_met=met, fp32=fp32, timings=timings,
        target_fn=None if target_fn is None else getattr(target_fn, "__name__", "target_fn"),
        final_target_metric=final_target)


def _noise(value: float) -> float:
    """SQNR dB -> relative noise power, negated (higher is better, additive across independent errors)."""
    return -(10.0 ** (-value / 10.0)) if math.isfinite(value) else (0.0 if value > 0 else -math.inf)


def _from_noise(value: float) -> float:
    return math.inf if value >= 0 else -10.0 * math.log10(-value)


def _choose(path: list[PathPoint], target, budget, key: str = "metric") -> PathPoint:
    measured = [p for p in path
                if getattr(p, key) is not None and (budget is None or p.cost <= budget * (1 + 1e-12))]
    if target is not None:
        meeting = [p for p in measured if getattr(p, key) >= target]
        if meeting:
            return min(meeting, key=lambda p: (p.cost, p.step))
    return max(measured, key=lambda p: (getattr(p, key), -p.cost))


def _bisect_path(path: list[PathPoint], config_of, engine, eval_fn, target_fn, target: float, budget,
                 progress: bool) -> None:
    """Measure ``target_fn`` (and the search metric) on path points by bisection for the first one
    meeting ``target``: the last point within ``budget``, then halving [first, last]. About log2(path)
    evaluations; exact when ``target_fn`` rises along the path."""
    within = [p.step for p in path if budget is None or p.cost <= budget * (1 + 1e-12)]
    bar = progress_bar(max(1, math.ceil(math.log2(len(within) + 1))) + 1, progress,
                       "mixed precision: bisection", "config")

    def meets(i: int) -> bool:
        point = path[i]
        if point.target_metric is None:
            config = {f"step{i}": config_of(i)}
            point.metric = engine.evaluate(config, eval_fn)[f"step{i}"]
            point.target_metric = engine.evaluate(config, target_fn)[f"step{i}"]
            bar.update(1)
        return point.target_metric >= target

    lo, hi = 0, len(within) - 1
    if meets(within[hi]):
        while lo < hi:
            mid = (lo + hi) // 2
            if meets(within[mid]):
                hi = mid
            else:
                lo = mid + 1
    bar.close()


def _goal(value, cands, uniform, field_name: str, what: str):
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    cand = parse_candidate(value)
    if cand.label not in uniform:
        raise RefquantError(f"mixed precision {what} {value!r}: {cand.label} is not one of the candidates "
                            f"{', '.join(c.label for c in cands)}")
    return float(uniform[cand.label][field_name]) if field_name in uniform[cand.label] else None


def _members(sim, names):
    """Quantizers whose bitwidth a candidate sets: not frozen, not int32 biases."""
    for name in names:
        q = sim.quantizers[name]
        if q.frozen or q.role == "bias":
            continue
        yield name, q


def _signature(sim, g: QuantGroup, cand: Candidate) -> tuple:
    """What a candidate changes in a group: groups without weights ignore the weight type and so on."""
    has_param = any(q.kind == "param" for _, q in _members(sim, g.quantizers))
    has_act = any(q.kind != "param" for _, q in _members(sim, g.quantizers))
    return ((cand.param_bits, cand.param_type) if has_param else None,
            (cand.act_bits, cand.act_type) if has_act else None)


def _equivalent(sim, g: QuantGroup, cand: Candidate, options: list[Candidate]) -> Candidate:
    sig = _signature(sim, g, cand)
    return next(c for c in options if _signature(sim, g, c) == sig)


def group_cost(g: QuantGroup, cand: Candidate, cost: str = "bitops") -> float:
    if cost == "memory":
        return float(g.parameters * cand.param_bits * (g.kind == "weighted") + g.output_elements * cand.act_bits)
    if g.macs and g.kind == "weighted":
        return float(g.macs * cand.param_bits * cand.act_bits)
    return float(g.output_elements * cand.act_bits)


def _set_bits(q, bits: int, dtype: str) -> None:
    q.bitwidth = bits
    q.data_type = dtype


def _assign(sim, names, cand: Candidate) -> None:
    for _, q in _members(sim, names):
        if q.kind == "param":
            _set_bits(q, cand.param_bits, cand.param_type)
        else:
            _set_bits(q, cand.act_bits, cand.act_type)


def calibrate_candidate(sim, cand: Candidate, data, batch_size: int, preprocess) -> Config:
    """Every enabled quantizer's simulated state with the whole model at ``cand`` (sim restored after)."""
    saved = {n: (q.bitwidth, q.data_type, q.encoding, q.frozen, q.fixed_value) for n, q in sim.quantizers.items()}
    try:
        _assign(sim, [n for n, q in sim.quantizers.items() if q.enabled], cand)
        sim.compute_encodings(data, batch_size=batch_size, progress=False, preprocess=preprocess)
        return sim_config(sim)
    finally:
        for name, (bits, dtype, encoding, frozen, fixed) in saved.items():
            q = sim.quantizers[name]
            q.bitwidth, q.data_type, q.encoding, q.frozen, q.fixed_value = bits, dtype, encoding, frozen, fixed
        _invalidate(sim)


def _invalidate(sim) -> None:
    """Make the sim re-quantize its parameters on its next run (encodings were swapped under it)."""
    sim.invalidate()


def apply_assignment(sim, groups, assignment: dict[str, Candidate], data, batch_size: int, preprocess) -> None:
    """Set every group's bitwidths to its candidate and recompute the encodings."""
    for g in groups:
        _assign(sim, g.quantizers, assignment[g.name])
    sim.compute_encodings(data, batch_size=batch_size, progress=False, preprocess=preprocess)
    _invalidate(sim)


def measure(sim, batches, eval_fn=None) -> float:
    """The metric of ``sim`` as it is, computed through QuantSim itself (not the sweep engine)."""
    if eval_fn is not None:
        return float(eval_fn(lambda feeds: sim.run(feeds)))
    from ..quant.evaluate import evaluate

    scores = evaluate(sim, batches)
    ratios = {name: 10.0 ** (-db / 10.0) for name, db in scores.sqnr.items()}
    return mean_sqnr({n: 1.0 for n in ratios}, ratios)


class top1_agreement:
    """``target_fn``/``eval_fn`` metric: top-1 agreement with FP32 in percent,
    ``100 * mean over samples of [argmax(output) == argmax(FP32 output)]`` (argmax over axis 1) of
    graph output ``output`` (default: the first) on ``data``. The FP32 argmax is computed once, here, with
    a float :class:`~refquant.runtime.Session` of ``graph``. Picklable (it runs on any executor)."""

    __name__ = "top1_agreement_pct"

    def __init__(self, graph, data, output: str | None = None, batch_size: int = 16, preprocess=None):
        from ..data import iter_feeds
        from ..runtime import Session

        self.output = output or graph.output_names[0]
        if self.output not in graph.output_names:
            raise RefquantError(f"top1_agreement: {self.output!r} is not an output of the graph "
                                f"({', '.join(graph.output_names)})")
        self.batches = list(iter_feeds(data, graph, batch_size=batch_size, preprocess=preprocess))
        session = Session(graph)
        self.reference = [np.argmax(session.run(feeds, outputs=[self.output])[self.output], axis=1)
                          for feeds in self.batches]

    def __call__(self, run) -> float:
        agree = total = 0
        for feeds, ref in zip(self.batches, self.reference):
            top = np.argmax(np.asarray(run(feeds)[self.output]), axis=1)
            agree += int(np.sum(top == ref))
            total += ref.size
        return 100.0 * agree / total


# ------------------------------------------------------------------------------ lite mixed precision
def flip_to_higher_precision(sim, sensitivity, n: int | None = None, percent: float | None = None,
                             bitwidth: int = 16, data=None, batch_size: int = 16, preprocess=None,
                             weights: bool = True, activations: bool = True) -> list[str]:
    """AIMET's lite mixed precision: the ``n`` (or ``percent`` %) most sensitive groups get ``bitwidth``
    bits (weights and/or activations), then encodings are recomputed on ``data``.

    ``sensitivity``: an :class:`~.report.AnalysisReport` (its ranking; its data is reused when ``data``
    is None) or ``{group name: metric with only that group quantized}`` (lower = more sensitive, AIMET's
    per-layer sensitivity dict). Returns the flipped group names, most sensitive first."""
    from .report import AnalysisReport

    if isinstance(sensitivity, AnalysisReport):
        order = [layer.name for layer in sensitivity.ranked()]
        if data is None:
            data = sensitivity._data
            preprocess = preprocess or getattr(sensitivity, "_preprocess", None)
    else:
        order = [name for name, _ in sorted(dict(sensitivity).items(), key=lambda kv: kv[1])]
    if data is None:
        raise RefquantError("flip_to_higher_precision: pass data= to recompute the encodings")
    if (n is None) == (percent is None):
        raise RefquantError("flip_to_higher_precision: give exactly one of n and percent")
    count = int(n) if n is not None else int(math.ceil(len(order) * float(percent) / 100.0))
    groups = {g.name: g for g in layer_groups(sim, [name for name, q in sim.quantizers.items() if q.enabled])}
    unknown = [name for name in order if name not in groups]
    if unknown:
        raise RefquantError(f"flip_to_higher_precision: {unknown[:3]} are not quantizer groups of this sim "
                            f"(groups: {list(groups)[:5]}...)")
    flipped = order[:max(0, count)]
    for name in flipped:
        for _, q in _members(sim, groups[name].quantizers):
            if (q.kind == "param" and weights) or (q.kind != "param" and activations):
                _set_bits(q, bitwidth, "int")
    sim.compute_encodings(data, batch_size=batch_size, progress=False, preprocess=preprocess)
    _invalidate(sim)
    return flipped
