"""Interval analysis over SymPy expressions, from the declared ranges of hyperparameters.

`bound(expr, env)` over-approximates the set of real values of `expr` when each symbol
ranges over its interval in `env`; it is used to prove that a denominator is never zero or
that a sqrt/log argument is never negative, which SymPy's assumptions cannot express for
bounded ranges like b1 in [0, 1). Ends are tracked as open or closed (a value reached only
as a limit at an open end is open), and finite ends are rounded outward, so a claim such as
`positive` holds for exact real arithmetic (not for float32 saturation or underflow).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Mapping

import sympy as sp
from sympy.codegen.cfunctions import log1p

from optdsl import functions as fn

INF = math.inf


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float
    lo_closed: bool = True
    hi_closed: bool = True

    def __post_init__(self):  # an infinite end is always open
        object.__setattr__(self, "lo_closed", self.lo_closed and math.isfinite(self.lo))
        object.__setattr__(self, "hi_closed", self.hi_closed and math.isfinite(self.hi))

    @staticmethod
    def point(x: float) -> Interval:
        return Interval(x, x)

    @staticmethod
    def full() -> Interval:
        return Interval(-INF, INF)

    @staticmethod
    def nonneg() -> Interval:
        return Interval(0.0, INF)

    @staticmethod
    def unit() -> Interval:
        return Interval(0.0, 1.0)

    def hull(self, other: Interval) -> Interval:
        return _pick(min, [(self.lo, self.lo_closed), (other.lo, other.lo_closed)],
                     max, [(self.hi, self.hi_closed), (other.hi, other.hi_closed)])

    @property
    def positive(self) -> bool:
        return self.lo > 0 or (self.lo == 0 and not self.lo_closed)

    @property
    def negative(self) -> bool:
        return self.hi < 0 or (self.hi == 0 and not self.hi_closed)

    @property
    def nonnegative(self) -> bool:
        return self.lo >= 0

    @property
    def nonzero(self) -> bool:
        return self.positive or self.negative

    def __contains__(self, x: float) -> bool:
        return (self.lo < x or (self.lo_closed and x == self.lo)) and (x < self.hi or (self.hi_closed and x == self.hi))

    def __str__(self) -> str:
        num = lambda x: str(int(x)) if abs(x) < 1e16 and x == int(x) else repr(x)  # noqa: E731
        return f"{'[' if self.lo_closed else '('}{num(self.lo)}, {num(self.hi)}{']' if self.hi_closed else ')'}"


FULL = Interval.full()
Env = Mapping[sp.Symbol, Interval]


def _make(lo: float, hi: float, lo_closed: bool, hi_closed: bool) -> Interval:
    return FULL if math.isnan(lo) or math.isnan(hi) else Interval(lo, hi, lo_closed, hi_closed)


def _pick(lo_of, los, hi_of, his) -> Interval:
    """The interval from candidate (value, attained) ends: an end is closed if any candidate there is."""
    lo, hi = lo_of(v for v, _ in los), hi_of(v for v, _ in his)
    return _make(lo, hi, any(c for v, c in los if v == lo), any(c for v, c in his if v == hi))


def _meet(a: Interval, b: Interval) -> Interval:
    lo = max((a.lo, not a.lo_closed), (b.lo, not b.lo_closed))
    hi = min((a.hi, a.hi_closed), (b.hi, b.hi_closed))
    return _make(lo[0], hi[0], not lo[1], hi[1])


# ---- outward-rounded scalar arithmetic on extended floats ----
def _round(q: Fraction, up: bool) -> float:
    """The float nearest the exact value q on the side `up` (above) or below."""
    try:
        f = float(q)
    except OverflowError:
        f = INF if q > 0 else -INF
    if math.isinf(f):
        return f if (f > 0) == up else math.copysign(1.7976931348623157e308, f)
    d = Fraction(f) - q
    return math.nextafter(f, INF) if up and d < 0 else math.nextafter(f, -INF) if not up and d > 0 else f


def _add(x: float, y: float, up: bool) -> float:
    return x + y if math.isinf(x) or math.isinf(y) else _round(Fraction(x) + Fraction(y), up)


def _mul(x: float, y: float, up: bool) -> float:  # 0 * inf = 0: an exact zero times a limit
    if x == 0 or y == 0:
        return 0.0
    return x * y if math.isinf(x) or math.isinf(y) else _round(Fraction(x) * Fraction(y), up)


def _pow1(x: float, y: float, up: bool) -> float:
    """x**y for x >= 0 as a limit at extended ends (0**0 = inf**0 = 1**inf = 1 as values)."""
    if x == 0:
        return 0.0 if y > 0 else INF if y < 0 else 1.0
    if x == 1 or y == 0:
        return 1.0
    if math.isinf(x) or math.isinf(y):
        return INF if (y > 0) == (x > 1) else 0.0
    if y == int(y) and abs(y) <= 64:
        return _round(Fraction(x) ** int(y), up)
    try:
        r = math.pow(x, y)
    except OverflowError:
        r = INF
    return r if math.isinf(r) and up else math.nextafter(r, INF if up else 0.0)


def _nudge(x: float, up: bool) -> float:  # two ulps outward for a libm result
    if math.isinf(x):
        return x if (x > 0) == up else math.copysign(1.7976931348623157e308, x)
    return math.nextafter(math.nextafter(x, INF if up else -INF), INF if up else -INF)


# ---- interval operations ----
def _add_iv(a: Interval, b: Interval) -> Interval:
    return _make(_add(a.lo, b.lo, False), _add(a.hi, b.hi, True),
                 a.lo_closed and b.lo_closed, a.hi_closed and b.hi_closed)


def _mul_iv(a: Interval, b: Interval) -> Interval:
    corners = [(x, xc, y, yc) for x, xc in ((a.lo, a.lo_closed), (a.hi, a.hi_closed))
               for y, yc in ((b.lo, b.lo_closed), (b.hi, b.hi_closed))]
    # a corner value is attained when both ends are, or when one is an attained 0
    att = [(xc and yc) or (x == 0 and xc) or (y == 0 and yc) for x, xc, y, yc in corners]
    return _pick(min, [(_mul(x, y, False), c) for (x, _, y, _), c in zip(corners, att)],
                 max, [(_mul(x, y, True), c) for (x, _, y, _), c in zip(corners, att)])


def _inv(a: Interval) -> Interval:
    if not a.nonzero:  # division by an interval that may contain 0
        return FULL
    pole = INF if a.positive else -INF
    r = lambda x, up: 0.0 if math.isinf(x) else pole if x == 0 else _round(1 / Fraction(x), up)  # noqa: E731
    return _make(r(a.hi, False), r(a.lo, True), a.hi_closed, a.lo_closed)


def _abs(a: Interval) -> Interval:
    if a.nonnegative:
        return a
    if a.hi <= 0:
        return Interval(-a.hi, -a.lo, a.hi_closed, a.lo_closed)
    return _pick(min, [(0.0, True)], max, [(-a.lo, a.lo_closed), (a.hi, a.hi_closed)])


def _powbox(x: Interval, y: Interval) -> Interval:
    """x**y for x >= 0: monotone in each argument, so extremes lie at (limits at) the corners."""
    cands = []
    for xe, xc, xo in ((x.lo, x.lo_closed, x.hi), (x.hi, x.hi_closed, x.lo)):
        for ye, yc, yo in ((y.lo, y.lo_closed, y.hi), (y.hi, y.hi_closed, y.lo)):
            lim = None  # indeterminate forms 0**0, inf**0, 1**(+-inf): all values between the limits
            if ye == 0 and xe in (0, INF) and yo != 0:
                lim = (0.0, 1.0) if (yo > 0) == (xe == 0) else (1.0, INF)
            elif xe == 1 and math.isinf(ye) and xo != 1:
                lim = (0.0, 1.0) if (xo < 1) == (ye > 0) else (1.0, INF)
            if lim:
                cands += [(lim[0], lim[0], False), (lim[1], lim[1], False)]
            else:
                cands.append((_pow1(xe, ye, False), _pow1(xe, ye, True), xc and yc))
    # values attained along a whole edge: 1**y = x**0 = 1, and 0**y = 0 for y > 0
    if (x.lo == 1 and x.lo_closed) or (x.hi == 1 and x.hi_closed) or (0 in y):
        cands.append((1.0, 1.0, True))
    if x.lo == 0 and x.lo_closed and y.hi > 0:
        cands.append((0.0, 0.0, True))
    return _pick(min, [(lo, c) for lo, _, c in cands], max, [(hi, c) for _, hi, c in cands])


def _ipow(a: Interval, n: int) -> Interval:
    if n == 0:
        return Interval.point(1.0)
    if n < 0:
        return _inv(_ipow(a, -n))
    if n % 2 == 0 or a.nonnegative:
        return _powbox(_abs(a), Interval.point(float(n)))
    odd = lambda v, up: -_pow1(-v, n, not up) if v < 0 else _pow1(v, n, up)  # noqa: E731
    return _make(odd(a.lo, False), odd(a.hi, True), a.lo_closed, a.hi_closed)


def _pow(e, env) -> Interval:
    base, ex = e.args
    if ex.is_Integer:
        return _ipow(bound(base, env), int(ex))
    b, y = bound(base, env), bound(ex, env)
    if not b.nonnegative:
        # x**y is NaN for x < 0, which the checks report at that argument; bound the real values.
        if b.hi < 0 or (b.hi == 0 and not b.hi_closed):
            return FULL
        b = _meet(b, Interval.nonneg())
    if 0 in b and y.lo < 0:  # a pole at x = 0
        return FULL
    return _powbox(b, y)


def _fold(op, e, env) -> Interval:
    out = bound(e.args[0], env)
    for arg in e.args[1:]:
        out = op(out, bound(arg, env))
    return out


# ---- rules for functions ----
def _mono(f: Callable[[float], float], codomain: Interval, exact=(), domain_lo=-INF):
    """An increasing function: map the ends (one ulp outward), keep within its codomain."""
    def rule(e, env):
        a = bound(e.args[0], env)
        if a.hi <= domain_lo:
            return FULL
        end = lambda x, up: f(x) if math.isinf(x) or x in exact else _nudge(f(x), up)  # noqa: E731
        lo = -INF if a.lo <= domain_lo else end(a.lo, False)
        return _meet(_make(lo, end(a.hi, True), a.lo_closed, a.hi_closed), codomain)
    return rule


def _safe(f: Callable[[float], float]) -> Callable[[float], float]:
    def g(x):
        try:
            return f(x)
        except OverflowError:
            return INF
    return g


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _softplus(x: float) -> float:
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def _sign(e, env) -> Interval:
    a = bound(e.args[0], env)
    lo = -1.0 if a.lo < 0 else 0.0 if 0 in a else 1.0
    hi = 1.0 if a.hi > 0 else 0.0 if 0 in a else -1.0
    return Interval(lo, hi)


def _atan2(e, env) -> Interval:
    y, pi = bound(e.args[0], env), math.nextafter(math.pi, INF)
    if bound(e.args[1], env).nonnegative:  # x >= 0: the right half-plane, |atan2| <= pi/2
        half = math.nextafter(math.pi / 2, INF)
        return Interval(-half if not y.nonnegative else 0.0, half if not y.negative else 0.0)
    if y.negative:
        return Interval(-pi, 0.0, True, False)
    return Interval(0.0, pi, not y.positive) if y.nonnegative else Interval(-pi, pi)


def _minmax(pick_min: bool):
    def rule(e, env):  # min: lo attained if any argument attains it, hi only if every argument there does
        args = [bound(a, env) for a in e.args]
        f = min if pick_min else max
        los, his = [a.lo for a in args], [a.hi for a in args]
        lo, hi = f(los), f(his)
        lc = [a.lo_closed for a in args if a.lo == lo]
        hc = [a.hi_closed for a in args if a.hi == hi]
        return _make(lo, hi, any(lc) if pick_min else all(lc), all(hc) if pick_min else any(hc))
    return rule


def _less(a: Interval, b: Interval) -> bool:  # every value of a < every value of b
    return a.hi < b.lo or (a.hi == b.lo and not (a.hi_closed and b.lo_closed))


def _le(a: Interval, b: Interval) -> bool:
    return a.hi <= b.lo


def _same_point(a: Interval, b: Interval) -> bool:
    return a.lo == a.hi == b.lo == b.hi and math.isfinite(a.lo)


def _compare(true: Callable, false: Callable):
    def rule(e, env):
        a, b = (bound(x, env) for x in e.args)
        return Interval.point(1.0) if true(a, b) else Interval.point(0.0) if false(a, b) else Interval.unit()
    return rule


def _given(r: Interval, x: sp.Expr, cond: sp.Expr) -> Interval:
    """r, the range of x, where `cond` holds: narrowed when cond compares x itself with a number
    (where(s > 0, s, 1) is never 0), or is a product of comparisons that all hold there."""
    if isinstance(cond, sp.Mul):
        for factor in cond.args:
            r = _given(r, x, factor)
        return r
    flipped = {fn.gt: fn.lt, fn.lt: fn.gt, fn.ge: fn.le, fn.le: fn.ge, fn.ne: fn.ne}
    if type(cond) not in flipped:
        return r
    kind, (left, right) = type(cond), cond.args
    if right == x and left.is_Number:
        kind, left, right = flipped[kind], right, left
    if left != x or not right.is_Number:
        return r
    c = float(right)
    if kind is fn.ne:  # x != c: an end at c is open
        return Interval(r.lo, r.hi, r.lo_closed and r.lo != c, r.hi_closed and r.hi != c)
    if kind in (fn.gt, fn.ge) and c >= r.lo:  # x > c: the low end moves up to c
        return Interval(c, r.hi, kind is fn.ge and c in r, r.hi_closed) if c <= r.hi else r
    if kind in (fn.lt, fn.le) and c <= r.hi:
        return Interval(r.lo, c, r.lo_closed, kind is fn.le and c in r) if c >= r.lo else r
    return r


def _sum(e, env) -> Interval:
    a = bound(e.args[0], env)
    return Interval(0.0, INF, not a.positive) if a.nonnegative else \
        Interval(-INF, 0.0, True, not a.negative) if a.hi <= 0 else FULL


def _lerp(e, env) -> Interval:
    a, b, w = e.args
    wb = bound(w, env)
    if wb.lo >= 0 and wb.hi <= 1:  # a convex combination
        return bound(a, env).hull(bound(b, env))
    return bound(a + w * (b - a), env)


def _bfloat16(e, env) -> Interval:
    """Rounding to bfloat16 moves a value by at most 2^-8 of itself and keeps its sign; one below
    bfloat16's smallest normal (~1e-38) may round to 0."""
    a = bound(e.args[0], env)

    def end(v: float, up: bool) -> float:
        if not math.isfinite(v) or v == 0:
            return v
        if abs(v) < 1e-37:
            return max(v, 0.0) if up else min(v, 0.0)
        return v * (1 + 2.0 ** -8) if (v > 0) == up else v * (1 - 2.0 ** -8)
    return Interval(end(a.lo, False), end(a.hi, True))


RULES: dict[type, Callable[[sp.Expr, Env], Interval]] = {
    sp.Add: lambda e, env: _fold(_add_iv, e, env),
    sp.Mul: lambda e, env: _fold(_mul_iv, e, env),
    sp.Pow: _pow,
    sp.exp: _mono(_safe(math.exp), Interval(0.0, INF, False), exact=(0.0,)),
    sp.log: _mono(math.log, FULL, exact=(1.0,), domain_lo=0.0),
    log1p: _mono(math.log1p, FULL, exact=(0.0,), domain_lo=-1.0),
    sp.cos: lambda e, env: Interval(-1.0, 1.0, True, True),
    sp.sin: lambda e, env: Interval(-1.0, 1.0, True, True),
    sp.tanh: _mono(math.tanh, Interval(-1.0, 1.0, False, False), exact=(0.0,)),
    fn.sigmoid: _mono(_sigmoid, Interval(0.0, 1.0, False, False), exact=(0.0,)),
    fn.softplus: _mono(_safe(_softplus), Interval(0.0, INF, False)),
    sp.Abs: lambda e, env: _abs(bound(e.args[0], env)),
    sp.sign: _sign,
    sp.atan2: _atan2,
    sp.Min: _minmax(True),
    sp.Max: _minmax(False),
    fn.lerp: _lerp,
    fn.bfloat16: _bfloat16,
    fn.where: lambda e, env: _given(bound(e.args[1], env), e.args[1], e.args[0]).hull(bound(e.args[2], env)),
    fn.lt: _compare(_less, lambda a, b: _le(b, a)),
    fn.le: _compare(_le, lambda a, b: _less(b, a)),
    fn.gt: _compare(lambda a, b: _less(b, a), _le),
    fn.ge: _compare(lambda a, b: _le(b, a), _less),
    fn.eq: _compare(_same_point, lambda a, b: _less(a, b) or _less(b, a)),
    fn.ne: _compare(lambda a, b: _less(a, b) or _less(b, a), _same_point),
    fn.norm: lambda e, env: Interval.nonneg(),
    fn.rms: lambda e, env: _abs(bound(e.args[0], env)),
    fn.mean: lambda e, env: bound(e.args[0], env),
    fn.amax: lambda e, env: bound(e.args[0], env),
    fn.sum: _sum,
    # axis reductions: a mean or a max lies within its operand's range, a norm is >= 0
    **{f: (lambda e, env: bound(e.args[0], env)) for f in (fn.row_mean, fn.col_mean, fn.row_max, fn.col_max,
                                                          fn.unit_mean)},
    fn.row_sum: _sum, fn.col_sum: _sum, fn.axis_sum: _sum,
    fn.unit_norm: lambda e, env: Interval.nonneg(),
    # matrix work: a transpose keeps the entries, a product of non-negative matrices is one (its
    # size is not known here, so no other bound), an orthonormal basis's entries lie in [-1, 1],
    # a permutation matrix's are 0 or 1
    fn.T: lambda e, env: bound(e.args[0], env),
    fn.mm: lambda e, env: Interval.nonneg() if all(bound(a, env).nonnegative for a in e.args) else FULL,
    fn.eigvecs: lambda e, env: Interval(-1.0, 1.0, True, True),
    fn.qr: lambda e, env: Interval(-1.0, 1.0, True, True),
    fn.sortperm: lambda e, env: Interval(0.0, 1.0, True, True),
    fn.triu: lambda e, env: bound(e.args[0], env).hull(Interval.point(0.0)),
    fn.rsolve_triu: lambda e, env: FULL,
    fn.mm_axis: lambda e, env: Interval.nonneg() if all(bound(a, env).nonnegative for a in e.args[:2]) else FULL,
    fn.rsolve_triu_axis: lambda e, env: FULL,
    fn.norm_lb: lambda e, env: Interval.nonneg(),
    # a state list's factor work (optdsl/axes.py): as the matrix work it stands for, on a diagonal factor its diagonal's
    fn.factor_T: lambda e, env: bound(e.args[0], env),
    fn.factor_triu: lambda e, env: bound(e.args[0], env).hull(Interval.point(0.0)),
    fn.factor_mm: lambda e, env: Interval.nonneg() if all(bound(a, env).nonnegative for a in e.args) else FULL,
    fn.factor_norm_lb: lambda e, env: Interval.nonneg(),
    fn.randn: lambda e, env: Interval.full(),
    fn.rand: lambda e, env: Interval(0.0, 1.0, True, False),
}


# The cases rebuild and expand the whole expression, and bound() asks them again of every sum and
# product below it that holds the sign: a sign and a max in each of 64 statements took 9 s. An update
# written with one is small: Yogi's v - k*sign(v - g^2)*g^2 is 16 nodes.
SIGN_CASES_SIZE = 20


def _sign_cases(expr: sp.Expr, env: Env) -> Interval | None:
    """Bound an expression holding sign(x - y) case by case: where the sign is 1, -1 or 0, and in
    each case also with x written as y + d, d of that sign, so that the relation the sign states
    is kept. Yogi's v - k*sign(v - g^2)*g^2 stays >= 0 for v >= 0 and k in [0, 1]: where v > g^2
    it is d + (1 - k)*g^2, elsewhere v + k*g^2 or v. None when expr has no such sign."""
    if fn.tree_size(expr) > SIGN_CASES_SIZE:
        return None
    signs = sorted((s for s in expr.atoms(sp.sign) if not s.args[0].is_Symbol), key=sp.default_sort_key)
    if not signs or len(signs) > 2:  # cases multiply: 3 per sign, each bounded in up to 3 forms
        return None
    arg = signs[0].args[0]
    d = sp.Dummy("d")
    linear = [v for v in sorted(arg.free_symbols, key=sp.default_sort_key) if sp.diff(arg, v) in (1, -1)
              and v not in sp.diff(arg, v).free_symbols]
    out = None
    for value, sign_range in ((1, Interval(0.0, INF, False)), (-1, Interval(-INF, 0.0, True, False)),
                              (0, Interval.point(0.0))):
        case = fn.xreplace(expr, {signs[0]: sp.Integer(value)})  # (subs, but each Min/Max made once)
        found = bound(case, env)
        for v in linear[:2]:  # x = y + d: the case's relation between x and y, in d alone
            # arg is c*v + rest with c = +-1 (its derivative), so arg = d at v + (d - arg) / c: what
            # sp.solve found, at 8 ms a call (it simplifies), asked 3 times per sign per bound
            solved = v + (d - arg) / sp.diff(arg, v)
            form = sp.expand(fn.xreplace(case, {v: solved}))
            others = sorted(form.free_symbols - {d}, key=sp.default_sort_key)
            found = _meet(found, bound(sp.collect(form, others), {**env, d: sign_range}))
        out = found if out is None else out.hull(found)
    return out


def bound(expr: sp.Expr, env: Env) -> Interval:
    """A sound over-approximation of the values of `expr` (a symbol missing from env is (-inf, inf))."""
    expr = sp.sympify(expr)
    if isinstance(expr, (sp.Add, sp.Mul)) and expr.has(sp.sign):
        cases = _sign_cases(expr, env)
        if cases is not None:
            return _meet(_bound(expr, env), cases)
    return _bound(expr, env)


def _bound(expr: sp.Expr, env: Env) -> Interval:
    expr = sp.sympify(expr)
    if expr.is_Symbol:
        return env.get(expr, FULL)
    if expr in (sp.oo, -sp.oo, sp.zoo, sp.nan):
        # Intervals hold finite reals (an infinite end is open): a constant inf (1e400) is none of
        # them, and the point (inf, inf) proved 1 / (inf - x) positive where it is 0, so the host
        # divided by it unguarded (fuzz seed 4779: ZeroDivisionError at step). Nothing is known.
        return FULL
    if expr.is_Rational or expr.is_Float:
        q = sp.Rational(expr)
        q = Fraction(int(q.p), int(q.q))
        return Interval(_round(q, False), _round(q, True))
    if expr.is_NumberSymbol:  # pi, E, ...: the float is within one ulp
        return Interval(_nudge(float(expr), False), _nudge(float(expr), True))
    rule = RULES.get(type(expr))
    return rule(expr, env) if rule else FULL
