"""Mixed precision: GradScaler and autocast as with torch.optim, bfloat16 parameters with
float32 states, and opt-in bfloat16 states written back with stochastic rounding."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from test_differential import spec


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def _scaled_training(make_opt, *, steps, overflow_at, autocast, dtype=torch.float32):
    """Train under a CPU GradScaler; at the steps in `overflow_at` the loss is scaled into
    inf, so the scaler must skip the step. Returns the parameters and step counts after each step."""
    model = _model(dtype)
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    gen = torch.Generator().manual_seed(1)
    history = []
    for step in range(steps):
        x = torch.randn(11, 5, generator=gen).to(dtype)
        y = torch.randn(11, 3, generator=gen).to(dtype)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        if step in overflow_at:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        history.append(([p.detach().clone() for p in model.parameters()],
                        [opt.state[p]["step"].item() if p in opt.state else 0 for p in model.parameters()],
                        scaler.get_scale()))
    return history


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("foreach", [False, True])
def test_grad_scaler_skips_overflow_and_unscales_like_torch_adamw(foreach, autocast):
    AdamW = spec("adamw")
    run = dict(steps=7, overflow_at={0, 3}, autocast=autocast)
    ours = _scaled_training(lambda ps: AdamW(ps, lr=0.01, wd=0.1, foreach=foreach), **run)
    ref = _scaled_training(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False), **run)
    for step, ((p_ours, t_ours, s_ours), (p_ref, t_ref, s_ref)) in enumerate(zip(ours, ref)):
        assert s_ours == s_ref
        assert t_ours == t_ref, f"step {step}: step counts {t_ours} != torch's {t_ref}"
        for a, b in zip(p_ours, p_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the overflowing steps were skipped: nothing moved, no step counted, the scale halved
    assert ours[0][1] == [0] * 4
    assert all(torch.equal(a, b) for a, b in zip(ours[2][0], ours[3][0]))
    assert ours[3][1] == ours[2][1] == [2] * 4 and ours[3][2] == ours[2][2] / 2
    # and the others moved the parameters by unscaled gradients (a scaled one would move them ~lr)
    moved = max((a - b).abs().max().item() for a, b in zip(ours[1][0], ours[2][0]))
    assert 0 < moved < 0.05


def test_grad_scaler_with_bfloat16_parameters_keeps_float32_states():
    AdamW = spec("adamw")
    run = dict(steps=5, overflow_at={2}, autocast=False)
    low = _scaled_training(lambda ps: AdamW(ps, lr=0.01, foreach=True), dtype=torch.bfloat16, **run)
    full = _scaled_training(lambda ps: AdamW(ps, lr=0.01, foreach=True), dtype=torch.float32, **run)
    assert [h[1] for h in low] == [h[1] for h in full]  # same steps skipped
    for a, b in zip(low[-1][0], full[-1][0]):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=0.02, atol=0.02)  # a few bfloat16 roundings apart
    model = _model(torch.bfloat16)
    opt = AdamW(model.parameters())
    model(torch.randn(2, 5, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    assert {s.dtype for st in opt.state.values() for k, s in st.items() if k != "step"} == {torch.float32}


# ---------------------------------------------------------------- bfloat16 states


def _accumulate(state_dtype, steps, n, foreach):
    """Adagrad with lr = 0 only accumulates g^2 = 0.001 per step into sum_sq, which starts at 1:
    in bfloat16 (spacing 2^-7 near 1) each increment is under half a spacing."""
    Adagrad = spec("adagrad")
    p = torch.nn.Parameter(torch.zeros(n))
    mode = dict(fused=True) if foreach == "fused" else dict(foreach=foreach)  # fused: Triton (interpreted on CPU)
    opt = Adagrad([p], lr=0.0, initial_accumulator_value=1.0, state_dtype=state_dtype, **mode)
    for _ in range(steps):
        p.grad = torch.full((n,), 0.001**0.5)
        opt.step()
    return opt.state[p]["sum"]  # torch.optim.Adagrad's key


@pytest.mark.parametrize("foreach", [False, True, "fused"])
def test_stochastic_rounding_is_unbiased_where_round_to_nearest_is_not(foreach):
    torch.manual_seed(0)
    steps, n = 20, 8192
    exact = _accumulate(None, steps, n, foreach)
    assert exact.dtype == torch.float32
    target = exact.double().mean().item()
    assert target == pytest.approx(1 + steps * 0.001, rel=1e-5)

    sr = _accumulate(torch.bfloat16, steps, n, foreach)
    assert sr.dtype == torch.bfloat16
    values = sr.double()
    stderr = values.std().item() / n**0.5
    assert 0 < stderr < 1e-3
    assert abs(values.mean().item() - target) < 4 * stderr

    # Round to nearest, in the same setting, never leaves 1.0: biased by all it accumulated.
    nearest = torch.ones(n, dtype=torch.bfloat16)
    for _ in range(steps):
        nearest = (nearest.float() + 0.001**0.5 * 0.001**0.5).to(torch.bfloat16)
    assert abs(nearest.double().mean().item() - target) > 50 * stderr


def test_stochastic_rounding_rounds_up_with_the_right_probability():
    from generated.adamw import _store_rounded
    torch.manual_seed(1)
    below, spacing = 1.0, 2.0**-7  # bfloat16 neighbours 1 and 1 + 2^-7
    for frac in (0.1, 0.5, 0.9):
        value = torch.full((20000,), below + frac * spacing)
        stored = torch.empty(20000, dtype=torch.bfloat16)
        _store_rounded(stored, value)
        assert set(stored.double().unique().tolist()) <= {below, below + spacing}
        up = (stored.double() > below).double().mean().item()
        assert abs(up - frac) < 4 * (frac * (1 - frac) / 20000) ** 0.5
    value = torch.tensor([-1.5, 0.0, 3.0, float("inf"), -float("inf")])  # exact ones stay exact
    stored = torch.empty(5, dtype=torch.bfloat16)
    _store_rounded(stored, value)
    assert stored.float().tolist() == value.tolist()


def test_bfloat16_states_train_like_float32_states():
    AdamW = spec("adamw")
    results = []
    for state_dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = _model()
        opt = AdamW(model.parameters(), lr=0.01, state_dtype=state_dtype)
        x, y = torch.randn(32, 5), torch.randn(32, 3)
        for _ in range(20):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        results.append((model, opt))
    (m32, o32), (m16, o16) = results
    assert {s.dtype for st in o16.state.values() for k, s in st.items() if k != "step"} == {torch.bfloat16}
    for a, b in zip(m16.parameters(), m32.parameters()):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.01)


def test_bfloat16_states_survive_state_dict_and_compile():
    AdamW = spec("adamw")
    model = _model()
    opt = AdamW(model.parameters(), lr=0.01, state_dtype=torch.bfloat16)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    again = AdamW(model.parameters(), lr=0.01, state_dtype=torch.bfloat16)
    again.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):  # torch.optim.AdamW's keys
            assert again.state[p][key].dtype == torch.bfloat16
            assert torch.equal(again.state[p][key], opt.state[p][key])
    counter = CompileCounter()
    step = torch.compile(again.step, backend=counter, fullgraph=True)
    for _ in range(3):
        step()
    assert counter.frame_count == 1
    assert all(again.state[p]["exp_avg"].dtype == torch.bfloat16 for p in model.parameters())
    torch._dynamo.reset()


def test_state_dtype_is_checked():
    AdamW = spec("adamw")
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="state_dtype"):
        AdamW(params, state_dtype=torch.float16)
    assert AdamW(params, state_dtype=torch.bfloat16, fused=True).param_groups[0]["state_dtype"] == torch.bfloat16


# ---------------------------------------------------------------- GradScaler and the fused kernels


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_grad_scaler_hands_unscale_and_inf_check_to_the_fused_kernel(autocast):
    """fused=True sets _step_supports_amp_scaling: GradScaler then only finds the overflows and
    hands the kernels its scale and found_inf. The run equals our foreach path under the usual
    protocol (the scaler unscales): same skipped steps, step counts and scales; parameters within a
    few float32 roundings (the scales are powers of 2, so unscaling is exact on both sides)."""
    from generated.adamw import AdamW
    run = dict(steps=7, overflow_at={0, 3}, autocast=autocast)
    opts = []
    fused = _scaled_training(lambda ps: opts.append(AdamW(ps, lr=0.01, weight_decay=0.1, fused=True)) or opts[-1],
                             **run)
    assert opts[0]._step_supports_amp_scaling
    foreach = _scaled_training(lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1, foreach=True), **run)
    for step, ((p_f, t_f, s_f), (p_e, t_e, s_e)) in enumerate(zip(fused, foreach)):
        assert (t_f, s_f) == (t_e, s_e), f"step {step}"
        for a, b in zip(p_f, p_e):
            torch.testing.assert_close(a, b, rtol=4 * 2**-24 * (step + 1), atol=1e-7 * (step + 1))
    assert fused[0][1] == [0] * 4 and fused[3][1] == fused[2][1]  # the overflows were skipped
    assert not hasattr(opts[0], "grad_scale")  # and the scaler took its attributes back


@pytest.mark.parametrize("found", [0.0, 1.0], ids=["finite", "overflow"])
def test_fused_grad_scale_and_found_inf_as_torch_fused_adam(found):
    """What the kernel does with grad_scale and found_inf, next to torch.optim.Adam(fused=True)
    given the same: g divided by the scale (and left so in .grad), or, on an overflow, nothing
    written at all and the step count unchanged."""
    from generated.adam import Adam
    gen = torch.Generator().manual_seed(7)
    shapes = [(5,), (3, 4), (2, 3, 1500)]  # the last spans several blocks of the kernel
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 1024 for s in shapes] for _ in range(3)]
    results = []
    for make in (lambda ps: Adam(ps, lr=0.01, weight_decay=0.1, fused=True),
                 lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, fused=True)):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make(ps)
        for row in grads:
            for p, g in zip(ps, row):
                p.grad = g.clone()
            opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(found)
            opt.step()
        results.append((ps, opt))
    (ours, opt), (theirs, ref) = results
    for p, q, g in zip(ours, theirs, grads[-1]):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)  # exact: a division by 2^10
        torch.testing.assert_close(p.grad, g / 1024 if not found else g, rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"]) == (0 if found else 3)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-8)
    if found:
        assert all(torch.equal(p.detach(), x) for p, x in zip(ours, init))


def test_grad_scale_on_a_path_without_it_is_an_error():
    """GradScaler gives grad_scale only to fused optimizers; on the other paths it would be lost."""
    from generated.adam import Adam
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adam([p], foreach=True)
    p.grad = torch.ones(3)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="fused path only"):
        opt.step()


def test_the_gradscaler_kernels_compile_for_a_gpu(tmp_path):
    """Compiled for an H100 (no GPU needed): with a GradScaler's arguments the kernel loads the
    scale and the flag (two more loads), and stores the unscaled gradient (one more store)."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    counts = {}
    for amp in (False, True):
        out = tmp_path / str(amp)
        done = subprocess.run([sys.executable, "bench/ptx_count.py", "--specs", "adamw", "--out", str(out),
                               *(["--amp"] if amp else [])], capture_output=True, text=True, cwd=root)
        assert done.returncode == 0, done.stderr
        counts[amp] = {(r["config"], r["aligned"]): r["accesses"] for r in json.loads((out / "ptx.json").read_text())["records"]}
    for key, plain in counts[False].items():
        scaled = counts[True][key]
        loads = lambda a: sum(v for k, v in a.items() if k.startswith("ld"))  # noqa: E731
        stores = lambda a: sum(v for k, v in a.items() if k.startswith("st"))  # noqa: E731
        assert loads(scaled) >= loads(plain) + 2 and stores(scaled) > stores(plain), (key, plain, scaled)
