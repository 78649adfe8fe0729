"""The Triton backend: a step is a few fused multi-tensor kernels, one launch each.

Every tensor of a (device, dtype) group is covered by one launch: a table of
data pointers per operand (p, g, each state) and a block map (tensor, offset)
let each program find its slice, load p, g and the states once, compute the
update in registers and store p and the states once. Scalars of the
hyperparameters are a small device tensor (a scheduler never recompiles);
scalars of `t` come from a per-tensor table, so `t` may differ inside a launch.

A whole-tensor reduction splits the step into stages: each stage's kernel adds
its blocks' partial results into a per-tensor accumulator (atomics, no host
sync), and the next stage reads the finished value.
"""
from __future__ import annotations

import sympy as sp

from .. import functions as fn
from .. import ir
from ..sym import GROUP, PARAM, Plan, is_reduction
from .printers import TritonPrinter, TritonScalar64Printer

# reduction -> (what each element adds, how blocks combine, the finished value from the total)
_REDUCE = {
    "norm": ("{x} * {x}", "add", "tl.sqrt({r})"),
    "rms": ("{x} * {x}", "add", "tl.sqrt({r} / {n})"),
    "sum": ("{x}", "add", "{r}"),
    "mean": ("{x}", "add", "{r} / {n}"),
    "amax": ("{x}", "max", "{r}"),
}


def unsupported(plan: Plan) -> str:
    """Why this plan has no fused kernels ('' when it has them)."""
    shaped = [s.name for s in plan.program.states if s.shape not in ("full", "scalar")]
    if shaped:
        return f"state {shaped[0]} is not shaped like its parameter (not fused yet)"
    for d in plan.steps + tuple(plan.outputs):
        e = d[1] if isinstance(d, tuple) else d.expr
        for node in sp.preorder_traversal(e):
            row = next((f for f in fn.TABLE.values() if type(node) is f.sympy), None)
            if row is not None and row.matrix or (row is not None and row.axis and row.axis != "unit"):
                return f"{row.name}() is not element-wise (not fused yet)"
    for node in _unit_nodes(plan):
        inner = node.args[0]
        if _unit_nodes_in(inner) or _reads_reduction(plan, inner):
            return f"{type(node).__name__}() of a value that needs another reduction is not fused yet"
    return ""


# unit reduction -> (what each element adds, the finished value from its unit's total)
_UNITS = {fn.unit_mean: ("{x}", "{r} / ucols.to(C_TYPE)"), fn.unit_norm: ("{x} * {x}", "tl.sqrt({r})")}


def _unit_nodes_in(e) -> list:
    return [n for n in sp.preorder_traversal(e) if type(n) in _UNITS]


def _unit_nodes(plan: Plan) -> list:
    """The distinct unit reductions (one value per output unit) the step reads, in order."""
    out = []
    for e in [d.expr for d in plan.steps] + [e for _, e in plan.outputs]:
        out += [n for n in _unit_nodes_in(e) if n not in out]
    return out


def _reads_reduction(plan: Plan, e) -> bool:
    """Whether e reads a whole-tensor or unit reduction, through the plan's steps."""
    stages = _Stages(plan)
    return any(is_reduction(stages.defs[s].expr) or _unit_nodes_in(stages.defs[s].expr)
               for s in stages.needed([e]))


class _Stages:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.defs = {d.symbol: d for d in plan.steps}
        self.stage: dict[sp.Symbol, int] = {}
        for d in plan.steps:
            if is_reduction(d.expr):
                below = [self.stage[r] for r in self.reductions_under(d.expr.args[0])]
                self.stage[d.symbol] = 1 + max(below, default=0)
        self.count = max(self.stage.values(), default=0)
        self.slot = {}  # reduction -> (stage, column)
        for s in range(1, self.count + 1):
            for j, r in enumerate(r for r in self.stage if self.stage[r] == s):
                self.slot[r] = (s, j)

    def needed(self, exprs) -> set[sp.Symbol]:
        """Step symbols these expressions read, through tensor and device steps, not into reductions."""
        out: set[sp.Symbol] = set()
        todo = [s for e in exprs for s in e.free_symbols]
        while todo:
            s = todo.pop()
            if s in out or s not in self.defs:
                continue
            out.add(s)
            if not is_reduction(self.defs[s].expr):
                todo += list(self.defs[s].expr.free_symbols)
        return out

    def reductions_under(self, e) -> list[sp.Symbol]:
        return [s for s in self.needed([e]) if is_reduction(self.defs[s].expr)]

    def width(self, s: int) -> int:
        return sum(1 for r in self.stage if self.stage[r] == s)


def kernel_context(plan: Plan) -> dict:
    """What the template needs to print the kernels and their launcher."""
    prog = plan.program
    printer = TritonPrinter()
    stages = _Stages(plan)
    # Unit reductions (one value per output unit, broadcast back) are summed per unit by a first
    # launch, with atomics into one accumulator per reduction, and gathered back by the others.
    units = _unit_nodes(plan)
    unit_of = {node: sp.Symbol(f"unit{k}_") for k, node in enumerate(units)}

    def body(need: set) -> list[str]:
        lines = []
        for d in plan.steps:
            if d.symbol not in need:
                continue
            if is_reduction(d.expr):
                s, j = stages.slot[d.symbol]
                total = f"tl.load(acc{s} + i * {stages.width(s)} + {j})"
                finish = _REDUCE[fn.REDUCTIONS[type(d.expr)].name][2]
                lines.append(f"{d.symbol} = {finish.format(r=total, n='n')}")
            else:
                lines.append(f"{d.symbol} = {printer.doprint(d.expr.xreplace(unit_of))}")
        return lines

    gathers = [f"{unit_of[node]} = " + _UNITS[type(node)][1].format(
        r=f"tl.load(uacc{k} + ubase + offsets // ucols.to(tl.int64), mask=mask)") for k, node in enumerate(units)]
    kernels = []
    if units:
        operands = [node.args[0] for node in units]
        lines = body(stages.needed(operands))
        for k, (node, x) in enumerate(zip(units, operands)):
            lines.append(f"unit{k}_x = {printer.doprint(x)}")
            value = _UNITS[type(node)][0].format(x=f"unit{k}_x")
            lines.append(f"tl.atomic_add(uacc{k} + ubase + offsets // ucols.to(tl.int64), {value}, mask=mask)")
        kernels.append(dict(name="units", lines=lines, stores=[], per_tensor=False))
    for s in range(1, stages.count + 1):
        mine = [r for r in stages.stage if stages.stage[r] == s]
        operands = [stages.defs[r].expr.args[0] for r in mine]
        lines = gathers + body(stages.needed(operands))
        for j, (r, x) in enumerate(zip(mine, operands)):
            each, combine, _ = _REDUCE[fn.REDUCTIONS[type(stages.defs[r].expr)].name]
            lines.append(f"{r}_x = {printer.doprint(x.xreplace(unit_of))}")
            value = each.format(x=f"{r}_x")
            if combine == "add":
                part = f"tl.sum(tl.where(mask, {value}, 0.0), axis=0)"
                lines.append(f"tl.atomic_add(acc{s} + i * {stages.width(s)} + {j}, {part})")
            else:
                part = f"tl.max(tl.where(mask, {value}, -float('inf')), axis=0)"
                lines.append(f"tl.atomic_max(acc{s} + i * {stages.width(s)} + {j}, {part})")
        kernels.append(dict(name=f"stage{s}", lines=lines, stores=[], per_tensor=False))
    # Scalar states: every program reads the old value, so the new one is written afterwards, by a
    # launch with one program per tensor (a write inside the main kernel would race with its reads).
    scalars = {s.name for s in prog.states if s.shape == "scalar"}
    changed = [(base, e) for base, e in plan.outputs if e != sp.Symbol(base)]
    main = [(b, e) for b, e in changed if b not in scalars]
    last = [(b, e) for b, e in changed if b in scalars]
    kernels.append(dict(name="kernel", lines=gathers + body(stages.needed([e for _, e in main])),
                        stores=[(b, printer.doprint(e.xreplace(unit_of))) for b, e in main], per_tensor=False))
    if last:
        kernels.append(dict(name="scalars", lines=body(stages.needed([e for _, e in last])),
                            stores=[(b, printer.doprint(e)) for b, e in last], per_tensor=True))

    levels = plan.level_of()
    # Per-tensor scalars (functions of t) are computed in each program, in float64, from that
    # tensor's step count read on the device: no host sync, and t may differ inside a launch.
    need = set().union(*(d.expr.free_symbols for d in plan.steps), *(e.free_symbols for _, e in plan.outputs))
    cast_args = sorted(str(s) for s in need if levels.get(s) in (GROUP, PARAM))  # read by the element-wise code
    param_defs = []
    for d in reversed(plan.param):
        if d.symbol in need:
            param_defs.insert(0, (str(d.symbol), TritonScalar64Printer().doprint(d.expr)))
            need |= d.expr.free_symbols
    group_args = sorted(str(s) for s in need if levels.get(s) == GROUP)
    param_args = sorted(str(s) for s in need if levels.get(s) == PARAM)
    # the parameter's shape (ndim, ncols, ...): a per-tensor table the launcher makes once per shapes
    shape_args = [n for n in ir.SHAPE_BUILTINS if sp.Symbol(n) in need]
    shape_codes = [ir.SHAPE_BUILTINS[n].replace("p.", "x.") for n in shape_args]
    accs = [dict(name=f"acc{s}", width=stages.width(s),
                 inits=", ".join('-math.inf' if type(stages.defs[r].expr) is fn.amax else "0.0"
                                 for r in stages.stage if stages.stage[r] == s))
            for s in range(1, stages.count + 1)]
    return dict(kernels=kernels, accs=accs, states=[s.name for s in prog.states], scalar_states=sorted(scalars),
                group_args=group_args, shape_args=shape_args, shape_codes=shape_codes, units=len(units),
                param_args=param_args, param_defs=param_defs,
                cast_args=cast_args)
