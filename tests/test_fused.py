"""The fused Triton path: one launch per step and (device, dtype), equal to the PyTorch paths.

Under TRITON_INTERPRET=1 (tests/conftest.py) the kernels run on CPU tensors; with
TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled on the GPU.
"""
import copy
import importlib
import os
import tempfile

import pytest
import torch

import optdsl

triton = pytest.importorskip("triton")

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

# spec module, class, hyperparameter settings
CASES = [
    ("nsgda", "NSGDA", [{}, dict(momentum=0.5, wd=0.0)]),
    ("adamw", "AdamW", [{}, dict(lr=1e-2, wd=0.3, b1=0.5)]),
    ("lamb", "LAMB", [{}, dict(wd=0.1, max_w=0.5)]),
    ("nadam", "NAdam", [{}, dict(wd=0.1, momentum_decay=0.01)]),  # a scalar state: written by a last launch
    ("adanorm", "AdaNorm", [{}]),
    ("amos", "Amos", [{}, dict(momentum=0.9, extra_l2=0.01)]),  # reads the shape (ndim, ncols) from a table
    ("adam", "Adam", [{}, dict(wd=0.1, eps=1e-3)]),
    ("amsgrad", "AMSGrad", [dict(lr=1e-2, wd=0.1)]),
    ("adamax", "Adamax", [dict(wd=0.1)]),
    ("radam", "RAdam", [{}, dict(b2=0.9, wd=0.1)]),
    ("lion", "Lion", [dict(lr=1e-2, wd=0.1)]),
    ("sgd", "SGD", [dict(lr=1e-2), dict(lr=1e-2, momentum=0.9, nesterov=1, wd=0.1),
                    dict(lr=1e-2, momentum=0.9, dampening=0.5)]),
    ("rmsprop", "RMSprop", [{}, dict(centered=1, momentum=0.9, wd=0.1)]),
    ("adagrad", "Adagrad", [dict(lr_decay=0.01, wd=0.1, initial_accumulator_value=0.1)]),
    ("adam_atan2", "AdamAtan2", [{}, dict(wd=0.1, a=2.0, b=0.5)]),  # atan2: the template's _atan2
]
SHAPES = [(1,), (7,), (13, 5), (2100,)]  # 2100 spans three blocks of 1024
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def _run(cls, kw, dtype, steps=8, **mode):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for s in SHAPES]
    opt = cls(params, **kw, **mode)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
            if i == 1 and step % 3 == 1:  # a parameter that sometimes has no gradient
                p.grad = None
        opt.step()
    return params, opt


def _run_both(cls, kw, dtype, steps=8):
    """The fused and foreach paths side by side on the same gradients (those of `_run`). Also: where
    a bfloat16 or float16 parameter's elements ever differed between the two after a step, and the
    largest magnitude each state of each parameter took over the steps (the reference's)."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for s in SHAPES]
    fused, ref = [x.clone() for x in init], [x.clone() for x in init]
    fused_opt, ref_opt = cls(fused, **kw, fused=True), cls(ref, **kw, foreach=True)
    diverged = [torch.zeros(x.shape, dtype=torch.bool, device=DEVICE) for x in init]
    largest = [{} for _ in init]
    for step in range(steps):
        for i, (a, b) in enumerate(zip(fused, ref)):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
            a.grad, b.grad = (None, None) if i == 1 and step % 3 == 1 else (g.clone(), g.clone())
        fused_opt.step()
        ref_opt.step()
        for i, (a, b) in enumerate(zip(fused, ref)):
            if dtype in (torch.bfloat16, torch.float16):  # float32 and float64 p differ by rounding, as states do
                diverged[i] |= a != b
            for key, value in ref_opt.state[b].items():
                if key != "step" and value.numel():
                    largest[i][key] = max(largest[i].get(key, 0.0), value.abs().max().item())
    return (fused, fused_opt), (ref, ref_opt), diverged, largest


# A state's new value is a few floating-point operations on the old one, the gradient and p. Both
# paths do the same operations, but may round a different few differently (op order; torch's CPU
# kernels contract add-with-alpha into a fused multiply-add, compiled Triton contracts a*b + c): at
# most ROUNDINGS roundings per step differ, each by at most u * M, u the unit roundoff of the
# state's dtype and M the largest magnitude among the terms, which is bounded by the largest value
# the state takes over the run. Carried errors are not amplified: each state's old value enters
# with a factor of at most 1 (decays, momentum 0.9), and the relative error of a denominator is at
# most a few u. So after `steps` steps |fused - foreach| <= steps * ROUNDINGS * u * M. This is an
# absolute bound: a state summing terms of opposite sign (RMSprop's momentum buffer: g/avg, up to
# 1/sqrt(1 - alpha) = 10 at step 1, summed with momentum 0.9) can end far below M, where a bound
# relative to the final value fails by one float32 step of M (measured: 9.5e-7 = 2^-20 at M = 10,
# with p equal on both paths at every step; a relative 1e-5 plus 1e-6 missed it by 1.2 on another
# CPU). Where p itself differed after some step (a float32 result on two sides of a bfloat16 or
# float16 rounding boundary, which the parameter check allows in 2% of elements), the paths
# continue from different parameters: a state that reads p (weight decay in g) moves by
# wd * (one rounding step of p) through every later term, including 1/avg, which no bound ties to
# u: those elements' states are not compared (the parameter check counts them).
ROUNDINGS = 4
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("module,name,settings", CASES, ids=[c[0] for c in CASES])
def test_fused_equals_foreach(module, name, settings, dtype):
    mod = importlib.import_module(f"generated.{module}")
    cls = getattr(mod, name)
    steps = 8
    for kw in settings:
        before = mod.LAUNCHES
        (fused, fused_opt), (ref, ref_opt), diverged, largest = _run_both(cls, kw, dtype, steps)
        # whole-tensor norms: accumulate, then update; scalar states: written by a per-tensor launch last
        stages = {"nsgda": 2, "lamb": 2, "nadam": 2, "adanorm": 3, "amos": 3}.get(module, 1)
        assert mod.LAUNCHES - before == steps * stages  # per step: one device, one dtype
        for a, b in zip(fused, ref):
            if dtype in (torch.bfloat16, torch.float16):  # float32 arithmetic, round to nearest even:
                # the same value, or a rounding step apart where float32 op order differs (compiled,
                # Triton also contracts a*b+c into one fused multiply-add: allow two steps there)
                ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10) * (2 if DEVICE == "cuda" else 1)
                torch.testing.assert_close(a.float(), b.float(), rtol=ulp, atol=1e-6)
                assert (a == b).float().mean() > 0.98
            else:
                torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])
        for pa, pb, apart, most in zip(fused, ref, diverged, largest):  # states: float32 for bfloat16 parameters
            for key, value in ref_opt.state[pb].items():
                got = fused_opt.state[pa][key]
                assert got.dtype == value.dtype
                # `step` is on the parameter's device for the fused kernel, on the CPU for foreach
                assert got.device == (pa.device if key == "step" else value.device)
                if key == "step":
                    assert got.item() == value.item()
                    continue
                low = 1e-12 if value.dtype == torch.float64 else 1e-5 if DEVICE == "cpu" else 1e-4
                atol = max(low / 10, steps * ROUNDINGS * UNIT_ROUNDOFF[value.dtype] * most.get(key, 0.0))
                same = ~apart if value.shape == pb.shape else torch.ones_like(value, dtype=torch.bool)
                if value.shape != pb.shape and apart.any():  # a scalar or reduced state: all of p feeds it
                    continue
                torch.testing.assert_close(got.to(value.device)[same], value[same], rtol=low, atol=atol)


def test_fused_adamw_matches_torch_adamw_float64():
    from generated.adamw import AdamW
    ours, _ = _run(AdamW, dict(lr=1e-2, wd=0.1), torch.float64, steps=20, fused=True)
    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE) for s in SHAPES]
    opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(20):
        for i, p in enumerate(ref):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(DEVICE)
            if i == 1 and step % 3 == 1:
                p.grad = None
        opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_one_launch_for_two_hundred_tensors_and_lr_changes_are_data():
    from generated import adamw
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(int(torch.randint(1, 300, (1,), generator=gen)), generator=gen).to(DEVICE)
              for _ in range(200)]
    opt = adamw.AdamW(params, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = adamw.LAUNCHES
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        opt.step()
        sched.step()
    assert adamw.LAUNCHES - before == 3
    cache = getattr(adamw._adamw_0_kernel, "cache", None)
    if DEVICE == "cuda" and isinstance(cache, dict):  # a new lr is a tensor's contents, not a new kernel
        assert sum(len(c) for c in cache.values()) == 1


def test_fused_where_it_cannot_run_says_why(monkeypatch):
    from generated import adamw
    from generated.adamw import AdamW
    monkeypatch.setattr(adamw, "triton", None)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        AdamW([torch.zeros(3, device=DEVICE)], fused=True)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        AdamW([torch.zeros(3)], fused=True, foreach=True)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
            AdamW([torch.zeros(3)], fused=True)
    # default: fused only for CUDA parameters
    p = torch.zeros(3, device=DEVICE)
    opt = AdamW([p])
    p.grad = torch.ones(3, device=DEVICE)
    before = adamw.LAUNCHES
    opt.step()
    assert adamw.LAUNCHES - before == (1 if DEVICE == "cuda" else 0)


def test_compile_in_memory_with_triton_compiling_for_real(tmp_path):
    """@triton.jit needs the kernel's source: optdsl.compile registers it (no interpreter here)."""
    import subprocess
    import sys
    code = ("import torch, optdsl\n"
            "C = optdsl.compile('optimizer X\\nhyper lr = 0.1\\nmask = 1 - lr^t\\np -= mask * g\\n')\n"
            "p = torch.ones(3); p.grad = torch.ones(3); C([p]).step(); print(p.tolist())\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    assert [round(x, 6) for x in eval(done.stdout)] == [0.1, 0.1, 0.1]  # 1 - (1 - 0.1)


def test_every_reduction_fused_in_stages():
    import optdsl
    cls = optdsl.compile(
        "optimizer Reduce\nhyper lr = 0.1 in [0, inf)\nstate m\n"
        "m = lerp(m, g, 0.5)\n"
        "u = g / (rms(g) + 1) + mean(m) + sum(g) * 1e-3 + amax(g) * 0.1 - amax(-m) + m / (norm(m) + 1)\n"
        "p -= lr * u / (norm(u) + 1)\n")  # a reduction of a value that needs reductions: 2 stages
    module = importlib.import_module(cls.__module__)
    for dtype in (torch.float64, torch.float32):
        before = module.LAUNCHES
        fused, _ = _run(cls, {}, dtype, steps=4, fused=True)
        assert module.LAUNCHES - before == 4 * 3
        ref, _ = _run(cls, {}, dtype, steps=4, foreach=False)
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a, b, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("fused", [True, False])
def test_a_reduction_of_a_scalar_runs_over_a_tensor_shaped_like_p(fused):
    import optdsl
    cls = optdsl.compile("optimizer S\nhyper lr = 0.5\np -= (sum(p - p + 1) + norm(lr)) * g\n")
    p = torch.zeros(4, dtype=torch.float64, device=DEVICE)
    p.grad = torch.ones(4, dtype=torch.float64, device=DEVICE)
    cls([p], fused=fused).step()
    assert p.tolist() == [-5.0] * 4  # 4 ones summed, plus 0.5 * sqrt(4)


def test_bfloat16_states_fused_track_the_foreach_path():
    """state_dtype=bfloat16: the kernel rounds states stochastically (its own random numbers), so the
    two paths agree to bfloat16 state noise, and both stay near float32 states."""
    from generated.adamw import AdamW
    fused, fused_opt = _run(AdamW, dict(lr=1e-2, state_dtype=torch.bfloat16), torch.float32, fused=True)
    ref, _ = _run(AdamW, dict(lr=1e-2, state_dtype=torch.bfloat16), torch.float32, foreach=True)
    exact, _ = _run(AdamW, dict(lr=1e-2), torch.float32, foreach=True)
    for a, b, c in zip(fused, ref, exact):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
        torch.testing.assert_close(a, c, rtol=0, atol=2e-3)
    assert {s.dtype for st in fused_opt.state.values() for k, s in st.items() if k != "step"} == {torch.bfloat16}


def test_a_scalar_state_fed_by_the_loss_fuses():
    """AdaLo: its loss average is one number per tensor, updated by the last launch of the step."""
    from generated import adalo
    results = []
    for mode in (dict(fused=True), dict(foreach=True)):
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE) for s in SHAPES]
        opt = adalo.AdaLo(params, **mode)
        before = adalo.LAUNCHES
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(DEVICE)
            loss = torch.rand((), generator=gen).item() + 0.5
            opt.step(lambda: loss)
        results.append((params, opt, adalo.LAUNCHES - before))
    (fused, fused_opt, launches), (ref, ref_opt, _) = results
    assert launches == 5 * 2
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused_opt.state[a]["loss_avg"].cpu(), ref_opt.state[b]["loss_avg"].cpu(),
                                   rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("module,name", [("adam_gc", "AdamGC"), ("sgd_agc", "SGDAGC"),
                                         ("adamw_softclip", "AdamWSoftClip")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_unit_reductions_fused_equal_foreach(module, name, dtype):
    """One value per output unit (gradient centralisation, AGC, soft clip): a first launch sums each
    unit with atomics, the update gathers it back. Units that cross blocks, rank 1, 2 and 3."""
    mod = importlib.import_module(f"generated.{module}")
    shapes = [(1,), (7,), (3, 1, 4), (40, 60), (2100,)]
    out = []
    for mode in (dict(fused=True), dict(foreach=True)):
        gen = torch.Generator().manual_seed(5)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for s in shapes]
        opt = getattr(mod, name)(params, **mode)
        before = mod.LAUNCHES
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
            opt.step()
        out.append((params, mod.LAUNCHES - before))
    (fused, launches), (ref, _) = out
    assert launches == 4 * 2
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


def test_a_unit_reduction_of_a_reduced_value_is_refused_clearly():
    import optdsl
    cls = optdsl.compile("optimizer U\nhyper lr = 0.1\np -= lr * unit_mean(g - mean(g))\n")
    with pytest.raises(RuntimeError, match="unit_mean\\(\\) of a value that needs another reduction"):
        cls([torch.zeros(3, 2, device=DEVICE)], fused=True)


@pytest.mark.parametrize("body, why", [
    ("p -= 0.1 * sum(unit_norm(g)) * g", r"sum\(\) of a value with one number per output unit"),
    ("p -= 0.1 * unit_norm(row_mean(g)) * g", r"unit_norm\(\) of a value that needs another reduction"),
    ("w = mm(mm(g, T(g)), g) * norm(g)\np -= 0.1 * w", r"matrix work that reads a reduction \(norm\(g\)\)"),
])
def test_what_the_fused_path_cannot_take_it_names(body, why):
    import optdsl
    cls = optdsl.compile(f"optimizer Refused\n{body}\n", "refused.opt")
    p = torch.nn.Parameter(torch.randn(3, 4, device=DEVICE))
    with pytest.raises(RuntimeError, match=why):
        cls([p], fused=True)
    p.grad = torch.randn(3, 4, device=DEVICE)
    cls([p]).step()  # fused=None takes another path


def test_periodic_work_fuses():
    """`every k` reads t mod k inside the kernel (a Mod once printed as nothing there)."""
    from generated import lookahead_adam
    fused, _ = _run(lookahead_adam.LookaheadAdam, dict(lr=1e-2, k=3), torch.float64, steps=7, fused=True)
    ref, _ = _run(lookahead_adam.LookaheadAdam, dict(lr=1e-2, k=3), torch.float64, steps=7, foreach=True)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_locals_named_like_the_kernels_own_names_are_renamed():
    """A local may be called acc1 or ax0_ (the kernels' accumulators): the plan renames it."""
    import optdsl
    cls = optdsl.compile("optimizer Clash\nacc1 = norm(g)\nax0_ = row_mean(g)\n"
                         "p -= 0.1 * g / (acc1 + 1) + 0.01 * ax0_\n", "clash.opt")
    out = []
    for mode in (dict(fused=True), dict(foreach=True)):
        p = torch.linspace(-1, 1, 65, dtype=torch.float64, device=DEVICE).reshape(13, 5)
        p.grad = torch.cos(p)
        cls([p], **mode).step()
        out.append(p)
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12)


def test_matrix_work_runs_in_torch_between_the_kernels():
    """A spec with matrix work and no rules fuses too: torch's matmul, then one launch for the update;
    with an element-wise entry, a first launch stores it for torch (Muon's momentum)."""
    import optdsl
    for body, launches in [("p -= 0.1 * mm(mm(g, T(g)), g)", 1),
                           # m is final before torch runs, but no launch is there yet: stored last
                           ("state m\nu = mm(mm(g, T(g)), g)\nm = lerp(m, g, 0.1)\np -= 0.1 * u + 0.01 * m", 1),
                           ("state m\nm = lerp(m, g, 0.1)\nx = m / (norm(m) + 1)\np -= 0.1 * mm(mm(x, T(x)), x)", 3)]:
        cls = optdsl.compile(f"optimizer Matrix\n{body}\n", "matrix.opt")
        module = __import__(cls.__module__, fromlist=["LAUNCHES"])
        out = []
        for mode in (dict(fused=True), dict(foreach=True)):
            p = torch.linspace(-1, 1, 84, dtype=torch.float64, device=DEVICE).reshape(7, 12)
            opt = cls([p], **mode)
            before = module.LAUNCHES
            for k in range(3):
                p.grad = torch.cos(p * (k + 2))
                opt.step()
            out.append((p, module.LAUNCHES - before))
        (fused, n), (ref, _) = out
        assert n == 3 * launches, body
        torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)


def _stores_by_launch(name, rule=0):
    from optdsl.backends.triton import kernel_context
    from optdsl.pipeline import compile_source
    from pathlib import Path
    compiled = compile_source((Path(__file__).parent.parent / "specs" / f"{name}.opt").read_text())
    plan = compiled.rules[rule][2] if compiled.rules else compiled.plan
    return {k["name"]: {s["base"] for s in k.get("stores", [])} for k in kernel_context(plan)["kernels"]}


def test_a_state_is_stored_by_the_first_launch_that_has_its_new_value():
    """LAMB's moments are final in its first launch: stored there, loaded by the second (40 bytes
    per element, not 44); SMMF's sign waits, as the update still reads the old one."""
    assert _stores_by_launch("lamb") == {"stage1": {"m", "v"}, "kernel": {"p"}}
    assert _stores_by_launch("muon") == {"stage1": {"buf"}, "matrix": set(), "kernel": {"p"}}
    assert _stores_by_launch("smmf") == {"stage1": set(), "kernel": {"p", "positive"},
                                         "reduced": {"rm", "cm", "rv", "cv"}}


def test_lamb_second_launch_reads_no_gradient(monkeypatch):
    """Zeroing the gradients between LAMB's two launches changes nothing: the second reads the
    moments the first stored. (Zeroing them before the first launch changes everything.)"""
    from generated import lamb

    def run(zero_before=None):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE) for s in SHAPES]
        opt = lamb.LAMB(params, wd=0.1, fused=True)

        class ZeroGrads:  # the kernel `zero_before`, launched after zeroing every gradient
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    for p in params:
                        p.grad.zero_()
                    return getattr(lamb, "_real_" + zero_before)[grid](*args, **kwargs)
                return launch
        if zero_before:
            monkeypatch.setattr(lamb, "_real_" + zero_before, getattr(lamb, zero_before), raising=False)
            monkeypatch.setattr(lamb, zero_before, ZeroGrads())
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(DEVICE)
            opt.step()
        monkeypatch.undo()
        return params

    plain, late, early = run(), run("_lamb_kernel"), run("_lamb_stage1")
    for a, b in zip(plain, late):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(plain, early))


@pytest.mark.parametrize("body", ["p = 2", "state m\nm = 1\np -= 0.1 * g * m", "state s: scalar\ns = 3\np -= s * g"])
def test_a_constant_stored_fuses(body):
    """A number assigned to p or a state is stored as a block of it (found by test_properties)."""
    import optdsl
    cls = optdsl.compile(f"optimizer Constant\n{body}\n", "constant.opt")
    out = []
    for mode in (dict(fused=True), dict(foreach=True)):
        p = torch.linspace(-1, 1, 12, dtype=torch.float64, device=DEVICE).reshape(3, 4)
        opt = cls([p], **mode)
        for _ in range(2):
            p.grad = torch.cos(p)
            opt.step()
        out.append(p)
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12)


def test_a_comparison_is_in_the_kernels_arithmetic_dtype():
    """tl.where of two literals is float32: sqrt(abs(m > g) + 0.5) must still be a float64 sqrt in
    a float64 kernel; tl.log(2.0) too is float32 (found by the property test: 4e-8 and 1e-9 off)."""
    import optdsl
    cls = optdsl.compile("optimizer Compare\nstate m = p\np -= 0.1 * sqrt(abs(m > g) + 0.5) * sign(g)\n"
                         "m = where(g > 0, 0.3, 0.7) * sqrt(where(g > 0, 0.3, 0.7)) + 2^tanh(g) * log(3)\n",
                         "compare.opt")  # and constants such as log(3), 2^x = exp(x log 2): from the host
    out = []
    for mode in (dict(fused=True), dict(foreach=True)):
        p = torch.linspace(-1, 1, 12, dtype=torch.float64, device=DEVICE)
        opt = cls([p], **mode)
        for _ in range(2):
            p.grad = torch.sin(3 * p)
            opt.step()
        out.append((p, opt.state[p]["m"]))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("body", ["p -= 0.1 * row_sum(sum(g)) * g", "state c: cols\nc = lerp(c, col_mean(norm(g)), 0.5)\np -= c * g",
                                  "state r: rows, s: scalar\nr = lerp(r, row_max((s + 1)^2), 0.3)\ns = lerp(s, mean(g), 0.3)\np -= r * g",
                                  "state s: scalar\ns = lerp(s, mean(p), 0.3)\np -= 0.1 * tanh(2 * row_mean(0.5 + s) * p)",
                                  # found by tests/test_fused_properties.py: the torch paths defined d0 = s,
                                  # an alias of the state they then updated in place before reading d0
                                  "state r: rows, s: scalar, c: cols, m\nu = p * row_mean(s)\nr = lerp(r, row_mean(p), 0.3)\n"
                                  "s = lerp(s, mean(p) + 1, 0.3)\nc = lerp(c, col_mean(p), 0.3)\nm = lerp(m, p, 0.3)\n"
                                  "p -= 0.1 * tanh(u)"])
def test_an_axis_reduction_of_a_scalar_is_the_scalar(body):
    """A scalar has size 1 along every axis: row_sum(x) of a scalar x is x, on every path (the
    torch paths once printed `(a + b).amax(...)` without parentheses; the fused path refused)."""
    import optdsl
    cls = optdsl.compile(f"optimizer AxisOfScalar\n{body}\n", "axis_of_scalar.opt")
    out = []
    for mode in (dict(fused=True), dict(foreach=True), dict(foreach=False)):
        p = torch.linspace(-1, 1, 35, dtype=torch.float64, device=DEVICE).reshape(5, 7)
        opt = cls([p], **mode)
        for k in range(3):
            p.grad = torch.cos(p * (k + 1))
            opt.step()
        out.append(p)
    for x in out[1:]:
        torch.testing.assert_close(out[0], x, rtol=1e-12, atol=1e-12)


def test_one_group_of_mixed_dtypes_launches_once_per_dtype():
    """Parameters of three dtypes interleaved in one group: one launch per dtype and step, each
    parameter updated with its own states (picked by index from the group's lists)."""
    from generated import adamw
    gen = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.bfloat16, torch.float64] * 3
    init = [torch.randn(3 + 40 * i, generator=gen, dtype=torch.float64).to(d) for i, d in enumerate(dtypes)]
    grads = [[torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) for x in init] for _ in range(4)]
    results = []
    for mode in (dict(fused=True), dict(foreach=True)):
        params = [x.clone().to(DEVICE) for x in init]
        opt = adamw.AdamW(params, lr=1e-2, weight_decay=0.1, **mode)
        before = adamw.LAUNCHES
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(DEVICE)
            opt.step()
        results.append((params, opt, adamw.LAUNCHES - before))
    (fused, fused_opt, launches), (ref, ref_opt, _) = results
    assert launches == 3 * len(grads)
    for a, b in zip(fused, ref):
        tol = 1e-12 if a.dtype == torch.float64 else 2e-6
        if a.dtype == torch.bfloat16:
            torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        torch.testing.assert_close(fused_opt.state[a]["exp_avg_sq"].cpu(), ref_opt.state[b]["exp_avg_sq"].cpu(),
                                   rtol=1e-5, atol=1e-9)


def test_tensors_that_move_between_steps_are_followed():
    """Pointer tables are kept between steps; parameters given new storage (`p.data = ...`) and
    states replaced by load_state_dict must be read from where they are now, not from a kept table."""
    from generated import adamw
    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in init] for _ in range(6)]
    results = []
    for mode in (dict(fused=True), dict(foreach=True)):
        params = [x.clone().to(DEVICE) for x in init]
        opt = adamw.AdamW(params, lr=1e-2, **mode)
        for step, step_grads in enumerate(grads):
            if step == 2:  # new storage for every parameter, old contents
                for p in params:
                    p.data = p.data.clone()
            if step == 4:  # every state replaced by a copy
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            for p, g in zip(params, step_grads):
                p.grad = g.to(DEVICE)
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_stochastic_rounding_in_the_kernel_is_unbiased_and_independent():
    """bfloat16 states: each value between bfloat16 neighbours rounds up with probability equal to
    where it lies between them, and the draws of two states, two tensors and two steps are
    independent (they agree as often as independent draws would, not always)."""
    import optdsl
    TwoStates = optdsl.compile("optimizer TwoStates\nhyper lr = 0\nstate a, b\na = a + g\nb = b + g\np -= lr * a\n")
    below, spacing, n, frac = 1.0, 2.0 ** -7, 20000, 0.25
    torch.manual_seed(2)
    params = [torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)]
    opt = TwoStates(params, fused=True, state_dtype=torch.bfloat16)
    for p in params:
        p.grad = torch.full((n,), below + frac * spacing, device=DEVICE)
    runs = []
    for _ in range(2):  # two steps of one optimizer, each from zeroed states (the key holds the step)
        for p in params:
            for key in ("a", "b"):
                if key in opt.state[p]:
                    opt.state[p][key].zero_()
        opt.step()
        runs.append([(opt.state[p]["a"].double().cpu(), opt.state[p]["b"].double().cpu()) for p in params])
    ups = []
    for tensors in runs:
        for a, b in tensors:
            for s in (a, b):
                assert set(s.unique().tolist()) <= {below, below + spacing}
                ups.append(s > below)
                assert abs(ups[-1].double().mean().item() - frac) < 4 * (frac * (1 - frac) / n) ** 0.5
    independent = frac ** 2 + (1 - frac) ** 2  # how often two independent draws agree
    for x, y, what in [(ups[0], ups[1], "two states"), (ups[0], ups[2], "two tensors"),
                       (ups[0], ups[4], "two steps")]:
        agree = (x == y).double().mean().item()
        assert abs(agree - independent) < 0.02, what


def test_whole_blocks_of_aligned_tensors_move_16_bytes_per_access(monkeypatch):
    """Tensors on 16 bytes launch with ALIGNED: whole blocks then load and store without a mask,
    which Triton compiles to 16-byte accesses (bench/ptx_count.py reads them from the PTX).
    A tensor off by one element launches without it, and both give foreach's result."""
    from generated import adamw
    seen = []
    kernel = adamw._adamw_0_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["ALIGNED"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(adamw, "_adamw_0_kernel", Spy())
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(5000, generator=gen, dtype=torch.float64)
    grads = [torch.randn(2100, generator=gen, dtype=torch.float64) for _ in range(3)]
    for offset, aligned in ((0, True), (1, False)):
        results = []
        for mode in (dict(fused=True), dict(foreach=True)):
            storage = base.clone().to(DEVICE)
            p = storage[offset:offset + 2100]  # a view: its data starts `offset` elements in
            opt = adamw.AdamW([p], lr=1e-2, **mode)
            for g in grads:
                p.grad = g.to(DEVICE)
                opt.step()
            results.append(p)
        assert seen[-1] is aligned
        torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


def test_the_ptx_of_a_whole_block_moves_16_bytes_per_access():
    """Compiled for an H100 (no GPU needed to compile): 16-byte loads and stores with ALIGNED,
    none without."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "bench/ptx_count.py", "--specs", "adamw", "--out", out],
                              capture_output=True, text=True, cwd=root)
        assert done.returncode == 0, done.stderr
        records = json.loads(open(os.path.join(out, "ptx.json")).read())["records"]
    for r in records:
        wide = {k: v for k, v in r["accesses"].items() if k.endswith(" 16B")}
        if r["aligned"]:
            assert wide.get("ld 16B", 0) >= 4 and wide.get("st 16B", 0) >= 3, r  # p, g, m, v in; p, m, v out
        else:
            assert not wide, r


@pytest.mark.parametrize("b1,b2", [(0.0, 0.5), (0.9, 0.0), (0.5, 0.999)])
def test_powers_of_hyperparameters_take_their_log_on_the_host(b1, b2):
    """b1^t in the kernels is exp(t * log(b1)), log(b1) computed once per step on the host (not in
    every program, in float64); b1 = 0 gives log = -inf and 0^t = 0, as on the other paths."""
    import inspect
    from generated import adamw
    assert "tl.log(" not in inspect.getsource(adamw._adamw_0_kernel.fn)
    kw = dict(lr=1e-2, betas=(b1, b2), weight_decay=0.1)
    fused, _ = _run(adamw.AdamW, kw, torch.float64, fused=True)
    ref, _ = _run(adamw.AdamW, kw, torch.float64, foreach=True)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_atan2_in_the_kernels_is_torchs_special_values_included(dtype):
    """The kernels compute atan2 with the template's _atan2 (+ - * / and where: the interpreter has
    no libdevice): within 2 ulp of torch.atan2 over 40 decades, and torch's value exactly at signed
    zeros, infinities and nan. atan2(g, 2) prints as SymPy's atan(g/2), atan2(1, g) has a number first."""
    import math

    import optdsl
    cls = optdsl.compile("optimizer Atan\nstate m, h, k\nm = atan2(g, p)\nh = atan2(g, 2)\nk = atan2(1, g)\n"
                         "p -= 0 * g\n", "atan.opt")
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0, -0.5, math.inf, -math.inf, math.nan, 1e-30],
                           dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    spread = (torch.randn(4000, generator=gen, dtype=torch.float64)
              * 10 ** torch.empty(4000, dtype=torch.float64).uniform_(-20, 20, generator=gen))
    y = torch.cat([special.repeat_interleave(len(special)), spread[:2000]]).to(dtype)
    x = torch.cat([special.repeat(len(special)), spread[2000:]]).to(dtype)
    p = x.clone().to(DEVICE)
    opt = cls([p], fused=True)
    p.grad = y.to(DEVICE)
    opt.step()
    eps = torch.finfo(dtype).eps
    two, one = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for state, expected in [("m", torch.atan2(y.double(), x.double())), ("h", torch.atan2(y.double(), two)),
                            ("k", torch.atan2(one, y.double()))]:
        got = opt.state[p][state].cpu().double()
        torch.testing.assert_close(got, expected.to(dtype).double(), rtol=2 * eps, atol=0, equal_nan=True)
        exact = (~torch.isfinite(x) | ~torch.isfinite(y) | (x == 0) | (y == 0)) & ~expected.isnan()  # a nan's sign means nothing
        assert torch.equal(torch.signbit(got[exact]), torch.signbit(expected.to(dtype)[exact].double())), state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_bfloat16_rounding_in_a_kernel_is_torchs(dtype):
    """`bfloat16(x)` in a kernel rounds as x.bfloat16() does (to nearest even, a float64 through
    float32): Triton's interpreter truncated float32 and made float64 garbage (-0.3 became 0), so
    a fuzzed Adadelta stepped to inf on the fused path (tests/fuzz_specs.py, seed 209). The state
    is the rounded value itself: equal bit for bit."""
    cls = optdsl.compile("optimizer X\nhyper lr = 0.1\nstate m\nm = bfloat16(lerp(m, g, 0.3))\n"
                         "p -= lr * bfloat16(m / 3)\n", "bf.opt")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    a, b = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
    loop, fused = cls([a], foreach=False), cls([b], fused=True)
    for _ in range(3):
        g = (torch.randn(3000, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-6, 6, (3000,),
                                                                                           generator=gen)).to(dtype)
        a.grad, b.grad = g.to(DEVICE), g.clone().to(DEVICE)
        loop.step()
        fused.step()
        assert torch.equal(loop.state[a]["m"], fused.state[b]["m"])
        # the two sides add the same rounded terms in another order: an ulp of the largest p apart
        torch.testing.assert_close(b, a, rtol=0, atol=torch.finfo(dtype).eps * a.abs().max().item())


def test_dead_matrix_work_of_an_unrolled_loop_is_no_exit():
    """An unrolled loop names each value it makes, dead ones too: `B = 2 * B` read matrix work
    nothing else needs, which became an exit of the matrix section, (3, 3) beside a (3, 5)
    parameter ("matrix work gave shape (3, 3)", tests/fuzz_specs.py seed 5469)."""
    cls = optdsl.compile("optimizer X\nhyper lr = 0.1\nrule ndim == 2 {\n  x = g / (1 + norm(g))\n"
                         "  repeat 2 {\n    A = mm(x, T(x))\n    B = 0.5 * A + mm(A, A)\n    B = 2 * B\n"
                         "    x = x * 1.5\n  }\n  p -= lr * x\n}\nrule {\n  p -= lr * g\n}\n", "dead.opt")
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
    a, b = [torch.nn.Parameter(x.clone().to(DEVICE)) for x in init], [torch.nn.Parameter(x.clone().to(DEVICE)) for x in init]
    loop, fused = cls(a, foreach=False), cls(b, fused=True)
    for _ in range(2):
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(DEVICE)
            y.grad = x.grad.clone()
        loop.step()
        fused.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-14)


def test_min_and_max_in_a_kernel_propagate_nan_as_torch():
    """torch.maximum(x, nan) is nan; Triton's tl.maximum gave x (its default drops nan), so a fuzzed
    Adamax, u = max(b2 * u, log1p(g) + eps), kept a finite u fused where the for-loop path had nan
    (tests/fuzz_specs.py, seed 5875 of a run on 2026-12-04)."""
    cls = optdsl.compile("optimizer X\nstate u, w\nu = max(0.5 * u, log1p(g))\nw = min(0.5 * w, log1p(g))\n"
                         "p -= 0.1 * g\n", "nan.opt")
    g = torch.tensor([-2.0, -0.5, 0.0, 3.0, float("nan")], dtype=torch.float64)
    a = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64, device=DEVICE))
    loop, fused = cls([a], foreach=False), cls([b], fused=True)
    a.grad, b.grad = g.clone(), g.clone().to(DEVICE)
    loop.step()
    fused.step()
    for key in ("u", "w"):
        torch.testing.assert_close(fused.state[b][key].cpu(), loop.state[a][key], equal_nan=True, rtol=0, atol=0)
    assert loop.state[a]["u"][0].isnan() and loop.state[a]["w"][0].isnan()
