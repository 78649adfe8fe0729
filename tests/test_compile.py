"""torch.compile(opt.step, fullgraph=True): no graph break, no recompilation as a scheduler
moves the learning rate, and the same parameters as the reference over several steps.

Dynamo traces with a counting backend that runs the captured graph as it is
(CompileCounter), which proves the graph whole and counts compilations; one test runs
Inductor for real. Steps run in float64 so that the compiled scalars (0-dim tensors)
and the reference's host floats agree to rounding.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from test_differential import CASES, SMALL, _makers, spec

STEPS = 8  # RAdam's rectified branch starts at t = 6
pytestmark = pytest.mark.filterwarnings(
    # the scheduler wraps opt.step after we compiled it, so it never sees its own wrapper called
    "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")


def _grads(shapes, dtype, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) * 10.0 ** (i - 2) for i, s in enumerate(shapes)]
            for _ in range(steps)]


def _train(make, shapes, dtype, grads, *, compile_with=None, tensor_lr=False, scheduler=True):
    """Parameters after len(grads) steps, each followed by a StepLR step (or the same by hand:
    the paper references take every group key as a hyperparameter, initial_lr too)."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    opt = make(params)
    if tensor_lr:  # as torch.optim recommends for a compiled step: the scheduler fills it in place
        for group in opt.param_groups:
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float64)
    step = torch.compile(opt.step, backend=compile_with, fullgraph=True) if compile_with else opt.step
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7) if scheduler else None
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        step()
        if sched:
            sched.step()
        else:
            for group in opt.param_groups:
                group["lr"] *= 0.7
    return [p.detach() for p in params], opt


def _relative(ours, ref):
    return max(((a - b).abs().max() / (b.abs().max() + 1e-300)).item() for a, b in zip(ours, ref))


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_is_one_graph_and_matches_reference(case):
    make_ours, make_ref = _makers(case)
    grads = _grads(SMALL, torch.float64, STEPS)
    counter = CompileCounter()
    with torch._dynamo.config.patch(error_on_recompile=True):
        ours, opt = _train(lambda ps: make_ours(ps, foreach=False), SMALL, torch.float64, grads,
                           compile_with=counter, tensor_lr=True)
    torch._dynamo.reset()
    eager, _ = _train(lambda ps: make_ours(ps, foreach=False), SMALL, torch.float64, grads, tensor_lr=True)
    ref, _ = _train(make_ref, SMALL, torch.float64, grads, scheduler=False)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    assert opt.param_groups[0]["lr"].item() == pytest.approx(CASES[case][1]["lr"] * 0.7**STEPS)
    assert _relative(ours, eager) < 1e-13  # the same float64 scalars, as tensors
    assert _relative(ours, ref) < 1e-10


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["f32", "bf16"])
def test_compiled_low_precision_matches_eager(dtype, tol):
    # float32 parameters keep a float32 step count; compiled, the scalars are still float64.
    # bfloat16 ones are updated in float32 with float32 states, compiled as eager.
    make_ours, _ = _makers("adamw-wd")
    grads = _grads(SMALL, dtype, STEPS)
    eager, _ = _train(lambda ps: make_ours(ps, foreach=True), SMALL, dtype, grads)
    compiled, opt = _train(lambda ps: make_ours(ps, foreach=True), SMALL, dtype, grads,
                           compile_with=CompileCounter(), tensor_lr=True)
    torch._dynamo.reset()
    assert {s["exp_avg"].dtype for s in opt.state.values()} == {torch.float32}
    assert _relative([x.double() for x in compiled], [x.double() for x in eager]) < tol


def test_float_lr_recompiles_once_then_is_dynamic():
    # What the README says of a float lr: Dynamo specialises on it at first, then makes it dynamic.
    make_ours, _ = _makers("adam-plain")
    counter = CompileCounter()
    _train(lambda ps: make_ours(ps, foreach=False), SMALL, torch.float64, _grads(SMALL, torch.float64, 5),
           compile_with=counter)
    torch._dynamo.reset()
    assert counter.frame_count == 2


def test_compiled_step_catches_a_wrong_constant():
    # The tolerance above is tight enough to see a bias correction off by 0.001 in b2.
    make_ours, make_ref = _makers("adamw-default")
    grads = _grads(SMALL, torch.float64, STEPS)
    AdamW = spec("adamw")
    ours, _ = _train(lambda ps: AdamW(ps, lr=0.01, b2=0.998), SMALL, torch.float64, grads,
                     compile_with=CompileCounter(), tensor_lr=True)
    torch._dynamo.reset()
    ref, _ = _train(make_ref, SMALL, torch.float64, grads, scheduler=False)
    assert _relative(ours, ref) > 1e-6


@pytest.mark.parametrize("foreach", [False, True])
def test_eager_tensor_lr_is_bitwise_the_float_lr(foreach):
    make_ours, _ = _makers("adam-wd")
    grads = _grads(SMALL, torch.float32, 4)
    floats, _ = _train(lambda ps: make_ours(ps, foreach=foreach), SMALL, torch.float32, grads)
    tensors, _ = _train(lambda ps: make_ours(ps, foreach=foreach), SMALL, torch.float32, grads,
                        tensor_lr=True)
    assert all(torch.equal(a, b) for a, b in zip(floats, tensors))


def test_inductor_compiled_adamw_matches_torch():
    """The one real compilation: Inductor's generated C++ for AdamW against torch.optim.AdamW."""
    shapes = [(7,), (13, 5)]
    grads = _grads(shapes, torch.float32, 3)
    AdamW = spec("adamw")
    ours, _ = _train(lambda ps: AdamW(ps, lr=0.01, wd=0.1), shapes, torch.float32, grads,
                     compile_with="inductor", tensor_lr=True)
    torch._dynamo.reset()
    ref, _ = _train(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False),
                    shapes, torch.float32, grads)
    assert _relative(ours, ref) < 1e-5


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("mode", [None, "all_diag"])
def test_compiled_kron_rank3_step_is_one_graph(mode, foreach):
    """Kron's rank-3 rules (gram(K) factors worked on by mm_axis, rsolve_triu_axis, gram_axis; or,
    all_diag, axis(K) ones by axis_sum), compiled whole: one graph over the steps, no recompilation.
    Compiled, the probes come from torch's generator (as documented), so a step that updates the
    factors draws other numbers than eager: with precondition_lr=0 after an eager warm-up (factors far
    from the identity) the probes change nothing, and compiled equals eager to float64's rounding; with
    it, the compiled step moves the factors too."""
    import io

    from generated.kron import Kron
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in ((4, 3, 5), (5, 1, 3))]
    warm = Kron(params, lr=0.01, precondition_lr=0.5, memory_save_mode=mode)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        warm.step()
    buf = io.BytesIO()
    torch.save(warm.state_dict(), buf)
    grads = _grads([p.shape for p in params], torch.float64, 4, seed=2)
    factors = "Q"  # triangular gram(K) or diagonal axis(K), by the state list (a side of 1: diagonal)
    for plr in (0.0, 0.1):
        out = {}
        for compiled in (True, False):
            ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = Kron(ps, lr=0.01, precondition_lr=plr, memory_save_mode=mode, foreach=foreach)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            saved["param_groups"] = [dict(g, lr=torch.tensor(0.01, dtype=torch.float64), precondition_lr=plr,
                                          foreach=foreach) for g in saved["param_groups"]]
            opt.load_state_dict(saved)
            before = {k: opt.state[ps[0]][f"{factors}{k}"].clone() for k in range(3)}
            counter = CompileCounter()
            step = torch.compile(opt.step, backend=counter, fullgraph=True) if compiled else opt.step
            with torch._dynamo.config.patch(error_on_recompile=True):
                for gs in grads:
                    for p, g in zip(ps, gs):
                        p.grad = g.clone()
                    step()
            if compiled:
                assert counter.frame_count == 1
            torch._dynamo.reset()
            assert all(torch.isfinite(p).all() for p in ps)
            moved = [not torch.equal(opt.state[ps[0]][f"{factors}{k}"], before[k]) for k in range(3)]
            assert moved == [plr > 0] * 3, (plr, moved)  # d1 and Q1 of (4, 3, 5) too: its axis 1 has 3
            out[compiled] = ps
        if plr == 0:
            start = torch.ones(4, 1, 1, dtype=torch.float64) if factors == "d" else torch.eye(4, dtype=torch.float64)
            assert not torch.equal(before[0], start)  # the warm-up moved the factors from where they start
            assert _relative(out[True], out[False]) < 1e-13
