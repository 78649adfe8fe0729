"""Property tests for faithful lowering: random valid specs, and random bad specs.

1. `random_specs` builds valid spec text from a small random grammar (hyperparameters with
   defaults and ranges, states with and without initial values, locals, `g` rebinding, every
   core operator, element-wise function and reduction) together with an independent numeric
   *oracle*: the meaning LANGUAGE.md gives the text, written directly in NumPy while the text
   is built (precedence and associativity included). Each example is compiled, stepped once or
   twice on one or two float64 tensors (the second may miss a gradient on the first step, so
   their step counts differ) on both generated paths, and checked after each update against

   * the SymPy meaning of the compiled program (`optdsl.sym.meanings`, after
     `functions.meaning`, lambdified with NumPy twins of the custom functions; a reduction
     reduces its argument over the whole tensor), to 1e-9 relative -- the back end;
   * the oracle, to 1e-9 relative -- the front end (parser, lowering, SymPy meaning);
   * the other generated path, bitwise.

   An example whose oracle passes within a hair of a discontinuity (a comparison, `sign`, a
   `where` condition that is nearly but not exactly 0) is discarded: there the two sides may
   round to different branches and neither is wrong.

2. The compiler raises nothing but SpecError (with `file:line:col`) on bad text:
   well-formed specs with one semantic mistake inserted at a known place (the error must
   point exactly there), token-level mutations of the real and of random specs, token soup
   shaped like statements, random text over the language's characters, and very deep
   expressions. (tests/test_errors.py fuzzes characters; this file fuzzes tokens and meanings.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import reduce as _reduce
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import optdsl
from optdsl import functions as F
from optdsl.errors import SpecError
from optdsl.ir import ssa_name
from optdsl.pipeline import compile_source
from optdsl.sym import meanings, to_sympy

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.opt"))
SPEC_TEXTS = [p.read_text(encoding="utf-8") for p in SPECS]
TOL = 1e-9
MARGIN = 1e-7  # relative distance to a discontinuity below which an example is discarded
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                      HealthCheck.data_too_large])

# =============================================================================================
# 1. Random valid specs with an independent oracle
# =============================================================================================
# Names chosen to collide with the generated code's own prefixes (k0, c0, r0, x0, tmp0, d0)
# and to have SSA forms with separators (m2 -> m2_0, acc_ -> acc__0).
CLASS_NAMES = ["X", "Opt", "My_Opt2"]
# Also names that the comprehensions of the multi-tensor path use for items (x0_, c0_, tmp0_),
# and b1 / c0 next to a local b / a state c, whose SSA versions are b1 and c0.
HYPER_NAMES = ["lr", "b1", "beta_2", "eps", "wd", "k0", "c0", "r0", "x0", "tmp0", "r0_", "c0_",
               "d0_", "tmp0_"]
STATE_NAMES = ["m", "v", "buf", "m2", "acc_", "k1", "x1", "tmp1", "s", "c", "k"]
# A local may take a name the generated code uses (it is renamed where it would clash).
LOCAL_NAMES = ["u", "d", "b", "mask", "k2", "c1", "x2", "tmp2", "r1", "s_", "d0", "torch", "math", "i", "param",
               "grads", "group", "self", "exact", "tl", "offsets", "x_", "y_", "t_", "super", "zip"]
NUMBERS = ["0.5", ".5", "2", "3", "1e-1", "0.25", "1.5", "0.9", "1", "0"]
# (range text or None, values it admits, used as defaults and as constructor arguments)
RANGES = [
    (None, [0.5, -1.0, 2.0, 0.0, 0.1]),
    ("[0, inf)", [0.0, 0.1, 0.5, 2.0]),
    ("(0, 1)", [0.1, 0.5, 0.9]),
    ("[0, 1)", [0.0, 0.3, 0.9]),
    ("[-1, 1]", [-1.0, -0.5, 0.0, 0.5, 1.0]),
    ("(-inf, inf)", [-2.0, 0.3, 1.0]),
    ("(0, 2]", [0.25, 1.0, 2.0]),
]
CMP_OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
           "==": np.equal, "!=": np.not_equal}

Env = dict  # name -> np.ndarray (p, g, states, tensor locals) or float; "__margin__" -> list


@dataclass(frozen=True)
class E:
    """An expression: its text, the precedence of its top (0 comparison .. 5 atom), its
    meaning per LANGUAGE.md as a NumPy function of the environment, whether it is a tensor,
    and the names it reads."""

    text: str
    prec: int
    fn: Callable[[Env], object]
    tensor: bool
    names: frozenset


def _num(text: str) -> E:
    v = float(text)
    return E(text, 5, lambda env: v, False, frozenset())


def _ref(name: str, tensor: bool) -> E:
    return E(name, 5, lambda env: env[name], tensor, frozenset({name}))


def _near(env: Env, x, scale) -> None:
    """Record how close a value is to a discontinuity at 0 (exact zeros are safe)."""
    x = np.abs(np.asarray(x, dtype=float))
    s = 1.0 + np.abs(np.asarray(scale, dtype=float))
    x, s = np.broadcast_arrays(x, s)
    hit = x > 0
    if hit.any():
        env["__margin__"].append(float((x[hit] / s[hit]).min()))


def _wrap(e: E, prec: int) -> str:
    return e.text if e.prec >= prec else f"({e.text})"


@dataclass
class Ctx:
    tensors: list[str]
    scalars: list[str]


def _leaf(draw, ctx: Ctx, tensor) -> E:
    if tensor is True and not ctx.tensors:  # p, g and the states all hold scalars by now
        tensor = None
    groups = []  # a tensor name, a scalar name (hyperparameter, t, loss, scalar local) or a number
    if tensor is not False and ctx.tensors:
        groups += [("t", ctx.tensors)] * 2
    if tensor is not True:
        groups += [("s", ctx.scalars)] * bool(ctx.scalars) + [("n", NUMBERS)]
    kind, names = draw(st.sampled_from(groups))
    name = draw(st.sampled_from(names))
    return _num(name) if kind == "n" else _ref(name, kind == "t")


def _args(draw, ctx, depth, tensor, n) -> list[E]:
    if tensor is True:
        k = draw(st.integers(0, n - 1))
        return [_gen(draw, ctx, depth, True if i == k else None) for i in range(n)]
    return [_gen(draw, ctx, depth, tensor) for _ in range(n)]


def _mk(text, prec, fn, args, extra_tensor=False) -> E:
    return E(text, prec, fn, extra_tensor or any(a.tensor for a in args),
             frozenset().union(*(a.names for a in args)))


def _unary(name, fn):
    """name(x) and its meaning."""
    def build(draw, ctx, depth, tensor):
        (x,) = _args(draw, ctx, depth, tensor, 1)
        return _mk(f"{name}({x.text})", 5, lambda env: fn(x.fn(env)), [x])
    return build


def _guarded(template, fn):
    """A function of a tamed argument: template has {x}; fn gets x's value."""
    def build(draw, ctx, depth, tensor):
        (x,) = _args(draw, ctx, depth, tensor, 1)
        return _mk(template.format(x=x.text), 5, lambda env: fn(x.fn(env)), [x])
    return build


def _b_add(op):
    def build(draw, ctx, depth, tensor):
        a, b = _args(draw, ctx, depth, tensor, 2)
        f = (lambda env: a.fn(env) + b.fn(env)) if op == "+" else (lambda env: a.fn(env) - b.fn(env))
        return _mk(f"{_wrap(a, 1)} {op} {_wrap(b, 2)}", 1, f, [a, b])
    return build


def _b_mul(draw, ctx, depth, tensor):
    a, b = _args(draw, ctx, depth, tensor, 2)
    return _mk(f"{_wrap(a, 2)} * {_wrap(b, 3)}", 2, lambda env: a.fn(env) * b.fn(env), [a, b])


def _b_div(draw, ctx, depth, tensor):
    a, b = _args(draw, ctx, depth, tensor, 2)
    return _mk(f"{_wrap(a, 2)} / (abs({b.text}) + 1)", 2, lambda env: a.fn(env) / (np.abs(b.fn(env)) + 1), [a, b])


def _b_neg(draw, ctx, depth, tensor):
    (x,) = _args(draw, ctx, depth, tensor, 1)
    return _mk(f"-{_wrap(x, 3)}", 3, lambda env: -x.fn(env), [x])


def _b_pow(draw, ctx, depth, tensor):
    variants = ["sq", "cube", "half", "inv", "rsqrt", "assoc", "base2", "texp"]
    if tensor is not True and "t" in ctx.scalars:
        variants.append("t")
    v = draw(st.sampled_from(variants))
    if v == "t":  # a scalar of the step count
        base = draw(st.sampled_from(["0.9", ".5", "2"]))
        b = float(base)
        return E(f"{base}^t", 4, lambda env: b ** env["t"], False, frozenset({"t"}))
    if v == "texp":
        x, y = _args(draw, ctx, depth, tensor, 2)
        return _mk(f"(abs({x.text}) + 0.5)^tanh({y.text})", 4,
                   lambda env: (np.abs(x.fn(env)) + 0.5) ** np.tanh(y.fn(env)), [x, y])
    (x,) = _args(draw, ctx, depth, tensor, 1)
    pos = f"(abs({x.text}) + 0.5)"
    table = {
        "sq": (f"{_wrap(x, 5)}^2", lambda env: x.fn(env) ** 2),
        "cube": (f"{_wrap(x, 5)}**3", lambda env: x.fn(env) ** 3),
        "half": (f"{pos}^0.5", lambda env: (np.abs(x.fn(env)) + 0.5) ** 0.5),
        "inv": (f"{pos}^-1", lambda env: (np.abs(x.fn(env)) + 0.5) ** -1.0),
        "rsqrt": (f"{pos} ** -0.5", lambda env: (np.abs(x.fn(env)) + 0.5) ** -0.5),
        "assoc": (f"{pos}^0.5^2", lambda env: (np.abs(x.fn(env)) + 0.5) ** 0.25),  # right associative
        "base2": (f"2^tanh({x.text})", lambda env: 2.0 ** np.tanh(x.fn(env))),
    }
    text, fn = table[v]
    return _mk(text, 4, fn, [x])


def _b_cmp(draw, ctx, depth, tensor):
    op = draw(st.sampled_from(sorted(CMP_OPS)))
    a, b = _args(draw, ctx, depth, tensor, 2)
    test = CMP_OPS[op]

    def fn(env):
        x, y = a.fn(env), b.fn(env)
        _near(env, np.asarray(x) - np.asarray(y), np.maximum(np.abs(x), np.abs(y)))
        return test(x, y).astype(float) if isinstance(test(x, y), np.ndarray) else float(test(x, y))
    return _mk(f"{_wrap(a, 1)} {op} {_wrap(b, 1)}", 0, fn, [a, b])


def _b_sign(draw, ctx, depth, tensor):
    (x,) = _args(draw, ctx, depth, tensor, 1)

    def fn(env):
        v = x.fn(env)
        _near(env, v, 0.0)
        return np.sign(v)
    return _mk(f"sign({x.text})", 5, fn, [x])


def _b_where(draw, ctx, depth, tensor):
    c = _b_cmp(draw, ctx, depth, None) if draw(st.booleans()) else _gen(draw, ctx, depth, None)
    a, b = _args(draw, ctx, depth, tensor, 2)

    def fn(env):
        cv = c.fn(env)
        _near(env, cv, 0.0)
        return np.where(np.asarray(cv) != 0, a.fn(env), b.fn(env))
    return _mk(f"where({c.text}, {a.text}, {b.text})", 5, fn, [c, a, b])


def _b_nary(name, fn_of):
    n = {"atan2": 2, "min": 2, "max": 2, "lerp": 3, "clamp": 3}[name]

    def build(draw, ctx, depth, tensor):
        args = _args(draw, ctx, depth, tensor, n)
        return _mk(f"{name}({', '.join(a.text for a in args)})", 5,
                   lambda env: fn_of(*(a.fn(env) for a in args)), args)
    return build


def _b_paren(draw, ctx, depth, tensor):
    x = _gen(draw, ctx, depth, tensor)
    return E(f"({x.text})", 5, x.fn, x.tensor, x.names)


REDUCE = {
    "norm": lambda x: np.sqrt(np.sum(np.square(x))),
    "sum": np.sum,
    "mean": np.mean,
    "rms": lambda x: np.sqrt(np.mean(np.square(x))),
    "amax": np.max,
}


def _b_reduce(draw, ctx, depth, tensor):
    name = draw(st.sampled_from(sorted(REDUCE)))
    x = _gen(draw, ctx, depth, True)
    f = REDUCE[name]
    # over the whole tensor: a scalar argument broadcasts to p's shape
    r = E(f"{name}({x.text})", 5, lambda env: float(f(np.broadcast_to(x.fn(env), env["__shape__"]))), False,
          x.names)
    if tensor is not True:
        return r
    y = _gen(draw, ctx, depth, True)  # a tensor wanted: scale one by the reduction
    return _mk(f"{_wrap(y, 2)} * {r.text}", 2, lambda env: y.fn(env) * r.fn(env), [y, r])


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


BUILDERS = {
    "add": _b_add("+"), "sub": _b_add("-"), "mul": _b_mul, "div": _b_div, "neg": _b_neg, "pow": _b_pow,
    "cmp": _b_cmp, "paren": _b_paren,
    "sqrt": _guarded("sqrt(abs({x}) + 0.5)", lambda v: np.sqrt(np.abs(v) + 0.5)),
    "rsqrt": _guarded("rsqrt(abs({x}) + 0.5)", lambda v: 1.0 / np.sqrt(np.abs(v) + 0.5)),
    "abs": _unary("abs", np.abs),
    "sign": _b_sign,
    "exp": _guarded("exp(tanh({x}))", lambda v: np.exp(np.tanh(v))),
    "log": _guarded("log(abs({x}) + 0.5)", lambda v: np.log(np.abs(v) + 0.5)),
    "log1p": _guarded("log1p(abs({x}))", lambda v: np.log1p(np.abs(v))),
    "tanh": _unary("tanh", np.tanh),
    "sigmoid": _unary("sigmoid", _sigmoid),
    "softplus": _unary("softplus", lambda v: np.logaddexp(0.0, v)),
    "square": _unary("square", np.square),
    "atan2": _b_nary("atan2", np.arctan2),
    "lerp": _b_nary("lerp", lambda a, b, w: a + w * (b - a)),
    "min": _b_nary("min", np.minimum),
    "max": _b_nary("max", np.maximum),
    "clamp": _b_nary("clamp", lambda x, lo, hi: np.minimum(np.maximum(x, lo), hi)),
    "where": _b_where,
    "reduce": _b_reduce,
}
KINDS = sorted(BUILDERS) + ["reduce"] * 4  # reductions often: one in six nodes


def _gen(draw, ctx: Ctx, depth: int, tensor=None) -> E:
    """An expression of at most `depth` levels; tensor True/False forces its kind."""
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        return _leaf(draw, ctx, tensor)
    kind = draw(st.sampled_from(KINDS))
    return BUILDERS[kind](draw, ctx, depth - 1, tensor)


@dataclass
class Spec:
    text: str
    name: str
    hypers: dict[str, float]          # value the optimizer runs with
    kwargs: dict[str, float]          # what the constructor is given
    states: list[str]
    inits: dict[str, E | None]
    body: list[tuple[str, str, E]]    # (target, op, expression)
    uses_loss: bool

    def oracle_init(self, p: np.ndarray) -> dict[str, np.ndarray]:
        env = {"p": p, **self.hypers, "__margin__": [], "__shape__": p.shape}
        return {s: np.broadcast_to(np.asarray(e.fn(env) if e else 0.0, dtype=float), p.shape).copy()
                for s, e in self.inits.items()}

    def oracle_step(self, env: Env) -> dict[str, np.ndarray]:
        env = dict(env)
        shape = env["p"].shape
        for target, op, e in self.body:
            v = e.fn(env)
            old = env.get(target)
            env[target] = {"=": lambda: v, "+=": lambda: old + v, "-=": lambda: old - v,
                           "*=": lambda: old * v, "/=": lambda: old / v}[op]()
        return {k: np.broadcast_to(np.asarray(env[k], dtype=float), shape) for k in ["p"] + self.states}


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)


@st.composite
def random_specs(draw) -> Spec:
    name = draw(st.sampled_from(CLASS_NAMES))
    hyper_names = draw(st.permutations(HYPER_NAMES))[:draw(st.integers(0, 3))]
    state_names = [n for n in draw(st.permutations(STATE_NAMES))  # (hyper c0 and state c: refused)
                   if n not in hyper_names and ssa_name(n, 0) not in hyper_names][:draw(st.integers(0, 2))]
    uses_loss = draw(st.integers(0, 3)) == 0

    hyper_items, values, kwargs = [], {}, {}
    for h in hyper_names:
        rng, admitted = draw(st.sampled_from(RANGES))
        default = draw(st.sampled_from(admitted))
        text = f"{h} = {_fmt(default)}" + (f" in {rng}" if rng else "")
        hyper_items.append(text)
        if draw(st.booleans()):
            kwargs[h] = draw(st.sampled_from(admitted))
        values[h] = kwargs.get(h, default)
    decls = []
    while hyper_items:  # one or more 'hyper' lines
        k = draw(st.integers(1, len(hyper_items)))
        decls.append("hyper " + ", ".join(hyper_items[:k]))
        hyper_items = hyper_items[k:]

    init_ctx = Ctx(["p"], list(hyper_names))
    inits: dict[str, E | None] = {}
    state_items = []
    for s in state_names:
        init = None
        if draw(st.booleans()):
            init = _ref("p", True) if draw(st.booleans()) else _gen(draw, init_ctx, draw(st.integers(0, 2)))
        inits[s] = init
        state_items.append(s + (f" = {init.text}" if init else ""))
    if state_items:
        if draw(st.booleans()):
            decls.append("state " + ", ".join(state_items))
        else:
            decls += [f"state {s}" for s in state_items]
    decls = draw(st.permutations(decls))

    ctx = Ctx(["p", "g", *state_names], [*hyper_names, "t"] + (["loss"] if uses_loss else []))
    locals_: list[str] = []
    body: list[tuple[str, str, E]] = []
    touched: set[str] = set()

    def set_kind(target, tensor):
        for lst in (ctx.tensors, ctx.scalars):
            if target in lst:
                lst.remove(target)
        (ctx.tensors if tensor else ctx.scalars).append(target)

    def statement(target, tensor=None):
        op = draw(st.sampled_from(["=", "=", "+=", "-=", "*=", "/="])) if (
            target in ("p", "g") or target in state_names or target in locals_) else "="
        depth = draw(st.integers(1, 3))
        if op == "/=":
            x = _gen(draw, ctx, depth, tensor)
            e = _mk(f"abs({x.text}) + 1", 1, lambda env: np.abs(x.fn(env)) + 1, [x])
        else:
            e = _gen(draw, ctx, depth, tensor)
        body.append((target, op, e))
        touched.update(e.names | {target})
        was_tensor = target in ctx.tensors
        set_kind(target, e.tensor or (op != "=" and was_tensor))
        if target not in ("p", "g") and target not in state_names and target not in locals_:
            locals_.append(target)

    for _ in range(draw(st.integers(1, 5))):
        kinds = ["local", "g", "p"] + (["state"] * 2 if state_names else []) + (["local_again"] if locals_ else [])
        kind = draw(st.sampled_from(kinds))
        # p, g and the states stay tensors, except now and then (a scalar broadcasts)
        keep = None if draw(st.integers(0, 9)) == 0 else True
        if kind == "local":
            fresh = [n for n in LOCAL_NAMES if n not in locals_]
            statement(draw(st.sampled_from(fresh)))
        elif kind == "local_again":
            statement(draw(st.sampled_from(locals_)))
        elif kind == "g":
            statement("g", keep)
        elif kind == "state":
            statement(draw(st.sampled_from(state_names)), keep)
        else:
            statement("p", keep)
    for s in state_names:
        if s not in touched:
            statement(s, True)
    if not any(t == "p" for t, _, _ in body):
        statement("p", True)

    header = f"optimizer {name}" + (' "a random spec; # not a comment"' if draw(st.booleans()) else "")
    lines = [header, *decls, *(f"{t} {op} {e.text}" for t, op, e in body)]
    if draw(st.booleans()):  # a comment, a blank line, ';' between two statements
        lines.insert(1, "# generated by test_properties")
        lines.insert(len(lines) - len(body), "")
    text = "\n".join(lines) + "\n"
    if len(body) >= 2 and draw(st.booleans()):
        text = text.replace(f"\n{body[-1][0]} {body[-1][1]} ", f"; {body[-1][0]} {body[-1][1]} ", 1) \
            if text.count(f"\n{body[-1][0]} {body[-1][1]} ") == 1 else text
    return Spec(text, name, values, kwargs, list(state_names), inits, body, uses_loss)


# ---- the SymPy meaning, lambdified ----
def _indicator(test):
    def f(a, b):
        r = test(a, b)
        return r.astype(float) if isinstance(r, np.ndarray) else float(r)
    return f


NAMESPACE = {
    "where": lambda c, a, b: np.where(np.asarray(c) != 0, a, b),
    "lt": _indicator(np.less), "le": _indicator(np.less_equal), "gt": _indicator(np.greater),
    "ge": _indicator(np.greater_equal), "eq": _indicator(np.equal), "ne": _indicator(np.not_equal),
    "sign": np.sign, "atan2": np.arctan2, "log1p": np.log1p, "reduce": _reduce,
}
_SHAPE = [()]  # p's shape while a Reference runs: a reduction reduces over the whole tensor, a scalar broadcasts
NAMESPACE.update({f"reduce_{name}": (lambda f: lambda x: f(np.broadcast_to(x, _SHAPE[0])))(f)
                  for name, f in REDUCE.items()})


def _lambdify(args, e: sp.Expr):
    """NumPy function of `args`; the reductions renamed (NumPy's printer owns the name `amax`)."""
    e = F.meaning(e).replace(lambda x: type(x) in F.REDUCTIONS,
                             lambda x: sp.Function(f"reduce_{type(x).__name__}")(*x.args))
    return sp.lambdify(args, e, modules=[NAMESPACE, "numpy"])


class Reference:
    """The SymPy meaning of a compiled program as NumPy functions of p, g, states, hypers, t, loss."""

    def __init__(self, program):
        syms, env, outputs = meanings(program)
        self.program = program
        self.states = [s.name for s in program.states]
        self.args = [sp.Symbol("p"), sp.Symbol("g"), *map(sp.Symbol, self.states),
                     *(sp.Symbol(h.name) for h in program.hypers), sp.Symbol("t"), sp.Symbol("loss")]
        self.outputs = {base: _lambdify(self.args, e) for base, e in outputs.items()}
        init_env = {h.name: sp.Symbol(h.name) for h in program.hypers} | {ssa_name("p", 0): sp.Symbol("p")}
        self.inits = {s.name: _lambdify(self.args, to_sympy(s.init, init_env)) if s.init is not None else None
                      for s in program.states}

    def _call(self, f, p, g, states, hypers, t, loss):
        args = [p, g, *(states[s] for s in self.states), *(hypers[h.name] for h in self.program.hypers), t, loss]
        _SHAPE[0] = p.shape
        with np.errstate(all="ignore"):
            return np.broadcast_to(np.asarray(f(*args), dtype=float), p.shape)

    def init(self, p, hypers):
        zero = {s: np.zeros_like(p) for s in self.states}
        return {s: (np.zeros_like(p) if f is None else self._call(f, p, p, zero, hypers, 1.0, 0.0).copy())
                for s, f in self.inits.items()}

    def step(self, p, g, states, hypers, t, loss):
        return {base: self._call(f, p, g, states, hypers, t, loss) for base, f in self.outputs.items()}


SHAPES = [(1,), (5,), (3, 4), (2, 1, 3)]
# Triton's interpreter runs the fused kernels on CPU (tests/conftest.py sets TRITON_INTERPRET=1)
FUSED = __import__("importlib").util.find_spec("triton") is not None and __import__("os").environ.get(
    "TRITON_INTERPRET") == "1"


def _close(actual: np.ndarray, expected: np.ndarray) -> tuple[bool, float]:
    err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    scale = 1.0 + float(np.max(np.abs(expected)))
    return err <= TOL * scale, err / scale


def _run(cls, spec: Spec, mode: dict, init, grads, losses):
    """Step the optimizer; return, per step, [(param index, before, after)] for updated params."""
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = cls(params, **mode, **spec.kwargs)
    history = []
    for step_grads, loss in zip(grads, losses):
        before = []
        for i, (p, gr) in enumerate(zip(params, step_grads)):
            p.grad = None if gr is None else gr.clone()
            st_ = opt.state[p]
            before.append((p.detach().clone(), {s: st_[s].clone() for s in spec.states} if st_ else None))
        opt.step(lambda: torch.tensor(loss, dtype=torch.float64))
        rows = []
        for i, p in enumerate(params):
            if step_grads[i] is None:
                continue
            after = (p.detach().clone(), {s: opt.state[p][s].clone() for s in spec.states},
                     opt.state[p]["step"].item())
            rows.append((i, before[i], after))
        history.append(rows)
    return history


@settings(max_examples=150, **SETTINGS)
@given(spec=random_specs(), shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=2),
       seed=st.integers(0, 2**16), skip_first=st.booleans(), steps=st.integers(1, 2))
def test_random_spec_matches_its_meaning(spec, shapes, seed, skip_first, steps):
    note(spec.text)
    try:
        compiled = compile_source(spec.text, "random.opt")
    except SpecError as err:  # the generator writes only valid specs
        raise AssertionError(f"a valid spec was refused:\n{spec.text}\n{err}") from None
    ref = Reference(compiled.program)
    cls = optdsl.compile(spec.text, "random.opt")

    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = []
    for step in range(steps):
        row = []
        for i, s in enumerate(shapes):
            gr = torch.randn(s, generator=gen, dtype=torch.float64) * (0.5 + i)
            gr[torch.rand(s, generator=gen) < 0.15] = 0.0  # exact zeros
            row.append(None if (skip_first and step == 0 and i == 1) else gr)  # this one's t lags
        grads.append(row)
    losses = [float(torch.randn((), generator=gen)) for _ in range(steps)]

    histories = {fe: _run(cls, spec, dict(foreach=fe), init, grads, losses) for fe in (False, True)}
    # The fused kernels (under the interpreter), near the foreach path: every core spec fuses. On a
    # third of the examples (the interpreter is slow).
    if FUSED and seed % 3 == 0:
        why = __import__(cls.__module__, fromlist=["fused_available"]).fused_available(init)
        assert not why, f"a core spec does not fuse ({why}):\n{spec.text}"
        fused = _run(cls, spec, dict(fused=True), init, grads, losses)
        for rows_fused, rows_fe in zip(fused, histories[True]):
            for (i, _, (p1, s1, _)), (_, _, (q1, r1, _)) in zip(rows_fused, rows_fe):
                for name, a, b in [("p", p1, q1)] + [(s, s1[s], r1[s]) for s in spec.states]:
                    ok, rel = _close(a.numpy(), b.numpy())
                    assert ok or not np.isfinite(b.numpy()).all(), (
                        f"the fused path differs from foreach on {name} (rel. error {rel:.3g})\n{spec.text}")
    seen_t: dict[int, int] = {}
    for step, (rows_loop, rows_fe) in enumerate(zip(histories[False], histories[True])):
        for (i, (p0, s0), (p1, s1, t)), (_, _, (q1, r1, _)) in zip(rows_loop, rows_fe):
            # the two generated paths agree bitwise
            assert torch.equal(p1, q1), f"foreach and for-loop paths differ on p\n{spec.text}"
            for s in spec.states:
                assert torch.equal(s1[s], r1[s]), f"foreach and for-loop paths differ on {s}\n{spec.text}"
            seen_t[i] = seen_t.get(i, 0) + 1
            assert t == seen_t[i]
            p_np, g_np = p0.numpy(), grads[step][i].numpy()
            if s0 is None:  # first update: the states start at their initial values
                ref_states = ref.init(p_np, spec.hypers)
                orc_states = spec.oracle_init(p_np)
            else:
                ref_states = orc_states = {s: v.numpy() for s, v in s0.items()}
            env = {"p": p_np, "g": g_np, **orc_states, **spec.hypers, "t": float(t), "loss": losses[step],
                   "__margin__": [], "__shape__": p_np.shape}
            with np.errstate(all="ignore"):
                oracle = spec.oracle_step(env)
            assume(all(np.isfinite(v).all() for v in oracle.values()))
            assume(min(env["__margin__"], default=1.0) > MARGIN)
            meaning = ref.step(p_np, g_np, ref_states, spec.hypers, float(t), losses[step])
            actual = {"p": p1.numpy(), **{s: s1[s].numpy() for s in spec.states}}
            for base in actual:
                ok, rel = _close(oracle[base], meaning[base])
                assert ok, (f"the SymPy meaning of {base} differs from the language's (rel. error {rel:.3g}), "
                            f"step {step + 1}, param {i}\n{spec.text}\nmeaning: {meaning[base]}\n"
                            f"oracle: {oracle[base]}")
                ok, rel = _close(actual[base], meaning[base])
                assert ok, (f"the generated optimizer's {base} differs from the meaning (rel. error {rel:.3g}), "
                            f"step {step + 1}, param {i}\n{spec.text}\ngot: {actual[base]}\n"
                            f"meaning: {meaning[base]}")


# =============================================================================================
# 2. Bad specs: SpecError, at the right place, and nothing else
# =============================================================================================
LOCATED = re.compile(r"^(?P<file>[^\n]+?):(?P<line>\d+):(?P<col>\d+): error: ")


def _located_error(text: str, filename: str = "fuzz.opt") -> SpecError | None:
    """Compile; a SpecError must name the file and a line:col inside the text."""
    try:
        compiled = compile_source(text, filename)
    except SpecError as err:
        shown = str(err)
        assert "this is a bug in optdsl" not in shown, f"an internal error, for\n{text!r}\n{shown}"
        m = LOCATED.match(shown)
        assert m and m["file"] == filename, f"no file:line:col in the error for\n{text!r}\n{shown}"
        line, col = int(m["line"]), int(m["col"])
        assert (line, col) == (err.line, err.column), shown
        assert 1 <= line <= text.count("\n") + 1 and col >= 1, f"{shown}\nfor\n{text!r}"
        return err
    compile(compiled.python, "generated.py", "exec")  # what compiles is valid Python
    return None


# ---- (1) one semantic mistake in an otherwise valid spec, at a known place ----
# Each kind: (name, how to apply it) -> (text, line, column, piece of the message).
FUNCS = sorted(F.TABLE)


@st.composite
def semantic_mistakes(draw):
    spec = draw(random_specs())
    lines = spec.text.split("\n")
    last = max(i for i, s in enumerate(lines) if s.strip())  # the last statement's line
    kinds = ["unknown-name", "unknown-function", "arity", "function-as-name", "assign-builtin",
             "assign-function", "assign-reserved", "aug-unassigned", "read-before-assign", "division-by-zero",
             "state-init", "never-assigns-p", "declaration-after-statement", "declared-twice",
             "default-outside-range", "empty-range", "declare-builtin", "hyper-named-function",
             "class-name-keyword", "unused-state", "reserved-declaration",
             "state-list-name"] + (["assign-hyper"] if spec.hypers else [])
    kind = draw(st.sampled_from(kinds))

    def statement(line, col, message, extra_end=None):
        out = lines[:last] + [line] + lines[last:]
        if extra_end:
            out.insert(len(out) - 1, extra_end)
        return "\n".join(out), last + 1, col, message

    def declaration(line, col, message):  # right after the header
        return "\n".join(lines[:1] + [line] + lines[1:]), 2, col, message

    if kind == "unknown-name":
        return statement("zq_new = g * qqz", 14, "unknown name 'qqz'")
    if kind == "unknown-function":
        return statement("zq_new = sqrtt(g)", 10, "unknown function 'sqrtt'")
    if kind == "arity":
        fn = draw(st.sampled_from(FUNCS))
        arity = F.TABLE[fn].arity
        n = draw(st.sampled_from([k for k in range(0, 5) if k != arity]))
        return statement(f"zq_new = {fn}({', '.join(['g', 'p', '1', '2'][:n])})", 10,
                         f"{fn}() takes {arity} argument")
    if kind == "function-as-name":
        fn = draw(st.sampled_from(FUNCS))
        return statement(f"zq_new = g * {fn}", 14, f"'{fn}' is a function")
    if kind == "assign-builtin":
        name = draw(st.sampled_from(["t", "loss"]))
        return statement(f"{name} = g", 1, f"cannot assign the built-in '{name}'")
    if kind == "assign-hyper":
        name = draw(st.sampled_from(sorted(spec.hypers)))
        op = draw(st.sampled_from(["=", "+=", "*="]))
        return statement(f"{name} {op} g", 1, f"cannot assign the hyperparameter '{name}'")
    if kind == "assign-function":
        fn = draw(st.sampled_from(FUNCS))
        return statement(f"{fn} = g", 1, f"cannot assign '{fn}': it is a function")
    if kind == "assign-reserved":
        name = draw(st.sampled_from(["lambda", "class", "def", "None", "import"]))
        return statement(f"{name} = g", 1, f"'{name}' is reserved")
    if kind == "aug-unassigned":
        op = draw(st.sampled_from(["+=", "-=", "*=", "/="]))
        return statement(f"zq_new {op} g", 1, f"'zq_new' is updated with '{op}' before it is assigned")
    if kind == "read-before-assign":
        return statement("zq_new = zq_late * g", 10, "local 'zq_late' is read before it is assigned",
                         extra_end="zq_late = g")
    if kind == "division-by-zero":
        zero = draw(st.sampled_from(["0", "(1 - 1)", "(0 * g)"]))  # a parenthesised one is shown inside
        return statement(f"zq_new = g / {zero}", 14 + zero.startswith("("), "division by zero")
    if kind == "state-init":
        bad = draw(st.sampled_from(["g", "t", "loss", *spec.states]))
        return declaration(f"state zq_s = 2 * {bad}", 18, f"a state's initial value cannot use '{bad}'")
    if kind == "never-assigns-p":
        decls = [s for s in lines[1:] if s.startswith(("hyper", "state"))]
        uses = [f"zq_{i} = {s}" for i, s in enumerate(spec.states)]  # the states are still used
        text = "\n".join([f"optimizer {spec.name}", *decls, "zq = g", *uses]) + "\n"
        return text, 1, 11, f"'{spec.name}' never assigns p"
    if kind == "declaration-after-statement":
        which = draw(st.sampled_from(["hyper zq_h = 1", "state zq_h"]))
        text = spec.text + which + "\n"
        return text, text.count("\n"), 7, f"'{which.split()[0]}' declaration after the first statement"
    if kind == "declared-twice":
        return declaration("hyper zq_d = 1, zq_d = 2", 17, "'zq_d' is declared twice")
    if kind == "default-outside-range":
        return declaration("hyper zq_r = 5 in [0, 1]", 7, "the default 5.0 of 'zq_r' is outside its range")
    if kind == "empty-range":
        return declaration("hyper zq_r = 1 in (1, 0)", 19, "of 'zq_r' is empty")
    if kind == "declare-builtin":
        name = draw(st.sampled_from(["p", "g", "t", "loss"]))
        which = draw(st.sampled_from(["hyper", "state"]))
        return declaration(f"{which} {name}" + (" = 1" if which == "hyper" else ""), 7,
                           f"'{name}' is a built-in name")
    if kind == "hyper-named-function":
        fn = draw(st.sampled_from(FUNCS))
        return declaration(f"hyper {fn} = 1", 7, f"'{fn}' is a function and cannot be declared")
    if kind == "class-name-keyword":
        kw = draw(st.sampled_from(["class", "def", "None", "lambda"]))
        return "\n".join([f"optimizer {kw}"] + lines[1:]), 1, 11, f"'{kw}' cannot be a class name"
    if kind == "reserved-declaration":
        name = draw(st.sampled_from(["super", "float", "self", "torch", "params", "t_", "_EXACT", "lambda"]))
        which = draw(st.sampled_from(["hyper", "state"]))
        return declaration(f"{which} {name}" + (" = 1" if which == "hyper" else ""), 7, f"'{name}' is reserved")
    if kind == "state-list-name":  # the generated code keeps state zq's tensors in a list zq_list
        which = draw(st.sampled_from(["hyper zq_list = 1", "state zq_list"]))
        return declaration(f"state zq; {which}", 11 + len(which.split()[0]) + 1,
                           "the name of the step functions' list of state 'zq'")
    assert kind == "unused-state"
    return declaration("state zq_u", 7, "state 'zq_u' is declared but never used")


@settings(max_examples=150, **SETTINGS)
@given(semantic_mistakes())
def test_a_semantic_mistake_is_reported_where_it_is(case):
    text, line, col, message = case
    note(text)
    err = _located_error(text, "mistake.opt")
    assert err is not None, f"this spec should be refused ({message}):\n{text}"
    assert (err.line, err.column) == (line, col) and message in err.message, (
        f"expected {line}:{col} {message!r}, got:\n{err}\nfor\n{text}")
    assert err.hint.strip(), str(err)


# ---- (2) random text, token soup, token-level mutations ----
VOCAB = ["optimizer", "hyper", "state", "in", "inf", "p", "g", "t", "loss", "m", "v", "lr", "b1", "u", "X",
         "=", "+=", "-=", "*=", "/=", "+", "-", "*", "/", "^", "**", "<", "<=", ">", ">=", "==", "!=",
         "(", ")", "[", "]", ",", ";", "\n", "# c\n", '"doc"', "0", "1", "2", ".5", "1e-8", "1e400", "3.",
         *FUNCS, "lambda", "class", "torch", "sqr", "amin"]
TOKEN = re.compile(r'\s+|#[^\n]*|"[^"\n]*"|\*\*|[-+*/]=|[<>=!]=|[A-Za-z_]\w*|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|.')
CHARS = "abglmptvxyz_019.e " + "\t\n;#()[],=+-*/^<>!\""


@st.composite
def token_mutations(draw):
    text = draw(st.one_of(st.sampled_from(SPEC_TEXTS), random_specs().map(lambda s: s.text)))
    tokens = TOKEN.findall(text)
    for _ in range(draw(st.integers(1, 4))):
        solid = [i for i, tok in enumerate(tokens) if tok.strip()]
        if not solid:
            break
        i = draw(st.sampled_from(solid))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "replace", "rename", "swap-lines"]))
        if op == "delete":
            del tokens[i]
        elif op == "duplicate":
            tokens.insert(i, tokens[i] + " ")
        elif op == "swap":
            j = draw(st.sampled_from(solid))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif op == "insert":
            tokens.insert(i, " " + draw(st.sampled_from(VOCAB)) + " ")
        elif op == "replace":
            tokens[i] = draw(st.sampled_from(VOCAB))
        elif op == "rename":  # every occurrence of a name: wrong names, but well-formed text
            old, new = tokens[i], draw(st.sampled_from(VOCAB[:15] + FUNCS + ["zz"]))
            if re.fullmatch(r"[A-Za-z_]\w*", old):
                tokens = [new if tok == old else tok for tok in tokens]
        else:
            lines = "".join(tokens).split("\n")
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[a], lines[b] = lines[b], lines[a]
            tokens = TOKEN.findall("\n".join(lines))
    return "".join(tokens)


@st.composite
def statement_soup(draw):
    """A header, then lines shaped like declarations and statements, of random tokens."""
    lines = [f"optimizer {draw(st.sampled_from(['X', 'class', 'Y2']))}"]
    for _ in range(draw(st.integers(1, 6))):
        head = draw(st.sampled_from(["hyper lr =", "state m =", "state m", "p -=", "p =", "g +=", "m =", "u =",
                                     "t =", "lr *="]))
        body = draw(st.lists(st.sampled_from(VOCAB[5:]), max_size=8))
        lines.append(" ".join([head, *body]).replace("\n", " "))
    return "\n".join(lines) + "\n"


malformed = st.one_of(
    token_mutations(),
    statement_soup(),
    st.text(alphabet=CHARS, max_size=120),
    st.text(alphabet=CHARS, max_size=120).map(lambda s: "optimizer X\n" + s),
)


@settings(max_examples=150, **SETTINGS)
@given(malformed)
def test_bad_text_raises_only_located_spec_errors(text):
    note(repr(text))
    _located_error(text)


@st.composite
def deep_specs(draw):
    """Long chains: parentheses, unary minus, calls, sums; the compiler may refuse them, but located."""
    n = draw(st.integers(50, 450))
    shape = draw(st.sampled_from(["parens", "neg", "calls", "sum", "pow"]))
    expr = {"parens": "(" * n + "g" + ")" * n, "neg": "-" * n + "g", "calls": "abs(" * n + "g" + ")" * n,
            "sum": " + ".join(["g"] * n), "pow": "^".join(["1"] * n) + " * g"}[shape]
    return f"optimizer Deep\nhyper lr = 0.1\n# {shape}\np -= lr * {expr}\n"


@settings(max_examples=10, **SETTINGS)
@given(deep_specs())
def test_deep_nesting_compiles_or_is_a_located_spec_error(text):
    _located_error(text)


def test_sum_of_a_tensor_expression_that_simplifies_to_a_constant():
    """SymPy folds p - p + 1 to 1; the reduction still runs over a tensor shaped like p."""
    cls = optdsl.compile("optimizer SumOnes\np -= sum(p - p + 1) * g\n", "sum_ones.opt")
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    p.grad = torch.ones(4, dtype=torch.float64)
    cls([p], foreach=False).step()
    assert torch.equal(p.detach(), torch.full((4,), -4.0, dtype=torch.float64))  # sum of four ones


@pytest.mark.parametrize("foreach", [False, True])
def test_a_product_of_device_scalars_compiles(foreach):
    """Found by Hypothesis: `-amax(..)` is a product with no tensor factor (the emitter popped from [])."""
    import optdsl
    C = optdsl.compile("optimizer X\ng = amax(abs(p)) - p\ng *= (g - p) * amax(p)\np = g\n")
    p = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    p.grad = torch.ones(3, dtype=torch.float64)
    C([p], foreach=foreach).step()
    q = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    g = q.abs().max() - q
    assert torch.equal(p, g * (g - q) * q.max())
