"""Correct or refused, never silently wrong: host scalars follow IEEE 754 as tensors do, every
constant prints on every path, degenerate shapes step.

Each case runs the for-loop, foreach and fused (Triton, interpreted on CPU) paths in float64
and compares with torch computing the same arithmetic on tensors, nan where torch gives nan.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

import optdsl
from optdsl.errors import SpecError

SPECS = Path(__file__).resolve().parent.parent / "specs"
PATHS = [dict(foreach=False), dict(foreach=True), dict(fused=True)]
G = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64)


def _run(cls, g=G, steps=1, **kw):
    """p (starting at zero) after `steps` steps on g, per path."""
    out = {}
    for path in PATHS:
        p = torch.nn.Parameter(torch.zeros_like(g))
        opt = cls([p], **path, **kw)
        for _ in range(steps):
            p.grad = g.clone()
            with warnings.catch_warnings():  # numpy (the Triton interpreter) warns of 1/0
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
        out[str(path)] = p.detach().clone()
    return out


def _assert_all(got: dict, want: torch.Tensor, rtol=0.0):
    for path, p in got.items():
        torch.testing.assert_close(p, want.to(p.dtype), rtol=rtol, atol=0, equal_nan=True, msg=path)


@pytest.mark.parametrize("k, want", [(0.0, 1.0), (4.0, 0.25)])
def test_a_value_where_guards_is_not_an_exception_after_hoisting(k, want):
    """`t / k` is hoisted to the host, out of the where: with k = 0 it is inf there (as on a
    tensor), and the where picks 1; it used to raise ZeroDivisionError on all three paths."""
    cls = optdsl.compile("optimizer W\nhyper k = 0 in [0, inf)\nlr = where(k > 0, t / k, 1)\np -= lr * g\n")
    _assert_all(_run(cls, k=k), -want * G)


# tanh(m) of the old m, read by one branch alone, is moved into it (not computed when the other is
# taken); m is updated in place (m.lerp_) before the branch, so the move must not pass that update
BRANCH_AFTER_UPDATE = """optimizer B
  hyper k = 1 in [0, inf)
  state m = 0
  b = tanh(m)
  m = lerp(m, g, 0.1)
  p -= 0.1 * where(k > 0.5, b * g + sin(b), m)
"""


@pytest.mark.parametrize("k", [0.0, 1.0])
def test_work_moved_into_a_branch_reads_values_from_before_an_in_place_update(k):
    """It read the updated m on the for-loop and foreach paths: p moved at the first step, where
    m = 0 gives b = 0 and no update. Against the loop written out: the fused path's tanh is
    2 sigmoid(2x) - 1 (optdsl/functions.py), some ulps from torch's where |x| is small (|m| >= 0.05
    here, or 0 exactly), so 1e-13 relative, nothing else differs."""
    cls = optdsl.compile(BRANCH_AFTER_UPDATE)
    m, want = torch.zeros_like(G), torch.zeros_like(G)
    for _ in range(3):
        b = torch.tanh(m)
        m = torch.lerp(m, G, 0.1)
        want = want - 0.1 * (b * G + torch.sin(b) if k > 0.5 else m)
    _assert_all(_run(cls, steps=3, k=k), want, rtol=1e-13)


# A host scalar of a hyperparameter x, against torch's value of the same on a float64 tensor.
HOST = [
    ("t / x", 0.0, lambda x: 1 / x),
    ("-t / x", 0.0, lambda x: -1 / x),
    ("(t - 1) / x", 0.0, lambda x: 0 / x),  # t = 1: 0/0
    ("log(x)", 0.0, torch.log),
    ("log(x)", -1.0, torch.log),
    ("log1p(x)", -1.0, torch.log1p),
    ("log1p(x)", -3.0, torch.log1p),
    ("sqrt(x)", -1.0, torch.sqrt),
    ("exp(x)", 1000.0, torch.exp),
    ("x^2", 1e200, lambda x: x**2),
    ("x^3", -1e200, lambda x: x**3),
    ("x^(-1.5)", 0.0, lambda x: x**-1.5),
    ("x^0.3", -8.0, lambda x: x**0.3),
    ("x^(t + 40)", 1e10, lambda x: x**41),  # t = 1: past the largest float
    ("sigmoid(x)", -1000.0, torch.sigmoid),
    # the unit norm of a scalar is that of the scalar broadcast to p's shape (7 elements, one unit):
    # |x - t| sqrt(7); in a kernel too (fuzz seed 1133: no Triton form)
    ("unit_norm(x - t)", 0.25, lambda x: (x - 1).abs() * math.sqrt(7)),
    ("row_mean(x - t) + unit_mean(t - x)", 0.25, lambda x: (x - 1) + (1 - x)),
]


@pytest.mark.parametrize("expr, x, ref", HOST, ids=[f"{e} at {x}" for e, x, _ in HOST])
def test_host_scalars_follow_ieee(expr, x, ref):
    cls = optdsl.compile(f"optimizer H\nhyper x = 1\nc = {expr}\np += c * (g * g + 1)\n")
    want = ref(torch.tensor(x, dtype=torch.float64)) * (G * G + 1)
    _assert_all(_run(cls, x=x), want, rtol=1e-15)


@pytest.mark.parametrize("expr", ["1 / sqrt(1 / (1e400 - b^t))", "t / (1 / (1e400 - b))"])
def test_a_constant_inf_proves_nothing_on_the_host(expr):
    """Fuzz seed 4779 (AdamGC mutant, sqrt(v / (1e400 - b2^t))): the range of the constant inf was the
    empty point (inf, inf), so 1 / (inf - b^t) was 'positive' and the host divided by its 0 without
    the IEEE guard: ZeroDivisionError at step. Now it is inf, as on a tensor."""
    cls = optdsl.compile(f"optimizer H\nhyper b = 0.5 in [0, 1)\nc = {expr}\np += c * (g * g + 1)\n")
    _assert_all(_run(cls), torch.full_like(G, math.inf))


CONSTANTS = [
    ("g^inf", lambda g: g**float("inf")),
    ("g^(-inf)", lambda g: g ** -float("inf")),
    ("g^5", lambda g: g**5),
    ("g^(-3)", lambda g: g**-3.0),
    ("g^k", lambda g: g**0.0),  # k = 0: 0^0 = 1
    ("g^3.5", lambda g: g**3.5),
    ("where(g > 0, inf, -inf)", lambda g: torch.where(g > 0, float("inf"), -float("inf")).double()),
    ("g * 1e300 + 1e-300", lambda g: g * 1e300 + 1e-300),
    ("g * 1e-300 * 1e-300", lambda g: g * 1e-300 * 1e-300),
    ("max(g, -inf) + min(g, inf)", lambda g: 2 * g),
]


@pytest.mark.parametrize("expr, ref", CONSTANTS, ids=[e for e, _ in CONSTANTS])
def test_every_constant_prints_on_every_path(expr, ref):
    """`g^inf` was a NameError (inf) on the torch paths and nan at 1 in the kernels; g^5 was nan
    for g < 0 in the kernels (exp(5 log g)). Now each is torch.pow's value (IEEE 754's pow)."""
    cls = optdsl.compile(f"optimizer C\nhyper k = 0 in [0, inf)\np = {expr}\n")
    _assert_all(_run(cls), ref(G), rtol=1e-15)  # the kernels' pow is exp(y log|x|): a few ulps


@pytest.mark.parametrize("shape", [(3, 0), (0, 3), (0, 0), (2, 0, 3), (0,)])
def test_muon_steps_on_empty_matrices(shape):
    """torch.optim.Muon steps a (0, 3) matrix and raises ZeroDivisionError on a (3, 0) one (its
    lr adjustment divides by the column count); ours steps both, as the empty update they are,
    and the other parameter gets exactly the update it gets alone."""
    Muon = optdsl.load(SPECS / "muon.opt")
    gen = torch.Generator().manual_seed(0)
    w0, gw = (torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    alone = _run_muon(Muon, [(w0, gw)])
    both = _run_muon(Muon, [(torch.zeros(shape, dtype=torch.float64),) * 2, (w0, gw)])
    for path in alone:
        assert both[path][0].shape == shape
        assert torch.equal(both[path][1], alone[path][0]), path
    if shape == (0, 3):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        p.grad = torch.zeros(shape, dtype=torch.float64)
        opt = torch.optim.Muon([p])
        opt.step()
        assert opt.state[p]["momentum_buffer"].shape == shape
    if shape == (3, 0):
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.zeros(shape)
        with pytest.raises(ZeroDivisionError):
            torch.optim.Muon([p]).step()


def _run_muon(cls, pairs, steps=3):
    out = {}
    for path in PATHS:
        ps = [torch.nn.Parameter(p.clone()) for p, _ in pairs]
        opt = cls(ps, lr=0.02, **path)
        for _ in range(steps):
            for p, (_, g) in zip(ps, pairs):
                p.grad = g.clone()
            opt.step()
        assert all(set(opt.state[p]) >= {"step"} for p in ps)
        out[str(path)] = [p.detach().clone() for p in ps]
    return out


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_adam_steps_empty_tensors_as_torch(shape):
    Adam = optdsl.load(SPECS / "adam.opt")
    for path in PATHS:
        p, q = (torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64)) for _ in range(2))
        ours, ref = Adam([p], **path), torch.optim.Adam([q], foreach=False)
        for _ in range(2):
            p.grad, q.grad = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
            ours.step()
            ref.step()
        assert p.shape == shape
        assert {k: v.shape for k, v in ours.state[p].items()} == {k: v.shape for k, v in ref.state[q].items()}


# ---- complex parameters: stepped as their real view, as torch.optim does, or refused ----
COMPLEX = [
    ("adam", torch.optim.Adam, dict(lr=0.1, weight_decay=0.01)),
    ("adamw", torch.optim.AdamW, dict(lr=0.1, weight_decay=0.1)),
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
]


@pytest.mark.parametrize("name, ref_cls, kw", COMPLEX, ids=[c[0] for c in COMPLEX])
@pytest.mark.parametrize("foreach", [False, True])
def test_complex_parameters_step_as_torch_optim(name, ref_cls, kw, foreach):
    """Differential against torch.optim on complex128 parameters beside a real one, 10 steps:
    torch steps view_as_real(p) element by element, so the imaginary part moves too (it used to be
    dropped). Same arithmetic in the same order on both sides: equal to a few ulps (1e-13)."""
    cls = optdsl.load(SPECS / f"{name}.opt")
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 3), (7,), (1,)]
    init = [torch.randn(s, generator=gen, dtype=torch.complex128) for s in shapes] + [
        torch.randn(4, generator=gen, dtype=torch.float64)]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    opt, ref = cls(ours, foreach=foreach, **kw), ref_cls(theirs, foreach=False, **kw)
    for _ in range(10):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b, x in zip(ours, theirs, init):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
        assert a.dtype == x.dtype
        if x.is_complex():
            assert not torch.equal(a.imag, x.imag)  # the imaginary part is updated
    for a, b in zip(ours, theirs):  # states saved complex, as torch.optim keeps them
        for key, value in ref.state[b].items():
            if key != "step" and value is not None:
                assert opt.state[a][key].dtype == value.dtype


def test_complex_parameters_step_as_their_real_view():
    """The same spec on view_as_real(p) (a real tensor) gives the same numbers, on each path."""
    cls = optdsl.load(SPECS / "adamw.opt")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, generator=gen, dtype=torch.complex128)
    gs = [torch.randn(6, 2, generator=gen, dtype=torch.complex128) for _ in range(5)]
    for path in PATHS[:2]:
        p, r = torch.nn.Parameter(x.clone()), torch.nn.Parameter(torch.view_as_real(x).clone())
        a, b = cls([p], lr=0.1, **path), cls([r], lr=0.1, **path)
        for g in gs:
            p.grad, r.grad = g.clone(), torch.view_as_real(g).clone()
            a.step()
            b.step()
        assert torch.equal(torch.view_as_real(p.detach()), r.detach()), path


def test_the_fused_path_refuses_complex_parameters_as_torch_does():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="floating-point parameters"):
        optdsl.load(SPECS / "adam.opt")([p], fused=True)
    p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="floating point"):
        torch.optim.Adam([p], fused=True).step()


@pytest.mark.parametrize("spec, why", [
    ("optimizer N\nhyper lr = 0.1\np -= lr * g / norm(g)\n", "it calls norm()"),
    ("optimizer N\nhyper lr = 0.1\np -= lr * g / (row_mean(g^2) + 1)\n", "it calls row_mean()"),
    ("optimizer N\nhyper lr = 0.1\np -= lr * sqrt(numel) * g\n", "it reads the shape (numel)"),
    ("optimizer N\nhyper lr = 0.1\nstate s: scalar\ns = s + 1\np -= lr * s * g\n", "its state 's' is declared ': scalar'"),
])
def test_a_spec_that_is_not_element_wise_refuses_complex_parameters(spec, why):
    """A reduction over the real view would count each complex number twice (a mean halves):
    refused with what the spec does, before any state is made, as a RuntimeError: the type
    torch.optim's Adafactor and Muon raise for complex parameters (tests/test_optim_db.py)."""
    cls = optdsl.compile(spec)
    p = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.complex64))
    p.grad = torch.ones_like(p)
    opt = cls([p])
    with pytest.raises(RuntimeError, match="does not support complex parameters: " + why.replace("(", r"\(").replace(")", r"\)")):
        opt.step()
    assert not opt.state[p]


# ---- ranks: what the rule's condition decides is a spec error, what only the parameter decides a clear one at step
def test_a_rule_that_takes_vectors_cannot_reduce_columns():
    from optdsl.errors import SpecError
    from optdsl.pipeline import compile_source
    text = "optimizer S\nhyper lr = 0.1\nrule ndim >= 1 {\n  p -= lr * col_mean(g)\n}\nrule {\n  p -= lr * g\n}\n"
    with pytest.raises(SpecError) as info:
        compile_source(text, "s.opt")
    err = info.value
    assert (err.span.line, err.span.column) == (4, 13)
    assert "col_mean() needs parameters of rank 2 or more" in str(err) and "'ndim >= 1'" in str(err)
    assert "rule ndim >= 2" in err.hint


@pytest.mark.parametrize("body, what, where", [
    ("p -= lr * col_mean(g)", "col_mean()", "<spec>:3:11: col_mean(g)\n    p -= lr * col_mean(g)\n"
                                            "              ^^^^^^^^^^^"),
    ("x = mm(g, T(g))\np -= lr * mm(x, g)", "mm()", "<spec>:3:5: mm(g, T(g))\n    x = mm(g, T(g))\n        ^^^^^^^^^^^"),
    ("state c: cols\nc = col_mean(g)\np -= lr * c", "state 'c: cols'", "<spec>:3:7: c\n    state c: cols\n          ^"),
])
@pytest.mark.parametrize("path", PATHS[:2], ids=str)
def test_a_vector_where_matrices_are_needed_is_a_clear_error_at_step(body, what, where, path):
    """A spec without rules by shape expects matrices (common and correct): a vector given to it
    raises at step with the operation, its place as a spec error shows it (file:line:col, the line,
    a caret under it) and the shape, not torch's IndexError, and before any state is made."""
    cls = optdsl.compile(f"optimizer S\nhyper lr = 0.1\n{body}\n")
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    opt = cls([p], **path)
    with pytest.raises(ValueError) as err:
        opt.step()
    assert str(err.value) == (f"S: {what} needs parameters of rank 2 or more; this one has shape (3,) (give such "
                              f"parameters a rule of their own)\n  {where}")
    assert not opt.state[p]
    w = torch.nn.Parameter(torch.zeros(3, 2))  # a matrix steps
    w.grad = torch.ones(3, 2)
    cls([w], **path).step()


def test_a_spec_without_states_steps_fused():
    """The fused path's split of launches by state storage zipped the states alone: with none, it
    made no launch, and fused=True left p as it was (silently; seen on main at aafd91c)."""
    cls = optdsl.compile("optimizer S\nhyper lr = 0.5\np -= lr * g\n")
    _assert_all(_run(cls), -0.5 * G)


def test_a_matrix_root_of_nan_is_nan_not_a_linalg_error():
    """Fuzz seed 3028 (a Shampoo mutant, inv_root(L, 1e-320)): the root overflowed, p went nan, and
    the next step's eigh of a nan matrix raised _LinAlgError. nan in, nan out, as element-wise work."""
    cls = optdsl.compile("optimizer R\nrule ndim == 2 {\n  state L: gram_rows\n  L += mm(g, T(g))\n"
                         "  p -= 0.1 * mm(inv_root(L, 2), g)\n}\n")
    for path in PATHS[:2]:  # fused=True refuses a gram_rows state: 'not fused yet'
        p = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64))
        p.grad = torch.full((3, 2), math.nan, dtype=torch.float64)
        cls([p], **path).step()
        assert torch.isnan(p).all(), path


# ---- a reduction of a scalar: the scalar broadcast to p's shape, then reduced -----------------------
# LANGUAGE.md: a scalar broadcasts where it meets a tensor, and a reduction takes a tensor; so
# `sum(c)` is the sum of a tensor like p filled with c, numel * c (shipped CautiousLion counts p's
# elements with sum(1)). The axis and unit reductions said c itself (row_sum(-2) was -2 on a (3, 4)
# parameter where sum(-2) was -24, unit_norm(-2) was 2), and so did a tensor that SymPy simplified to
# a number (row_sum(g - g - 2)). Reference: torch reducing torch.full_like(p, c).
def _units(x):
    return tuple(range(1, x.dim())) if x.dim() >= 2 else tuple(range(x.dim()))


REDUCE = {
    "sum": lambda x: x.sum(), "mean": lambda x: x.mean(), "norm": lambda x: torch.linalg.vector_norm(x),
    "rms": lambda x: x.square().mean().sqrt(), "amax": lambda x: x.amax(),
    "row_sum": lambda x: x.sum(-1, keepdim=True), "row_mean": lambda x: x.mean(-1, keepdim=True),
    "row_max": lambda x: x.amax(-1, keepdim=True), "col_sum": lambda x: x.sum(-2, keepdim=True),
    "col_mean": lambda x: x.mean(-2, keepdim=True), "col_max": lambda x: x.amax(-2, keepdim=True),
    "unit_mean": lambda x: x.mean(_units(x), keepdim=True) if x.dim() else x,
    "unit_norm": lambda x: torch.linalg.vector_norm(x, dim=_units(x), keepdim=True) if x.dim() else x.abs(),
}
# -2 of every level: a number, a hyperparameter (group), a function of t (per parameter), a function of
# a reduction (a 0-dim device value) and a tensor expression that SymPy simplifies to -2
SCALARS = ["-2", "lr", "t - 3", "mean(g) - 3", "g - g - 2"]
RED_SHAPES = [(), (7,), (3, 4), (2, 3, 5)]


def _steps_like(cls, want_of, shapes, paths=PATHS):
    for shape in shapes:
        for path in paths:
            p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
            p.grad = torch.ones_like(p)
            cls([p], **path).step()
            torch.testing.assert_close(p.detach(), torch.zeros_like(p) + want_of(p), rtol=1e-14, atol=0,
                                       msg=f"{shape} {path}")


@pytest.mark.parametrize("f", sorted(REDUCE))
def test_a_reduction_of_a_scalar_reduces_it_broadcast_to_p(f):
    shapes = [s for s in RED_SHAPES if len(s) >= 2] if f.startswith("col_") else RED_SHAPES
    terms = " + ".join(f"{10 ** i} * {f}({x})" for i, x in enumerate(SCALARS))
    cls = optdsl.compile(f"optimizer R\nhyper lr = -2\np += {terms}\n")
    weight = sum(10 ** i for i in range(len(SCALARS)))
    _steps_like(cls, lambda p: weight * REDUCE[f](torch.full_like(p, -2.0)), shapes)
    # a state's initial value reads the same rule (it is printed apart from the step)
    init = optdsl.compile(f"optimizer I\nhyper lr = -2\nstate s = {f}(lr) + 0 * p\np += s\ns = 2 * s\n")
    _steps_like(init, lambda p: REDUCE[f](torch.full_like(p, -2.0)), shapes)


def test_a_reduction_of_a_scalar_in_a_mode_block_and_over_the_group():
    """The same rule in the eval()/train() blocks and in a group statement (over every tensor of the
    group: sum(c) is c times the group's number of elements)."""
    cls = optdsl.compile("optimizer M\nhyper lr = -2\nstate z = p\np -= 0 * g\nz = p\non eval {\n  p = z + row_sum(lr) + "
                         "sum(lr)\n}\non train {\n  p = z\n}\n")
    p = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    p.grad = torch.ones_like(p)
    opt = cls([p])
    opt.step()
    opt.eval()
    torch.testing.assert_close(p.detach(), torch.full_like(p, -2.0 * 4 - 2.0 * 12), rtol=0, atol=0)
    cls = optdsl.compile("optimizer G\nhyper lr = -2\ngroup s = sum(lr)\np += s\n")
    for path in PATHS:
        params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in [(3, 4), (5,)]]
        for q in params:
            q.grad = torch.ones_like(q)
        cls(params, **path).step()
        for q in params:
            torch.testing.assert_close(q.detach(), torch.full_like(q, -2.0 * 17), rtol=0, atol=0, msg=str(path))


def test_an_axis_reduction_of_a_value_already_reduced_along_it_is_the_value():
    """`row_sum(r)` of a rows state is r (its last axis has size 1), also when SymPy simplifies the
    operand to a number (`r - r - 2` is -2 per row, not -2 broadcast to p's shape: -2 * ncols)."""
    cls = optdsl.compile("optimizer W\nstate r: rows\nr = row_mean(g)\n"
                         "p += row_sum(r - r - 2) + unit_norm(unit_mean(g) - 3)\n")
    _steps_like(cls, lambda p: torch.full_like(p, -2.0 + 2.0), [(3, 4), (2, 3, 5)])


# ---- a reduction of a value of a reduced shape (rows, cols, ...) that SymPy simplifies to a number ------
# `r - r - 2` with `r` a rows state is -2 in each row, shaped p.shape[:-1] + (1,): sum() of it on a (3, 4)
# parameter is -6. SymPy simplifies it to the number -2, and the scalar-broadcast rule reduced -2 over p's
# 12 elements (-24). The shape of the operand is the language's (LANGUAGE.md, docs/language.md), decided on
# the operands as written; the broadcast counts that shape's elements. Reference: torch reducing a tensor of
# that shape filled with the value.
def _reduced_like(p, kind):
    s, n = tuple(p.shape), p.dim()
    if kind == "rows":
        return s[:-1] + (1,)
    if kind == "cols":
        return s[:-2] + (1,) + s[-1:]
    if kind == "both":
        return s[:-2] + (1, 1)
    units = (s[0],) + (1,) * (n - 1) if n >= 2 else (1,) * n
    if kind == "unit":
        return units
    return tuple(1 if i == n - 2 else u for i, u in enumerate(units))  # unit_cols: col_mean(unit_mean(x))


# (operand, what it is shaped like, the shapes it takes): state r: rows, state c: cols, locals b, u, uc
REDUCED = [("r - r - 2", "rows"), ("c - c - 2", "cols"), ("b - b - 2", "both"), ("u - u - 2", "unit"),
           ("uc * 0 - 2", "unit_cols"), ("q", "rows")]  # q: a rows state assigned the number -2 (t - 3)
REDUCED_HEAD = ("optimizer Z\nstate r: rows, c: cols, q: rows\nr = row_mean(g)\nc = col_mean(g)\n"
                "b = row_mean(col_mean(g))\nu = unit_mean(g)\nuc = col_mean(unit_mean(g))\nq = t - 3\n")
ROWS_HEAD = "optimizer Z\nstate r: rows, q: rows\nr = row_mean(g)\nu = unit_mean(g)\nq = t - 3\n"


@pytest.mark.parametrize("f", sorted(REDUCE))
def test_a_reduction_of_a_reduced_value_simplified_to_a_number_counts_its_shape(f):
    # vectors: rows and units alone, on the torch paths (the fused path keeps rows from rank 2 on)
    vectors = [(ROWS_HEAD, [o for o in REDUCED if o[1] in ("rows", "unit")], [(7,)], PATHS[:2])]
    for head, operands, shapes, paths in [(REDUCED_HEAD, REDUCED, [(3, 4), (2, 3, 5)], PATHS)] + (
            [] if f.startswith("col_") else vectors):
        terms = " + ".join(f"{10 ** i} * {f}({x})" for i, (x, _) in enumerate(operands))
        cls = optdsl.compile(f"{head}p += {terms}\n")

        def want(p, operands=operands):
            return sum(10 ** i * REDUCE[f](torch.full(_reduced_like(p, kind), -2.0, dtype=p.dtype))
                       for i, (_, kind) in enumerate(operands))
        _steps_like(cls, want, shapes, paths)


@pytest.mark.parametrize("body, want", [
    ("sum(r - r + g - g)", lambda p: torch.zeros_like(p)),          # shaped like p: zeros
    ("sum(r - r + g - g + 1)", lambda p: torch.full_like(p, p.numel())),
    ("sum(r * 0 + g / g)", lambda p: torch.full_like(p, p.numel())),  # g = 1 here
    ("sum(r / r)", lambda p: torch.full_like(p, p.numel() / p.shape[-1])),  # r = 1 (row_mean of ones)
    ("norm(c * 0 + 3)", lambda p: torch.full_like(p, 3 * (p.numel() / p.shape[-2]) ** 0.5)),
    ("unit_norm(r - r + 1)", lambda p: torch.linalg.vector_norm(torch.ones(p.shape[:-1] + (1,), dtype=p.dtype),
                                                                dim=tuple(range(1, p.dim())), keepdim=True)),
    ("col_sum(r - r + 1) + row_sum(c - c + 1)", lambda p: torch.full_like(p, p.shape[-2] + p.shape[-1])),
])
def test_a_simplified_reduced_value_mixed_with_tensors(body, want):
    cls = optdsl.compile("optimizer Z\nstate r: rows, c: cols\nr = row_mean(g)\nc = col_mean(g)\n"
                         f"p += {body}\n")
    _steps_like(cls, want, [(3, 4), (2, 3, 5)])


# ---- empty parameters: the broadcast rule counts products of p's axes, exact where an axis is 0 --------
# A (2, 3, 0) parameter has 6 rows: the count numel / ncols was 0/0 (nan), which a scalar state, a rows
# state or a group value carries on (to the other tensors, in a group). Every rank, every zero axis; the
# values live in scalar states (p has no element to show them). Reference: torch reducing tensors of the
# operands' shapes, as above.
EMPTY_SHAPES = [(0,), (2, 0), (0, 3), (2, 3, 0), (2, 0, 3), (0, 2, 3), (1, 0, 1, 2), (2, 3, 0, 4), (2, 3, 5)]
INNER = {"": lambda x: x, "row_sum": REDUCE["row_sum"], "col_sum": REDUCE["col_sum"], "unit_norm": REDUCE["unit_norm"]}
OUTER = {"sum": REDUCE["sum"], "norm": REDUCE["norm"]}  # reductions that count what they reduce


@pytest.mark.parametrize("vector", [False, True], ids=["rank>=2", "rank1"])
def test_an_empty_parameter_counts_the_reduced_shapes_it_has(vector):
    head, operands = (ROWS_HEAD, [o for o in REDUCED if o[1] in ("rows", "unit")]) if vector else (REDUCED_HEAD, REDUCED)
    combos = [(i, o) for i in INNER for o in OUTER if not (vector and i == "col_sum")]
    lines = [f"s{k} = " + " + ".join(f"{10 ** j} * {o}({i}({x}))" if i else f"{10 ** j} * {o}({x})"
                                     for j, (x, _) in enumerate(operands)) for k, (i, o) in enumerate(combos)]
    decl = "state " + ", ".join(f"s{k}: scalar" for k in range(len(combos)))
    cls = optdsl.compile(head.replace("\n", f"\n{decl}\n", 1) + "\n".join(lines) + "\np += 1\n")
    shapes = [s for s in EMPTY_SHAPES if (len(s) == 1) == vector]
    for shape in shapes:
        states = {}
        for path in PATHS if not vector else PATHS[:2]:
            p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
            p.grad = torch.ones_like(p)
            opt = cls([p], **path)
            opt.step()
            # the rows and columns states too, as the for-loop path steps them (the fused path's blocks
            # cover p's elements: none of an empty parameter's)
            states.setdefault("for-loop", opt.state[p])
            torch.testing.assert_close(opt.state[p], states["for-loop"], rtol=1e-14, atol=0, equal_nan=True,
                                       msg=f"{shape} {path}")
            for k, (i, o) in enumerate(combos):
                want = sum(10 ** j * OUTER[o](INNER[i](torch.full(_reduced_like(p, kind), -2.0, dtype=p.dtype)))
                           for j, (_, kind) in enumerate(operands))
                torch.testing.assert_close(opt.state[p][f"s{k}"].double(), want, rtol=1e-14, atol=0,
                                           msg=f"{shape} {path} {lines[k]}")



@pytest.mark.parametrize("path", PATHS[:2], ids=str)
def test_a_spec_without_hyperparameters_replays_its_shapes(path):
    """The shape replay's signature was `def _shapes_z(param, t, *, **_)` for a spec with no
    hyperparameter (and no loss): a SyntaxError, so 'this is a bug in optdsl' at compile time."""
    cls = optdsl.compile("optimizer Z\nu = unit_mean(g)\np += row_mean(u) * g\n")
    p = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    p.grad = torch.ones_like(p)
    cls([p], **path).step()
    assert torch.equal(p.detach(), torch.ones_like(p))
    q = torch.nn.Parameter(torch.zeros(3))  # a vector: the replay names col_mean's rank (the spec's line)
    q.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"(?s)Z: col_mean\(\) needs parameters of rank 2 or more.*<spec>:3:6"):
        optdsl.compile("optimizer Z\nu = unit_mean(g)\np += col_mean(u) * g\n")([q], **path).step()


def test_a_reduction_of_matrix_work_simplified_to_a_number_counts_the_matrix():
    """`x - x + 1` of x = mm(g, T(g)) is an (nrows x nrows) matrix of ones per matrix of p: sum() of it is
    nrows^2 per matrix (9 on a (3, 4) parameter, 18 on (2, 3, 4)), not numel; the sizes are optdsl/shapes.py's
    (a hyperparameter's too: svd_u(g, k) is nrows x k)."""
    cls = optdsl.compile("optimizer W\nhyper k = 2 in [1, 3]\nrule ndim >= 2 {\n  x = mm(g, T(g))\n"
                         "  p += sum(x - x + 1) + 100 * norm(mm(T(g), g) * 0 - 2) + 1000 * row_sum(svd_u(g, k) * 0 + 1)"
                         "\n}\nrule {\n  p -= g\n}\n")

    def want(p):
        n, m, batch = p.shape[-2], p.shape[-1], p.numel() // (p.shape[-2] * p.shape[-1])
        return torch.full_like(p, batch * n * n + 100 * 2 * (batch * m * m) ** 0.5 + 1000 * 2)
    _steps_like(cls, want, [(3, 4), (2, 3, 4), (4, 3)])


def test_a_group_reduction_of_a_reduced_value_simplified_to_a_number_counts_its_shape():
    """Over every tensor of the group: `sum(r - r - 2)` of a rows state is -2 per row of each tensor (-6 for
    a (3, 4) and -2 for a (1, 5) parameter: -8), not -2 per element (-34); the group phase computes a
    scalar's part on zeros of the value's shape as written."""
    cls = optdsl.compile("optimizer G\nstate r: rows, c: cols\ngroup s = sum(r - r - 2) + 10 * norm(c * 0 + 1) + "
                         "100 * sum(unit_mean(g) * 0 + 1)\nr = row_mean(g)\nc = col_mean(g)\np += s\n")
    # with empty parameters of every zero axis (their rows, columns and units count: a mean of zeros along
    # an empty axis made the zeros nan)
    for shapes in ([(3, 4), (1, 5), (2, 3, 4)], [(3, 4), (2, 3, 0), (2, 0), (0, 3), (2, 0, 3), (1, 0, 1, 2)]):
        _group_counts(cls, shapes)


def _group_counts(cls, shapes):
    rows, cols = sum(math.prod(s[:-1]) for s in shapes), sum(math.prod(s[:-2]) * s[-1] for s in shapes)
    units = sum(s[0] for s in shapes)
    for path in PATHS:
        params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
        for q in params:
            q.grad = torch.ones_like(q)
        cls(params, **path).step()
        for q in params:
            want = torch.full_like(q, -2.0 * rows + 10 * cols ** 0.5 + 100 * units)
            torch.testing.assert_close(q.detach(), want, rtol=1e-14, atol=0, msg=str(path))


# ---- a group reduction's operand: one rule with the per-parameter statements (optdsl/shapes.py operand) ----
GROUP_SHAPES = [(3, 4), (1, 5), (2, 3, 4)]


@pytest.mark.parametrize("body, want", [
    # a reduction inside a group reduction follows the broadcast rule as in a step: norm(r - r - 2) is
    # 2 * sqrt(rows) per tensor, a scalar counting once per element of p (the group phase printed abs(-2))
    ("sum(norm(r - r - 2))", lambda ss: sum(math.prod(s) * 2 * math.prod(s[:-1]) ** 0.5 for s in ss)),
    ("sum(norm(-2) + g * 0)", lambda ss: sum(math.prod(s) * 2 * math.prod(s) ** 0.5 for s in ss)),
    ("sum(row_sum(c - c - 2))", lambda ss: sum(math.prod(s[:-2]) * -2 * s[-1] for s in ss)),
    ("sum(sum(r - r - 2) * g / g)", lambda ss: sum(math.prod(s) * -2 * math.prod(s[:-1]) for s in ss)),
    # a reduction is a scalar: sum(norm(g)) is numel * norm(g) per tensor (docs/language.md), not norm(g)
    ("sum(norm(g))", lambda ss: sum(math.prod(s) * math.prod(s) ** 0.5 for s in ss)),
    # mean and rms over the group divide by the elements of the value's shape, a rows state's rows (they
    # divided by p's elements: mean(r) of r = 3 was 3 / ncols)
    ("mean(r)", lambda ss: 3.0),
    ("rms(c)", lambda ss: 2.0),
    ("mean(r - r + 5)", lambda ss: 5.0),
])
def test_a_group_reduction_reads_its_operand_as_a_step_does(body, want):
    cls = optdsl.compile(f"optimizer G\nstate r: rows = 3, c: cols = -2\ngroup s = {body}\nr = r * 1\nc = c * 1\np += s\n")
    for path in PATHS:
        params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in GROUP_SHAPES]
        for q in params:
            q.grad = torch.ones_like(q)
        cls(params, **path).step()
        for q in params:
            torch.testing.assert_close(q.detach(), torch.full_like(q, want(GROUP_SHAPES)), rtol=1e-14, atol=0,
                                       msg=f"{body} {path}")


def test_a_group_reduction_of_matrix_work_that_is_a_number_is_refused():
    """The group phase counts a number on zeros of p's shape or a reduced one: matrix work's sizes (nrows^2
    per matrix here) it does not make, so the spec is refused where it would count p's elements."""
    with pytest.raises(SpecError, match=r"sum\(\) over the group of a \(nrows x nrows\) value that is a number") as err:
        optdsl.compile("optimizer G\ngroup s = sum(mm(g, T(g)) * 0 + 1)\np += s\n", "g.opt")
    assert "g.opt:2:" in str(err.value)


@pytest.mark.parametrize("expr", ["norm(0.5)", "norm(2 * 0.25)", "unit_norm(0.5) * 0 + norm(0.5)"])
def test_a_reduction_of_a_float_is_not_evaluated_by_its_mpmath_namesake(expr):
    """SymPy evaluates a function of floats by the mpmath function of its name: norm(0.5) was
    mpmath.norm(0.5) = 0.5 on every path, where the norm of 0.5 broadcast to a (3, 4) parameter is
    0.5 * sqrt(12) (norm(2) was right: an integer is not evaluated so). Found by tests/test_shape_properties.py."""
    cls = optdsl.compile(f"optimizer N\np += {expr}\n")
    _steps_like(cls, lambda p: torch.full_like(p, 0.5 * p.numel() ** 0.5), [(3, 4), (2, 3, 5)])


@pytest.mark.parametrize("body, where, shown", [
    ("p -= 0.1 * mm(qr(g * 0 + 0.5), g)", (4, 17), "qr() of a value that simplifies to the scalar 0.5"),
    ("x = mm(g, T(g))\n  p -= 0.1 * mm(x - x + lr, g)", (5, 14), "mm() of a value that simplifies to the scalar lr"),
])
def test_matrix_work_of_a_value_that_simplifies_to_a_scalar_is_a_located_error(body, where, shown):
    """qr(g * 0 + 0.5) was 'this is a bug in optdsl' (SymPy evaluated qr(0.5) by mpmath.qr, which raised),
    and mm(x - x + lr, g) a raw torch error at step (matmul of a 0-dim tensor)."""
    from optdsl.errors import SpecError
    from optdsl.pipeline import compile_source
    text = f"optimizer W\nhyper lr = 0.1\nrule ndim == 2 {{\n  {body}\n}}\nrule {{\n  p -= g\n}}\n"
    with pytest.raises(SpecError) as info:
        compile_source(text, "w.opt")
    assert (info.value.span.line, info.value.span.column) == where and shown in str(info.value)
    assert "bug in optdsl" not in str(info.value)


@pytest.mark.parametrize("init, want", [("scale >= eye / 3", 1.0), ("sqrt(scale + eye)", None)])
def test_a_matrix_state_s_initial_value_applies_functions_to_the_identity_as_a_tensor(init, want):
    """Fuzz seed 8623 (a Kron mutant, `Q1: gram(1) = scale >= (1/3) * eye`): the initial value was printed
    as a host float, float(scale >= _eye_like(...) / 3), a ValueError at the first step; now on the tensor."""
    cls = optdsl.compile(f"optimizer W\nhyper scale = 1\nrule ndim == 2 {{\n  state L: gram_rows = {init}\n"
                         "  p -= 0.1 * mm(L, g)\n}\nrule {\n  p -= g\n}\n")
    eye = torch.eye(3, dtype=torch.float64)
    L = torch.ones(3, 3, dtype=torch.float64) if want else torch.sqrt(1 + eye)
    for path in PATHS[:2]:
        p = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
        p.grad = torch.ones_like(p)
        cls([p], **path).step()
        torch.testing.assert_close(p.detach(), -0.1 * L @ torch.ones(3, 4, dtype=torch.float64), rtol=1e-15, atol=0)


def test_a_group_mean_over_empty_tensors_only_is_nan_as_torch():
    """mean and rms over a group whose tensors are all empty divide 0 by 0 elements: nan, as torch.mean
    of an empty tensor (the host raised ZeroDivisionError at step); a group holding a non-empty tensor
    still divides by its elements."""
    cls = optdsl.compile("optimizer G\nstate u: group\ngroup u = mean(g) + rms(g)\np -= 0 * g\n")
    for path in PATHS:
        for shapes, want in (([(0,), (2, 0)], math.nan), ([(0,), (2, 3)], 2.0)):
            params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
            for q in params:
                q.grad = torch.ones_like(q)
            opt = cls(params, **path)
            opt.step()
            got = opt.param_groups[0]["u"]
            assert (math.isnan(got) if math.isnan(want) else got == want), (shapes, path, got)


# ---- a maximum over no elements is -inf (max's identity), where torch.amax refuses ----------------------
# Kron (amax of its diagonal factors' terms) and SM3 (row_max/col_max) ended a step with a raw torch error on
# any empty parameter; a sharded parameter's empty shard and a group's maximum over no tensors were -inf
# already. The 0 x 0 factor of Kron's empty axis has norm 0 (its norm_lb), its solves and Grams are empty.
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 3), (2, 3, 0)], ids=str)
def test_a_maximum_over_no_elements_is_minus_inf(shape):
    cls = optdsl.compile("optimizer M\nrule ndim >= 2 {\n  state a: scalar, r: rows, c: cols\n"
                         "  a = amax(g)\n  r = row_max(g)\n  c = col_max(g)\n  p -= 0.1 * g\n}\n"
                         "rule {\n  state a: scalar\n  a = amax(g)\n  p -= 0.1 * g\n}\n")
    for path in PATHS:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        p.grad = torch.ones_like(p)
        opt = cls([p], **path)
        opt.step()
        want = {"a": torch.tensor(-math.inf, dtype=torch.float64)}
        if len(shape) >= 2:  # a row over no columns (3, 0) has no maximum; no rows (0, 3): an empty state
            want["r"] = torch.full((*shape[:-1], 1), -math.inf if shape[-1] == 0 else 0.0, dtype=torch.float64)
            want["c"] = torch.full((*shape[:-2], 1, shape[-1]), -math.inf if shape[-2] == 0 else 0.0,
                                   dtype=torch.float64)
        for name, value in want.items():
            got = opt.state[p][name]
            assert got.shape == value.shape, (path, name)
            assert torch.equal(got[got != 0] if name != "a" else got, value[value != 0] if name != "a" else value), (
                path, name, got)


@pytest.mark.parametrize("spec", sorted(p.stem for p in SPECS.glob("*.opt")))
def test_every_spec_steps_beside_empty_parameters(spec):
    """Every shipped optimizer steps a (4, 5) parameter beside empty ones of every zero axis, three steps on
    both torch paths, and the empty ones change nothing of it: bit for bit where the spec draws nothing
    (Kron's draws are keyed by rule, so another rule's tensors move them: finite there)."""
    cls = optdsl.load(SPECS / f"{spec}.opt")
    draws = "randn()" in (SPECS / f"{spec}.opt").read_text()
    for path in PATHS[:2]:
        for shape in [(0,), (0, 3), (3, 0), (2, 0, 3), (2, 3, 0)]:
            outs = []
            for params in ([(4, 5)], [(4, 5), shape]):
                ps = [torch.nn.Parameter(torch.linspace(-1, 1, math.prod(s), dtype=torch.float64).reshape(s))
                      for s in params]
                opt = cls(ps, **path)
                if draws:
                    opt.manual_seed(7)
                for i in range(3):
                    for x in ps:
                        x.grad = torch.cos(torch.arange(x.numel(), dtype=torch.float64) + i).reshape(x.shape)
                    opt.step(lambda: torch.tensor(1.5, dtype=torch.float64))  # AdaLo reads the loss
                assert ps[-1].shape == params[-1]
                outs.append(ps[0].detach())
            if draws:
                assert torch.isfinite(outs[1]).all(), (path, shape)
            else:
                assert torch.equal(outs[0], outs[1]), (path, shape)
