"""`repeat COUNT { ... }` with a hyperparameter count. With matrix work in its body (Muon's
ns_steps) it is kept as a loop: a Python `for` loop of COUNT rounds on every path, so any count
torch.optim.Muon takes (up to 99, none for 0 or less) runs, and code and compile time do not grow
with it. Otherwise it is unrolled up to the bound of the count's declared range, each round past
its lower bound guarded. Differential against torch.optim.Muon for several counts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import optdsl
from generated.muon import Muon
from optdsl.errors import SpecError
from optdsl.pipeline import compile_source

SHAPES = [(5, 3), (3, 7), (4, 4)]  # tall (iterated transposed), wide, square


def _run(cls, ns_steps, dtype, steps=3, **kw):
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    opt = cls(params, lr=0.02, weight_decay=0.1, ns_steps=ns_steps, **kw)
    for k in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, dtype=dtype, generator=torch.Generator().manual_seed(10 * k + i)) * (i + 1)
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("ns_steps", [0, 1, 2, 6, 16])
def test_muon_follows_ns_steps_as_torch_does(ns_steps, foreach, dtype):
    # Newton-Schulz runs in bfloat16 on both sides, each product rounded as torch rounds it (ours
    # rounds b*A + c*A@A once, torch's addmm too, but their float32 sums may differ by an ulp before
    # rounding), so the results agree to a few bits of the bfloat16 iterate (|x| <= ~1.2) scaled by
    # lr and the shape factor: 3 * 2^-8 * 0.02 * sqrt(5/3) = 3e-4 after 16 rounds; a single round
    # more or fewer moves p by more than 1e-3 (asserted below).
    ours, opt = _run(Muon, ns_steps, dtype, foreach=foreach)
    ref, _ = _run(torch.optim.Muon, ns_steps, dtype)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=3e-4, rtol=0)
    assert opt.param_groups[0]["ns_steps"] == ns_steps
    if ns_steps:
        other, _ = _run(torch.optim.Muon, ns_steps - 1, dtype)
        assert max((a - b).abs().max().item() for a, b in zip(ours, other)) > 1e-3


SHAPES64 = [(13, 5), (4, 9), (6, 6)]


def _run_paths(cls, ns_steps, steps=3, **kw):
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES64]
    opt = cls(params, lr=0.02, ns_steps=ns_steps, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    return [p.detach() for p in params]


PATHS = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("ns_steps", [17, 50, 0, -3])
def test_muon_takes_counts_past_the_old_bound_as_torch_does(ns_steps, path):
    # float64 parameters, Newton-Schulz in bfloat16 as torch: the for-loop and foreach paths give
    # torch's numbers exactly; the fused path computes the momentum in its kernel (lerp's float64
    # form), an ulp of the momentum (|buf| < 4, 2^-52 * 4 = 9e-16) apart before the bfloat16
    # rounding, which then agrees. 0 and less: no round, as Python's range in torch's loop.
    if path == "fused" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused path runs under TRITON_INTERPRET=1 here")
    ours = _run_paths(Muon, ns_steps, **PATHS[path])
    ref = _run_paths(torch.optim.Muon, ns_steps)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=0 if path != "fused" else 1e-15, rtol=0)


def _newton_schulz64(g, steps, a=3.4445, b=-4.775, c=2.0315, eps=1e-7):
    """torch.optim.Muon's _zeropower_via_newtonschulz with its bfloat16 casts left out (float64)."""
    x = g.T if g.size(0) > g.size(1) else g
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + torch.addmm(gram, gram, gram, beta=b, alpha=c) @ x
    return x.T if g.size(0) > g.size(1) else x


@pytest.mark.parametrize("path", list(PATHS))
def test_ninety_nine_rounds_in_float64_agree_with_the_reference_loop(path):
    # In bfloat16, 99 rounds of ours and torch's drift apart by a few bfloat16 ulps of the iterate
    # (torch's addmm sums in float32 before rounding, ours in the arithmetic's dtype: from about
    # 60 rounds on, a rounding that lands the other way is carried on). With ns_bfloat16=False both
    # sides are float64: ours against torch's loop in float64, one step from p with momentum 0 (p1
    # = p0 - lr * sqrt(max(1, rows/cols)) * NS(g)). Newton-Schulz keeps the iterate's singular values
    # in about [0.7, 1.2], so float64 rounding stays near 2^-52 * (products of size <= 13) ~ 1e-14.
    if path == "fused" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused path runs under TRITON_INTERPRET=1 here")
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES64]
    start = [p.detach().clone() for p in params]
    opt = Muon(params, lr=0.02, weight_decay=0.0, momentum=0.0, nesterov=False, ns_steps=99,
               ns_bfloat16=False, **PATHS[path])
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    opt.step()
    for p, x in zip(params, start):
        want = x - 0.02 * max(1, p.size(0) / p.size(1)) ** 0.5 * _newton_schulz64(p.grad, 99)
        torch.testing.assert_close(p.detach(), want, atol=1e-13, rtol=0)
        assert not torch.allclose(p.detach(), x - 0.02 * max(1, p.size(0) / p.size(1)) ** 0.5
                                  * _newton_schulz64(p.grad, 98), atol=1e-9, rtol=0)  # one round less shows


def test_ns_steps_is_an_int_keyword_refused_where_torch_fails():
    p = torch.zeros(3, 2, requires_grad=True)
    assert Muon([p]).param_groups[0]["ns_steps"] == 5 and type(Muon([p]).defaults["ns_steps"]) is int
    for fine in (17, 99, 0, -1):  # torch.optim.Muon steps with each (no round for 0 or less)
        assert Muon([p], ns_steps=fine).param_groups[0]["ns_steps"] == fine
    # torch raises at step: ValueError for 100 and more ("less than 100"), TypeError from range() for
    # 2.5 and -inf; ours at construction, a ValueError naming ns_steps for each
    for bad in (100, 2.5, float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="ns_steps"):
            Muon([p], ns_steps=bad)


def _matmuls(ns_steps, foreach):
    """How many matrix products a step does on one 4 x 6 matrix."""
    calls = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
                calls.append(func)
            return func(*args, **(kwargs or {}))

    p = torch.randn(4, 6, requires_grad=True)
    p.grad = torch.randn(4, 6)
    opt = Muon([p], ns_steps=ns_steps, foreach=foreach)
    with Count():
        opt.step()
    return len(calls)


@pytest.mark.parametrize("foreach", [False, True])
def test_rounds_past_the_count_do_no_work(foreach):
    # each Newton-Schulz round is three products (x x^T, A A, B x): ns_steps rounds run, no more
    assert [_matmuls(n, foreach) for n in (0, 2, 5, 99, -4)] == [0, 6, 15, 297, 0]


SPEC = """optimizer R
hyper k = 2 {range}
rule {{
  c = g
  repeat {count} {{
    c = 0.5 * c + g
  }}
  p -= c
}}
"""


def test_a_counted_loop_agrees_with_the_written_out_one():
    counted = optdsl.compile(SPEC.format(range="in [0, 4]", count="k"))
    for k in range(5):
        fixed = optdsl.compile(SPEC.format(range="", count=k)) if k else None
        p, q = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
        p.grad = q.grad = torch.tensor([1.0, -2.0, 0.25])
        counted([p], k=k).step()
        if fixed:
            fixed([q], k=k).step()
        else:
            q.data -= q.grad  # no round: c is g
        torch.testing.assert_close(p, q, atol=0, rtol=0)


@pytest.mark.parametrize("range_, count, message", [
    ("", "k", "'k' counts a 'repeat' but has no range to bound it"),
    ("in [0, inf)", "k", "must end at a whole number from 1 to 64"),
    ("in [0, 100]", "k", "must end at a whole number from 1 to 64"),
    ("in [0, 4]", "j", "the count of 'repeat' must be a number or a hyperparameter, not 'j'"),
    ("in [0, 64]", "k", "a rule may have at most 128"),
])
def test_a_count_without_a_usable_bound_is_a_located_spec_error(range_, count, message):
    text = SPEC.format(range=range_, count=count).replace("c = 0.5 * c + g", "c = 0.5 * c + g\n    c = c * 1.5")
    with pytest.raises(SpecError) as info:
        compile_source(text, "r.opt")
    assert message in info.value.message and info.value.span is not None and info.value.line > 1


# a loop kept as a loop (matrix work, counted by k) that swaps two carried values each round
SPIN = (Path(__file__).resolve().parent / "specs" / "lang" / "spin.opt").read_text()


@pytest.mark.parametrize("path", list(PATHS))
def test_a_kept_loop_carries_its_values_together(path):
    # two carried values, y's next value x's current one: each round ends binding both at once (a
    # binding of x first would hand y the new x); against the loop as Python writes it, float64:
    # the same operations but for the order of a product's factors (0.1 * (x y^T) x), a few ulps
    # apart relatively (the cubic grows |x| to 1e4 in 9 rounds, so no absolute bound); a binding
    # one after the other is wrong from the second round on, by far more
    if path == "fused" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused path runs under TRITON_INTERPRET=1 here")
    Spin = optdsl.compile(SPIN)
    for k in (0, 1, 4, 9, -2):
        gen = torch.Generator().manual_seed(k + 3)
        p = torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64))
        p.grad = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        x, y = p.grad.clone(), 0.5 * p.grad
        for _ in range(k):
            x, y = 0.5 * y + 0.1 * (x @ y.T) @ x, x
        want = p.detach() - 0.01 * (x + y)
        Spin([p], k=k, **PATHS[path]).step()
        torch.testing.assert_close(p.detach(), want, atol=1e-15, rtol=4 * 2.0**-52)


def test_a_kept_loop_is_one_round_of_code_whatever_its_count():
    import time
    start = time.process_time()
    small = compile_source(SPIN, "spin.opt").python
    big = compile_source(SPIN.replace("(-inf, 10)", "[0, 1e9]"), "spin.opt").python
    assert time.process_time() - start < 10  # two compiles; issue 12: any spec compiles in under 2 s
    assert len(big.splitlines()) == len(small.splitlines())
    assert small.count("for _ in range(int(k)):") == 3  # for-loop, foreach and fused matrix section
    muon = (Path(__file__).resolve().parent.parent / "generated" / "muon.py").read_text()
    # one round (3 products) on each path (for-loop, its staged form for DTensors, foreach, fused
    # matrix section) and in the replay that names a step's shape error
    assert muon.count("torch.matmul(") == 15 and "ns_steps >= " not in muon


def test_a_round_that_changes_a_carried_shape_is_a_located_spec_error():
    text = SPIN.replace("x = 0.5 * y + 0.1 * mm(mm(x, T(y)), x)", "x = mm(x, T(y))")
    with pytest.raises(SpecError) as info:
        compile_source(text, "spin.opt")
    assert "a round of this 'repeat' starts from a value (nrows x ncols)" in info.value.message
    assert info.value.line == 5
