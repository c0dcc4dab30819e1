"""Shape rules: what an op's ``infer=`` receives and returns, and the rules many ops share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir import Dim


@dataclass
class TensorInfo:
    dtype: np.dtype | None
    shape: tuple[Dim, ...] | None
    const: np.ndarray | None = None
    sym: tuple | None = None  # values of a small int tensor made from shapes, e.g. ("batch", 64)

    @property
    def rank(self):
        return None if self.shape is None else len(self.shape)


UNKNOWN = TensorInfo(None, None)


def int_values(info) -> tuple | None:
    """The values of a 1-D/0-D int tensor, as ints where constant and dim names where symbolic."""
    if info is None:
        return None
    if info.const is not None:
        return tuple(int(v) for v in np.asarray(info.const).reshape(-1))
    return info.sym


def same_as_first(x: TensorInfo, *rest, **attrs) -> TensorInfo:
    """Unary ops: the output has the input's dtype and shape."""
    return TensorInfo(x.dtype, x.shape)


def broadcast_shapes(*shapes) -> tuple[Dim, ...] | None:
    """NumPy broadcasting over shapes that may hold symbolic dims (None when undecidable)."""
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        fixed = {d for d in dims if isinstance(d, int) and d != 1}
        symbolic = {d for d in dims if not isinstance(d, int)}
        if len(fixed) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        if fixed:
            out.append(fixed.pop())
        elif len(symbolic) == 1:
            out.append(symbolic.pop())
        elif symbolic:
            out.append(None)
        else:
            out.append(1)
    return tuple(out)


def broadcast_rule(*infos, **attrs) -> TensorInfo:
    """Element-wise ops: the first input's dtype, the broadcast of every input's shape."""
    present = [i for i in infos if i is not None]
    return TensorInfo(present[0].dtype, broadcast_shapes(*(i.shape for i in present)))


def comparison_rule(*infos, **attrs) -> TensorInfo:
    """Comparisons and logic: bool, broadcast shape."""
    return TensorInfo(np.dtype(bool), broadcast_rule(*infos).shape)
