"""IR → SymPy, and the plan the backends print: scalar work hoisted, common subexpressions shared.

Every value gets a *level*: GROUP scalars depend on hyperparameters alone and are
computed once per group per step on the host; PARAM scalars also depend on `t`
and are host floats per parameter; DEVICE scalars depend on a whole-tensor
reduction and stay 0-dim tensors (no host sync); TENSOR values are element-wise.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import sympy as sp
from sympy.core.parameters import global_parameters

from . import functions as fn
from . import ieee
from . import ir
from .errors import SpecError
from .functions import COMPARISONS, REDUCTIONS, TABLE, xreplace
from .lower import RESERVED
from .rewrite import rewrite

GROUP, PARAM, DEVICE, TENSOR = 0, 1, 2, 3
LEVEL_NAMES = {GROUP: "group", PARAM: "param", DEVICE: "device", TENSOR: "tensor"}
_CMP = {f.name: f for f in COMPARISONS.values()}
_LOOPS = {ir.LOOP: fn.loop, ir.LOOP_END: fn.loop_end}


def number(x: float) -> sp.Expr:
    if abs(x) == float("inf"):
        return sp.oo if x > 0 else -sp.oo
    if x == int(x) and abs(x) < 2**53:
        return sp.Integer(int(x))
    return sp.Float(x, precision=53)


def to_sympy(e: ir.Expr, env: dict[str, sp.Expr]) -> sp.Expr:
    """The SymPy meaning of an IR expression; `env` maps each name read to its value."""
    try:
        value = _to_sympy(e, env)
    except ZeroDivisionError:  # SymPy's Mod(x, 0); the innermost expression that divides says so
        raise SpecError("this expression takes a remainder by zero", e.span,
                        hint="x % 0 has no value (torch gives nan, Python raises): check the right side") from None
    # (asked only of evaluated expressions: SymPy can recurse without end on unevaluated ones)
    if value is sp.nan or (global_parameters.evaluate and value.is_extended_real is False):  # 0*inf, log(0), ...
        raise SpecError(f"this expression has no real value (it is {value})", e.span,
                        hint="check its constants: 0 * inf, inf - inf, log(0) and sqrt(-1) are not numbers")
    if value.is_Number and value.is_finite and abs(value) > sp.Float(1.7976931348623157e308):
        raise SpecError("this constant is too large for a float64", e.span,
                        hint="use a smaller constant, or inf")
    return value


def _to_sympy(e: ir.Expr, env: dict[str, sp.Expr]) -> sp.Expr:
    if isinstance(e, ir.Const):
        return number(e.value)
    if isinstance(e, ir.Ref):
        return env[e.name]
    args = [to_sympy(a, env) for a in e.args]
    if e.op == "+":
        return args[0] + args[1]
    if e.op == "-":
        return args[0] - args[1]
    if e.op == "*":
        return args[0] * args[1]
    if e.op == "/":
        return args[0] / args[1]
    if e.op == "^":
        return args[0] ** args[1]
    if e.op == "neg":
        return -args[0]
    if e.op in (ir.LOOP, ir.LOOP_END):  # a kept loop (optdsl/ir.py): functions of unknown value
        return _LOOPS[e.op](*args)
    fn = TABLE.get(e.op) or _CMP[e.op]
    if getattr(e, "operand", 0):  # a reduction of a value of a reduced shape: kept beside it (functions.py)
        if isinstance(e.operand, int):
            return fn.sympy(args[0], sp.Integer(e.operand))
        return fn.sympy(args[0], sp.Tuple(*(_size(s, env) for s in e.operand)))
    if e.op == "atan2" and args[0] == 0 and args[1] == 0:  # nan to SymPy, 0 to IEEE 754, torch and math
        return sp.S.Zero
    if e.op == "abs":  # every value is real: SymPy reads Abs(exp(x)) of a complex x as exp(re(x))
        # named by a text no spec name can be, not Dummy: the same each time, so the Min and Max below
        # are made once (functions.minmax), not once per abs
        real = {s: sp.Symbol(f"{s.name}#real", real=True) for s in args[0].free_symbols if not s.is_real}
        return xreplace(sp.Abs(xreplace(args[0], real)), {d: s for s, d in real.items()})
    return fn.sympy(*args)


def _size(name: str, env: dict[str, sp.Expr]) -> sp.Expr:
    """A matrix size as optdsl/shapes.py names it: 1, a number, nrows, ncols or a hyperparameter."""
    try:
        return number(float(name))
    except ValueError:
        return env.get(name, sp.Symbol(name))


def symbols_of(prog: ir.Program) -> dict[str, sp.Symbol]:
    """One SymPy symbol per input: p, g, each state (their step-start values), hypers, t, loss."""
    names = {ir.P0: "p", ir.G0: "g", **{ir.ssa_name(s.name, 0): s.name for s in prog.states}}
    syms = {ssa: sp.Symbol(code) for ssa, code in names.items()}
    syms.update({h.name: sp.Symbol(h.name) for h in prog.hypers})
    syms.update({"t": sp.Symbol("t"), "loss": sp.Symbol("loss")})
    syms.update({n: sp.Symbol(n) for n in ir.SHAPE_BUILTINS})
    syms[ir.EYE] = sp.Symbol(ir.EYE)  # a matrix state's initial value may read the identity
    return syms


def input_levels(prog: ir.Program) -> dict[sp.Symbol, int]:
    """The level of every input: tensors, scalar states (0-dim tensors), hyperparameters, t, shape."""
    levels = {sp.Symbol("p"): TENSOR, sp.Symbol("g"): TENSOR}
    levels.update({sp.Symbol(s.name): DEVICE if s.shape == "scalar" else TENSOR for s in prog.states})
    levels.update({sp.Symbol(h.name): GROUP for h in prog.hypers})
    levels.update({sp.Symbol("t"): PARAM, sp.Symbol("loss"): GROUP})
    levels.update({sp.Symbol(n): PARAM for n in ir.SIZES})
    return levels


def has_matrix_work(e: ir.Expr) -> bool:
    if isinstance(e, ir.Op):
        return ((e.op in TABLE and TABLE[e.op].matrix) or e.op in (ir.LOOP, ir.LOOP_END)
                or any(has_matrix_work(a) for a in e.args))
    return False


def _matrix_of_tensors(value: sp.Expr, eq: ir.Eqn, prog: ir.Program) -> None:
    """A located SpecError where matrix work reads a value that SymPy simplified to a scalar (mm(g * 0 +
    0.5, g): the terms that made it a tensor cancel), which torch's matrix functions do not take."""
    levels = input_levels(prog)
    tensors = {s for s in value.free_symbols if levels.get(s, TENSOR) == TENSOR}
    reads = fn.reads_tensor(tensors)
    for node in sp.postorder_traversal(value):  # the innermost first: qr(g * 0 + 1) in mm(qr(...), g)
        row = fn.TABLE.get(type(node).__name__)
        if row is None or not row.matrix or type(node) is not row.sympy:
            continue
        for arg in node.args[:len(node.args) - row.scalars]:
            if not reads(arg):
                span = next((o.span for o in _ops(eq.expr) if o.op == row.name), None) or eq.span
                shown = f"{float(arg):g}" if arg.is_Number else str(arg)
                raise SpecError(f"{row.name}() of a value that simplifies to the scalar {shown}: matrix work takes a "
                                "tensor", span, hint="its terms cancel (x - x, x * 0); write the matrix's value "
                                                     "without them")


def _ops(e: ir.Expr):
    if isinstance(e, ir.Op):
        yield e
        for a in e.args:
            yield from _ops(a)


def has_matrix_nodes(e: sp.Expr) -> bool:
    return e.has(*fn.MATRIX_CLASSES)


# The largest value read more than once, counted as a tree, that the plan keeps whole (the shipped specs'
# largest is Kron's update u, about 360 nodes): a statement that reads the one before it twice,
# `x2 = max(sqrt(x1) * g, x1 / g)` and so on, doubles the tree each time, and SymPy's Min/Max compare
# their arguments' trees, so 12 such statements took 76 s to compile. A larger one is named, as an
# unrolled loop's values are, and compiling stays linear in the statements.
MAX_SHARED_TREE = 128

# What the plan keeps of a rule is bounded in depth and in size, so that what SymPy does with it is: a
# value read once is written into the one that reads it, so statements each reading the one before
# nest (`x2 = abs(x1) + g`, ...), and SymPy's Abs, exp and sign walk the whole argument each time they
# are made: 126 such statements took 121 s and ended in a RecursionError. The shipped specs' deepest
# value is 19 operations (kron.opt), their largest rule keeps 1,100 nodes and kron.opt 6,707 over its
# 11 rules; at these limits the slowest statements we know (tests/test_bounded.py, bench/compile_bounds.py)
# compile in under 2 s.
MAX_DEPTH = 64        # operations deep, a statement's value once the values it reads once are written in
MAX_WORK = 8192       # tree nodes of every statement's value, over all rules of a spec


def depth(e: sp.Expr, depths: dict) -> int:
    if e not in depths:
        depths[e] = 1 + max((depth(a, depths) for a in e.args), default=0)
    return depths[e]


def _bounded(eq: ir.Eqn, value: sp.Expr, depths: dict, work: int) -> int:
    """The work of the rule with this statement's value, or a located SpecError past the limits."""
    deep = depth(value, depths)
    if deep > MAX_DEPTH:
        raise SpecError(f"this value is {deep} operations deep once the values it reads are written into it; "
                        f"at most {MAX_DEPTH} compile in bounded time", eq.span,
                        hint="fewer statements that each transform the one before; a loop's rounds ('repeat') "
                             "are named and do not nest")
    work += fn.tree_size(value)
    if work > MAX_WORK:
        raise SpecError(f"this rule's values reach {work} operations here (each statement's value with the "
                        f"values it reads written in); a spec may have at most {MAX_WORK}", eq.span,
                        hint="shorten the statements or the rule; a loop's rounds ('repeat') are named and "
                             "count once")
    return work


def meanings(prog: ir.Program, barriers: list | None = None, names=None, works: list | None = None
             ) -> tuple[dict[str, sp.Symbol], dict[str, sp.Expr], dict[str, sp.Expr]]:
    """(input symbols, SymPy value of every SSA name, final value of each output) over the inputs.

    With `barriers` (a list, and `names` to name them), a value computed by matrix work, each
    value of an unrolled loop, and one read twice and larger than MAX_SHARED_TREE, is a fresh
    symbol instead, its expression appended to `barriers`: an unrolled loop reads each iterate
    several times (Newton-Schulz's x, the printed `c*c` of `c^2`), so its full expression would
    grow exponentially with the count. With barriers, each statement's value is held to MAX_DEPTH
    and the rule's to MAX_WORK (a located SpecError), and `works`, if given, gets (statement, the
    rule's work up to it) for check_work.
    """
    syms = symbols_of(prog)
    env: dict[str, sp.Expr] = dict(syms)
    depths: dict[sp.Expr, int] = {}
    work = 0
    reads = Counter(name for eq in prog.eqns for name in ir.refs(eq.expr)) if barriers is not None else {}
    for eq in prog.eqns:
        env[eq.out] = to_sympy(eq.expr, env)
        if barriers is not None:  # the plan's (equiv and explain take a compiled spec's whole)
            work = _bounded(eq, env[eq.out], depths, work)
            if works is not None:
                works.append((eq, work))
        if has_matrix_work(eq.expr):
            _matrix_of_tensors(env[eq.out], eq, prog)
        shared = reads.get(eq.out, 0) > 1 and fn.tree_size(env[eq.out]) > MAX_SHARED_TREE
        if barriers is not None and (has_matrix_work(eq.expr) or ((eq.named or shared) and not env[eq.out].is_Atom)):
            symbol = names.fresh("w")
            barriers.append((symbol, env[eq.out]))
            env[eq.out] = symbol
    outputs = {base: env[ssa] for base, ssa in prog.outputs}
    return syms, env, outputs


def named_meanings(prog: ir.Program):
    """(names, input symbols, values, outputs, barriers): meanings() with barriers, named apart from the
    spec's names, as the plan and unread.py both take it; `names` is fresh, holding what it named."""
    taken, syms, env, outputs, barriers, _ = _named_meanings(prog)
    return _Names(taken), dict(syms), dict(env), dict(outputs), list(barriers)


@ir.per_program
def _named_meanings(prog: ir.Program):
    names = _Names({str(s) for s in symbols_of(prog).values()} | {eq.target for eq in prog.eqns} | RESERVED)
    barriers: list[tuple[sp.Symbol, sp.Expr]] = []
    works: list[tuple[ir.Eqn, int]] = []
    syms, env, outputs = meanings(prog, barriers, names, works)
    return frozenset(names.taken), syms, env, outputs, tuple(barriers), tuple(works)


def check_work(programs) -> None:
    """A located SpecError at the statement where the rules' values, all together, pass MAX_WORK: asked
    before the analyses, so a spec past it is refused in about the time the limit allows."""
    total = 0
    for prog in programs:
        works = _named_meanings(prog)[-1]  # (each rule alone is refused past it as its values are made)
        for eq, work in works:
            if total + work > MAX_WORK:
                raise SpecError(f"this spec's values reach {total + work} operations here, over all its rules "
                                f"(each statement's value with the values it reads written in); a spec may have "
                                f"at most {MAX_WORK}", eq.span,
                                hint="fewer or shorter rules or statements; a loop's rounds ('repeat') are named "
                                     "and count once")
        total += works[-1][1] if works else 0


def is_reduction(e: sp.Expr) -> bool:
    return type(e) in REDUCTIONS


@dataclass(frozen=True)
class Def:
    symbol: sp.Symbol
    level: int
    expr: sp.Expr


@dataclass(frozen=True)
class Plan:
    """What a backend prints: scalar definitions by level, ordered steps, and final outputs."""

    program: ir.Program
    inputs: tuple[sp.Symbol, ...]           # tensor inputs: p, g, states
    group: tuple[Def, ...]                  # host floats, once per group per step
    param: tuple[Def, ...]                  # host floats, per parameter (functions of t)
    steps: tuple[Def, ...]                  # DEVICE scalars (incl. reductions) and TENSOR temps, in order
    outputs: tuple[tuple[str, sp.Expr], ...]  # (p or state, value over inputs and step symbols)

    def level_of(self) -> dict[sp.Symbol, int]:
        levels = input_levels(self.program)
        for d in self.group + self.param + self.steps:
            levels[d.symbol] = d.level
        return levels

    def __str__(self) -> str:
        lines = []
        for d in self.group + self.param + self.steps:
            lines.append(f"{LEVEL_NAMES[d.level]:>6} {d.symbol} = {d.expr}")
        lines += [f"   out {base} = {e}" for base, e in self.outputs]
        return "\n".join(lines)


@dataclass(frozen=True)
class LoopBlock:
    """A kept loop (optdsl/ir.py's loop-carried form) as the backends print it: `count` rounds of
    `body`, each round starting from the carried values and ending by giving each its next value."""
    count: sp.Expr                                   # the hyperparameter: rounds, none for 0 or less
    carried: tuple[tuple[sp.Symbol, sp.Expr], ...]   # (value where a round starts, value on entry)
    body: tuple[Def, ...]                            # one round, in order
    ends: tuple[tuple[sp.Symbol, sp.Symbol, sp.Expr], ...]  # (value after the loop, where a round starts,
                                                            #  the round's end) per carried value


def nest_loops(defs) -> list:
    """Ordered definitions (a plan's steps, the fused path's matrix section) with each kept loop's
    definitions gathered into a LoopBlock where its first `loop_end` stood: its body is what reads a
    carried value, directly or not; what it reads and does not change stays before the loop."""
    defs = list(defs)
    starts: dict[int, list[Def]] = {}
    for d in defs:
        if type(d.expr) is fn.loop:
            starts.setdefault(int(d.expr.args[0]), []).append(d)
    if not starts:
        return defs
    taken, blocks, at = set(), {}, {}
    for k, heads in starts.items():
        variant = {d.symbol for d in heads}
        ends = [d for d in defs if type(d.expr) is fn.loop_end and d.expr.args[0] in variant]
        end_syms = {d.symbol for d in ends}
        body = []
        for d in defs:
            if d.symbol not in variant and d.symbol not in end_syms and d.expr.free_symbols & variant:
                variant.add(d.symbol)
                body.append(d)
        taken |= variant | end_syms
        if ends:  # (else nothing reads the loop's values: it does not run)
            at[ends[0].symbol] = k
            blocks[k] = LoopBlock(heads[0].expr.args[2], tuple((d.symbol, d.expr.args[3]) for d in heads),
                                  tuple(body), tuple((d.symbol, *d.expr.args) for d in ends))
    out = []
    for d in defs:
        if d.symbol in at:
            out.append(blocks[at[d.symbol]])
        elif d.symbol not in taken:
            out.append(d)
    return out


class _Names:
    """Fresh code names that never collide with a spec's own names."""

    def __init__(self, taken: set[str]):
        self.taken = set(taken)

    def fresh(self, prefix: str) -> sp.Symbol:
        i = 0
        while f"{prefix}{i}" in self.taken or f"{prefix}{i}_" in self.taken:  # x0_ names x0's items
            i += 1
        self.taken.add(f"{prefix}{i}")
        return sp.Symbol(f"{prefix}{i}")


class _Hoister:
    """Replace each maximal scalar subexpression by a named scalar of its level."""

    _PREFIX = {GROUP: "k", PARAM: "c", DEVICE: "d"}

    def __init__(self, levels: dict[sp.Symbol, int], names: _Names, preferred: dict[sp.Expr, str]):
        self.levels, self.names, self.preferred = levels, names, preferred
        self.defs: dict[sp.Expr, Def] = {}
        self._level: dict[sp.Expr, int] = {}  # a compound expression's level, once (asked again at each hoist)

    def level(self, e: sp.Expr) -> int:
        if e.is_Symbol:  # (a symbol's level is set as it is defined: never kept below)
            return self.levels[e]
        if e in self._level:
            return self._level[e]
        if type(e) in fn.BROADCAST and self.scalar(e.args[0]):
            lvl = self.level(fn.broadcast(e))
        elif is_reduction(e):
            lvl = DEVICE
        elif not e.args:
            lvl = GROUP
        else:
            lvl = max(self.level(a) for a in e.args)
        self._level[e] = lvl
        return lvl

    def scalar(self, e: sp.Expr) -> bool:
        return self.level(e) < TENSOR

    def hoist(self, e: sp.Expr, ceiling: int) -> sp.Expr:
        if e.is_Atom:
            return e
        if type(e) in fn.BROADCAST and self.scalar(e.args[0]):
            # A reduction of a scalar (a hyperparameter expression, t, a scalar state, another
            # reduction, or a tensor expression SymPy simplified to one: g - g + 1) reduces that scalar
            # broadcast to its operand's shape, p's unless the language's is a reduced one (r - r - 2 of
            # a rows state): functions.py's one rule, arithmetic on the shape built-ins here, so every
            # path computes the same number (`row_sum(-2)` was -2 where `sum(-2)` was -24)
            return self.hoist(fn.broadcast(e), ceiling)
        e = fn.untagged(e)  # a reduction of a tensor: its operand's shape is the tensor's own
        lvl = self.level(e)
        if lvl < ceiling or is_reduction(e):  # a reduction always gets its own name
            return self.define(e, lvl)
        if isinstance(e, (sp.Add, sp.Mul)):
            low = [a for a in e.args if self.level(a) < ceiling]
            high = [a for a in e.args if self.level(a) >= ceiling]
            if low and high:
                combined = self.hoist(e.func(*low), ceiling)
                return e.func(combined, *(self.hoist(a, ceiling) for a in high))
        return fn.rebuild(e, [self.hoist(a, ceiling) for a in e.args])

    def define(self, e: sp.Expr, lvl: int) -> sp.Expr:
        if is_reduction(e):
            body = e.func(self.hoist(e.args[0], TENSOR))
            prefix = "r"
        else:
            body = fn.rebuild(e, [self.hoist(a, lvl) for a in e.args])
            prefix = self._PREFIX[lvl]
        if body.is_Atom:
            return body
        if body not in self.defs:
            wanted = self.preferred.get(e)
            symbol = sp.Symbol(wanted) if wanted and wanted not in self.names.taken else self.names.fresh(prefix)
            self.names.taken.add(str(symbol))
            self.levels[symbol] = lvl
            self.defs[body] = Def(symbol, lvl, body)
        return self.defs[body].symbol


def _collect_base(base: sp.Symbol, e: sp.Expr) -> sp.Expr:
    """Write `p - lr*wd*p - u` as `p*(1 - lr*wd) - u`, so p can be updated in place."""
    if not isinstance(e, sp.Add):
        return e
    parts = sp.collect(e, base, evaluate=False)
    coef = parts.pop(base, None)
    if coef is None or coef.has(base):
        return e
    rest = sp.Add(*(k * v for k, v in parts.items()))
    head = base if coef == 1 else sp.Mul(coef, base, evaluate=False)
    return sp.Add(head, rest, evaluate=False) if rest != 0 else head


# How many times a printer writes each operand (the most of any printer: Triton's lerp reads its
# weight three times, its ends twice; x^2 is x * x).
_COPIES = {fn.lerp: (2, 2, 3), fn.TABLE["sign"].sympy: (3,), fn.softplus: (3,), fn.TABLE["mod"].sympy: (1, 2)}
_COPIED_WEIGHT = 64  # an operand written more than once and larger than this gets a name of its own


class _CopiedOperands:
    """Name each large operand that a printer would write out more than once: nested, the copies
    would multiply (`lerp(lerp(lerp(x, ...` as text is exponential in its depth)."""

    def __init__(self, hoister: _Hoister):
        self.hoister, self.defs, self.memo = hoister, [], {}

    @staticmethod
    def copies(e: sp.Expr) -> tuple[int, ...]:
        if isinstance(e, sp.Pow) and e.exp.is_Integer and 2 <= abs(int(e.exp)) <= 4:
            return (abs(int(e.exp)), 1)
        if isinstance(e, sp.Pow) and not (e.base.is_number or e.exp in (sp.S.Half, -sp.S.Half)):
            return (3, 2)  # Triton's pow: where(|x| == 1, 1, exp(y log |x|)), x's sign for odd y
        return _COPIES.get(type(e), (1,) * len(e.args))

    def name(self, e: sp.Expr) -> sp.Expr:
        return self.visit(e)[0]

    def visit(self, e: sp.Expr) -> tuple[sp.Expr, int]:
        """(e with its large copied operands named, the size of its printed text in nodes)"""
        if e.is_Atom:
            return e, 1
        if e in self.memo:
            return self.memo[e]
        args, weight = [], 1
        for a, k in zip(e.args, self.copies(e)):
            a, w = self.visit(a)
            if k > 1 and w > _COPIED_WEIGHT:
                lvl = self.hoister.level(a)
                symbol = self.hoister.names.fresh("y")
                self.hoister.levels[symbol] = lvl
                self.defs.append(Def(symbol, lvl, a))
                a, w = symbol, 1
            args.append(a)
            weight += k * w
        out = fn.rebuild(e, args) if tuple(args) != e.args else e
        self.memo[e] = (out, weight)
        return out, weight


def _fresh_forever(names: _Names, prefix: str):
    while True:
        yield names.fresh(prefix)


def _toposort(defs: list[Def]) -> list[Def]:
    """Order definitions so each comes after what it reads, keeping the given order where free."""
    defined = {d.symbol for d in defs}
    done: set[sp.Symbol] = set()
    out, pending = [], list(defs)
    while pending:
        for i, d in enumerate(pending):
            if all(s in done or s not in defined for s in d.expr.free_symbols):
                out.append(pending.pop(i))
                done.add(d.symbol)
                break
        else:  # pragma: no cover - the hoister builds a DAG
            raise RuntimeError("cyclic plan")
    return out


def plan(prog: ir.Program) -> Plan:
    names, syms, env, outputs, barriers = named_meanings(prog)
    inputs = tuple(syms[n] for n in prog.inputs)
    levels = input_levels(prog)
    # A hoisted scalar that is exactly a spec local keeps the local's name.
    preferred = {fn.untagged(env[eq.out]): eq.target for eq in prog.eqns
                 if eq.kind == ir.SCALAR and sum(e.target == eq.target for e in prog.eqns) == 1}
    hoister = _Hoister(levels, names, preferred)

    base_sym = {"p": syms[ir.P0], **{s.name: syms[ir.ssa_name(s.name, 0)] for s in prog.states}}
    tensors = set(inputs)
    walls, named = [], {}  # named: a scalar barrier -> the hoisted scalar that stands for it
    for symbol, e in barriers:
        e = fn.xreplace(e, named)
        if has_matrix_nodes(e) or hoister.level(e) == TENSOR:  # a step of its own
            levels[symbol] = TENSOR
            tensors.add(symbol)
            walls.append((symbol, e))
        else:  # an unrolled loop's scalar: a host (or 0-dim) definition of its level
            named[symbol] = hoister.hoist(e, TENSOR)
    outputs = {base: rewrite(fn.xreplace(e, named), tensors, prog) for base, e in outputs.items()}
    hoisted = [(base, hoister.hoist(_collect_base(base_sym[base], e), TENSOR)) for base, e in outputs.items()]
    walls = [(symbol, hoister.hoist(rewrite(e, tensors, prog), TENSOR)) for symbol, e in walls]

    # Share common tensor work between the outputs, the matrix work and the reductions' operands.
    scalar_defs = list(hoister.defs.values())
    reductions = [d for d in scalar_defs if is_reduction(d.expr)]
    exprs = [e for _, e in hoisted] + [d.expr.args[0] for d in reductions] + [e for _, e in walls]
    replacements, reduced = sp.cse(exprs, symbols=_fresh_forever(hoister.names, "x"), order="none")
    steps: list[Def] = [Def(symbol, TENSOR, reduced[len(hoisted) + len(reductions) + i])
                        for i, (symbol, _) in enumerate(walls)]
    for symbol, e in replacements:
        lvl = hoister.level(e)
        levels[symbol] = lvl
        (steps if lvl >= DEVICE else scalar_defs).append(Def(symbol, lvl, e))
    outs = tuple((base, reduced[i]) for i, (base, _) in enumerate(hoisted))
    new_reductions = {d.symbol: Def(d.symbol, DEVICE, d.expr.func(reduced[len(hoisted) + i]))
                      for i, d in enumerate(reductions)}
    scalar_defs = [new_reductions.get(d.symbol, d) for d in scalar_defs]
    copied = _CopiedOperands(hoister)
    scalar_defs = [Def(d.symbol, d.level, copied.name(d.expr)) for d in scalar_defs]
    steps = [Def(d.symbol, d.level, copied.name(d.expr)) for d in steps]
    outs = tuple((base, copied.name(e)) for base, e in outs)
    for d in copied.defs:
        (steps if d.level >= DEVICE else scalar_defs).append(d)
    # host floats follow IEEE 754 where the ranges do not prove Python's arithmetic safe
    group, env = ieee.guard(_toposort([d for d in scalar_defs if d.level == GROUP]), prog)
    param, _ = ieee.guard(_toposort([d for d in scalar_defs if d.level == PARAM]), prog, env)
    return Plan(prog, inputs, group=tuple(group), param=tuple(param),
                steps=tuple(_toposort([d for d in scalar_defs if d.level >= DEVICE] + steps)),
                outputs=outs)
