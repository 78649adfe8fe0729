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
from .errors import SpecError
from .functions import TABLE
from .sym import to_sympy

_STATE_RANK = {"rows": 1, "cols": 2, "gram_rows": 2, "gram_cols": 2}


def _state_rank(kind: str) -> int:
    return 2 if ir.matrix_dims(kind) else _STATE_RANK.get(kind, 0)


def _needs(e: ir.Expr):
    """(rank, op, span) for each operation in e that needs parameters of that rank or more."""
    if isinstance(e, ir.Op):
        row = TABLE.get(e.op)
        if row is not None and (row.matrix or row.axis == "-2"):
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
    for rank in (1, 0):  # the larger rank first: a vector, the likelier parameter
        for i, (cond, prog) in enumerate(rules):
            earlier = [_takes(c, rank, prog.hypers) for c in [c for c, _ in rules[:i]]
                       + [c for before, c, *_ in refusals if before <= i]]
            if any(t is True for t in earlier) or cond is None or _takes(cond, rank, prog.hypers) is not True:
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
                        raise SpecError(f"{op}() needs parameters of rank {need} or more (it works on the last "
                                        f"two axes), but {who} takes parameters of rank {rank}", span or eq.span,
                                        hint=hint)
