"""Host scalars follow IEEE 754, as the tensor paths do.

A scalar of hyperparameters, `t` and the parameter's shape is a Python float on the host, and
Python raises where IEEE 754 (and torch) gives inf or nan: `t / k` with k = 0, `x ** y` past
the largest float, `math.sqrt(-1)`, `math.log(0)`, `math.exp(1000)`. Hoisting makes that
reachable from a value the spec guards: `where(k > 0, t / k, 1)` computes `t / k` on the host
before the `where` picks. Each such operation the ranges of its operands (optdsl.ranges, from
the declared ranges) do not prove safe is wrapped in one of the functions below, which the host
printer writes as a helper with IEEE results; every other printer writes its plain meaning.
"""
from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import log1p

from . import ir
from .ranges import Interval, bound
from .rewrite import scalar_env


class _Guarded(sp.Function):
    """An operation whose host form needs IEEE semantics; `plain()` is what it means."""

    is_real = True
    helper = ""

    def plain(self) -> sp.Expr:
        raise NotImplementedError


class ieee_pow(_Guarded):  # x ** y, also 1 / x (y = -1) and sqrt (y = 1/2)
    nargs = 2
    helper = "_pow"

    def plain(self):
        return sp.Pow(*self.args)


class ieee_exp(_Guarded):
    nargs = 1
    helper = "_exp"

    def plain(self):
        return sp.exp(self.args[0])


class ieee_log(_Guarded):
    nargs = 1
    helper = "_log"

    def plain(self):
        return sp.log(self.args[0])


class ieee_log1p(_Guarded):
    nargs = 1
    helper = "_log1p"

    def plain(self):
        return log1p(self.args[0])


class ieee_mod(_Guarded):
    nargs = 2
    helper = "_fmod"

    def plain(self):
        return sp.Mod(*self.args)


GUARDED = (ieee_pow, ieee_exp, ieee_log, ieee_log1p, ieee_mod)

# Their Python forms, emitted into a generated module only where it calls them.
HELPERS = {
    "_pow": "def _pow(x, y):\n"
            "    try:\n"
            "        r = x ** y\n"
            "    except ZeroDivisionError:  # 0 to a negative power\n"
            "        return math.copysign(math.inf, x) if y % 2 == 1 else math.inf\n"
            "    except OverflowError:\n"
            "        return -math.inf if x < 0 and y % 2 == 1 else math.inf\n"
            "    return math.nan if isinstance(r, complex) else r",
    "_exp": "def _exp(x):\n    try:\n        return math.exp(x)\n    except OverflowError:\n        return math.inf",
    "_log": "def _log(x):\n    return math.log(x) if x > 0 else -math.inf if x == 0 else math.nan",
    "_log1p": "def _log1p(x):\n    return math.log1p(x) if x > -1 else -math.inf if x == -1 else math.nan",
    "_fmod": "def _fmod(x, y):\n    return math.fmod(x, y) if y != 0 and abs(x) != math.inf else math.nan",
}


def shape_env() -> dict[sp.Symbol, Interval]:
    """The parameter's shape as host numbers: any size, 0 included (a (3, 0) matrix)."""
    return {sp.Symbol(n): Interval(0.0, float("inf"), True, False) for n in ir.SIZES}


def _finite(iv: Interval) -> bool:
    return iv.lo > float("-inf") and iv.hi < float("inf")


class _Guard:
    def __init__(self, env: dict):
        self.env = env

    def safe(self, e: sp.Expr) -> bool:
        if isinstance(e, sp.Pow):
            base = bound(e.base, self.env)
            # printed as a division (which overflows to inf), math.sqrt, 1 / math.sqrt
            if e.exp == -1:
                return base.nonzero
            if e.exp == sp.S.Half:
                return base.nonnegative
            if e.exp == -sp.S.Half:
                return base.positive
            integer = e.exp.is_Integer
            return _finite(bound(e, self.env)) and (integer or base.nonnegative) and (
                not (e.exp.is_number and e.exp < 0) or base.nonzero)
        if isinstance(e, sp.exp):
            return _finite(bound(e, self.env))
        if isinstance(e, sp.log):
            return bound(e.args[0], self.env).positive
        if isinstance(e, log1p):
            return bound(1 + e.args[0], self.env).positive
        if isinstance(e, sp.Mod):
            return bound(e.args[1], self.env).nonzero and _finite(bound(e.args[0], self.env))
        return True

    def __call__(self, e: sp.Expr) -> sp.Expr:
        if e.is_Atom:
            return e
        new = e.func(*(self(a) for a in e.args)) if any(not a.is_Atom for a in e.args) else e
        if self.safe(e):
            return new
        wrap = {sp.Pow: ieee_pow, sp.exp: ieee_exp, sp.log: ieee_log, log1p: ieee_log1p, sp.Mod: ieee_mod}
        return wrap[type(e)](*new.args)


def guard(defs, prog: ir.Program, known: dict | None = None):
    """The host definitions (in order) with each operation not proven safe made IEEE's; `known`
    adds the intervals of earlier definitions. Returns (defs, the env with theirs added)."""
    env = {**scalar_env(prog), **shape_env(), **(known or {})}
    env[sp.Symbol("t")] = Interval(1.0, 2.0**53)  # a count in a float64: finite
    env.setdefault(sp.Symbol("loss"), Interval(float("-inf"), float("inf"), False, False))
    out = []
    for d in defs:
        expr = _Guard(env)(d.expr)
        env[d.symbol] = bound(d.expr, env)
        out.append(type(d)(d.symbol, d.level, expr))
    return out, env


def plain(e: sp.Expr) -> sp.Expr:
    """The expression with its IEEE wrappers taken off (for the printers that compute on tensors)."""
    return e.replace(lambda x: isinstance(x, _Guarded), lambda x: x.plain())
