"""The ranks each rule can take, against the ranks its operations need: a spec error where the
rule's condition decides it, else a clear error at step (the operation, its line, the shape),
never a raw torch error.

`col_mean(g)` reduces the second-to-last axis and `mm`, `T` work on the last two: a rank-1
parameter has neither (torch raises at step, or `mm` of two vectors silently means a dot
product). A `rows` state needs an axis to keep, a `cols` state two. Which ranks reach a rule
follows from the conditions of the rules before it and its own, decided for ranks 0 and 1
where the shape fixes them (a vector has nrows = 1). A rule whose condition takes such ranks
(`rule ndim >= 1`) is a spec error; a spec without rules, or a last rule taking the rest, checks
each parameter's rank at step (specs that expect matrices only are common and correct).
"""
from __future__ import annotations

import sympy as sp

from . import ir
from .errors import SpecError, SpecWarning
from .functions import AXIS_FUNCTIONS, TABLE
from .sym import to_sympy

_STATE_RANK = {"rows": 1, "cols": 2, "gram_rows": 2, "gram_cols": 2}


def _state_rank(kind: str) -> int:
    axis = ir.axis_kind(kind)  # gram(K), axis(K): p needs an axis K
    return axis[1] + 1 if axis else 2 if ir.matrix_dims(kind) else _STATE_RANK.get(kind, 0)


def _needs(e: ir.Expr):
    """(rank, op, span) for each operation in e that needs parameters of that rank or more."""
    if isinstance(e, ir.Op):
        row = TABLE.get(e.op)
        if e.op in AXIS_FUNCTIONS and isinstance(e.args[-1], ir.Const):  # along axis k: rank k + 1
            yield int(e.args[-1].value) + 1, e.op, e.span
        elif row is not None and (row.matrix or row.axis == "-2"):
            yield 2, e.op, e.span
        for a in e.args:
            yield from _needs(a)


def _takes(cond: ir.Expr | None, rank: int, hypers) -> bool | None:
    """Whether a rule with this condition takes a parameter of this rank (None: it depends)."""
    if cond is None:
        return True
    env = {h.name: sp.Symbol(h.name) for h in hypers}
    env.update({"ndim": sp.Integer(rank), "nrows": sp.Integer(1),
                "ncols": sp.Integer(1) if rank == 0 else sp.Symbol("ncols", positive=True),
                "numel": sp.Integer(1) if rank == 0 else sp.Symbol("numel", positive=True),
                "nunits": sp.Integer(1) if rank == 0 else sp.Symbol("nunits", positive=True)})
    env.update({n: sp.Symbol(n, positive=True) for n in ir.AXIS_SIZES})
    value = to_sympy(cond, env)
    return bool(value != 0) if value.is_Number else None


def need(prog: ir.Program) -> tuple[int, str, object]:
    """(the least rank the program's operations need, what needs it, its span) - (0, '', None) for any."""
    found = [(_state_rank(s.shape), f"state '{s.name}: {s.shape}'", s.span) for s in prog.states]
    found += [(r, f"{op}()", span or eq.span) for eq in prog.eqns for r, op, span in _needs(eq.expr)]
    rank, what, span = max(found, key=lambda f: f[0], default=(0, "", None))
    return (rank, what, span) if rank else (0, "", None)


def check(rules: list[tuple[ir.Expr | None, ir.Program]], refusals=()) -> None:
    """Raise a located SpecError where a rule's condition takes rank-0 or rank-1 parameters that its
    operations cannot work on (the rest is checked at step: see need). `refusals`: (updating rules
    before it, condition) per `rule COND refuse`, which takes parameters before the rules after it."""
    memo: dict[tuple, tuple[ir.Expr, bool | None]] = {}

    def takes(c, rank, hypers):  # each rule's condition is asked of every rule after it: once per rank
        key = (id(c), rank, tuple(h.name for h in hypers))  # (_takes reads the hyperparameters' names)
        if key not in memo:
            memo[key] = (c, _takes(c, rank, hypers))  # c kept: its id is not reused meanwhile
        return memo[key][1]

    for rank in (1, 0):  # the larger rank first: a vector, the likelier parameter
        for i, (cond, prog) in enumerate(rules):
            earlier = [takes(c, rank, prog.hypers) for c in [c for c, _ in rules[:i]]
                       + [c for before, c, *_ in refusals if before <= i]]
            if any(t is True for t in earlier) or cond is None or takes(cond, rank, prog.hypers) is not True:
                continue  # a rule before it takes them all, or its condition does not decide to take them
            who = f"the rule '{ir.format_expr(cond)}'"
            hint = (f"put it in a rule for those parameters, e.g. 'rule ndim >= {rank + 1} {{ ... }}', and add a "
                    "rule for the others")
            for s in prog.states:
                if _state_rank(s.shape) > rank:
                    raise SpecError(f"state '{s.name}' is declared ': {s.shape}', which needs parameters of "
                                    f"rank {_state_rank(s.shape)} or more, but {who} takes parameters of rank {rank}",
                                    s.span, hint=hint)
            for eq in prog.eqns:
                for need, op, span in _needs(eq.expr):
                    if need > rank:
                        works = "an axis of that number" if op in AXIS_FUNCTIONS else "the last two axes"
                        raise SpecError(f"{op}() needs parameters of rank {need} or more (it works on {works}), "
                                        f"but {who} takes parameters of rank {rank}", span or eq.span,
                                        hint=hint)


# A rule's condition as a truth value over the ranks: 0 and 1 fix nrows (and ndim) as _takes does; 2 fixes
# ndim alone; every rank from 3 on is one case, ndim = 3 + k for a whole k >= 0, decided by SymPy's relations.
_RELATIONS = {"lt": sp.Lt, "le": sp.Le, "gt": sp.Gt, "ge": sp.Ge, "eq": sp.Eq, "ne": sp.Ne, "land": sp.And,
              "lor": sp.Or}
_RANK_CASES = ("0", "1", "2", "3 or more")


def _holds(cond: ir.Expr | None, case: str, hypers) -> bool | None:
    """Whether a rule's condition holds for every parameter of these ranks (True), for none (False),
    or depends on more than the rank (None)."""
    if cond is None:
        return True
    positive = {n: sp.Symbol(n, positive=True) for n in ("nrows", "ncols", "numel", "nunits")}
    env = {h.name: sp.Symbol(h.name) for h in hypers} | {n: sp.Symbol(n, positive=True) for n in ir.AXIS_SIZES}
    if case in ("0", "1"):
        rank = int(case)
        env.update(positive, ndim=sp.Integer(rank), nrows=sp.Integer(1))
        if rank == 0:
            env.update(ncols=sp.Integer(1), numel=sp.Integer(1), nunits=sp.Integer(1))
    else:
        k = sp.Symbol("k", integer=True, nonnegative=True)
        env.update(positive, ndim=sp.Integer(2) if case == "2" else 3 + k)
    try:
        value = to_sympy(cond, env)
        value = value.replace(lambda e: type(e).__name__ in _RELATIONS and isinstance(e, sp.Function),
                              lambda e: _RELATIONS[type(e).__name__](*e.args))
    except (TypeError, ValueError, SpecError):  # a comparison mixed into arithmetic: not decided here
        return None
    if value in (sp.true, sp.false):
        return value == sp.true
    if value.is_Number:
        return bool(value != 0)
    return None


def unreachable_refusals(rules: list[tuple[ir.Expr | None, ir.Program]], refusals=()) -> list[SpecWarning]:
    """A warning at each `rule COND refuse "why"` that can never apply: at every rank, either its condition
    does not hold or a rule above it (updating, or refusing) takes every such parameter already
    (`rule ndim >= 0 { ... }` above `rule ndim == 1 refuse`). `refusals`: lower.refusals' tuples."""
    out = []
    hypers = rules[0][1].hypers if rules else ()
    for j, (before, cond, _, span) in enumerate(refusals):
        above = [c for c, _ in rules[:before]] + [r[1] for r in refusals[:j]]
        taken_by = {}
        for case in _RANK_CASES:
            mine = _holds(cond, case, hypers)
            if mine is False:
                continue
            first = next((c for c in above if _holds(c, case, hypers) is True), "none")
            if first == "none":
                break
            taken_by[case] = first
        else:
            if not taken_by:
                why = "its condition holds for no parameter"
            else:
                firsts = list(dict.fromkeys(ir.format_expr(c) for c in taken_by.values() if c is not None))
                shown = " and ".join(f"'rule {c}'" for c in firsts)
                why = (f"{shown} above it {'takes' if len(firsts) == 1 else 'take'} every parameter it would refuse"
                       f" (rank {', '.join(taken_by)})")
            out.append(SpecWarning(f"this refusal never applies: {why}", span,
                                   hint="correct its condition, or remove it" if not taken_by else
                                   "put the 'refuse' rule above the rules that take those parameters, or remove it"))
    return out
