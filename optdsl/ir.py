"""The IR: a spec as a small SSA program of immutable records, and its printout.

Every value is named once: inputs are `p·0`, `g·0` and one `<state>·0` per state;
each assignment makes the next version (`m·1 = lerp(m·0, g·0, 1 - b1)`).
Hyperparameters, `t` and `loss` are read-only names. `outputs` maps each
updated value (p and the states) to its last version.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import Span

BUILTINS = ("p", "g", "t", "loss")
# The parameter's shape, as host numbers per parameter: rules by shape read them.
SHAPE_BUILTINS = {"ndim": "p.dim()", "numel": "p.numel()",
                  "nrows": "(p.shape[-2] if p.dim() >= 2 else 1)", "ncols": "(p.shape[-1] if p.dim() >= 1 else 1)",
                  # the first axis: the number of output units (unit_mean, unit_norm), 1 for a scalar
                  "nunits": "(p.shape[0] if p.dim() >= 1 else 1)"}
# The size of each axis, `d[K]`: read by the rules optdsl/axes.py unrolls from a state list (their
# conditions only; a spec cannot write these names)
AXIS_SIZES = {f"d[{k}]": f"(p.shape[{k}] if p.dim() > {k} else 1)" for k in range(8)}
# Sizes the broadcast rule counts besides the built-ins (optdsl/functions.py OPERAND_SHAPES): products of
# p's axes that no quotient of the built-ins gives where an axis is 0. Not names a spec can write
# (optdsl/lower.py RESERVED holds them); the backends compute them as they compute the built-ins.
HIDDEN_SIZES = {"_nbatch": "math.prod(p.shape[:-2])", "_ninner": "math.prod(p.shape[1:-2])"}
SIZES = SHAPE_BUILTINS | HIDDEN_SIZES
TENSOR, SCALAR = "tensor", "scalar"

# ---- shapes ----
# A value's shape is told by the axes of p it has reduced (kept with size 1, so it broadcasts
# back): FULL is shaped like p, ALL a scalar, None a shape that is not p's (a matrix product).
FULL: frozenset = frozenset()
ALL: frozenset = frozenset({"all"})
STATE_SHAPES = {"full": FULL, "scalar": ALL,
                "rows": frozenset({"-1"}),   # one value per row: p.shape[:-1] + (1,)
                "cols": frozenset({"-2"}),   # one value per column: p.shape[:-2] + (1,) + p.shape[-1:]
                "bool": FULL,                # shaped like p, one byte per element: a value kept as != 0
                # matrices of another shape than p's (optdsl/shapes.py checks them): per matrix of p
                # (its last two axes), nrows x nrows and ncols x ncols; Shampoo's L and R
                "gram_rows": None, "gram_cols": None}
MATRIX_STATES = ("gram_rows", "gram_cols")
# `matrix(A, B)`: an A x B matrix per matrix of p, each size `nrows`, `ncols` or a hyperparameter
# (GaLore's rank: its projections and low-rank moments); as text, "matrix(A, B)"
MATRIX_SIZES = ("nrows", "ncols")
_MATRIX = re.compile(r"matrix\((\w+), (\w+)\)")


def matrix_dims(kind: str) -> tuple[str, str] | None:
    """The two sizes of a `matrix(A, B)` state's kind, None for any other kind."""
    m = _MATRIX.fullmatch(kind)
    return (m[1], m[2]) if m else None


# Per-axis states, one per tensor whatever its rank: `gram(K)` a d_K x d_K matrix, d_K the size of
# axis K; `axis(K)` one value per index of axis K (p's shape with every other axis of size 1).
# PSGD-Kron's triangular and diagonal factors of a tensor of rank 3. As text, "gram(K)", "axis(K)".
# `factor(K)` (a state list's factor, optdsl/axes.py): a d_K x d_K matrix or its diagonal (d_K,), which of
# the two decided per parameter when the state is made (State.diag); checked as the matrix it stands for.
_AXIS = re.compile(r"(gram|axis|factor)\((\d+)\)")


def axis_kind(kind: str) -> tuple[str, int] | None:
    """("gram", "axis" or "factor", K) of a per-axis state's kind, None for any other kind."""
    m = _AXIS.fullmatch(kind)
    return (m[1], int(m[2])) if m else None


def is_matrix(kind: str) -> bool:
    """Whether a state of this kind is a matrix per matrix of p, or a per-axis state, not shaped like
    (a reduction of) p kept by the kernels."""
    return kind in MATRIX_STATES or matrix_dims(kind) is not None or axis_kind(kind) is not None


def needs_whole(kind: str) -> bool:
    """Whether a state of this kind needs the whole tensor to step (a sharded parameter steps whole on an
    owner rank): a matrix per matrix of p or a `gram(K)`; an `axis(K)` state is a reduction of p's
    shape, split as p along axis K (as rows/cols states), its axis sums partial over a split axis."""
    return is_matrix(kind) and (axis_kind(kind) or ("gram",))[0] != "axis"


def state_shape(kind: str):
    """ir's shape of a state of this kind (see join): None for a matrix of its own shape."""
    return None if matrix_dims(kind) or axis_kind(kind) else STATE_SHAPES[kind]
EYE = "eye"  # the identity of a matrix state's shape: a name its initial value may read


def join(a, b):
    """The shape of an element-wise result of values shaped a and b (None: not known to be p's)."""
    if a is None or b is None:
        return None
    if a == ALL or a == b:
        return b
    if b == ALL:
        return a
    if "unit" in a | b:  # which axes "all but the first" covers depends on the rank
        return FULL if not a or not b else None
    return a & b  # an axis stays reduced only where both operands reduced it


def result_shape(row, args):
    """The shape of a function's result (`row` from optdsl.functions, None for arithmetic)."""
    if row is not None and row.reduction:
        return ALL
    if row is not None and row.axis:  # the operand's shape with one more axis reduced
        return None if args[0] is None else args[0] if args[0] == ALL else args[0] | {row.axis}
    if row is not None and row.matrix:  # a product's shape is not p's (of scalars, a scalar)
        return None if any(a != ALL for a in args) else ALL
    out = ALL
    for a in args:
        out = join(out, a)
    return out


def operand_code(shape) -> int:
    """The code (optdsl/functions.py OPERAND_SHAPES) of a reduced shape a reduction's operand has, where
    SymPy may simplify the operand to a number and the reduction must still count this shape's elements;
    0 for p's shape and a scalar's (a scalar broadcasts to p's shape) and for matrix work's."""
    if shape is None or shape == FULL or shape == ALL:
        return 0
    if "unit" in shape:  # all axes but the first, with the rows' or not: the same; with the columns' too
        return 5 if "-2" in shape else 4
    return {frozenset({"-1"}): 1, frozenset({"-2"}): 2, frozenset({"-1", "-2"}): 3}[shape]


def shape_text(shape) -> str:
    """How an error message says a shape."""
    names = {FULL: "shaped like p", ALL: "a scalar", STATE_SHAPES["rows"]: "one per row (rows)",
             STATE_SHAPES["cols"]: "one per column (cols)"}
    return names.get(shape, "of another shape" if shape is None else "reduced over axes " + ", ".join(sorted(shape)))


# ---- expressions ----
@dataclass(frozen=True)
class Const:
    value: float
    span: Span | None = None


@dataclass(frozen=True)
class Ref:
    name: str  # an SSA name (p0, m1, u1), a hyperparameter, `t` or `loss`
    span: Span | None = None


@dataclass(frozen=True)
class Op:
    op: str  # + - * / ^ neg, a function of optdsl.functions.TABLE, or lt le gt ge eq ne
    args: tuple[Expr, ...]
    span: Span | None = None
    # a reduction: its operand's shape where the language's is a reduced one (operand_code), or matrix
    # work's two sizes (names: nrows, ncols, 1, a hyperparameter), which SymPy forgets when it simplifies
    # the operand to a number (r - r - 2, x - x + 1 of x = mm(g, T(g))); 0 for p's shape
    operand: int | tuple = 0


Expr = Const | Ref | Op


# ---- program ----
@dataclass(frozen=True)
class Hyper:
    name: str
    default: float
    lo: float = float("-inf")
    hi: float = float("inf")
    lo_closed: bool = False
    hi_closed: bool = False
    span: Span | None = None
    keyword: str | None = None  # its constructor keyword when not its name (weight_decay for wd)
    flag: bool = False          # True/False, read as 1.0/0.0
    only: bool = False          # no value but the default is accepted
    computed: bool = False      # a group value (optdsl/group.py): computed each step, not a keyword
    optional: bool = False      # defaults to None: the machine epsilon of p's dtype (default holds float32's)
    choices: tuple = ()         # named choices (None or strings); the math reads the index, default 0
    count: bool = False         # counts a `repeat`: a whole number (an int keyword, as torch's ns_steps)

    @property
    def range_text(self) -> str:
        return (f"{'[' if self.lo_closed else '('}{_num(self.lo)}, "
                f"{_num(self.hi)}{']' if self.hi_closed else ')'}")


@dataclass(frozen=True)
class State:
    name: str
    init: Expr | None  # over p0, hyperparameters and numbers; None is zero
    span: Span | None = None
    shape: str = "full"  # a key of STATE_SHAPES
    fed: bool = False    # an `input`: a scalar the training loop sets, read-only in the spec
    key: str | None = None  # its key in state_dict() when not its name (exp_avg for m)
    eager: bool = False     # made when the optimizer is (torch.optim.Adagrad's sum), not lazily
    # a `factor(K)` state: the condition (over d[k], ndim and the hyperparameters) under which it is made
    # diagonal, its shape (d_K,), else a d_K x d_K matrix; its kind is then its number of axes
    diag: Expr | None = None

    @property
    def saved_as(self) -> str:
        return self.key or self.name


@dataclass(frozen=True)
class Keyword:
    """A constructor keyword and param_groups key: one hyperparameter, or a tuple of them (betas)."""
    name: str
    members: tuple[str, ...]  # the hyperparameters it carries, in order
    is_tuple: bool = False


@dataclass(frozen=True)
class Eqn:
    out: str      # SSA name this equation defines
    target: str   # the spec's name it is a version of
    kind: str     # TENSOR or SCALAR
    expr: Expr
    span: Span | None = None
    named: bool = False  # a value of an unrolled loop: the plan names it, so code grows linearly with the count


@dataclass(frozen=True)
class GroupReduce:
    """A reduction over every tensor of the group: `func` (sum, norm, mean, rms, amax) of `arg`, an
    expression of one parameter's step-start values (p0, g0, its states' version 0, t, its shape)."""
    out: str
    func: str
    arg: Expr
    span: Span | None = None
    # the shape of `arg` as written, as ir.Op.operand keeps a reduction's (optdsl/shapes.py operand): what
    # a scalar arg counts per tensor, and what mean and rms divide by
    operand: int | tuple = 0


@dataclass(frozen=True)
class GroupPhase:
    """The group statements: run once per group per step, before any parameter is updated."""
    states: tuple[State, ...]               # `state NAME: group`: one number per group, kept in param_groups
    steps: tuple[Eqn | GroupReduce, ...]    # in order; an Eqn reads hypers, group values and reductions
    outputs: tuple[tuple[str, str], ...]    # (group state, its last SSA version)
    values: tuple[tuple[str, str], ...]     # (name the per-parameter statements read, its last SSA version)
    reads: tuple[str, ...] = ()             # per-parameter states the reductions read


@dataclass(frozen=True)
class Mode:
    """What the optimizer's eval() or train() does to each parameter (optdsl/modes.py)."""
    name: str                             # "eval" or "train"
    eqns: tuple[Eqn, ...]                 # over p0, the states' version 0, hyperparameters and numbers
    outputs: tuple[tuple[str, str], ...]  # (p or state, last SSA version) of those it assigns


@dataclass(frozen=True)
class Program:
    name: str
    doc: str
    hypers: tuple[Hyper, ...]
    states: tuple[State, ...]
    eqns: tuple[Eqn, ...]
    outputs: tuple[tuple[str, str], ...]  # (p or state, last SSA version)
    uses_loss: bool
    keywords: tuple[Keyword, ...] = ()  # the constructor's, in order; () when each is its hyper's name
    group: GroupPhase | None = None     # the group statements, read by the step as computed hypers
    modes: tuple[Mode, ...] = ()        # `on eval { ... }`, `on train { ... }`

    @property
    def dropin(self) -> bool:
        """Whether the spec names its interface (keywords, tuples, flags, saved keys) for torch.optim."""
        return bool(self.keywords)

    @property
    def inputs(self) -> tuple[str, ...]:
        return (P0, G0) + tuple(ssa_name(s.name, 0) for s in self.states)

    def __str__(self) -> str:
        return format_program(self)


def ssa_name(base: str, version: int) -> str:
    """`m·1`: the '·' keeps SSA names apart from every name a spec can write (ASCII only), so a
    hyperparameter `m1` or `d0` never meets the versions of `m` or `d`."""
    return f"{base}\u00b7{version}"


P0, G0 = ssa_name("p", 0), ssa_name("g", 0)


def per_program(func):
    """func(prog), a pure function of an immutable Program, computed once per Program object: the checks,
    the plan and the backends each ask the same analyses of a rule (a state's proven range, its low-bit
    code, the meaning of every statement). By identity, the Program kept beside its value (so an id
    freed and reused never hits); the last few Programs only. An exception is raised anew each time."""
    memo: dict[int, tuple[Program, object]] = {}

    def cached(prog: Program):
        hit = memo.get(id(prog))
        if hit is not None and hit[0] is prog:
            return hit[1]
        value = func(prog)
        if len(memo) >= 256:  # the rules of a spec or two (kron.opt has 29)
            memo.clear()
        memo[id(prog)] = (prog, value)
        return value
    cached.__doc__, cached.__name__, cached.__wrapped__ = func.__doc__, func.__name__, func
    return cached


# ---- printing ----
_INFIX = {"+": 1, "-": 1, "*": 2, "/": 2, "^": 4}
_CMP = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
_LOGIC = {"lor": "or", "land": "and"}  # a rule's condition only; `or` binds loosest, `and` next


def refs(e: Expr):
    """The names an expression reads, in order (with repeats)."""
    if isinstance(e, Ref):
        yield e.name
    elif isinstance(e, Op):
        for a in e.args:
            yield from refs(a)


def _num(x: float) -> str:
    if abs(x) == float("inf"):
        return "inf" if x > 0 else "-inf"
    return str(int(x)) if x == int(x) and abs(x) < 1e15 else repr(x)


def format_expr(e: Expr, prec: int = 0, names: dict[str, str] | None = None) -> str:
    """The expression in spec syntax, with only the parentheses it needs; `names` renames refs."""
    if isinstance(e, Const):
        text = _num(e.value)
        return f"({text})" if e.value < 0 and prec > 0 else text
    if isinstance(e, Ref):
        return names.get(e.name, e.name) if names else e.name
    sub = lambda x, p=0: format_expr(x, p, names)  # noqa: E731
    if e.op in _INFIX:
        p = _INFIX[e.op]
        right_assoc = e.op == "^"
        left = sub(e.args[0], p + (1 if right_assoc else 0))
        right = sub(e.args[1], p if right_assoc else p + 1)
        text = f"{left}^{right}" if e.op == "^" else f"{left} {e.op} {right}"
        return f"({text})" if p < prec else text
    if e.op == "neg":
        text = "-" + sub(e.args[0], 3)
        return f"({text})" if prec > 3 else text
    if e.op in _LOGIC:  # the loosest operators: only an `or` inside an `and`, or inside an operand, needs ( )
        parts = [sub(a) for a in e.args]
        if e.op == "land":
            parts = [f"({t})" if isinstance(a, Op) and a.op == "lor" else t for a, t in zip(e.args, parts)]
        text = f" {_LOGIC[e.op]} ".join(parts)
        return f"({text})" if prec > 0 else text
    if e.op in _CMP:
        text = f"{sub(e.args[0], 1)} {_CMP[e.op]} {sub(e.args[1], 1)}"
        return f"({text})" if prec > 0 else text
    if e.op in RANDOM_DRAWS:  # randn(p, k) is the spec's k-th `randn()`
        return f"{e.op}()"
    return f"{e.op}({', '.join(sub(a) for a in e.args)})"


RANDOM_DRAWS = ("randn", "rand")  # optdsl.functions' rows with random=True, as lowering writes them


# ---- loops ----
# `repeat COUNT { ... }` counted by a hyperparameter, with matrix work in its body, is kept as a loop
# (optdsl/lower.py decides which), in a loop-carried form: the body's equations appear once, between
#   x·4 = loop(k, j, ns_steps, x·3)   the value of x a round starts from: x·3 before the first round,
#                                     the previous round's end after it (loop k's j-th carried value)
#   x·8 = loop_end(x·4, x·7)          x after the loop: each round ends with x·4 taking x·7's value,
#                                     so x·7 of the last round, or x·3 when the count is 0 or less
# A value the body reads and does not assign is the same in every round. Every analysis sees these
# two as functions (of unknown range, each carrying its operand's shape); the backends run the body
# in a Python `for` loop (optdsl.sym.nest_loops), so code and compile time do not grow with the count.
LOOP, LOOP_END = "loop", "loop_end"


def loop_parts(e: Expr) -> tuple[int, int, str, Expr] | None:
    """(loop number, carried value's number, count, value on entry) of a `loop` expression, else None."""
    if isinstance(e, Op) and e.op == LOOP:
        k, j, count, init = e.args
        return int(k.value), int(j.value), count.name, init
    return None


def source_names(prog: Program) -> dict[str, str]:
    """SSA name → the spec's name it is a version of (for messages)."""
    names = {ssa_name(b, 0): b for b in ("p", "g")} | {ssa_name(s.name, 0): s.name for s in prog.states}
    return names | {eq.out: eq.target for eq in prog.eqns}


def format_program(prog: Program) -> str:
    lines = [f"optimizer {prog.name}"]
    for h in prog.hypers:
        if h.computed:
            continue
        value = str(bool(h.default)) if h.flag else _num(h.default)
        fixed = " only" if h.only else "" if h.flag else f" in {h.range_text}"
        if h.choices:
            value, fixed = " | ".join("None" if c is None else f'"{c}"' for c in h.choices), ""
        lines.append(f"  hyper {h.name} = {value}{fixed}" + (f" as {h.keyword}" if h.keyword else ""))
    for k in prog.keywords:
        if k.is_tuple:
            lines.append(f"  hyper {k.name} = ({', '.join(k.members)})")
    for s in prog.states:
        shape = "" if s.shape == "full" else f": {s.shape}"
        lines.append(f"  state {s.name}{shape} = {format_expr(s.init) if s.init else '0'}"
                     + (f" as {s.key}" if s.key else "") + (" eager" if s.eager else ""))
    if prog.group is not None:
        for s in prog.group.states:
            lines.append(f"  state {s.name}: group = {format_expr(s.init) if s.init else '0'}")
        for step in prog.group.steps:
            if isinstance(step, GroupReduce):
                lines.append(f"  group {step.out} = {step.func} over the group of {format_expr(step.arg)}")
            else:
                lines.append(f"  group {step.out} = {format_expr(step.expr)}")
        lines.append("  group out " + ", ".join(f"{base} = {ssa}" for base, ssa in prog.group.values))
    for mode in prog.modes:
        lines.append(f"  on {mode.name}: " + "; ".join(f"{eq.out} = {format_expr(eq.expr)}" for eq in mode.eqns))
    lines.append("  in " + ", ".join(prog.inputs + ("t",) + (("loss",) if prog.uses_loss else ())))
    body = False  # a kept loop's body is indented under its `loop` lines (loops do not nest)
    for eq in prog.eqns:
        start = loop_parts(eq.expr) is not None
        body = body and not (isinstance(eq.expr, Op) and eq.expr.op == LOOP_END)
        lines.append(("    " if body and not start else "  ") + f"{eq.out} = {format_expr(eq.expr)}"
                     + ("    # scalar" if eq.kind == SCALAR else ""))
        body = body or start
    lines.append("  out " + ", ".join(f"{base} = {ssa}" for base, ssa in prog.outputs))
    return "\n".join(lines)
