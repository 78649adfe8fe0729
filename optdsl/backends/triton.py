"""The Triton backend: a step is a few fused multi-tensor kernels, one launch each.

Every tensor of a (device, dtype) group is covered by one launch: a table of
data pointers per operand (p, g, each state) and a block map (tensor, offset)
let each program find its slice, load p, g and the states once, compute the
update in registers and store p and the states once. Scalars of the
hyperparameters are a small device tensor (a scheduler never recompiles);
scalars of `t` come from a per-tensor table, so `t` may differ inside a launch.

A reduction splits the step into stages. A whole-tensor one (`norm`, `mean`)
adds each block's partial result into a per-tensor accumulator; an axis one
(`row_mean`, `col_max`) adds each element into its row's or column's slot; both
with atomics, no host sync, and the next stage reads the finished value. Each
tensor is seen as [B, R, C] (its last two axes, and the batch before them): a
value with an axis reduced (a `rows` state, a row mean) lives at one index per
row or column, and only the elements of the first column (or row) add it into a
reduction or store it, so nothing counts twice. Which launch computes what is
optdsl.backends.fusion's job; this module prints the kernels.
"""
from __future__ import annotations

import re

import sympy as sp

from .. import functions as fn
from .. import ir
from ..sym import DEVICE, GROUP, PARAM, LoopBlock, Plan, nest_loops
from . import sharding
from .fusion import AXIS_REDUCTIONS, UNIT_REDUCTIONS, Fusion, early_stores, matrix_nodes
from .printers import _BY_CLASS, HostPrinter, MatrixPrinter, TritonPrinter, TritonScalar64Printer

# whole-tensor reduction -> (what each element adds, how blocks combine, the finished value from the total)
_REDUCE = {
    "norm": ("{x} * {x}", "add", "tl.sqrt({r})"),
    "rms": ("{x} * {x}", "add", "tl.sqrt({r} / {n})"),
    "sum": ("{x}", "add", "{r}"),
    "mean": ("{x}", "add", "{r} / {n}"),
    "amax": ("{x}", "max", "{r}"),
}
# axis reduction -> how its elements combine, and whether the total is divided by their count
_AXIS = {fn.row_sum: ("add", False), fn.row_mean: ("add", True), fn.row_max: ("max", False),
         fn.col_sum: ("add", False), fn.col_mean: ("add", True), fn.col_max: ("max", False)}
# unit reduction -> (what each element adds, the finished value from its unit's total)
_UNITS = {fn.unit_mean: ("{x}", "{r} / ucount.to(C_TYPE)"), fn.unit_norm: ("{x} * {x}", "tl.sqrt({r})")}

# A value's shape (the axes of p it reduced, as optdsl.ir says it) -> where it lives in its storage,
# which elements of the tensor hold it once (they alone add it up or store it), and how many it has.
ROWS, COLS, BOTH = ir.STATE_SHAPES["rows"], ir.STATE_SHAPES["cols"], frozenset({"-1", "-2"})
_INDEX = {ir.FULL: "offsets", ROWS: "rows_", COLS: "cols_", BOTH: "mat_", ir.ALL: "0"}
# The stochastic rounding's counter of a number a kernel stores: its place in the whole state, from the
# place in the whole p of the element storing it (`places`: a shard's, by the place table), so a shard's
# rows, columns or matrices round as one process rounds them (by the local index they drew as rank 0's)
_COUNTER = {ir.FULL: "places", ROWS: "(places // CW_)", COLS: "((places // (RW_ * CW_)) * CW_ + places % CW_)",
            BOTH: "(places // (RW_ * CW_))", ir.ALL: "0"}
_ONCE = {ir.FULL: "mask", ROWS: "mask & (col_ == 0)", COLS: "mask & (row_ == 0)",
         BOTH: "mask & (col_ == 0) & (row_ == 0)", ir.ALL: "mask"}  # a scalar: broadcast over p
# Counts (divisors of means) are the whole tensor's: n, RW_ and CW_ (a shard's R_ and C_ index it).
_COUNT = {ir.FULL: "n", ROWS: "(n / CW_.to(C_TYPE))", COLS: "(n / RW_.to(C_TYPE))",
          BOTH: "(n / (RW_ * CW_).to(C_TYPE))", ir.ALL: "n"}
_AXIS_SIZE = {"-1": "CW_", "-2": "RW_"}  # elements along the axis a row (column) reduction reduces
_SIZE = {ROWS: "B * R", COLS: "B * C", BOTH: "B"}  # per tensor, in the launcher
_WHAT = {ROWS: "one per row", COLS: "one per column", BOTH: "one per matrix"}


MAX_STAGES = 8  # reductions in sequence: each is a launch that recomputes what it reads


def _reduction_depth(plan: Plan) -> int:
    """The longest chain of reductions each reading the one before (a launch each, fused)."""
    reductions = (*fn.REDUCTIONS, *AXIS_REDUCTIONS, *UNIT_REDUCTIONS)
    depth: dict = {}

    def of(e) -> int:
        if e.is_Symbol:
            return depth.get(e, 0)
        return max((of(a) for a in e.args), default=0) + (type(e) in reductions)
    for d in plan.steps:
        depth[d.symbol] = of(d.expr)
    return max([0, *depth.values(), *(of(e) for _, e in plan.outputs)])


def unsupported(plan: Plan) -> str:
    """Why this plan has no fused kernels ('' when it has them)."""
    matrices = [s for s in plan.program.states if ir.is_matrix(s.shape)]
    if matrices:  # read and written by matrix work alone: torch's code keeps them
        what = "per-axis" if ir.axis_kind(matrices[0].shape) else "matrix-shaped"  # gram(K), axis(K)
        return f"its {what} state '{matrices[0].name}: {matrices[0].shape}' is not fused yet"
    if _reduction_depth(plan) > MAX_STAGES:  # the kernels' text would grow with its square
        return f"more than {MAX_STAGES} reductions in sequence are not fused"
    f = Fusion(plan)
    if any(matrix_nodes(e) for _, e in plan.outputs):
        return "matrix work in an output itself is not fused yet (assign it to a local first)"
    levels = plan.level_of()
    steps = {d.symbol: d.expr for d in plan.steps}
    for e in f.entries:
        if e in f.whole or levels.get(e) == DEVICE or e in f.unit_syms or e in f.axes:
            return f"matrix work that reads a reduction ({steps.get(e, e)}) is not fused yet"
    for e in list(f.defs.values()) + [d.expr for d in plan.param] + [e for _, e in plan.outputs]:
        for node in sp.preorder_traversal(e):  # (the matrix section is printed for torch)
            row = _BY_CLASS.get(type(node))
            if row is not None and not row.triton and not row.reduction and not row.axis:
                return f"{row.name}() has no Triton form yet (not fused yet)"
    if f.entries and any(d.expr.has(*fn.RANDOM) for d in plan.steps):
        return "randn()/rand() beside matrix work is not fused yet"
    for node, operand in zip(f.units, f.unit_operands):
        if f.reductions_under(operand) or f.reads_unit(operand):
            return f"{type(node).__name__}() of a value that needs another reduction is not fused yet"
    for r in f.axes + f.whole:
        shape = f.shape(f.operand(r))
        name = f.axis_kind[r].__name__ if r in f.axis_kind else type(f.defs[r]).__name__
        if shape is None or "unit" in shape:
            return f"{name}() of a value with one number per output unit is not fused yet"
    return ""


def kernel_context(plan: Plan) -> dict:
    """What the template needs to print the kernels and their launcher."""
    prog = plan.program
    printer = TritonPrinter()
    f = Fusion(plan)
    pr = lambda e: printer.doprint(e)  # noqa: E731

    def finish_axis(k: int, r) -> str:
        combine, divide = _AXIS[f.axis_kind[r]]
        total = f"tl.load(axacc{k} + axbase{k}_ + {_INDEX[f.shape(r)]}, mask=mask)"
        if not divide:
            return total
        axis = fn.TABLE[f.axis_kind[r].__name__].axis
        if axis in f.shape(f.operand(r)):  # the axis has one element: the mean is the value
            return total
        return f"{total} / {_AXIS_SIZE[axis]}.to(C_TYPE)"

    def body(exprs, known=None) -> list[str]:
        """The lines that compute `exprs`; `known`: step values stored already, loaded as that state."""
        known = known or {}
        need = f.needed(exprs, known)
        lines = [f"{r} = {finish_axis(k, r)}" for k, r in enumerate(f.axes) if r in need]
        lines += [f"{x} = tl.load(tl.load(mxout{k}_ptrs + i).to(tl.pointer_type(C_TYPE)) + offsets, mask=mask)"
                  for k, x in enumerate(f.exits) if x in need]  # matrix work's result, made by torch
        for d in plan.steps:
            if d.symbol not in need or d.symbol not in f.defs:
                continue
            if d.symbol in known:
                lines.append(f"{d.symbol} = {known[d.symbol]}  # stored by an earlier launch")
            elif d.symbol in f.whole:
                s, j = f.slot[d.symbol]
                total = f"tl.load(acc{s} + i * {f.width(s)} + {j})"
                finish = _REDUCE[fn.REDUCTIONS[type(d.expr)].name][2]
                lines.append(f"{d.symbol} = {finish.format(r=total, n=_COUNT[f.shape(f.operand(d.symbol))])}")
            else:
                lines.append(f"{d.symbol} = {pr(f.defs[d.symbol])}")
        return lines

    # Unit reductions (one value per output unit, broadcast back) are summed per unit by a first
    # launch, with atomics into one accumulator per reduction, and gathered back by the others.
    gathers = [f"{u} = " + _UNITS[type(node)][1].format(
        r=f"tl.load(uacc{k} + ubase + offsets // ucols.to(tl.int64), mask=mask)")
        for k, (node, u) in enumerate(zip(f.units, f.unit_syms))]
    kernels = []
    if f.units:
        lines = body(f.unit_operands)
        for k, (node, x) in enumerate(zip(f.units, f.unit_operands)):
            lines.append(f"unit{k}_x = {pr(x)}")
            value = _UNITS[type(node)][0].format(x=f"unit{k}_x")
            lines.append(f"_add_by_segment(uacc{k} + ubase, offsets // ucols.to(tl.int64), {value}, mask, False)")
        kernels.append(dict(name="units", lines=lines, stores=[], per_tensor=False, combine=sharding.units(f)))
    # Scalar states: every program reads the old value, so the new one is written afterwards, by a
    # launch with one program per tensor (a write inside the main kernel would race with its reads).
    # Likewise rows and cols states: every row's (column's) elements read its old value, which may
    # lie in other blocks; a second launch over the same blocks writes the new ones (the elements of
    # the first column or row, which alone read them there).
    kinds = {s.name: s.shape for s in prog.states}
    changed = [(base, e) for base, e in f.outputs if e != sp.Symbol(base)]
    main = [(b, e) for b, e in changed if kinds.get(b, "full") in ("full", "bool")]
    reduced = [(b, e) for b, e in changed if kinds.get(b) in ("rows", "cols")]
    last = [(b, e) for b, e in changed if kinds.get(b) == "scalar"]
    entries = f.computed_entries()
    section_stage = f.stage[f.exits[0]] if f.exits else None
    early = early_stores(f, main, reduced + last, entries, section_stage)

    def known(stage: int) -> dict:
        return {e: b for b, (s, e) in early.items() if s < stage and e.is_Symbol}

    def as_tensor(e, shape="[BLOCK]") -> str:  # a number stored or reduced: a block of it, in the kernel's dtype
        return pr(e) if e.free_symbols else f"tl.full({shape}, {pr(e)}, C_TYPE)"

    def stores(outputs):
        return [dict(base=b, code=as_tensor(e), kind="p" if b == "p" else kinds[b],
                     index=_INDEX[ir.STATE_SHAPES[kinds.get(b, "full")]],
                     counter=_COUNTER[ir.STATE_SHAPES[kinds.get(b, "full")]],
                     once=_ONCE[ir.STATE_SHAPES[kinds.get(b, "full")]]) for b, e in outputs]
    for s in range(1, f.count + 1):
        whole = [r for r in f.whole if f.stage[r] == s]
        axes = [(k, r) for k, r in enumerate(f.axes) if f.stage[r] == s]
        stored = entries if s == section_stage else []  # the matrix section's entries, for torch
        now = [(b, e) for b, (at, e) in early.items() if at == s]
        operands = [f.operand(r) for r in whole] + [f.operand(r) for _, r in axes] + stored
        if s == section_stage and not operands and not now:  # torch reads p, g and states themselves
            kernels.append(dict(name="matrix", torch=True))
            continue
        lines = gathers + body(operands + [e for _, e in now], known(s))
        for k, x in enumerate(stored):
            lines.append(f"tl.store(tl.load(mxin{k}_ptrs + i).to(tl.pointer_type(C_TYPE)) + offsets, {x}, mask=mask)")
        for j, r in enumerate(whole):
            each, combine, _ = _REDUCE[fn.REDUCTIONS[type(f.defs[r])].name]
            lines.append(f"{r}_x = {as_tensor(f.operand(r))}")
            value, once = each.format(x=f"{r}_x"), _ONCE[f.shape(f.operand(r))]
            if combine == "add":
                part = f"tl.sum(tl.where({once}, {value}, 0.0), axis=0)"
                lines.append(f"tl.atomic_add(acc{s} + i * {f.width(s)} + {j}, {part})")
            else:
                part = f"tl.max(tl.where({once}, {value}, -float('inf')), axis=0)"
                lines.append(f"tl.atomic_max(acc{s} + i * {f.width(s)} + {j}, {part})")
        for k, r in axes:
            combine, _ = _AXIS[f.axis_kind[r]]
            operand = f.operand(r)
            lines.append(f"{r}x = {pr(operand)}")
            index, once = _INDEX[f.shape(r)], _ONCE[f.shape(operand)]
            if index == "cols_":  # a block's elements spread over the columns: one atomic each
                lines.append(f"tl.atomic_{combine}(axacc{k} + axbase{k}_ + {index}, {r}x, mask={once})")
            else:  # a row's (matrix's) elements are contiguous: a reduction per segment first
                lines.append(f"_add_by_segment(axacc{k} + axbase{k}_, {index}, {r}x, {once}, {combine == 'max'})")
        kernels.append(dict(name=f"stage{s}", lines=lines, stores=stores(now), per_tensor=False,
                            combine=sharding.stage(f, s)))
        if s == section_stage:
            kernels.append(dict(name="matrix", torch=True))
    main = [(b, e) for b, e in main if b not in early]
    after = known(f.count + 1)
    kernels.append(dict(name="kernel", lines=gathers + body([e for _, e in main], after),
                        stores=stores(main), per_tensor=False))
    if reduced:
        kernels.append(dict(name="reduced", lines=gathers + body([e for _, e in reduced], after),
                            stores=stores(reduced), per_tensor=False))
    if last:
        kernels.append(dict(name="scalars", lines=body([e for _, e in last], after),
                            stores=[dict(base=b, code=as_tensor(e, "()"), kind="scalar", index="0", once="")
                                    for b, e in last], per_tensor=True))

    after = False  # kernels after the matrix section read its exits
    for k in kernels:
        k.setdefault("torch", False)
        k.setdefault("combine", [])
        k["after_matrix"] = after
        after = after or k["torch"]
    levels = plan.level_of()
    matrix = _matrix_context(plan, f, levels) if f.section else None
    # Per-tensor scalars (functions of t) are computed in each program, in float64, from that
    # tensor's step count read on the device: no host sync, and t may differ inside a launch.
    need = set().union(*(d.expr.free_symbols for d in plan.steps), *(e.free_symbols for _, e in plan.outputs))
    cast_args = sorted(str(s) for s in need if levels.get(s) in (GROUP, PARAM))  # read by the element-wise code
    param_defs, logs = [], {}
    for d in reversed(plan.param):
        if d.symbol in need:
            expr = _hoist_logs(d.expr, levels, logs)
            param_defs.insert(0, (str(d.symbol), TritonScalar64Printer().doprint(expr)))
            need |= expr.free_symbols
    group_args = sorted(str(s) for s in need if levels.get(s) == GROUP or s in logs.values())
    param_args = sorted(str(s) for s in need if levels.get(s) == PARAM)
    # the parameter's shape (ndim, ncols, ...): a per-tensor table the launcher makes once per shapes
    shape_args = [n for n in ir.SIZES if sp.Symbol(n) in need]
    shape_codes = [ir.SIZES[n].replace("p.", "x.") for n in shape_args]
    accs = [dict(name=f"acc{s}", width=f.width(s), stage=s,
                 inits=", ".join('-math.inf' if type(f.defs[r]) is fn.amax else "0.0"
                                 for r in f.whole if f.stage[r] == s))
            for s in range(1, f.count + 1) if f.width(s)]
    axes = [dict(size=_SIZE[f.shape(r)], init="-math.inf" if _AXIS[f.axis_kind[r]][0] == "max" else "0.0",
                 what=f"{f.axis_kind[r].__name__}(), {_WHAT[f.shape(r)]}") for r in f.axes]
    states = [s.name for s in prog.states]
    state_loads = []
    for s in prog.states:
        shape = ir.STATE_SHAPES[s.shape]
        state_loads.append(dict(name=s.name, kind=s.shape, index=_INDEX[shape]))
    segments = bool(f.units) or any(_INDEX[f.shape(r)] != "cols_" for r in f.axes)
    printed = [c for k in kernels if not k["torch"] for c in k["lines"] + [s["code"] for s in k["stores"]]]
    atan = any(re.search(r"\b_atan2?\(", c) for c in printed + [c for _, c in param_defs])  # the template's helpers
    return dict(kernels=kernels, accs=accs, matrix=matrix, mxin=len(entries), segments=segments, atan=atan, axes=axes, geometry=f.geometry(), state_loads=state_loads,
                states=states, group_args=group_args, shape_args=shape_args, shape_codes=shape_codes,
                units=len(f.units), param_args=param_args, param_defs=param_defs, cast_args=cast_args,
                log_defs=[(str(name), HostPrinter().doprint(base)) for base, name in logs.items()],
                float_states=[s.name for s in prog.states if s.shape != "bool"])


def _hoist_logs(expr: sp.Expr, levels: dict, logs: dict) -> sp.Expr:
    """`expr` with each power b^e of a hyperparameter base and a symbolic exponent (Adam's b1^t)
    written exp(e * logK_): the launcher computes logK_ = log(b) once per step, where every program
    would compute the float64 log again (`logs`: base -> its symbol, filled here)."""
    powers = {}
    for pw in sorted(expr.atoms(sp.Pow), key=sp.default_sort_key):  # a set: sorted, for byte-equal builds
        symbols = pw.base.free_symbols
        if not pw.exp.is_number and symbols and all(levels.get(x) == GROUP for x in symbols):
            name = logs.setdefault(pw.base, sp.Symbol(f"log{len(logs)}_"))
            powers[pw] = sp.exp(pw.exp * name, evaluate=False)
    return expr.xreplace(powers)


def _lazy_section(section, exits: set, host: set[str], printer, pad: str = "") -> list[str]:
    """The matrix section's lines, each where() on host scalars a Python if whose branch holds the
    work only its first operand reads (a guarded round of a `repeat` computes nothing when skipped,
    as on the torch paths). A select inside another's branch nests; a kept loop is a Python for loop,
    its round's lines made the same way."""
    items = nest_loops(section)
    section = [d for d in items if not isinstance(d, LoopBlock)]
    loops = [b for b in items if isinstance(b, LoopBlock)]
    reads = {b: _loop_reads(b) for b in loops}
    defined = {d.symbol: d for d in section}
    users = {d.symbol: set() for d in section}
    for d in section:
        for s in d.expr.free_symbols & users.keys():
            users[s].add(d.symbol)
    for b in loops:  # what a loop reads is never moved into a branch (it stays with its readers' owner)
        for s in reads[b] & users.keys():
            users[s].add(b)
    lazy = {}  # select -> the definitions that only its first operand reads, directly or not
    for d in section:
        if not (isinstance(d.expr, fn.where) and all(x.name in host for x in d.expr.args[0].free_symbols)):
            continue
        cond, _, b = d.expr.args
        keep_out = cond.free_symbols | b.free_symbols | exits | {d.symbol}
        inner, changed = set(), True
        while changed:
            changed = False
            for x in defined:
                if x not in inner and x not in keep_out and users[x] and users[x] <= inner | {d.symbol}:
                    inner.add(x)
                    changed = True
        lazy[d.symbol] = inner
    owner = {}  # each lazy definition's innermost select
    for sel, inner in sorted(lazy.items(), key=lambda kv: -len(kv[1])):
        owner.update((x, sel) for x in inner)

    def emit(symbols, pad):
        lines = []
        for d in items:
            if isinstance(d, LoopBlock):
                if pad == outer:
                    lines += _loop_lines(d, host, printer, pad)
                continue
            if d.symbol not in symbols:
                continue
            mine = {x for x in lazy.get(d.symbol, ()) if owner[x] == d.symbol}
            if mine:
                cond, a, b = d.expr.args
                lines.append(f"{pad}if {HostPrinter().doprint(cond)}:")
                lines += emit(mine, pad + "    ")
                lines += [f"{pad}    {d.symbol} = {printer.doprint(a)}", f"{pad}else:",
                          f"{pad}    {d.symbol} = {printer.doprint(b)}"]
            else:
                lines.append(f"{pad}{d.symbol} = {printer.doprint(d.expr)}")
        return lines

    outer = pad
    return emit({d.symbol for d in section if d.symbol not in owner}, pad)


def _loop_reads(block: LoopBlock) -> set:
    """The values from before a kept loop that it reads."""
    inside = {s for s, _ in block.carried} | {d.symbol for d in block.body}
    exprs = [block.count] + [e for _, e in block.carried] + [d.expr for d in block.body] + [e for _, _, e in block.ends]
    return set().union(*(e.free_symbols for e in exprs)) - inside


def _loop_lines(block: LoopBlock, host: set[str], printer, pad: str) -> list[str]:
    """A kept loop in the matrix section: its carried values bound, `for _ in range(count):` one round
    that ends by binding each to its next value (all at once: one may read another), then the values
    after the loop named."""
    starts = ", ".join(str(s) for s, _ in block.carried)
    lines = [f"{pad}{starts} = {', '.join(printer.doprint(e) for _, e in block.carried)}",
             f"{pad}for _ in range(int({HostPrinter().doprint(block.count)})):"]
    ends = {s for _, _, e in block.ends for s in e.free_symbols}
    lines += _lazy_section(list(block.body), ends, host, printer, pad + "    ")
    lines.append(f"{pad}    {starts} = {', '.join(printer.doprint(e) for _, _, e in block.ends)}")
    return lines + [f"{pad}{after} = {start}" for after, start, _ in block.ends]


def _matrix_context(plan: Plan, f: Fusion, levels: dict) -> dict:
    """The matrix section as torch code: a function of one tensor's entries, and the launcher's
    per-tensor lines that compute its host scalars (the parameter's shape, t) and call it."""
    host = {str(s) for s, level in levels.items() if level in (GROUP, PARAM)}
    printer = MatrixPrinter(host)
    body = _lazy_section(f.section, set(f.exits), host, printer)
    # the per-tensor host scalars it reads, and what they read in turn
    need = {e for e in f.entries if levels.get(e) == PARAM}
    params = []
    for d in reversed(plan.param):
        if d.symbol in need:
            params.insert(0, f"{d.symbol} = {HostPrinter().doprint(d.expr)}")
            need |= d.expr.free_symbols
    per_tensor = [f"{n} = {code.replace('p.', 'whole[i].')}" for n, code in ir.SIZES.items()
                  if sp.Symbol(n) in need]
    if sp.Symbol("t") in need:
        per_tensor.append("t = device_steps[i].item()  # a sync per tensor, as on the foreach path")
    computed = f.computed_entries()
    tensors = {str(s) for s in plan.inputs}
    call = []
    for e in map(str, f.entries):
        if e in tensors:
            call.append(f"{e}={e}[i].to(compute)")
        elif sp.Symbol(e) in computed:
            call.append(f"{e}=mxin[{computed.index(sp.Symbol(e))}][i]")
        else:
            call.append(f"{e}={e}")
    return dict(args=[str(e) for e in f.entries], body=body, exits=[str(x) for x in f.exits],
                per_tensor=per_tensor + params, call=", ".join(call))
