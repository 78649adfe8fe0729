"""`repeat COUNT { ... }` with a hyperparameter count (Muon's ns_steps): unrolled up to the bound
of the count's declared range, each round past its lower bound guarded, and a guarded round's work
done only when the count asks for it. Differential against torch.optim.Muon for several counts."""
from __future__ import annotations

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


def test_ns_steps_is_an_int_keyword_and_refused_outside_the_unrolled_bound():
    p = torch.zeros(3, 2, requires_grad=True)
    assert Muon([p]).param_groups[0]["ns_steps"] == 5 and type(Muon([p]).defaults["ns_steps"]) is int
    for bad in (17, 99, -1, 2.5):
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
    # each Newton-Schulz round is three products (x x^T, A A, B x); the 16 unrolled rounds are
    # not all run: only ns_steps of them
    assert [_matmuls(n, foreach) for n in (0, 2, 5)] == [0, 6, 15]


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
