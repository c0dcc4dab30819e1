"""Control flow: If and Loop. Their bodies are IR subgraphs run by the runtime in the current scope,
so they read outer tensors by name."""

from __future__ import annotations

import numpy as np

from .registry import register


@register("If", since=1)
def if_(cond, *, then_branch, else_branch, ctx):
    """Run then_branch when cond (a one-element bool tensor) is true, else_branch otherwise."""
    branch = then_branch if bool(np.asarray(cond).reshape(-1)[0]) else else_branch
    return tuple(ctx.run_subgraph(branch, {}))


@register("Loop", since=1)
def loop(max_trip_count=None, cond=None, *carried, body, ctx):
    """for i in range(M) while cond: (cond, carried..., scans...) = body(i, cond, carried...).

    Returns the final carried values, then each scan output stacked along a new first axis.
    """
    names = body.input_names
    limit = None if max_trip_count is None else int(np.asarray(max_trip_count).reshape(-1)[0])
    keep_going = True if cond is None else bool(np.asarray(cond).reshape(-1)[0])
    values = list(carried)
    scans: list[list[np.ndarray]] = []
    i = 0
    while keep_going and (limit is None or i < limit):
        feeds = {names[0]: np.array(i, dtype=np.int64), names[1]: np.array(keep_going)}
        feeds.update(zip(names[2:], values))
        outputs = ctx.run_subgraph(body, feeds)
        keep_going = bool(np.asarray(outputs[0]).reshape(-1)[0])
        values = outputs[1:1 + len(values)]
        for k, scan in enumerate(outputs[1 + len(values):]):
            if len(scans) <= k:
                scans.append([])
            scans[k].append(np.asarray(scan))
        i += 1
    n_scans = len(body.outputs) - 1 - len(carried)
    stacked = [np.stack(s) if s else np.zeros((0,), np.float32) for s in scans] + \
        [np.zeros((0,), np.float32)] * (n_scans - len(scans))
    return tuple(values + stacked)
