import math
import random

import pytest
import sympy as sp
from sympy.codegen.cfunctions import log1p

from optdsl import functions as fn
from optdsl.ranges import Interval, bound

INF = math.inf
b, t, v, eps, x, y, g, w = sp.symbols("b t v eps x y g w", real=True)
ENV = {b: Interval(0, 1, True, False), t: Interval(1, INF), v: Interval.nonneg(), eps: Interval(0, INF, False)}


def B(e, env=ENV):
    return bound(e, env)


def test_interval_basics():
    assert str(Interval(0, 1, True, False)) == "[0, 1)"
    assert str(Interval.full()) == "(-inf, inf)"
    assert str(Interval.point(2.5)) == "[2.5, 2.5]"
    assert Interval(-INF, 3, True, True).lo_closed is False  # an infinite end is always open
    assert Interval.unit() == Interval(0, 1) and Interval.nonneg() == Interval(0, INF)
    assert Interval(0, 1, True, False).hull(Interval(1, 2, False, True)) == Interval(0, 2)
    assert Interval(0, 1, False).positive and not Interval(0, 1).positive
    assert Interval(0, 1).nonnegative and not Interval(0, 1).nonzero
    assert Interval(-2, 0, True, False).negative and Interval(-2, 0, True, False).nonzero


def test_bias_correction():
    assert B(b**t) == Interval(0, 1, True, False)
    assert B(1 - b**t) == Interval(0, 1, False, True)
    assert B(1 - b**t).positive


def test_one_minus_beta():
    assert B(1 - b).positive
    closed = B(1 - b, {b: Interval.unit()})
    assert closed.nonnegative and not closed.positive


def test_sqrt_eps():
    assert B(sp.sqrt(v) + eps).positive
    assert B(sp.sqrt(v)).nonnegative and not B(sp.sqrt(v)).nonzero
    assert B(sp.sqrt(v / (1 - b**t)) + eps).positive
    assert B(1 / (sp.sqrt(v / (1 - b**t)) + eps)).positive
    assert B(v**sp.Rational(-1, 2)) == Interval.full()  # a pole at v = 0


def test_powers():
    assert B(x**2).nonnegative and B(x**4) == Interval.nonneg()
    assert B(x**-1, {x: Interval(0, INF, False)}).positive
    assert B(x**-1) == Interval.full()
    assert B(x**3, {x: Interval(-2, 1, False, True)}) == Interval(-8, 1, False, True)
    assert B(x**-2, {x: Interval(-INF, 0, False, False)}) == Interval(0, INF, False)
    assert B(x**0) == Interval.point(1)
    assert B(x**y, {x: Interval(-1, 1)}) == Interval.full()  # not real for a negative base


def test_lerp_where():
    assert B(fn.lerp(v, g**2, 1 - b)).nonnegative
    assert B(fn.lerp(1, 3, w), {w: Interval.unit()}) == Interval(1, 3)
    assert B(fn.lerp(1, 3, w), {w: Interval(0, 2)}) == Interval(1, 5)
    assert B(fn.where(x, v, 2)) == Interval.nonneg()


def test_comparisons():
    assert B(fn.lt(x, y)) == Interval.unit()
    assert B(fn.lt(b, 1)) == Interval.point(1)
    assert B(fn.ge(b, 1)) == Interval.point(0)
    assert B(fn.le(t, 1)) == Interval.unit()
    assert B(fn.gt(t, 0)) == Interval.point(1)
    assert B(fn.eq(b, 2)) == Interval.point(0) and B(fn.ne(b, 2)) == Interval.point(1)


def test_functions():
    assert B(fn.sigmoid(x)) == Interval(0, 1, False, False)
    assert B(fn.softplus(x)) == Interval(0, INF, False)
    assert B(sp.exp(x)) == Interval(0, INF, False) and B(sp.exp(v)).lo == 1
    assert B(sp.log(v)).lo == -INF and B(sp.log(1 + v)).nonnegative
    assert B(log1p(v)).nonnegative
    assert B(sp.tanh(x)) == Interval(-1, 1, False, False)
    assert B(sp.Abs(x - 3), {x: Interval(1, 4, False, True)}) == Interval(0, 2, True, False)
    assert B(sp.sign(v)) == Interval.unit() and B(sp.sign(eps)) == Interval.point(1)
    assert B(sp.atan2(y, x)).lo <= -math.pi and B(sp.atan2(v, x)).nonnegative
    assert B(sp.Min(v, b)) == Interval(0, 1, True, False)
    assert B(sp.Max(v, eps)).positive
    assert B(fn.norm(x)) == Interval.nonneg() and B(fn.rms(x - 3), {x: Interval(1, 2)}) == Interval(1, 2)
    assert B(fn.mean(b)) == B(b) and B(fn.amax(b)) == B(b)
    assert B(fn.sum(eps)).positive and B(fn.sum(v)) == Interval.nonneg() and B(fn.sum(x)) == Interval.full()
    assert B(sp.Function("mystery")(v)) == Interval.full()


def test_numbers_and_inf():
    assert B(sp.Integer(3)) == Interval.point(3) and B(sp.Rational(1, 4)) == Interval.point(0.25)
    third = B(sp.Rational(1, 3))
    assert third.lo < 1 / 3 < third.hi or third.lo == 1 / 3 or third.hi == 1 / 3
    assert math.pi in B(sp.pi) and math.e in B(sp.E)
    assert B(x - y) == Interval.full()  # inf - inf
    assert B(t - v) == Interval.full() and B(t + v) == Interval(1, INF)
    assert B(0 * x + 1) == Interval.point(1)
    huge = B(x**3, {x: Interval(1e200, 1e300)})  # overflow: the low end stays finite
    assert huge.lo == 1.7976931348623157e308 and huge.hi == INF and str(huge) == "[1.7976931348623157e+308, inf)"
    assert B(sp.exp(x), {x: Interval(800, 900)}).lo < INF


def test_fractional_power_of_negative_bounds_the_real_values():
    assert B(sp.sqrt(x), {x: Interval(-1, 4)}).lo == 0 and B(sp.sqrt(x), {x: Interval(-1, 4)}).hi >= 2
    assert B(sp.sqrt(x), {x: Interval(-2, -1)}) == Interval.full()


# ---- randomized soundness: sampled values lie in the computed interval ----
SYMS = sp.symbols("p q r", real=True)
NUMERIC = {
    "lerp": lambda a, c, k: a + k * (c - a), "where": lambda c, a, d: a if c != 0 else d,
    "sigmoid": lambda z: 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z)),
    "softplus": lambda z: z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z)),
    "lt": lambda a, c: float(a < c), "le": lambda a, c: float(a <= c), "gt": lambda a, c: float(a > c),
    "ge": lambda a, c: float(a >= c), "eq": lambda a, c: float(a == c), "ne": lambda a, c: float(a != c),
    "sign": lambda z: math.copysign(1.0, z) if z else 0.0, "log1p": math.log1p,
    "norm": abs, "rms": abs, "sum": lambda z: z, "mean": lambda z: z, "amax": lambda z: z,
}
UNARY = [sp.exp, sp.tanh, fn.sigmoid, fn.softplus, sp.Abs, sp.sign, sp.sqrt, sp.log, log1p,
         fn.norm, fn.rms, fn.sum, fn.mean, fn.amax, lambda e: e**2, lambda e: e**3, lambda e: 1 / e,
         lambda e: e**-2, lambda e: -e, lambda e: sp.Abs(e)**sp.Rational(3, 2)]
BINARY = [sp.Add, sp.Mul, lambda a, c: a - c, lambda a, c: a / c, sp.Min, sp.Max, sp.atan2,
          fn.lt, fn.le, fn.gt, fn.ge, fn.eq, fn.ne, lambda a, c: sp.Abs(a) ** c]
TERNARY = [fn.lerp, fn.where, lambda a, c, k: fn.lerp(a, c, fn.sigmoid(k))]
ENDS = [-INF, -3, -1, -0.5, 0, 0.25, 1, 2, 5, INF]


def random_expr(rng, depth):
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(SYMS + (sp.Integer(rng.randint(-2, 3)), sp.Rational(1, 3), sp.pi))
    while True:
        arity = rng.choice([1, 1, 2, 2, 3])
        op = rng.choice({1: UNARY, 2: BINARY, 3: TERNARY}[arity])
        try:  # SymPy refuses some constant arguments (Min of lerp(pi, 1, 2), lt(0, nan))
            return op(*(random_expr(rng, depth - 1) for _ in range(arity)))
        except (ValueError, TypeError):
            pass


def random_interval(rng):
    lo, hi = sorted(rng.sample(ENDS, 2))
    return Interval(lo, hi, rng.random() < 0.6, rng.random() < 0.6)


def sample(rng, iv):
    lo = iv.lo if math.isfinite(iv.lo) else min(iv.hi, 0) - 20 * rng.random()
    hi = iv.hi if math.isfinite(iv.hi) else max(iv.lo, 0) + 20 * rng.random()
    r = rng.random()
    z = lo if r < 0.15 else hi if r < 0.3 else lo + (hi - lo) * rng.random()
    return z if z in iv else (lo + hi) / 2


def test_random_soundness():
    rng = random.Random(1234)
    checked = 0
    for _ in range(400):
        expr = random_expr(rng, 3)
        env = {s: random_interval(rng) for s in SYMS}
        iv = bound(expr, env)
        f = sp.lambdify(SYMS, expr, modules=[NUMERIC, "math"])
        for _ in range(30):
            point = [sample(rng, env[s]) for s in SYMS]
            try:
                val = f(*point)
            except (ValueError, ZeroDivisionError, OverflowError, TypeError, NameError):
                continue
            if isinstance(val, complex) or not math.isfinite(val):
                continue
            tol_lo, tol_hi = 1e-9 * abs(iv.lo) + 1e-12, 1e-9 * abs(iv.hi) + 1e-12
            assert iv.lo - tol_lo <= val <= iv.hi + tol_hi, (expr, env, point, val, str(iv))
            checked += 1
    assert checked > 3000


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
