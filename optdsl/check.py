"""Checks on the IR with SymPy: denominators that can be zero, sqrt/log of values that can be negative.

Hyperparameters range over their declared intervals, `t` over 1, 2, ...; a
state's range is proven by induction over steps: start from its initial value,
run one step assuming the range so far, widen until nothing changes.
"""
from __future__ import annotations

import sympy as sp

from . import ir
from .errors import SpecError, SpecWarning
from .ranges import Interval, bound
from .sym import to_sympy

_FULL = Interval(float("-inf"), float("inf"), False, False)
_ROUNDS = 4


def _hyper_interval(h: ir.Hyper) -> Interval:
    return Interval(h.lo, h.hi, h.lo_closed and h.lo > float("-inf"), h.hi_closed and h.hi < float("inf"))


def _widen(old: Interval, new: Interval) -> Interval:
    """Keep an end that held still, drop one that moved: the induction then ends."""
    lo_same = (new.lo, new.lo_closed) == (old.lo, old.lo_closed) or new.lo > old.lo or (
        new.lo == old.lo and not new.lo_closed)
    hi_same = (new.hi, new.hi_closed) == (old.hi, old.hi_closed) or new.hi < old.hi or (
        new.hi == old.hi and not new.hi_closed)
    return Interval(old.lo if lo_same else float("-inf"), old.hi if hi_same else float("inf"),
                    old.lo_closed if lo_same else False, old.hi_closed if hi_same else False)


class _Ranges:
    def __init__(self, prog: ir.Program):
        self.prog = prog
        self.symbols = {name: sp.Symbol(name) for name in
                        [h.name for h in prog.hypers] + ["t", "loss", "p0", "g0", *ir.SHAPE_BUILTINS]
                        + [e.out for e in prog.eqns] + list(prog.inputs)}
        self.env: dict[sp.Symbol, Interval] = {self.symbols[h.name]: _hyper_interval(h) for h in prog.hypers}
        self.env[self.symbols["t"]] = Interval(1.0, float("inf"), True, False)
        for name in ir.SHAPE_BUILTINS:  # ndim >= 0; numel, nrows, ncols >= 1
            self.env[self.symbols[name]] = Interval(0.0 if name == "ndim" else 1.0, float("inf"), True, False)
        for name in ("loss", "p0", "g0"):
            self.env[self.symbols[name]] = _FULL

    def of(self, e: ir.Expr) -> Interval:
        return bound(to_sympy(e, self.symbols), self.env)

    def run_step(self) -> None:
        for eq in self.prog.eqns:
            self.env[self.symbols[eq.out]] = self.of(eq.expr)

    def prove_states(self) -> None:
        last = dict(self.prog.outputs)
        init_env = {self.symbols["p0"]: _FULL}
        for s in self.prog.states:
            zero = Interval(0.0, 0.0, True, True)
            start = bound(to_sympy(s.init, self.symbols), {**self.env, **init_env}) if s.init else zero
            # an input holds whatever the training loop feeds it
            self.env[self.symbols[ir.ssa_name(s.name, 0)]] = _FULL if s.fed else start
        for round_ in range(_ROUNDS):
            self.run_step()
            changed = False
            for s in self.prog.states:
                sym0 = self.symbols[ir.ssa_name(s.name, 0)]
                old = self.env[sym0]
                new = old.hull(self.env[self.symbols[last[s.name]]])
                if new != old:
                    self.env[sym0] = _widen(old, new) if round_ > 0 else new
                    changed = True
            if not changed:
                return
        for s in self.prog.states:  # no fixed point in time: assume nothing
            self.env[self.symbols[ir.ssa_name(s.name, 0)]] = _FULL
        self.run_step()


def _walk(e: ir.Expr, guards: tuple[ir.Expr, ...] = ()):
    """Each operation in e, with the conditions that hold where its value is used: the first
    branch of where(cond, a, b) only matters where cond holds."""
    if isinstance(e, ir.Op):
        yield e, guards
        if e.op == "where":
            cond, a, b = e.args
            yield from _walk(cond, guards)
            yield from _walk(a, guards + (cond,))
            yield from _walk(b, guards)
        else:
            for a in e.args:
                yield from _walk(a, guards)


def _factors(e: ir.Expr) -> set[str]:
    if isinstance(e, ir.Op) and e.op == "*":
        return {f for a in e.args for f in _factors(a)}
    return {ir.format_expr(e)}


def _guarded_nonzero(den: ir.Expr, guards: tuple[ir.Expr, ...]) -> bool:
    """A guard compares den, or a product with den as a factor, strictly with 0 (w * r > 0, gn != 0)."""
    key = ir.format_expr(den)
    for g in guards:
        if isinstance(g, ir.Op) and g.op in ("gt", "lt", "ne"):
            for x, other in (g.args, g.args[::-1]):
                if _literal(other) == 0 and key in _factors(x):
                    return True
    return False


def check(prog: ir.Program) -> list[SpecWarning]:
    """Domain warnings for a lowered program; raises SpecError for a certain division by zero."""
    ranges = _Ranges(prog)
    ranges.prove_states()
    warnings = []
    names = ir.source_names(prog)
    for eq in prog.eqns:
        for op, guards in _walk(eq.expr):
            warnings += _check_op(op, ranges, names, guards)
    return warnings


def _literal(e: ir.Expr) -> float | None:
    """The value of a number as written, `-1` (a negated literal) included; None for anything else."""
    if isinstance(e, ir.Op) and e.op == "neg" and isinstance(e.args[0], ir.Const):
        return -e.args[0].value
    return e.value if isinstance(e, ir.Const) else None


def _check_op(op: ir.Op, ranges: _Ranges, names: dict[str, str], guards=()) -> list[SpecWarning]:
    out = []

    def format_expr(e):
        return ir.format_expr(e, names=names)

    def warn(arg, message, hint):
        out.append(SpecWarning(message.format(x=format_expr(arg), r=ranges.of(arg)), arg.span or op.span, hint))

    exponent = _literal(op.args[1]) if op.op == "^" else None
    if op.op == "/" or (exponent is not None and exponent < 0):
        den = op.args[1] if op.op == "/" else op.args[0]
        r = ranges.of(den)
        if r.lo == r.hi == 0:
            raise SpecError(f"division by zero: '{format_expr(den)}' is always 0", den.span or op.span,
                            hint="divide by a value that is not zero")
        if not r.nonzero and not _guarded_nonzero(den, guards):
            warn(den, "denominator '{x}' can be zero (it ranges over {r})",
                 "add a positive epsilon, e.g. '+ eps' with 'hyper eps = 1e-8 in (0, inf)', "
                 "or narrow the ranges of the hyperparameters it uses")
    elif op.op in ("sqrt", "log", "rsqrt", "log1p"):
        arg, r = op.args[0], ranges.of(op.args[0])
        need = {"sqrt": r.nonnegative, "rsqrt": r.positive, "log": r.positive,
                "log1p": r.lo > -1 or (r.lo == -1 and not r.lo_closed)}[op.op]
        if not need:
            what = {"sqrt": "negative", "rsqrt": "zero or negative", "log": "zero or negative",
                    "log1p": "-1 or less"}[op.op]
            warn(arg, f"{op.op}() of '{{x}}', which can be {what} (it ranges over {{r}})",
                 "guard the argument (e.g. max(x, 0) or + eps) or narrow the declared ranges")
    elif exponent is not None and not float(exponent).is_integer():
        if not ranges.of(op.args[0]).nonnegative:
            warn(op.args[0], "fractional power of '{x}', which can be negative (it ranges over {r})",
                 "raise a non-negative value, e.g. abs(x)^a")
    return out
