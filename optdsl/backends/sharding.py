"""The sharding plan of the fused path: what each launch leaves partial when a parameter is split.

Under FSDP2 or tensor parallelism a parameter is a DTensor and each rank holds a shard; the
kernels run on the local shards. Element-wise work is then local. A reduction over an axis the
mesh splits leaves each rank a partial result in its accumulator: after the launch that fills
them, every such accumulator of that stage is combined over the mesh by one all-reduce of a flat
buffer (one per mesh dimension and op: sum, or max for amax/row_max/col_max), never one per
tensor. Whether a slot is partial depends on the placement, known at run time (a row mean of a
row-sharded matrix is local, a column mean is not); what each reduction reduces is known here.
Matrix work (mm, T) needs whole matrices: optdsl.backends.fusion's section, see the template.
"""
from __future__ import annotations

from .fusion import Fusion

# reduction -> (the axes of p it reduces, as the generated _REDUCES table names them; how partial
# results combine)
COMBINE = {"norm": ("all", "add"), "sum": ("all", "add"), "mean": ("all", "add"), "rms": ("all", "add"),
           "amax": ("all", "max"),
           "row_sum": ("-1", "add"), "row_mean": ("-1", "add"), "row_max": ("-1", "max"),
           "col_sum": ("-2", "add"), "col_mean": ("-2", "add"), "col_max": ("-2", "max"),
           "unit_mean": ("unit", "add"), "unit_norm": ("unit", "add")}


def units(f: Fusion) -> list[dict]:
    """What the first launch (unit reductions) leaves partial: one accumulator per unit reduction."""
    return [dict(buffer=f"uacc[{k}]", segments="unit_segments", reduced=COMBINE[type(node).__name__][0],
                 op=COMBINE[type(node).__name__][1]) for k, node in enumerate(f.units)]


def stage(f: Fusion, s: int) -> list[dict]:
    """What stage s's launch leaves partial: its whole-tensor reductions (a column each of acc<s>)
    and its axis reductions (axacc<k>)."""
    out = []
    whole = [r for r in f.whole if f.stage[r] == s]
    for j, r in enumerate(whole):
        reduced, op = COMBINE[type(f.defs[r]).__name__]
        out.append(dict(buffer=f"acc{s}", segments=f"_column(len(p), {len(whole)}, {j})", reduced=reduced, op=op))
    for k, r in enumerate(f.axes):
        if f.stage[r] == s:
            reduced, op = COMBINE[f.axis_kind[r].__name__]
            out.append(dict(buffer=f"axacc[{k}]", segments=f"axis_segments[{k}]", reduced=reduced, op=op))
    return out

