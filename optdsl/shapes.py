"""Symbolic shapes: every value of a lowered program gets the sizes of its last two axes, as names
of the parameter's (`nrows`, `ncols`) or 1, so that a spec whose shapes cannot fit is a located
spec error, never a torch error at step (issue 12, item 3) or a silent broadcast.

p and g are `(nrows, ncols)` (its leading axes, when it has more, ride along unchanged); a `rows`
state `(nrows, 1)`, a `cols` state `(1, ncols)`, a `gram_rows` state `(nrows, nrows)`, a
`gram_cols` state `(ncols, ncols)`; scalars `()`. Since p need not be square, `nrows` and `ncols`
are different sizes: `mm(x, T(x)) + x` adds an (nrows, nrows) to an (nrows, ncols) value and is
refused. Element-wise work broadcasts (a size meets itself or 1); `mm` needs equal inner sizes;
`inv_root`, `eigvecs` and `norm_lb` need square matrices (`norm_lb` gives one number per
matrix, `(1, 1)`); `rsolve_triu(B, A)` a square A of B's column size. A `matrix(A, B)` state is
`(A, B)`, its sizes `nrows`, `ncols` or a hyperparameter's name (GaLore's `rank`), which
`svd_u(x, rank)` (n x rank) and `svd_vh(x, rank)` (rank x m) give. A `gram(K)` state is
`(d[K], d[K])`, d[K] the size of p's axis K, which `gram_axis(x, K)` gives and `mm_axis` and
`rsolve_triu_axis` along axis K take; an `axis(K)` state and `axis_sum` are known only at step
(their last two axes depend on p's rank). Where a shape depends on the
parameter at step (a `where` on the host picking `x` or `T(x)`, as Muon iterates on the wide side; the per-unit
reductions, whose axes depend on the rank), the value's shape is unknown and nothing that reads it
is refused here: those are checked by torch at step.
"""
from __future__ import annotations

from dataclasses import replace

from . import ir
from .errors import SpecError
from .functions import AXIS_FUNCTIONS, TABLE

R, C, ONE = "nrows", "ncols", "1"
UNKNOWN = None
_DECLARED = {"full": (R, C), "bool": (R, C), "scalar": (), "rows": (R, ONE), "cols": (ONE, C),
             "gram_rows": (R, R), "gram_cols": (C, C)}
_SQUARE = ("inv_root", "eigvecs", "sortperm", "norm_lb")  # functions of a square (symmetric) matrix


def text(shape) -> str:
    """How a message says a shape."""
    if shape is UNKNOWN:
        return "of a shape known only at step"
    if shape == ():
        return "a scalar"
    return f"({shape[0]} x {shape[1]})"


def _broadcast(shapes, span, what: str):
    out = ()
    for s in shapes:
        if s is UNKNOWN:
            return UNKNOWN
        if s == ():
            continue
        if out == ():
            out = s
            continue
        dims = []
        for a, b in zip(out, s):
            if a != b and ONE not in (a, b):
                raise SpecError(f"{what} of values {text(out)} and {text(s)}: {a} and {b} differ (p need not be "
                                "square)", span,
                                hint="bring the operands to one shape (mm, T, row_mean, col_mean, ...)")
            dims.append(b if a == ONE else a)
        out = tuple(dims)
    return out


def shape_of(e: ir.Expr, env: dict) -> tuple | None:
    """The symbolic shape of e (a tuple of two sizes, () for a scalar, None when known only at step)."""
    if isinstance(e, ir.Const):
        return ()
    if isinstance(e, ir.Ref):
        return env.get(e.name, ())
    return _op_shape(e, [shape_of(a, env) for a in e.args])


# A state list's factor work (optdsl/axes.py) is checked as the matrix work it stands for: a diagonal
# factor is a diagonal d[K] x d[K] matrix, kept as its diagonal
_FACTOR = {"factor_T": "T", "factor_triu": "triu", "factor_mm": "mm", "factor_norm_lb": "norm_lb"}


def _op_shape(e: ir.Op, args: list) -> tuple | None:
    """The shape of e's result from its operands' shapes (see shape_of)."""
    if e.op in _FACTOR:
        e = replace(e, op=_FACTOR[e.op])
    if e.op == "factor_gram":
        e, args = replace(e, op="gram_axis", args=(e.args[0], e.args[2])), [args[0], args[2]]
    if e.op == ir.LOOP:  # a kept loop's carried value where a round starts: its value on entry
        return args[3]
    if e.op == ir.LOOP_END:  # after the loop: a round must end with the shape it started from
        start, end = args
        if UNKNOWN not in (start, end) and _fits(end, start) != start:
            raise SpecError(f"a round of this 'repeat' starts from a value {text(start)} but ends with one "
                            f"{text(end)}: the next round could not start from it", e.span,
                            hint="keep each value the loop carries in its shape (mm, T, ...)")
        return start if end is not UNKNOWN else UNKNOWN
    row = TABLE.get(e.op)
    if row is not None and row.reduction:
        return ()
    if row is not None and row.axis:
        x = args[0]
        if x is UNKNOWN or x == () or row.axis == "unit":
            return x if x == () else UNKNOWN
        return (x[0], ONE) if row.axis == "-1" else (ONE, x[1])
    if e.op == "where" and args[0] == () and args[1] != args[2] and () not in args[1:]:
        return UNKNOWN  # a host condition picks a branch: its shape is the parameter's business at step
    if e.op == "mm":
        a, b = args
        if UNKNOWN in (a, b) or () in (a, b):
            return UNKNOWN
        if a[1] != b[0]:
            raise SpecError(f"mm() of a {text(a)} and a {text(b)} value: the inner sizes {a[1]} and {b[0]} differ "
                            "(p need not be square)", e.span,
                            hint="transpose one operand with T(), or multiply in the other order")
        return (a[0], b[1])
    if e.op == "T":
        return UNKNOWN if args[0] in (UNKNOWN, ()) else (args[0][1], args[0][0])
    if e.op in _SQUARE:
        a = args[0]
        if a is not UNKNOWN and a != () and a[0] != a[1]:
            raise SpecError(f"{e.op}() takes a symmetric matrix, but this value is {text(a)} (p need not be square)",
                            e.args[0].span or e.span,
                            hint="pass a Gram matrix such as mm(g, T(g)) or a 'gram_rows'/'gram_cols' state")
        return (ONE, ONE) if e.op == "norm_lb" and a not in (UNKNOWN, ()) else a
    if e.op == "triu":
        return args[0]
    if e.op == "rsolve_triu":
        b, a = args
        if UNKNOWN in (a, b) or () in (a, b):
            return UNKNOWN
        if a[0] != a[1] or b[1] != a[0]:
            raise SpecError(f"rsolve_triu(B, A) takes a square A of B's column size, but B is {text(b)} and A "
                            f"{text(a)} (p need not be square)", e.span,
                            hint="B A^-1 needs A of (ncols x ncols) for B of (nrows x ncols): transpose B with T()")
        return b
    if e.op in AXIS_FUNCTIONS:  # along axis k: its size d[k]; p's other axes are not in this model
        k = int(e.args[-1].value) if isinstance(e.args[-1], ir.Const) else None
        if e.op == "axis_sum":
            return UNKNOWN
        if e.op == "gram_axis":
            return UNKNOWN if args[0] is UNKNOWN or k is None else (axis_size(k), axis_size(k))
        x, a = (args[1], args[0]) if e.op == "mm_axis" else (args[0], args[1])
        if a not in (UNKNOWN, ()) and (a[0] != a[1] or (a[0].startswith("d[") and a[0] != axis_size(k))):
            raise SpecError(f"{e.op}() along axis {k} takes a square matrix of that axis' size "
                            f"({axis_size(k)} x {axis_size(k)}), but this one is {text(a)}",
                            e.args[0 if e.op == "mm_axis" else 1].span or e.span,
                            hint=f"a 'gram({k})' state, or gram_axis(x, {k})")
        return x
    if e.op in ("svd_u", "svd_vh"):  # A's first k singular vectors: (n x k) columns, (k x m) rows
        a, k = args[0], e.args[1]
        if a is UNKNOWN or a == ():
            return UNKNOWN
        size = k.name if isinstance(k, ir.Ref) else f"{k.value:g}" if isinstance(k, ir.Const) else UNKNOWN
        if size is UNKNOWN:
            return UNKNOWN
        return (a[0], size) if e.op == "svd_u" else (size, a[1])
    if e.op == "qr":
        a = args[0]
        return a if a is UNKNOWN or a == () or a[0] == a[1] else UNKNOWN  # Q is n x min(n, m)
    return _broadcast(args, e.span, f"{e.op}()" if row is not None else f"'{_OPS.get(e.op, e.op)}'")


_OPS = {"neg": "-", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}


def axis_size(k: int) -> str:
    """The size of p's axis k, as a name: d[k]."""
    return f"d[{k}]"


def _declared(kind: str) -> tuple | None:
    """A state's shape as its declaration says: a `matrix(A, B)` one (A, B), sizes as names; a
    `gram(K)` one (d[K], d[K]); an `axis(K)` one is known only at step (it depends on p's rank)."""
    axis = ir.axis_kind(kind)
    if axis is not None:  # a factor(K) (a state list's) as the d[K] x d[K] matrix it stands for, diagonal or not
        return (axis_size(axis[1]),) * 2 if axis[0] != "axis" else UNKNOWN
    return ir.matrix_dims(kind) or _DECLARED.get(kind, (R, C))


def check(prog: ir.Program) -> dict[str, tuple | None]:
    """Give every value of prog its symbolic shape; raise a located SpecError where shapes cannot
    fit, or where p or a state is assigned a value that is not of its shape. Returns the shapes."""
    declared = {s.name: _declared(s.shape) for s in prog.states}
    env: dict[str, tuple | None] = {ir.P0: (R, C), ir.G0: (R, C)}
    env |= {ir.ssa_name(s.name, 0): declared[s.name] for s in prog.states}
    for eq in prog.eqns:
        shape = shape_of(eq.expr, env)
        want = (R, C) if eq.target in ("p", "g") else declared.get(eq.target)
        if want is not None and shape is not UNKNOWN and shape != () and _fits(shape, want) != want:
            what = eq.target if eq.target in ("p", "g") else f"state '{eq.target}'"
            raise SpecError(f"{what} is {text(want)} but this value is {text(shape)}", eq.span,
                            hint="bring the value to its shape (mm, T, row_mean, col_mean, ...)"
                                 + ("" if eq.target in ("p", "g") else ", or declare the state with another shape"))
        env[eq.out] = want if want is not None and shape == () else shape
    return env


def written(e: ir.Expr, shapes: dict):
    """The language's shape of a value as written (ir.join's tags: ir.FULL, ir.ALL, the axes it reduced,
    None when not p's), from its operands': `shapes` maps a name to its shape, ir.ALL where absent (a
    hyperparameter, t, a shape built-in)."""
    if isinstance(e, ir.Const):
        return ir.ALL
    if isinstance(e, ir.Ref):
        return shapes.get(e.name, ir.ALL)
    return ir.result_shape(TABLE.get(e.op), [written(a, shapes) for a in e.args])


def operand(e: ir.Expr, shapes: dict, eqns, states) -> int | tuple:
    """What a reduction of e keeps of e's shape (ir.Op.operand, ir.GroupReduce.operand), which SymPy forgets
    where it simplifies e to a number (r - r - 2 of a rows state): the code of a reduced shape
    (ir.operand_code), matrix work's two sizes (sizes_of), or 0 for p's shape and a scalar's. One rule for
    the per-parameter statements (optdsl/lower.py) and the group's reductions (optdsl/group.py)."""
    shape = written(e, shapes)
    return ir.operand_code(shape) if shape is not None else (sizes_of(e, eqns, states) or 0)


def sizes_of(e: ir.Expr, eqns, states) -> tuple | None:
    """The symbolic sizes (two) of e, a value read after `eqns` with these (AST or IR) states, where they
    are known and the shapes so far fit (else None: check says where they do not). The lowering asks it
    of matrix work a reduction reads, whose size the reduction counts where SymPy simplifies it away."""
    declared = {s.name: _declared(s.shape) for s in states}
    env: dict[str, tuple | None] = {ir.P0: (R, C), ir.G0: (R, C)}
    env |= {ir.ssa_name(s.name, 0): declared[s.name] for s in states}
    try:
        for eq in eqns:
            shape = shape_of(eq.expr, env)
            want = (R, C) if eq.target in ("p", "g") else declared.get(eq.target)
            env[eq.out] = want if want is not None and shape == () else shape
        out = shape_of(e, env)
    except SpecError:
        return None
    return out if out else None


def decided_at_step(prog: ir.Program) -> list[ir.Eqn]:
    """The statements where shapes that only the parameter's shape decides meet and may not fit:
    matrix work or element-wise work of two non-scalars of which one is of a shape known only at
    step, or p or a state assigned such a value. Torch checks them at step; the generated code
    turns its error there into one that names these statements (their file:line and text)."""
    env = check(prog)
    declared = {s.name: _declared(s.shape) for s in prog.states}
    for eq in prog.eqns:  # past its statement, p or a state has its own shape (or torch raised there)
        if eq.target in ("p", "g") or eq.target in declared:
            env[eq.out] = declared.get(eq.target, (R, C))

    def walk(e: ir.Expr):  # (shape, whether a piece of e may not fit, whether e is per unit)
        if not isinstance(e, ir.Op):
            return shape_of(e, env), False, isinstance(e, ir.Ref) and e.name in per_unit_values
        parts = [walk(a) for a in e.args]
        args = [shape for shape, _, _ in parts]
        row = TABLE.get(e.op)
        elementwise = row is None or not (row.matrix or row.reduction or row.axis)
        # A per-unit reduction keeps every axis (p.shape[0], 1, ...): whatever p's rank, it broadcasts
        # against p's shape, and element-wise work of it with values of p's shape stays so.
        per_unit = (row is not None and row.axis == "unit") or elementwise and any(u for _, _, u in parts)
        seen = [(R, C) if u else a for a, (_, _, u) in zip(args, parts)] if elementwise else args
        risky = any(r for _, r, _ in parts) or _may_not_fit(e.op, seen)
        return _op_shape(e, args), risky, per_unit

    found, per_unit_values = [], set()
    for eq in prog.eqns:
        shape, risky, per_unit = walk(eq.expr)
        if per_unit and shape is UNKNOWN:
            per_unit_values.add(eq.out)
        if risky or (shape is UNKNOWN and not per_unit and (eq.target in ("p", "g") or eq.target in declared)):
            found.append(eq)
    return found


def _may_not_fit(op: str, args: list) -> bool:
    if UNKNOWN not in args:
        return False
    op = _FACTOR.get(op, op)
    row = TABLE.get(op)
    if op in ("T", "factor_gram") or op in (ir.LOOP, ir.LOOP_END) or (row is not None and (row.reduction or row.axis)):
        return False  # works on any matrix
    if op == "where" and args[0] == ():
        return False  # a host condition picks a branch; nothing is combined
    if op == "mm" or op in _SQUARE:
        return True
    return sum(a != () for a in args) >= 2  # element-wise: fits whatever a scalar meets


def _fits(shape, want):
    """The broadcast of shape against want, or None where they do not fit."""
    try:
        return _broadcast([want, shape], None, "")
    except SpecError:
        return None
