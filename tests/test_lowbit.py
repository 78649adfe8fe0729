"""Low-bit states (state_dtype "int8", "int4"): the codes optdsl/quant.py decides, as the generated
modules quantise and dequantise them; each state's code from its proven range; state_dict and
resume bit-exact; and the int8/int4 paths against the float32 path, step by step.

Error bounds. A block with scale s (its largest |x|) stores x as the level nearest x / s. In exact
arithmetic the error is at most s * w, w = quant.worst_error(levels) (half the widest gap between
neighbouring levels, or the distance from an end of [-1, 1] / [0, 1] to the outermost level).
float32 adds a relative 2^-24 in x / s and another in level * s, so |x - x^| <= s * (w + 2^-23).
Stochastic rounding picks one of the two levels around x / s: at most s * (widest gap + 2^-23)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from generated import adamw as adamw_module
from generated.adamw import AdamW
from optdsl import quant
from optdsl.pipeline import compile_source

SPECS = Path(__file__).resolve().parent.parent / "specs"
F32 = 2.0 ** -23
CODES = sorted(quant.LEVELS)
PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True)}


def _x(n, signed, seed=0, spread=6.0):
    """Values over many decades (as optimizer states are), each block with its own scale."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=gen, dtype=torch.float64) * spread).float()
    return x * torch.sign(torch.randn(n, generator=gen)) if signed else x


def _block_scales(x, fmt):
    block = quant.BLOCK[fmt]
    flat = torch.nn.functional.pad(x.reshape(-1), (0, -x.numel() % block))
    return flat.view(-1, block).abs().amax(1).repeat_interleave(block)[:x.numel()].view(x.shape)


def _assert_one_rounding(module, stored, value, code, fmt, where):
    """The stored codes dequantise to within one rounding of `value` (float32): each block's scale
    times the code's worst level gap, plus float32's own rounding."""
    back = module._dequantised(stored, code.signed, value.shape, torch.float32)
    w = quant.worst_error(quant.LEVELS[(fmt, code.signed)], code.signed)
    assert ((back - value).abs() <= _block_scales(value, fmt) * (w + F32)).all(), where


@pytest.mark.parametrize("fmt,signed", CODES)
def test_nearest_round_trip_error_bound(fmt, signed):
    x = _x(10007, signed).view(1, 10007)  # awkward: the last block is partial
    stored = adamw_module._quantised(x, fmt, signed)
    assert stored.dtype == torch.uint8 and stored.shape[1] == quant.width(fmt)
    back = adamw_module._dequantised(stored, signed, x.shape, torch.float32)
    levels = quant.LEVELS[(fmt, signed)]
    bound = _block_scales(x, fmt) * (quant.worst_error(levels, signed) + F32)
    assert ((back - x).abs() <= bound).all()
    # nearest: no other level is closer (ties aside), checked by brute force in units of the scale
    s = _block_scales(x, fmt)
    lv = torch.tensor(levels, dtype=torch.float64)
    best = ((x.double() / s.double()).unsqueeze(-1) - lv).abs().min(-1).values
    assert ((back.double() / s.double() - x.double() / s.double()).abs() <= best + 4 * F32).all()
    # the block's largest |x| is stored exactly (a level of 1 and a float32 scale)
    peak = x.abs().argmax()
    if x.view(-1)[peak] > 0 or not signed:
        assert back.view(-1)[peak] == x.view(-1)[peak]


@pytest.mark.parametrize("fmt,signed", CODES)
def test_stochastic_round_trip_bound_unbiased_and_resumable(fmt, signed):
    x = _x(8192, signed, seed=1)
    levels = quant.LEVELS[(fmt, signed)]
    widest = max(b - a for a, b in zip(levels, levels[1:]))
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    stored = adamw_module._quantised(x, fmt, signed, gen, stochastic=True)
    back = adamw_module._dequantised(stored, signed, x.shape, torch.float32)
    s = _block_scales(x, fmt)
    inside = (x / s >= levels[0]) & (x / s <= levels[-1])  # outside the levels it clamps to the end one
    assert ((back - x).abs()[inside] <= (s * (widest + F32))[inside]).all()
    gen.set_state(state)  # the same generator state rounds alike: a resumed run is bit-identical
    assert torch.equal(adamw_module._quantised(x, fmt, signed, gen, stochastic=True), stored)
    # unbiased: the mean of many roundings of one value is the value (within 5 standard errors)
    value = torch.full((4096,), 0.3, dtype=torch.float32)
    value[0] = 1.0  # the block's scale: 0.3 lies between two levels
    draws = torch.stack([adamw_module._dequantised(adamw_module._quantised(value, fmt, signed, gen, True),
                                                   signed, value.shape, torch.float32)[1:] for _ in range(8)])
    below = max(v for v in levels if v <= 0.3)
    above = min(v for v in levels if v >= 0.3)
    sd = (above - below) / 2 / draws.numel() ** 0.5
    assert abs(draws.double().mean().item() - 0.3) <= 5 * sd + 1e-7


@pytest.mark.parametrize("fmt", sorted(quant.BLOCK))
def test_unsigned_never_dequantises_negative(fmt):
    """Every unsigned level is >= 0 and every scale is >= 0: whatever is stored reads back >= 0."""
    assert min(quant.LEVELS[(fmt, False)]) >= 0
    x = _x(9000, False, seed=2)
    x[::7] = 0.0
    x[::11] = -1e-30  # what an update's rounding could leave: still read back >= 0
    back = adamw_module._dequantised(adamw_module._quantised(x, fmt, False), False, x.shape, torch.float32)
    assert (back >= 0).all()
    # and Adam's v through training, at 4 bit where rounding is coarsest
    p = torch.nn.Parameter(torch.randn(64, 100))
    opt = AdamW([p], lr=1e-2, state_dtype=fmt)
    for i in range(5):
        p.grad = torch.randn(64, 100) * 10.0 ** -i
        opt.step()
        v = adamw_module._read_state(opt.state[p]["exp_avg_sq"], p, False, p.shape)
        assert (v >= 0).all()


def test_code_from_proven_range():
    codes = quant.codes(compile_source((SPECS / "adamw.opt").read_text()).program)
    assert codes["v"].signed is False and "[0, inf)" in codes["v"].why
    assert codes["m"].signed is True
    smmf = quant.codes(compile_source((SPECS / "smmf.opt").read_text()).program)
    assert "positive" not in smmf  # a bool state is not quantised


def test_small_tensors_scalars_and_bools_stay():
    p_small, p_big = torch.nn.Parameter(torch.randn(4095)), torch.nn.Parameter(torch.randn(4096))
    opt = AdamW([p_small, p_big], state_dtype="int8")
    for p in (p_small, p_big):
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p_small]["exp_avg"].dtype == torch.float32
    assert opt.state[p_big]["exp_avg"].dtype == torch.uint8
    assert opt.state[p_big]["exp_avg"].shape == (2, quant.width("int8"))
    assert opt.state[p_big]["step"].dtype == torch.float32


def test_refused():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="state_dtype"):
        AdamW(p, state_dtype="int2")


def _stepped(cls, kw, steps, seed=0, params=None):
    gen = torch.Generator().manual_seed(seed)
    params = params or [torch.nn.Parameter(torch.randn(70, 90, generator=gen)),
                        torch.nn.Parameter(torch.randn(50, generator=gen))]
    opt = cls(params, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, params, gen


def _saved(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("state_dtype", ["int8", "int4", "int8_stochastic", "int4_stochastic"])
def test_state_dict_round_trip_and_resume_bit_exact(path, state_dtype):
    kw = dict(lr=1e-2, state_dtype=state_dtype, **PATHS[path])
    opt, params, gen = _stepped(AdamW, kw, 3)
    saved = _saved(opt)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = AdamW(copies, **kw)
    again.load_state_dict(saved)
    resaved = again.state_dict()
    for i, state in saved["state"].items():
        for key, value in state.items():
            assert resaved["state"][i][key].dtype == value.dtype
            assert torch.equal(resaved["state"][i][key], value), key
    for _ in range(4):  # both go on alike, bit for bit (stochastic rounding from the saved generator)
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        again.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
    for p, q in zip(params, copies):
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], again.state[q][key])


def test_load_refuses_codes_of_sharded_parameters_into_a_whole_one():
    """A sharded parameter's codes (shards, rows, width: blocks laid over each rank's shard) are not
    a whole parameter's blocks: refused, saying so (tests/test_distributed.py: at another world size)."""
    p = torch.nn.Parameter(torch.randn(5, 4100))
    opt = AdamW([p], state_dtype="int8")
    p.grad = torch.ones_like(p)
    opt.step()
    saved = _saved(opt)
    saved["state"][0]["exp_avg"] = torch.zeros(2, 7, quant.width("int8"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="blocks laid over 2 shards .* here the parameter is whole"):
        AdamW([p], state_dtype="int8").load_state_dict(saved)


def test_load_refuses_codes_of_another_shape():
    opt, params, _ = _stepped(AdamW, dict(state_dtype="int8"), 1)
    saved = _saved(opt)
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"][:, :100]
    with pytest.raises(ValueError, match="int8/int4 codes"):
        AdamW(params, state_dtype="int8").load_state_dict(saved)


def _dequantised_state_dict(opt, prog):
    """opt's state_dict with each low-bit state read back as float32: what the float32 path starts from."""
    codes = quant.codes(prog)
    shapes = {s.saved_as: (s.shape, codes.get(s.name)) for s in prog.states}
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        state[i] = {}
        for key, value in st.items():
            if torch.is_tensor(value) and value.dtype == torch.uint8:
                kind, code = shapes[key]
                p = params[i]
                shape = {"full": p.shape, "rows": p.shape[:-1] + (1,), "cols": p.shape[:-2] + (1,) + p.shape[-1:]}[kind]
                value = adamw_module._dequantised(value, code.signed, shape, torch.float32)
            state[i][key] = value.clone()
    groups = [dict(g, state_dtype=None) for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


DIFFERENTIAL = ["adamw", "lion", "rmsprop", "adagrad", "sgd", "adabelief", "adafactor"]


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("fmt", sorted(quant.BLOCK))
@pytest.mark.parametrize("name", DIFFERENTIAL)
def test_against_float32_path_step_by_step(name, fmt, path):
    """Over 30 steps, each step of the low-bit path is the float32 path's step from the same
    (dequantised) states: p bit for bit (the update computes in float32 either way), and each new
    state within one rounding of the float32 path's, s * (w + 2^-23) per block."""
    import importlib
    module = importlib.import_module(f"generated.{name}")
    cls = getattr(module, module.__all__[0])
    prog = compile_source((SPECS / f"{name}.opt").read_text()).program
    codes = quant.codes(prog)
    kinds = {s.saved_as: (s.shape, codes.get(s.name)) for s in prog.states}
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(70, 90, generator=gen)), torch.nn.Parameter(torch.randn(50, generator=gen))]
    low = cls(params, state_dtype=fmt, **PATHS[path])
    for step in range(30):
        grads = [torch.randn(p.shape, generator=gen) * 10.0 ** (-(step % 4)) for p in params]
        start = _dequantised_state_dict(low, prog) if step else None
        ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        ref = cls(ref_params, **PATHS[path])
        if start is not None:
            ref.load_state_dict(start)
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        low.step()
        ref.step()
        for p, q in zip(params, ref_params):
            assert torch.equal(p, q), f"step {step + 1}"
            for key, value in ref.state[q].items():
                stored = low.state[p][key]
                if key == "step" or stored.dtype != torch.uint8:
                    assert torch.equal(stored.to(value.dtype), value), (key, step)
                    continue
                _assert_one_rounding(module, stored, value, kinds[key][1], fmt, (key, step))



@pytest.mark.parametrize("path", ["single", "foreach", "fused"])
@pytest.mark.parametrize("fmt", sorted(quant.BLOCK))
@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_bfloat16_parameters_against_float32_states_step_by_step(name, fmt, path):
    """bfloat16 parameters with int8/int4 states: each step computes in float32 on a float32 copy of p
    (in registers, fused) and writes p back rounded to the nearest bfloat16. From the same
    (dequantised) states, the float32-state run of the same path computes the same float32 update,
    so p is the same bfloat16 number, bit for bit on every path (the kernels with float and with
    low-bit states share the update's code; the interpreter runs it as numpy, without contraction;
    compiled for a GPU the two might differ by float32 ulps, so by one bfloat16 spacing of p, and
    this test only runs under the interpreter), and each new state is within one rounding of the
    float32 state, s * (w + 2^-23) per block of scale s; the small parameter's float32 states equal."""
    import importlib
    if path == "fused":
        _fused_ready()
    module = importlib.import_module(f"generated.{name}")
    cls = getattr(module, module.__all__[0])
    prog = compile_source((SPECS / f"{name}.opt").read_text()).program
    codes = quant.codes(prog)
    kinds = {s.saved_as: (s.shape, codes.get(s.name)) for s in prog.states}
    kw = dict(foreach=path == "foreach", fused=path == "fused", lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(70, 90, generator=gen).bfloat16()),
              torch.nn.Parameter(torch.randn(50, generator=gen).bfloat16())]
    low = cls(params, state_dtype=fmt, **kw)
    moved = False
    for step in range(6):
        grads = [(torch.randn(p.shape, generator=gen) * 10.0 ** (-(step % 3))).bfloat16() for p in params]
        start = _dequantised_state_dict(low, prog) if step else None
        ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        ref = cls(ref_params, **kw)
        if start is not None:
            ref.load_state_dict(start)
        before = [p.detach().clone() for p in params]
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        low.step()
        ref.step()
        moved = moved or any(not torch.equal(p, b) for p, b in zip(params, before))
        for p, q in zip(params, ref_params):
            assert p.dtype == torch.bfloat16 and torch.equal(p, q), f"step {step + 1}"
            assert (low.state[p]["exp_avg"].dtype == torch.uint8) == (p.numel() >= quant.MIN_NUMEL)
            for key, value in ref.state[q].items():
                stored = low.state[p][key]
                if key == "step" or stored.dtype != torch.uint8:
                    assert stored.dtype == value.dtype == (torch.float32 if key != "step" else value.dtype)
                    assert torch.equal(stored, value), (key, step)
                    continue
                _assert_one_rounding(module, stored, value, kinds[key][1], fmt, (key, step))
    assert moved


def test_info_reports_stored_bytes():
    """`optdsl info` counts codes plus scales: AdamW at 4096x4096 keeps 2 states of 2^24 numbers,
    8192 blocks of 2048 codes + 4 bytes each at int8, 65536 blocks of 128 bytes + 4 at int4: 1.031 B
    per parameter, under the issue's 1.05 B goal."""
    from optdsl.info import memory, report
    compiled = compile_source((SPECS / "adamw.opt").read_text())
    m = memory(compiled, (4096, 4096))
    assert m.stored_bytes(None) == 8 * 2 ** 24
    assert m.stored_bytes("int8") == 2 * 8192 * (2048 + 4)
    assert m.stored_bytes("int4") == 2 * 65536 * (128 + 4)
    assert m.stored_bytes("int4") / 2 ** 24 <= 1.05
    small = memory(compiled, (64, 63))  # under 4096 numbers: float32
    assert small.stored_bytes("int8") == small.stored_bytes(None)
    assert '"int8" 33,619,968 B (2.004 B per element)' in report(compiled, (4096, 4096))
    # under FSDP2 over 3 ranks (4096 rows: 1366 + 1366 + 1364) every rank keeps the largest shard's
    # rows of codes: ceil(1366 * 4096 / 2048) = 2732 of 2052 B per state; float32, that shard's numbers
    assert m.stored_bytes("int8", shards=3) == 2 * 2732 * 2052
    assert m.stored_bytes(None, shards=3) == 2 * 4 * 1366 * 4096
    assert memory(compiled, (1, 5000)).stored_bytes("int4", shards=2) == 2 * 20 * 132  # one rank holds it all
    assert "per rank under FSDP2 over 3 ranks" in report(compiled, (4096, 4096), 3)
    # and a real optimizer holds exactly that
    p = torch.nn.Parameter(torch.zeros(300, 100))
    for fmt in ("int8", "int4"):
        opt = AdamW([p], state_dtype=fmt)
        p.grad = torch.ones_like(p)
        opt.step()
        held = sum(v.nbytes for k, v in opt.state[p].items() if k != "step")
        assert held == memory(compiled, (300, 100)).stored_bytes(fmt)


def test_explain_shows_each_code_and_why():
    from optdsl.explain import explain, report
    text = report(explain(compile_source((SPECS / "adamw.opt").read_text())))
    assert "int8/int4 code of state v" in text and "unsigned: proven in [0, inf)" in text
    assert "int8/int4 code of state m" in text and "signed: proven only in (-inf, inf)" in text


def test_matrix_states_say_what_they_get_and_why():
    """Matrix states (Shampoo's Gram matrices and inverse roots, SOAP's and their eigenbases) are quantised
    as the other states at int8/int4, a decision measured in bench/results/lowbit_matrix.md: `optdsl
    explain` says so per state and `optdsl info` names those of the shape given large enough to be; a real
    Shampoo holds them as codes, the bytes `info` counts; p-shaped states say nothing of matrices."""
    from optdsl.explain import explain, report as explained
    from optdsl.info import memory, report
    from generated.shampoo import Shampoo
    assert quant.MATRIX_LOWBIT and "bench/results/lowbit_matrix.md" in quant.MATRIX_WHY
    soap = explained(explain(compile_source((SPECS / "soap.opt").read_text())))
    for name in ("GL", "GR", "QL", "QR"):
        line = next(x for x in soap.splitlines() if f"code of state {name} " in x)
        assert "a matrix state, quantised as the others" in line and quant.MATRIX_WHY in line, line
    assert "matrix state" not in next(x for x in soap.splitlines() if "code of state m " in x)
    shampoo = compile_source((SPECS / "shampoo.opt").read_text())
    text = report(shampoo, (100, 20))  # L, Li 100 x 100 (quantised), R, Ri 20 x 20 (under 4096 numbers)
    assert "matrix states pre_cond_0, pre_cond_1, inv_pre_cond_0, inv_pre_cond_1" in text
    assert "here pre_cond_0, inv_pre_cond_0 (the others under 4096 numbers)" in text
    assert "matrix states" not in report(compile_source((SPECS / "adamw.opt").read_text()), (100, 20))
    p = torch.nn.Parameter(torch.randn(100, 20, generator=torch.Generator().manual_seed(0)))
    opt = Shampoo([p], state_dtype="int8")
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["pre_cond_0"].dtype == torch.uint8 and opt.state[p]["pre_cond_1"].dtype == torch.float32
    held = sum(v.nbytes for k, v in opt.state[p].items() if k != "step")
    assert held == memory(shampoo, (100, 20)).stored_bytes("int8")


def test_eval_train_modes_read_and_write_low_bit_states():
    """Schedule-Free's eval() and train() read z and write p: through the codes, z stays uint8."""
    from generated.schedule_free_adamw import ScheduleFreeAdamW
    p = torch.nn.Parameter(torch.randn(80, 80))
    opt = ScheduleFreeAdamW([p], lr=1e-2, state_dtype="int8")
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    before = p.detach().clone()
    opt.eval()
    assert not torch.equal(p, before)
    opt.train()
    assert opt.state[p]["z"].dtype == torch.uint8
    assert torch.allclose(p, before, atol=1e-5)


def test_load_converts_between_float_and_low_bit_states():
    """The groups of a state_dict replace the optimizer's (torch.optim's rule), state_dtype with
    them; where a group's state_dtype and its saved states disagree (a float32 checkpoint edited to
    int8), the states follow the group: quantised to the nearest level, or read back exactly."""
    f32, params, _ = _stepped(AdamW, dict(lr=1e-2), 2)
    saved = _saved(f32)
    saved["param_groups"][0]["state_dtype"] = "int8"
    low = AdamW(params, lr=1e-2)
    low.load_state_dict(saved)
    assert low.param_groups[0]["state_dtype"] == "int8"
    big = params[0]
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        stored = low.state[big][key]
        assert stored.dtype == torch.uint8
        assert torch.equal(stored, adamw_module._quantised(f32.state[big][key], "int8", signed))
    assert low.state[params[1]]["exp_avg"].dtype == torch.float32  # 50 numbers: float32
    back = AdamW(params, lr=1e-2)
    saved = _saved(low)
    saved["param_groups"][0]["state_dtype"] = None
    back.load_state_dict(saved)
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        value = back.state[big][key]
        assert value.dtype == torch.float32 and value.shape == big.shape
        assert torch.equal(value, adamw_module._dequantised(low.state[big][key], signed, big.shape, torch.float32))



@pytest.mark.parametrize("fmt,signed", CODES)
def test_refit_gives_back_the_codes_of_dequantised_numbers(fmt, signed):
    """Requantising dequantised codes in the same blocks (a reshardable state_dict loaded at the world
    size it was saved at) gives the same codes and numbers, because the scale is refitted
    (_refitted_scale). Taking each block's largest |x| as its scale does not for a signed map: it has
    no level -1, so a block whose largest number is negative reads back smaller (scale * L0) and the
    block's scale would shrink, turning codes. The scale's own bytes may come back one float32 ulp
    apart where two scales give every number of the block alike (int4's few levels: the numbers,
    all a step reads, are the same). On numbers that are not dequantised codes, refitting changes
    nothing. Blocks of 10007 numbers over 12 decades, the last partial; scales of every magnitude."""
    x = _x(10007, signed)
    stored = adamw_module._quantised(x, fmt, signed)
    back = adamw_module._dequantised(stored, signed, x.shape, torch.float32)
    _same_numbers(adamw_module._quantised(back, fmt, signed, refit=True), stored, signed)
    assert torch.equal(adamw_module._quantised(x, fmt, signed, refit=True), stored)
    if signed:  # the case refitting is for: some blocks' largest number is negative
        assert not torch.equal(adamw_module._dequantised(adamw_module._quantised(back, fmt, signed), signed,
                                                         x.shape, torch.float32), back)
    for e in range(-90, 91, 6):  # scales of every magnitude (the division by |L0| rounds either way)
        y = _x(4100, signed, seed=e) * 2.0 ** e
        assert torch.isfinite(y).all() and (y != 0).all()
        codes = adamw_module._quantised(y, fmt, signed)
        again = adamw_module._quantised(adamw_module._dequantised(codes, signed, y.shape, torch.float32), fmt,
                                        signed, refit=True)
        _same_numbers(again, codes, signed, e)


def _same_numbers(got, stored, signed, where=None):
    """Two low-bit tensors hold the same codes and dequantise to the same numbers (their scales equal
    or, where the block's numbers do not tell them apart, an ulp apart)."""
    assert torch.equal(got[..., :-4], stored[..., :-4]), where
    block = adamw_module._LOWBIT[adamw_module._WIDTHS[got.shape[-1]]][1]
    one, other = (adamw_module._dequantised(x, signed, (x[..., 0].numel() * block,), torch.float32) for x in (got, stored))
    assert torch.equal(one, other), where
    scales = [x[..., -4:].contiguous().view(torch.float32) for x in (got, stored)]
    assert ((scales[0] - scales[1]).abs() <= torch.finfo(torch.float32).eps * scales[1]).all(), where


def _go_on_alike(opt, again, params, copies, gen, steps=3):
    """Both optimizers step on the same gradients; the parameters stay equal to the bit."""
    for _ in range(steps):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        again.step()
    assert all(torch.equal(p, q) for p, q in zip(params, copies))


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("state_dtype", ["int8", "int4", "int4_stochastic"])
def test_reshardable_state_dict_holds_float32_and_resumes_bit_exact(path, state_dtype):
    """reshardable=True: state_dict() holds each low-bit state as the float32 numbers its codes hold,
    shaped as p (what torch.distributed.checkpoint reshards; tests/test_distributed.py), and leaves
    the optimizer's own states alone; loaded into an optimizer of the same blocks, they come back as
    the same codes, byte for byte, and training goes on as the uninterrupted run."""
    kw = dict(lr=1e-2, state_dtype=state_dtype, **PATHS[path])
    opt, params, gen = _stepped(AdamW, kw, 3)
    opt.reshardable = True  # as AdamW(..., reshardable=True); pickled with the optimizer
    saved = _saved(opt)
    big = params[0]
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        assert opt.state[big][key].dtype == torch.uint8
        value = saved["state"][0][key]
        assert value.dtype == torch.float32 and value.shape == big.shape
        assert torch.equal(value, adamw_module._dequantised(opt.state[big][key], signed, big.shape, torch.float32))
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = AdamW(copies, **kw, reshardable=True)
    again.load_state_dict(saved)
    assert again.reshardable and _pickled(again).reshardable and not _pickled(AdamW(copies, **kw)).reshardable
    for p, q in zip(params, copies):
        for key in opt.state[p]:
            if key in AdamW._LOWBIT_SIGNED and opt.state[p][key].dtype == torch.uint8:
                _same_numbers(again.state[q][key], opt.state[p][key], AdamW._LOWBIT_SIGNED[key], key)
            else:
                assert torch.equal(opt.state[p][key], again.state[q][key]), key
    _go_on_alike(opt, again, params, copies, gen)


@pytest.mark.parametrize("saver", [True, False], ids=["saved-reshardable", "saved-codes"])
def test_reshardable_on_one_side_only(saver, tmp_path):
    """reshardable=True on one side only. load_state_dict takes either form whatever the loading
    optimizer's reshardable says: float32 numbers (a reshardable state_dict) are requantised in its
    blocks (exactly, in the saved layout: _refitted_scale), codes are copied byte for byte, and the
    generator comes back from the param groups (where a state_dict of a drawing optimizer carries it) or the
    top level: training goes on as the uninterrupted run, rounding stochastically, to the bit.
    torch.distributed.checkpoint loads into the loading optimizer's own state_dict, whose shapes
    differ between the forms (numbers shaped as p; codes as rows of blocks): it refuses, never loads
    one form into the other (docs/distributed.md says what to pass)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd
    from torch.distributed.checkpoint.api import CheckpointException
    kw = dict(lr=1e-2, state_dtype="int8_stochastic")
    opt, params, gen = _stepped(AdamW, kw, 3)
    opt.reshardable = saver
    saved = _saved(opt)
    assert (saved["state"][0]["exp_avg"].dtype == torch.float32) == saver
    assert "rng_state" in saved["param_groups"][0]  # what passes through DCP: rounding stochastically, either form
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = AdamW(copies, **kw, reshardable=not saver).manual_seed(5)  # its own generator: replaced by the saved one
    again.load_state_dict(saved)
    assert all("rng_state" not in g for g in again.param_groups)
    _go_on_alike(opt, again, params, copies, gen)
    # through torch.distributed.checkpoint (one process, no process group): refused, in both directions
    model, other = torch.nn.Module(), torch.nn.Module()
    model.w, model.b = params
    other.w, other.b = (torch.nn.Parameter(p.detach().clone()) for p in params)
    dcp.save({"optim": sd.get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
    state = {"optim": sd.get_optimizer_state_dict(other, AdamW([other.w, other.b], **kw, reshardable=not saver))}
    with pytest.raises(CheckpointException, match="Size mismatch"):
        dcp.load(state, checkpoint_id=tmp_path)


def _pickled(opt):
    import copy
    return copy.deepcopy(opt)


# ---- the fused path: the kernels (de)quantise in registers, with the torch paths' maps ----
COPY = """optimizer Copy
hyper lr = 1e-3 in [0, inf)
state m
state v
m = g
v = g^2
p -= lr * m / (sqrt(v) + 1)
"""
AWKWARD = [(4096,), (4097,), (91, 53)]  # one block, one and a bit, 2-D with a partial last block


def _fused_ready():
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused low-bit tests run on CPU tensors under TRITON_INTERPRET=1")


@pytest.mark.parametrize("state_dtype", [None, "int8", "int4_stochastic"])
def test_fused_none_picks_the_kernels_for_low_bit_states_as_for_float_ones(monkeypatch, state_dtype):
    """fused=None runs the kernels where they would run for float states, as torch.optim picks its fused
    ones: on CUDA tensors, unless foreach is chosen. CUDA is pretended here (every tensor says is_cuda;
    the interpreter runs the kernels on the CPU): the default then launches them and steps as fused=True
    does, to the bit; foreach=True keeps the torch paths; on the CPU, not pretended, no kernel runs."""
    _fused_ready()

    def stepped(**kw):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 91 * 53).view(91, 53))  # 4823 numbers: codes
        opt = AdamW([p], lr=1e-2, state_dtype=state_dtype, **kw)
        opt.manual_seed(5)
        before = adamw_module.LAUNCHES
        for k in range(2):
            p.grad = torch.cos(torch.arange(p.numel(), dtype=torch.float32) * (k + 1)).view_as(p)
            opt.step()
        return p.detach(), opt.state[p], adamw_module.LAUNCHES - before, opt._fused_for(opt.param_groups[0], p)

    _, _, launches, chosen = stepped()
    assert launches == 0 and not chosen
    monkeypatch.setattr(adamw_module, "_IS_CUDA", lambda x: True)
    p_default, states, launches, chosen = stepped()
    assert launches > 0 and chosen
    assert (states["exp_avg"].dtype == torch.uint8) == (state_dtype is not None)
    p_fused, fused_states, _, _ = stepped(fused=True)
    assert torch.equal(p_default, p_fused)
    assert all(torch.equal(states[k], fused_states[k]) for k in ("exp_avg", "exp_avg_sq"))
    _, _, launches, chosen = stepped(foreach=True)
    assert launches == 0 and not chosen


@pytest.mark.parametrize("fmt", sorted(quant.BLOCK))
def test_fused_quantises_as_the_torch_paths_bit_exact(fmt):
    """m = g and v = g^2 are the same float32 numbers on both paths, so the kernels' codes and scales
    (signed m, unsigned v; the nearest level, counting the same midpoints below it) must be the
    for-loop path's byte for byte, the last block's padding included, at 1823x781 too."""
    import optdsl
    _fused_ready()
    cls = optdsl.compile(COPY)
    gen = torch.Generator().manual_seed(7)
    shapes = [*AWKWARD, (1823, 781)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    loop, fused = ([torch.nn.Parameter(x.clone()) for x in init] for _ in range(2))
    grads = [_x(x.numel(), True, seed=k).view(x.shape) for k, x in enumerate(init)]  # many decades per block
    grads[0][::5] = 0.0
    opts = [cls(loop, state_dtype=fmt, foreach=False), cls(fused, state_dtype=fmt, fused=True)]
    for params, opt in zip((loop, fused), opts):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(loop, fused):
        for key in ("m", "v"):
            assert opts[1].state[b][key].dtype == torch.uint8
            assert torch.equal(opts[0].state[a][key], opts[1].state[b][key]), (key, a.shape)
        assert torch.allclose(a, b, rtol=0, atol=1e-9)  # the update reads the unquantised m, v: same floats


EDGES = """optimizer Edges
hyper lr = 1e-3 in [0, inf)
state m
state v
m = g
v = abs(g)
p -= lr * m / (v + 1)
"""


def _edge_values(fmt, block):
    """Every level and midpoint of both maps of fmt, and the floats just above and below each, and
    0, -0 and values far below the smallest level; laid out in blocks whose first number is 1, so
    every block's scale is 1 and the kernels search for these very numbers."""
    points = []
    for signed in (False, True):
        levels = torch.tensor(quant.LEVELS[(fmt, signed)], dtype=torch.float32)
        for x in (levels, (levels[1:] + levels[:-1]) / 2):
            points += [x, torch.nextafter(x, torch.tensor(math.inf)), torch.nextafter(x, torch.tensor(-math.inf))]
    points.append(torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0 ** -25, -(2.0 ** -25), 1e-9]))
    x = torch.cat(points).clamp(-1, 1)
    body = block - 1
    rows = max(-(-x.numel() // body), -(-quant.MIN_NUMEL // block))  # smaller tensors stay float32
    x = torch.nn.functional.pad(x, (0, rows * body - x.numel())).view(rows, body)
    return torch.cat([torch.ones(x.shape[0], 1), x], dim=1).reshape(-1)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("fmt", sorted(quant.BLOCK))
def test_fused_search_at_every_level_and_midpoint(fmt, stochastic):
    """The kernels find a number's code from a table indexed by its float32 exponent and top
    mantissa bits, then one comparison (_lowbit_count); that must give torch.searchsorted's code at
    every boundary: each level and midpoint of the signed (m = g) and unsigned (v = |g|) maps, and
    their float32 neighbours. Nearest rounding: the for-loop path's codes byte for byte.
    Stochastic: a number on a level stores that level's code whatever the draw, as on the torch
    paths; any other number one of the two codes around it."""
    import optdsl
    _fused_ready()
    cls = optdsl.compile(EDGES)
    state_dtype = fmt + ("_stochastic" if stochastic else "")
    g = _edge_values(fmt, quant.BLOCK[fmt])
    loop, fused = torch.nn.Parameter(torch.zeros_like(g)), torch.nn.Parameter(torch.zeros_like(g))
    opts = [cls([loop], state_dtype=state_dtype, foreach=False), cls([fused], state_dtype=state_dtype, fused=True)]
    for p, opt in zip((loop, fused), opts):
        p.grad = g.clone()
        opt.step()
    for key, signed in (("m", True), ("v", False)):
        a, b = opts[0].state[loop][key], opts[1].state[fused][key]
        assert b.dtype == torch.uint8
        assert torch.equal(a[:, -4:], b[:, -4:]), key  # the scales: 1 in every block
        if not stochastic:
            assert torch.equal(a, b), key
            continue
        codes = [x[:, :-4].long() for x in (a, b)]
        if fmt == "int4":
            codes = [torch.stack([c & 15, c >> 4], dim=2).view(c.shape[0], -1) for c in codes]
        levels = torch.tensor(quant.LEVELS[(fmt, signed)], dtype=torch.float32)
        values = (g if signed else g.abs()).view(codes[0].shape)
        on_level = torch.isin(values, levels)
        assert on_level.sum() >= levels.numel() - 1, key
        assert torch.equal(codes[0][on_level], codes[1][on_level]), key
        assert (codes[0] - codes[1]).abs().max() <= 1, key


def _stored_scales(stored, shape):
    """Each number's block scale as stored (a block's largest |x|, which its dequantised numbers
    may not reach: the signed maps have no level -1)."""
    scale = stored[:, -4:].contiguous().view(torch.float32).reshape(-1)
    block = (stored.shape[1] - 4) * 8 // (8 if stored.shape[1] == quant.width("int8") else 4)
    return scale.repeat_interleave(block)[:math.prod(shape)].view(shape)


def _copy_state(src_opt, src, dst_opt, dst):
    for a, b in zip(src, dst):
        b.data.copy_(a.data)
        for key, value in src_opt.state[a].items():
            dst_opt.state[b][key].copy_(value)


# class, shapes; adagrad: an unsigned state alone; adafactor: a rows state of 4100 numbers at low bit,
# which the launcher dequantises around the kernels
FUSED_SPECS = {"adamw": ("AdamW", AWKWARD), "lion": ("Lion", AWKWARD), "adam": ("Adam", AWKWARD),
               "adagrad": ("Adagrad", AWKWARD), "adafactor": ("Adafactor", [(4100, 3)])}


@pytest.mark.parametrize("state_dtype", ["int8", "int4", "int8_stochastic"])
@pytest.mark.parametrize("name", sorted(FUSED_SPECS))
def test_fused_against_for_loop_step_by_step(name, state_dtype):
    """From the same parameters and states (copied each step), the fused step is the for-loop step:
    p to float32 rounding (the kernels order the float32 arithmetic their own way), and each
    state's numbers read back within s * (widest gap + 2^-23) of the for-loop path's per block of
    scale s: nearest, each path is within half a gap of its x, and the two x differ by ulps (a
    value a few ulps from a midpoint may round either way); stochastic, each path draws its own
    level of the two around its x, so two gaps. Nearest: nearly all codes are the same (<= 1% differ)."""
    import importlib
    _fused_ready()
    module = importlib.import_module(f"generated.{name}")
    cls, shapes = getattr(module, FUSED_SPECS[name][0]), FUSED_SPECS[name][1]
    prog = compile_source((SPECS / f"{name}.opt").read_text()).program
    codes = quant.codes(prog)
    signed_of = {s.saved_as: codes[s.name].signed for s in prog.states if s.name in codes}
    kind_of = {s.saved_as: s.shape for s in prog.states}
    fmt, stochastic = quant.STATE_DTYPES[state_dtype]
    gen = torch.Generator().manual_seed(11)
    init = [torch.randn(s, generator=gen) for s in shapes]
    loop, fused = ([torch.nn.Parameter(x.clone()) for x in init] for _ in range(2))
    kw = dict(lr=1e-2, state_dtype=state_dtype)
    opt_loop, opt_fused = cls(loop, foreach=False, **kw), cls(fused, fused=True, **kw)
    for step in range(3):
        grads = [torch.randn(x.shape, generator=gen) * 10.0 ** -step for x in init]
        for params, opt in ((loop, opt_loop), (fused, opt_fused)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if step == 0:
                opt.step()  # makes the states
        if step == 0:
            continue
        _copy_state(opt_loop, loop, opt_fused, fused)
        opt_loop.step()
        opt_fused.step()
        for a, b in zip(loop, fused):
            assert torch.allclose(a, b, rtol=2e-6, atol=1e-7), (step, a.shape)
            for key, x in opt_loop.state[a].items():
                y = opt_fused.state[b][key]
                assert x.dtype == y.dtype and x.shape == y.shape
                if x.dtype != torch.uint8:
                    assert torch.allclose(x, y.to(x.dtype)), key
                    continue
                signed = signed_of[key]
                levels = quant.LEVELS[(fmt, signed)]
                widest = max(hi - lo for lo, hi in zip(levels, levels[1:]))
                shape = {"full": a.shape, "rows": a.shape[:-1] + (1,), "cols": a.shape[:-2] + (1,) + a.shape[-1:]}[kind_of[key]]
                xa = module._dequantised(x, signed, shape, torch.float32)
                ya = module._dequantised(y, signed, shape, torch.float32)
                s = torch.maximum(_stored_scales(x, shape), _stored_scales(y, shape))
                steps = 2 if stochastic else 1  # each path within a gap of its own x (half a gap: nearest)
                assert ((xa - ya).abs() <= s * steps * (widest + F32)).all(), (key, step)
                assert torch.allclose(x[:, -4:].contiguous().view(torch.float32),
                                      y[:, -4:].contiguous().view(torch.float32), rtol=1e-5), key  # scales
                if not signed:
                    assert (ya >= 0).all()
                if not stochastic:
                    assert (x[:, :-4] != y[:, :-4]).float().mean() <= 0.01, key


def test_fused_low_bit_resumes_bit_exact_and_skips_small_tensors():
    """Stochastic rounding in the kernels draws from the optimizer's own generator (one seed per
    step): a state_dict round trip goes on bit for bit. A tensor under 4096 numbers keeps float32
    states beside low-bit ones in the same step (two launches, one per storage)."""
    _fused_ready()
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(4097, generator=gen)), torch.nn.Parameter(torch.randn(50, generator=gen))]
    kw = dict(lr=1e-2, state_dtype="int4_stochastic", fused=True)
    opt = AdamW(params, **kw)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert opt.state[params[0]]["exp_avg"].dtype == torch.uint8
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = AdamW(copies, **kw)
    again.load_state_dict(_saved(opt))
    for _ in range(2):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        again.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], again.state[q][key]), key


# Kron's rank-3 rule keeps per-axis factors (factor(K)): d[K] x d[K], or diagonal (its d[K] values, 1-D).
# They follow the rule of every float state: stored at low bit when they hold MIN_NUMEL numbers or more
# (a gram(0) of a (70, 2, 30) tensor: 4900; an axis(0) of a (4100, 2, 1) one: 4100), float32 below
# (gram(1), gram(2), axis(1), axis(2) here), as rows/cols and gram_rows/gram_cols states are.
RANK3 = {"gram": ((70, 2, 30), {}, {"momentum_buffer", "Q0"}),
         "axis": ((4100, 2, 1), dict(memory_save_mode="all_diag"), {"momentum_buffer", "Q0"})}
PATHS3 = {**PATHS, "fused": dict(fused=True)}  # fused: these rules run the foreach path's torch code


def _rank3_float_shapes(shape, diagonal=False):
    """The float shape of each per-axis state of a rank-3 parameter of `shape`, by its saved name: Q{k} a
    triangular factor (n x n), or diagonal (its n values, 1-D) for all_diag and a side of 1."""
    out = {"momentum_buffer": tuple(shape)}
    for k, n in enumerate(shape):
        out[f"Q{k}"] = (n,) if diagonal or n == 1 else (n, n)  # a diagonal factor: its diagonal
    return out


def _rank3_stepped(kind, path, state_dtype, steps, gen):
    from generated.kron import Kron
    shape, kw, _ = RANK3[kind]
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    opt = Kron([p], lr=1e-2, state_dtype=state_dtype, **kw, **PATHS3[path]).manual_seed(4)
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=gen)
        opt.step()
    return opt, p


@pytest.mark.parametrize("path", sorted(PATHS3))
@pytest.mark.parametrize("state_dtype", ["int8", "int4_stochastic", torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", sorted(RANK3))
def test_rank3_per_axis_states_store_and_resume_bit_exact(kind, state_dtype, path):
    """Which states are stored at low bit (those of 4096 numbers or more: p's momentum and the large
    axis' factor), bfloat16 for every float state; state_dict() round trip and resume, bit for bit."""
    from generated.kron import Kron
    shape, kw, large = RANK3[kind]
    gen = torch.Generator().manual_seed(0)
    opt, p = _rank3_stepped(kind, path, state_dtype, 3, gen)
    floats = _rank3_float_shapes(shape, "memory_save_mode" in RANK3[kind][1])
    for key, value in opt.state[p].items():
        if key == "step":
            assert value.dtype == torch.float32
        elif state_dtype is torch.bfloat16:
            assert value.dtype == torch.bfloat16 and tuple(value.shape) == floats.get(key, ()), key
        elif key in large:
            assert value.dtype == torch.uint8 and value.shape[-1] == quant.width(state_dtype[:4]), key
        else:
            assert value.dtype == torch.float32 and tuple(value.shape) == floats.get(key, ()), key
    saved = _saved(opt)
    q = torch.nn.Parameter(p.detach().clone())
    again = Kron([q], lr=1e-2, state_dtype=state_dtype, **kw, **PATHS3[path])
    again.load_state_dict(saved)
    resaved = again.state_dict()
    for key, value in saved["state"][0].items():
        assert resaved["state"][0][key].dtype == value.dtype and torch.equal(resaved["state"][0][key], value), key
    for _ in range(3):  # both go on alike: the probes and the stochastic rounding from the saved generator
        p.grad = torch.randn(shape, generator=gen)
        q.grad = p.grad.clone()
        opt.step()
        again.step()
    assert torch.equal(p, q)
    assert all(torch.equal(opt.state[p][k], again.state[q][k]) for k in opt.state[p])


@pytest.mark.parametrize("path", sorted(PATHS3))
@pytest.mark.parametrize("fmt", sorted(quant.BLOCK))
@pytest.mark.parametrize("kind", sorted(RANK3))
def test_rank3_per_axis_states_against_float32_path_step_by_step(kind, fmt, path):
    """Over 12 steps, each low-bit step is the float32 path's step from the same (dequantised) states
    and the same generator: p bit for bit, each new low-bit state within one rounding of the float32
    path's (s * (w + 2^-23) per block), float states equal."""
    from generated import kron as module
    shape, kw, large = RANK3[kind]
    floats = _rank3_float_shapes(shape, "memory_save_mode" in RANK3[kind][1])
    gen = torch.Generator().manual_seed(1)
    low, p = _rank3_stepped(kind, path, fmt, 0, gen)
    signed = low._LOWBIT_SIGNED
    for step in range(12):
        g = torch.randn(shape, generator=gen) * 10.0 ** (-(step % 3))
        q = torch.nn.Parameter(p.detach().clone())
        ref = module.Kron([q], lr=1e-2, **kw, **PATHS3[path])
        sd = _saved(low)  # a copy: state_dict() holds the live states, as torch.optim's
        if step:
            for key, value in sd["state"][0].items():
                if value.dtype == torch.uint8:
                    sd["state"][0][key] = module._dequantised(value, signed[key], floats[key], torch.float32)
        else:
            sd["state"] = {}
        ref.load_state_dict({**sd, "param_groups": [dict(gr, state_dtype=None) for gr in sd["param_groups"]]})
        p.grad, q.grad = g.clone(), g.clone()
        low.step()
        ref.step()
        assert torch.equal(p, q), f"step {step + 1}"
        assert {k for k, v in low.state[p].items() if v.dtype == torch.uint8} == large
        for key, value in ref.state[q].items():
            stored = low.state[p][key]
            if stored.dtype != torch.uint8:
                assert key not in large and torch.equal(stored, value), (key, step)
                continue
            assert key in large
            _assert_one_rounding(module, stored, value, quant.Code(signed[key], ""), fmt, (key, step))
