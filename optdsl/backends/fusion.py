"""The plan cut into launches, for the fused path: which values each launch computes.

A reduction (whole-tensor, row/column, per unit) is finished only when every block has added
its part, so what reads it waits for the next launch: each reduction gets a *stage*, one more
than the stages of the reductions its operand reads. Matrix work (mm, T) and the steps between
them form a *section* that torch runs between two launches, reading *entries* and giving
*exits*, which later launches read like finished reductions. A value's *shape* is the set of
p's axes it reduced (optdsl.ir's shapes), which tells where a row's or column's value lives.
"""
from __future__ import annotations

import sympy as sp

from .. import functions as fn
from .. import ir
from ..sym import Plan, is_reduction

AXIS_REDUCTIONS = (fn.row_sum, fn.row_mean, fn.row_max, fn.col_sum, fn.col_mean, fn.col_max)
UNIT_REDUCTIONS = (fn.unit_mean, fn.unit_norm)


def _walk_postorder(e):
    for a in e.args:
        yield from _walk_postorder(a)
    yield e


class Fusion:
    """The plan cut into launches: reductions by stage, the values each launch needs, shapes."""

    def __init__(self, plan: Plan):
        self.plan = plan
        prog = plan.program
        self._split_matrix_work(plan)
        inside = {d.symbol for d in self.section} | self.dead
        exprs = [d.expr for d in plan.steps if d.symbol not in inside] + [e for _, e in plan.outputs]
        found = list(dict.fromkeys(n for e in exprs for n in _walk_postorder(e) if type(n) in UNIT_REDUCTIONS))
        self.units = found
        # (a reduction of a scalar is arithmetic on the shape built-ins: sym.plan has taken those out)
        axes = list(dict.fromkeys(n for e in exprs for n in _walk_postorder(e) if type(n) in AXIS_REDUCTIONS))
        swap = {n: sp.Symbol(f"unit{k}_") for k, n in enumerate(found)}
        swap |= {n: sp.Symbol(f"ax{k}_") for k, n in enumerate(axes)}
        self.swap = swap
        self.unit_syms = [swap[n] for n in found]
        self.unit_operands = [n.args[0].xreplace(swap) for n in found]
        self.axes = [swap[n] for n in axes]
        self.axis_kind = {swap[n]: type(n) for n in axes}
        self.axis_operand = {swap[n]: n.args[0].xreplace(swap) for n in axes}
        self.defs = {d.symbol: d.expr.xreplace(swap) for d in plan.steps if d.symbol not in inside}
        self.outputs = [(b, e.xreplace(swap)) for b, e in plan.outputs]
        self.whole = [s for s, e in self.defs.items() if is_reduction(e)]
        self.state_shape = {sp.Symbol(s.name): ir.state_shape(s.shape) for s in prog.states}
        self._shapes: dict = {}
        self.stage: dict[sp.Symbol, int] = {}
        for r in self.whole + self.axes + self.exits:
            self._stage_of(r)
        self.count = max(self.stage.values(), default=0)
        self.slot = {}  # whole-tensor reduction -> (stage, column)
        for s in range(1, self.count + 1):
            for j, r in enumerate(r for r in self.whole if self.stage[r] == s):
                self.slot[r] = (s, j)

    def _split_matrix_work(self, plan: Plan) -> None:
        """The matrix section: the steps with matrix work (mm, T) and those between them. Torch runs
        it per tensor between two launches: it reads `entries` (values of the kernels, stored for it
        in scratch tensors, or p, g and states themselves) and gives `exits`, shaped like p."""
        # Only the steps the outputs need: an unrolled loop names each value it makes (sym.Plan keeps
        # them), so a dead one, `B = bfloat16(B)` after the last round, would read matrix work and
        # make it an exit of another shape than p's (fuzz seed 5469).
        live = set().union(*(e.free_symbols for _, e in plan.outputs))
        for d in reversed(plan.steps):
            if d.symbol in live:
                live |= d.expr.free_symbols
        live_steps = [d for d in plan.steps if d.symbol in live]
        steps = {d.symbol for d in live_steps}
        matrix = {d.symbol for d in live_steps if matrix_nodes(d.expr)}
        after, before = set(matrix), set()  # steps reading matrix work; steps matrix work reads
        for d in live_steps:
            if d.expr.free_symbols & after:
                after.add(d.symbol)
        for d in reversed(live_steps):
            if d.symbol in matrix or d.symbol in before:
                before |= d.expr.free_symbols & steps
        self.section = [d for d in live_steps if d.symbol in matrix | (after & before)]
        inside = {d.symbol for d in self.section}
        read_outside = set().union(*(d.expr.free_symbols for d in live_steps if d.symbol not in inside),
                                   *(e.free_symbols for _, e in plan.outputs))
        self.exits = [d.symbol for d in self.section if d.symbol in read_outside]
        # steps no output needs, and matrix work nothing reads: not run at all
        self.dead = {d.symbol for d in plan.steps if d.symbol not in live} | (set() if self.exits else inside)
        if not self.exits:
            self.section = []
        reads = set().union(*(d.expr.free_symbols for d in self.section)) - inside
        self.entries = sorted(reads, key=str)  # values, tensors and scalars the section reads

    def operand(self, r: sp.Symbol) -> sp.Expr:
        return self.axis_operand[r] if r in self.axis_operand else self.defs[r].args[0]

    def computed_entries(self) -> list[sp.Symbol]:
        """The section's tensor entries that kernels compute (stored for it in scratch tensors)."""
        return [e for e in self.entries if e in self.defs and e not in self.whole]

    def _stage_of(self, r) -> int:
        if r not in self.stage:
            if r in self.exits:  # after the kernel that computes its entries
                under = [x for e in self.computed_entries() for x in self.reductions_under(e)]
                self.stage[r] = 1 + max((self._stage_of(x) for x in under), default=0)
            else:
                under = self.reductions_under(self.operand(r))
                self.stage[r] = 1 + max((self._stage_of(x) for x in under), default=0)
        return self.stage[r]

    def needed(self, exprs, stop=()) -> set[sp.Symbol]:
        """Step symbols these expressions read, through tensor and device steps, not into reductions
        (nor into `stop`: values a launch loads instead of computing)."""
        out: set[sp.Symbol] = set()
        todo = [s for e in exprs for s in e.free_symbols]
        while todo:
            s = todo.pop()
            if s in out or (s not in self.defs and s not in self.axis_operand and s not in self.exits):
                continue
            out.add(s)
            if s in self.defs and s not in self.whole and s not in stop:
                todo += list(self.defs[s].free_symbols)
        return out

    def reads(self, exprs, stop=()) -> set[sp.Symbol]:
        """Every symbol these expressions read (inputs such as a state's old value included)."""
        need = self.needed(exprs, stop)
        return set().union(*(e.free_symbols for e in exprs),
                           *(self.defs[s].free_symbols for s in need
                             if s in self.defs and s not in self.whole and s not in stop))

    def reductions_under(self, e) -> list[sp.Symbol]:
        """The values e reads that an earlier launch finishes (reductions, and matrix work's exits)."""
        return [s for s in self.needed([e]) if s in self.axis_operand or s in self.whole or s in self.exits]

    def reads_unit(self, e) -> bool:
        return any(u in self.defs.get(s, sp.S.Zero).free_symbols or u in e.free_symbols
                   for s in self.needed([e]) for u in self.unit_syms)

    def width(self, s: int) -> int:
        return sum(1 for r in self.whole if self.stage[r] == s)

    def shape(self, e) -> frozenset | None:
        """The axes of p this value reduced (optdsl.ir's shapes): ir.FULL, ROWS, ..., ir.ALL."""
        if e in self._shapes:
            return self._shapes[e]
        if e in self.state_shape:
            out = self.state_shape[e]
        elif e in (sp.Symbol("p"), sp.Symbol("g")) or e in self.exits:  # exits: checked when made
            out = ir.FULL
        elif e in self.unit_syms:
            out = frozenset({"unit"})
        elif e in self.axis_operand:
            out = ir.result_shape(fn.TABLE[self.axis_kind[e].__name__], [self.shape(self.axis_operand[e])])
        elif e in self.defs:
            out = ir.ALL if e in self.whole else self.shape(self.defs[e])
        elif e.is_Atom:
            out = ir.ALL  # numbers, hyperparameters, t and its scalars
        else:
            out = ir.ALL
            for a in e.args:
                out = ir.join(out, self.shape(a))
        self._shapes[e] = out
        return out

    def geometry(self) -> bool:
        """Whether the kernels index rows and columns (axis reductions or rows/cols states)."""
        return bool(self.axes) or any(s not in (ir.FULL, ir.ALL) for s in self.state_shape.values())


def matrix_nodes(e) -> list:
    return [n for n in sp.preorder_traversal(e) if type(n) in fn.MATRIX_CLASSES]


def matrix_work(plan: Plan) -> str:
    """The first matrix function (mm, T) the plan calls ('' when none)."""
    for e in [d.expr for d in plan.steps] + [e for _, e in plan.outputs]:
        if matrix_nodes(e):
            return type(matrix_nodes(e)[0]).__name__
    return ""


def early_stores(f: Fusion, main: list, others: list, entries: list, section_stage) -> dict:
    """States whose new value an earlier stage's launch can store already, {state: (stage, value)}:
    later launches then load it instead of recomputing it from the old value and g (LAMB's moments:
    40 bytes per element instead of 44; Muon's momentum). Not when a later launch, or torch's matrix
    work, still reads the old value, nor into a launch made for it alone (that would cost bytes)."""
    def launches(s: int) -> bool:  # a stage whose launch is there anyway (not torch's work alone)
        return any(f.stage[r] == s for r in f.whole + f.axes) or (s == section_stage and bool(entries))

    early = {}
    for b, e in main:
        stage = 1 + max((f.stage[r] for r in f.reductions_under(e)), default=0)
        if b != "p" and stage <= f.count and launches(stage) and sp.Symbol(b) not in f.entries:
            early[b] = (stage, e)
    while True:
        def demands(after: int):  # (stage, values) of each launch after `after`
            for s in range(after + 1, f.count + 1):
                values = [f.operand(r) for r in f.whole + f.axes if f.stage[r] == s]
                values += (entries if s == section_stage else []) + [e for at, e in early.values() if at == s]
                yield s, values
            yield f.count + 1, [e for b, e in main if b not in early] + [e for _, e in others]
        late = []
        for b, (stage, _) in early.items():
            for s, values in demands(stage):
                stop = {e: x for x, (at, e) in early.items() if at < s and e.is_Symbol}
                if sp.Symbol(b) in f.reads(values, stop):
                    late.append(b)
                    break
        if not late:
            return early
        for b in late:
            del early[b]
