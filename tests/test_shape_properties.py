"""Property test of shapes: random specs with rows, cols and scalar states, every reduction over values
of every shape, and expressions that cancel (x - x, x * 0, x / x), which SymPy simplifies to numbers.

A sibling of tests/test_properties.py (whose specs keep every tensor shaped like p). The oracle is the
language's meaning written directly in NumPy while the text is built: each value is an array of the
shape LANGUAGE.md and docs/language.md give it (p's for p, g and plain states; p.shape[:-1] + (1,) for
a `rows` state and a row reduction; p.shape[:-2] + (1,) + p.shape[-1:] for `cols`; (d0, 1, ..., 1) for
a unit reduction; a float for a scalar), element-wise arithmetic broadcasts as NumPy does, and
a reduction reduces the array it is given, as it is. A scalar stands for p's shape where it meets a
reduction (docs/language.md, "A reduction of a scalar"): the reduction of that scalar broadcast to p,
and, reading no tensor, it is a scalar again (row_sum(c) is ncols * c). Nothing of the oracle reads
optdsl; SymPy never sees it, so a value it simplifies (r - r - 2 is -2 in each row, not a number
broadcast to p) is computed with its shape here.

Each example is compiled, stepped twice on one or two float64 parameters of rank 2 or 3 on the for-loop
and foreach paths (and the fused kernels, interpreted, on a third of them) and compared with the oracle
after each step, to 1e-9 relative: p and every state. HYPOTHESIS_PROFILE=explore with
SHAPE_EXAMPLES=2000 runs it longer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import optdsl
from optdsl.errors import SpecError
from optdsl.pipeline import compile_source

TOL = 1e-9
EXAMPLES = int(os.environ.get("SHAPE_EXAMPLES", "60"))
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                      HealthCheck.data_too_large])
if os.environ.get("SHAPE_NOSHRINK"):  # exploring: report the first failure as found (each example compiles)
    from hypothesis import Phase
    SETTINGS["phases"] = [Phase.explicit, Phase.reuse, Phase.generate]
FUSED = __import__("importlib").util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"

# Shapes, by the axes of p a value has reduced: F like p, R rows, C cols, B rows and cols, U units, S scalar.
# What an element-wise operation of two of them gives (docs/language.md's table; a unit value meets only
# scalars, units and p-shaped values: which axes "all but the first" are depends on the rank).
JOIN = {("S", k): k for k in "SFRCBU"} | {("F", k): "F" for k in "FRCBU"} | {
    ("R", "R"): "R", ("R", "C"): "F", ("R", "B"): "R", ("C", "C"): "C", ("C", "B"): "C", ("B", "B"): "B",
    ("U", "U"): "U"}
JOIN |= {(b, a): k for (a, b), k in JOIN.items()}
# the operands each shape can be made of, with what (besides scalars and itself)
PARTNERS = {"F": "FRCBU", "R": "RB", "C": "CB", "B": "B", "U": "U", "S": ""}

Env = dict  # name -> np.ndarray (tensors, in their own shape) or float (scalars); "__p__" -> p's shape


@dataclass(frozen=True)
class E:
    text: str
    prec: int      # 1 + -, 2 * /, 3 unary minus, 5 atom
    kind: str      # one of SFRCBU
    fn: Callable[[Env], object]


def _wrap(e: E, prec: int) -> str:
    return e.text if e.prec >= prec else f"({e.text})"


def _p_broadcast(x, env):
    return np.broadcast_to(np.asarray(x, dtype=float), env["__p__"])


def _units(n: int) -> tuple[int, ...]:
    return tuple(range(1, n)) if n >= 2 else tuple(range(n))


WHOLE = {"sum": np.sum, "mean": np.mean, "norm": lambda x: np.sqrt(np.sum(np.square(x))),
         "rms": lambda x: np.sqrt(np.mean(np.square(x))), "amax": np.max}
AXIS = {  # name: (axes of an array of rank n, NumPy reduction keeping them, kind of the result per operand kind)
    "row_sum": (lambda n: (n - 1,), np.sum), "row_mean": (lambda n: (n - 1,), np.mean),
    "row_max": (lambda n: (n - 1,), np.max), "col_sum": (lambda n: (n - 2,), np.sum),
    "col_mean": (lambda n: (n - 2,), np.mean), "col_max": (lambda n: (n - 2,), np.max),
    "unit_mean": (_units, np.mean),
    "unit_norm": (_units, lambda x, axis, keepdims: np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims))),
}
# the kind an axis reduction gives, per operand kind it is generated on
AXIS_KIND = {"row": {"F": "R", "R": "R", "C": "B", "B": "B"}, "col": {"F": "C", "C": "C", "R": "B", "B": "B"},
             "unit": {"F": "U", "U": "U"}}


def _whole(name, x: E) -> E:
    f = WHOLE[name]

    def fn(env):
        v = x.fn(env)
        # a scalar: broadcast to p's shape; a tensor: reduced as the array it is (its own shape)
        return float(f(_p_broadcast(v, env) if x.kind == "S" else v))
    return E(f"{name}({x.text})", 5, "S", fn)


def _axis(name, x: E, kind: str) -> E:
    axes, f = AXIS[name]

    def fn(env):
        v = x.fn(env)
        if x.kind == "S":  # the scalar broadcast to p, reduced: every element the same, a scalar again
            full = _p_broadcast(v, env)
            return float(f(full, axis=axes(full.ndim), keepdims=True).reshape(-1)[0])
        return f(v, axis=axes(v.ndim), keepdims=True)
    return E(f"{name}({x.text})", 5, kind, fn)


@dataclass
class Ctx:
    names: dict  # kind -> names readable of that kind


def _leaf(draw, ctx: Ctx, kind: str) -> E | None:
    names = ctx.names.get(kind, [])
    if kind == "S":
        choice = draw(st.sampled_from(names + ["0.5", "2", "1.5", "0.25"]))
        if choice[0].isdigit():
            v = float(choice)
            return E(choice, 5, "S", lambda env: v)
        return E(choice, 5, "S", lambda env: env[choice])
    if not names:
        return None
    name = draw(st.sampled_from(names))
    return E(name, 5, kind, lambda env: env[name])


def _base(draw, kind: str) -> E:
    """A value of this kind made from g alone (a kind no name has yet)."""
    g = E("g", 5, "F", lambda env: env["g"])
    if kind == "F":
        return g
    if kind == "B":
        return _axis(draw(st.sampled_from(["row_mean", "row_sum"])), _base(draw, "C"), "B")
    fam = {"R": "row", "C": "col", "U": "unit"}[kind]
    return _axis(draw(st.sampled_from([n for n in sorted(AXIS) if n.startswith(fam)])), g, kind)


def gen(draw, ctx: Ctx, kind: str, depth: int) -> E:
    """An expression of the given shape kind, at most `depth` levels deep."""
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        leaf = _leaf(draw, ctx, kind)
        if leaf is not None:
            return leaf
        if depth <= 0:
            return _base(draw, kind)
    options = ["binary", "binary", "unary", "cancel", "reduce"]
    how = draw(st.sampled_from(options))
    if how == "binary":
        partners = "S" + PARTNERS[kind]
        if kind == "F" and draw(st.integers(0, 3)) == 0:  # rows meet columns: p's shape
            a, b = gen(draw, ctx, "R", depth - 1), gen(draw, ctx, "C", depth - 1)
        else:
            a = gen(draw, ctx, kind, depth - 1)
            b = gen(draw, ctx, draw(st.sampled_from(partners)) if draw(st.booleans()) else kind, depth - 1)
        if draw(st.booleans()):
            a, b = b, a
        assert JOIN[(a.kind, b.kind)] == kind, (a.kind, b.kind, kind)
        op = draw(st.sampled_from(["+", "-", "*", "/", "max", "min"]))
        if op in "+-":
            f = (lambda env: a.fn(env) + b.fn(env)) if op == "+" else (lambda env: a.fn(env) - b.fn(env))
            return E(f"{_wrap(a, 1)} {op} {_wrap(b, 2)}", 1, kind, f)
        if op == "*":
            return E(f"{_wrap(a, 2)} * {_wrap(b, 3)}", 2, kind, lambda env: a.fn(env) * b.fn(env))
        if op == "/":
            return E(f"{_wrap(a, 2)} / (abs({b.text}) + 1)", 2, kind,
                     lambda env: a.fn(env) / (np.abs(b.fn(env)) + 1))
        g = np.maximum if op == "max" else np.minimum
        return E(f"{op}({a.text}, {b.text})", 5, kind, lambda env: g(a.fn(env), b.fn(env)))
    if how == "unary":
        x = gen(draw, ctx, kind, depth - 1)
        which = draw(st.sampled_from(["neg", "abs", "tanh", "sqrt", "square"]))
        if which == "neg":
            return E(f"-{_wrap(x, 3)}", 3, kind, lambda env: -x.fn(env))
        if which == "sqrt":
            return E(f"sqrt(abs({x.text}) + 0.5)", 5, kind, lambda env: np.sqrt(np.abs(x.fn(env)) + 0.5))
        f = {"abs": np.abs, "tanh": np.tanh, "square": np.square}[which]
        return E(f"{which}({x.text})", 5, kind, lambda env: f(x.fn(env)))
    if how == "cancel":  # a value of this shape that SymPy simplifies: x - x, x * 0, x / x (x != 0)
        x = gen(draw, ctx, kind, depth - 1)
        c = draw(st.sampled_from(["0.5", "2", "-3", "0"]))
        cv = float(c)
        which = draw(st.sampled_from(["sub", "mul0", "div"]))
        if which == "sub":
            return E(f"({_wrap(x, 1)} - {_wrap(x, 2)} + {c})", 5, kind, lambda env: x.fn(env) - x.fn(env) + cv)
        if which == "mul0":
            return E(f"({_wrap(x, 2)} * 0 + {c})", 5, kind, lambda env: x.fn(env) * 0.0 + cv)
        return E(f"(abs({x.text}) + 1) / (abs({x.text}) + 1)", 2, kind,
                 lambda env: (np.abs(x.fn(env)) + 1) / (np.abs(x.fn(env)) + 1))
    # a reduction that gives this kind
    if kind == "S":
        if draw(st.integers(0, 3)) == 0:  # an axis reduction of a scalar is a scalar
            name = draw(st.sampled_from(sorted(AXIS)))
            return _axis(name, gen(draw, ctx, "S", depth - 1), "S")
        return _whole(draw(st.sampled_from(sorted(WHOLE))), gen(draw, ctx, draw(st.sampled_from("SFRCBU")), depth - 1))
    family = [(fam, src) for fam, table in AXIS_KIND.items() for src, out in table.items() if out == kind]
    if not family:  # p's shape: a tensor scaled by a reduction of a value of any shape
        x = gen(draw, ctx, kind, depth - 1)
        r = _whole(draw(st.sampled_from(sorted(WHOLE))), gen(draw, ctx, draw(st.sampled_from("SFRCBU")), depth - 1))
        return E(f"{_wrap(x, 2)} * {r.text}", 2, kind, lambda env: x.fn(env) * r.fn(env))
    fam, src = draw(st.sampled_from(family))
    name = draw(st.sampled_from([n for n in sorted(AXIS) if n.startswith(fam)]))
    return _axis(name, gen(draw, ctx, src, depth - 1), kind)


STATE_KINDS = {"m": "F", "r": "R", "c": "C", "s": "S", "r2": "R"}
DECL = {"F": "", "R": ": rows", "C": ": cols", "S": ": scalar"}


@dataclass
class Spec:
    text: str
    lr: float
    states: dict                       # name -> kind
    body: list                         # (target, op, E)

    def oracle(self, p: np.ndarray, g: np.ndarray, states: dict, t: float) -> dict:
        env = {"p": p, "g": g, "lr": self.lr, "t": t, "__p__": p.shape, **states}
        for target, op, e in self.body:
            v = e.fn(env)
            old = env.get(target)
            env[target] = {"=": lambda: v, "+=": lambda: old + v, "-=": lambda: old - v}[op]()
            if target == "p" or target in self.states:  # p and a state keep their declared shape
                kind = "F" if target == "p" else self.states[target]
                new = np.broadcast_to(np.asarray(env[target], dtype=float), _state_shape(kind, p.shape)).copy()
                env[target] = float(new) if kind == "S" else new
        out = {"p": _p_broadcast(env["p"], env)}
        for s, kind in self.states.items():
            out[s] = np.broadcast_to(np.asarray(env[s], dtype=float), _state_shape(kind, p.shape))
        return out


def _state_shape(kind, shape):
    return {"F": shape, "R": shape[:-1] + (1,), "C": shape[:-2] + (1,) + shape[-1:], "S": ()}[kind]


@st.composite
def shape_specs(draw) -> Spec:
    names = draw(st.lists(st.sampled_from(sorted(STATE_KINDS)), min_size=1, max_size=4, unique=True))
    states = {n: STATE_KINDS[n] for n in names}
    ctx = Ctx({"F": ["p", "g"] + [n for n, k in states.items() if k == "F"],
               "S": ["lr", "t"] + [n for n, k in states.items() if k == "S"]})
    for k in "RC":
        ctx.names[k] = [n for n, kk in states.items() if kk == k]
    body = []
    locals_ = 0
    order = list(states) + ["local"] * draw(st.integers(0, 3))
    order = draw(st.permutations(order)) + ["p"]
    for target in order:
        depth = draw(st.integers(1, 3))
        if target == "local":
            kind = draw(st.sampled_from("SFRCBU"))
            name = f"u{locals_}"
            locals_ += 1
            e = gen(draw, ctx, kind, depth)
            body.append((name, "=", e))
            ctx.names.setdefault(kind, []).append(name)
            continue
        kind = "F" if target == "p" else states[target]
        value_kind = draw(st.sampled_from([kind, "S"])) if kind in "RC" else kind  # a scalar broadcasts
        op = draw(st.sampled_from(["=", "+=", "-="]))
        e = gen(draw, ctx, value_kind, depth)
        if target == "p":
            e = E(f"lr * {_wrap(e, 3)}", 2, "F", (lambda e: lambda env: env["lr"] * e.fn(env))(e))
        body.append((target, op, e))
    decls = [f"state {n}{DECL[k]}" for n, k in states.items()]
    lr = draw(st.sampled_from([0.1, 0.5, 1.0]))
    text = "\n".join(["optimizer Shapes", f"hyper lr = {lr}", *decls,
                      *(f"{t} {op} {e.text}" for t, op, e in body)]) + "\n"
    return Spec(text, lr, states, body)


SHAPES = [(3, 4), (2, 3, 5), (1, 4), (4, 1), (2, 1, 3)]


def _run(cls, mode, init, grads):
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = cls(params, **mode)
    out = []
    for row in grads:
        for p, gr in zip(params, row):
            p.grad = gr.clone()
        opt.step()
        out.append([(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if k != "step"})
                    for p in params])
    return out


def _close(actual, expected) -> tuple[bool, float]:
    err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    scale = 1.0 + float(np.max(np.abs(expected))) if expected.size else 1.0
    return err <= TOL * scale, err / scale


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(spec=shape_specs(), shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=2),
       seed=st.integers(0, 2**16))
def test_random_shaped_spec_matches_the_language(spec, shapes, seed):
    note(spec.text)
    try:
        compile_source(spec.text, "shapes.opt")
    except SpecError as err:  # the generator writes only valid specs
        raise AssertionError(f"a valid spec was refused:\n{spec.text}\n{err}") from None
    cls = optdsl.compile(spec.text, "shapes.opt")
    gen_ = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen_, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen_, dtype=torch.float64) for s in shapes] for _ in range(2)]
    modes = [dict(foreach=False), dict(foreach=True)]
    if FUSED and seed % 3 == 0:  # where the kernels take the spec ("not fused yet" names what they do not)
        why = __import__(cls.__module__, fromlist=["fused_available"]).fused_available(init)
        modes += [] if why else [dict(fused=True)]
    runs = {str(m): _run(cls, m, init, grads) for m in modes}
    states = [{s: np.zeros(_state_shape(k, tuple(x.shape))) for s, k in spec.states.items()} for x in init]
    ps = [x.numpy() for x in init]
    for step in range(2):
        for i in range(len(init)):
            with np.errstate(all="ignore"):
                want = spec.oracle(ps[i], grads[step][i].numpy(), states[i], float(step + 1))
            assume(all(np.isfinite(v).all() and np.abs(v).max(initial=0) < 1e12 for v in want.values()))
            for mode, history in runs.items():
                p1, s1 = history[step][i]
                got = {"p": p1.numpy(), **{s: s1[s].numpy() for s in spec.states}}
                for name, value in got.items():
                    assert value.shape == want[name].shape, (
                        f"{mode}: {name} has shape {value.shape}, the language's is {want[name].shape}\n{spec.text}")
                    ok, rel = _close(value, want[name])
                    assert ok, (f"{mode}: {name} differs from the language's meaning (rel. error {rel:.3g}), step "
                                f"{step + 1}, shape {tuple(init[i].shape)}\n{spec.text}\ngot: {value}\n"
                                f"want: {want[name]}")
            ps[i] = np.array(want["p"])
            states[i] = {s: np.array(want[s]) for s in spec.states}


@pytest.mark.parametrize("text, shape, want", [
    # found by the generator above (HYPOTHESIS_PROFILE=explore, seed 3007): norm() of a float was mpmath.norm's
    # value, 0.5, where the language's is the norm of 0.5 broadcast to p, 0.5 * sqrt(12)
    ("optimizer Shapes\nhyper lr = 1.0\nstate s: scalar\ns = norm(2 * 0.25)\np += s\n", (3, 4),
     lambda p: 0.5 * p.numel() ** 0.5),
])
def test_found_by_the_shape_generator(text, shape, want):
    cls = optdsl.compile(text)
    for mode in [dict(foreach=False), dict(foreach=True)] + ([dict(fused=True)] if FUSED else []):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        p.grad = torch.ones_like(p)
        cls([p], **mode).step()
        torch.testing.assert_close(p.detach(), torch.zeros_like(p) + want(p), rtol=1e-14, atol=0, msg=str(mode))
