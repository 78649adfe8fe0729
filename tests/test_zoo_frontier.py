"""Issue 16's frontier: the language pieces the 2020-2025 optimizers need beyond the zoo, each
against a handwritten reference on the for-loop, foreach and fused paths (tests/test_zoo_lang.py's
harness: float64 to 1e-10, float32 to 1e-5, after every step, several shapes and settings).

- cos, sin, `%` (Python's modulo: the sign of the right side) and `nunits` (the first axis's size);
- a state list sized by a hyperparameter (AggMo's K momenta): refused, with where and what to do.
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

import optdsl
from test_differential import ON_GPU, PaperRef, run_pair  # noqa: E402 - the shared checker

SMALL = [(1,), (7,), (13, 5), (3, 1, 4)]
STEPS = 25
FUSED_STEPS = 10


def _fused_ok():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ---------------------------------------------------------------- cos, sin, %, nunits

TRIG = """
optimizer TrigMod
hyper lr = 0.01 in [0, inf), w = 0.5 in [0, inf), q = 0.3 in (0, inf)
state m
m = lerp(m, g, 0.1)
u = m * cos(w * t) + sin(m) * 0.1 + (g % q) * 0.01 + ((0 - t) % 3 - 1) * 0.001 * p / nunits
p -= lr * u
"""


def trig_update(p, g, state, t, lr, w, q):
    m = state.setdefault("m", torch.zeros_like(p))
    m.lerp_(g, 0.1)
    units = p.shape[0] if p.dim() >= 1 else 1
    u = m * math.cos(w * t) + torch.sin(m) * 0.1 + torch.remainder(g, q) * 0.01 + ((-t) % 3 - 1) * 0.001 * p / units
    p.sub_(lr * u)


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("settings", [dict(), dict(lr=0.05, w=2.0, q=0.07)], ids=["default", "other"])
def test_cos_sin_mod_and_nunits_match_a_reference(settings, dtype, fused, request):
    if fused:
        _fused_ok()
    if dtype == torch.float64:
        request.getfixturevalue("float64_default")
    Trig = optdsl.compile(TRIG, "trig_mod.opt")
    hypers = dict(dict(lr=0.01, w=0.5, q=0.3), **settings)
    run_pair(lambda ps, **mode: Trig(ps, **mode, **settings),
             lambda ps: PaperRef(ps, trig_update, **hypers), SMALL, dtype,
             FUSED_STEPS if fused and not ON_GPU else STEPS, seed=zlib.crc32(repr(settings).encode()), fused=fused)


def test_mod_is_pythons_modulo_on_every_path():
    """`%` takes the sign of its right side, as Python's % and torch.remainder: -7 % 3 is 2."""
    Mod = optdsl.compile("optimizer ModSign\nhyper k = 3 in (0, inf)\n"
                         "p = g % k + (0 - t * 7) % k * 1000 + (1 - t * 7) % (0 - k) * 100000\n", "mod_sign.opt")
    g = torch.tensor([-7.0, -1.0, 0.0, 1.0, 7.0, -3.0], dtype=torch.float64)
    want = torch.tensor([2.0, 2.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64) + 2 * 1000 + (-6 % -3) * 100000
    modes = [dict(foreach=False), dict(foreach=True)]
    if os.environ.get("TRITON_INTERPRET") == "1":
        modes.append(dict(fused=True))
    for mode in modes:
        p = torch.nn.Parameter(torch.zeros(6, dtype=torch.float64))
        p.grad = g.clone()
        Mod([p], **mode).step()
        assert torch.equal(p.detach(), want), (mode, p)


def test_nunits_is_the_first_axis():
    Units = optdsl.compile("optimizer Units\np = p * 0 + nunits + 100 * ncols\n", "units.opt")
    for shape, want in [((), 1 + 100), ((7,), 7 + 700), ((13, 5), 13 + 500), ((3, 1, 4), 3 + 400)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.zeros(shape)
        Units([p], foreach=False).step()
        assert torch.all(p == want), (shape, p)


@pytest.mark.parametrize("decl", ["state m[K]", "state v, m[3]", "state m[K] = 0"])
def test_a_state_list_is_refused_where_it_is_written(decl):
    """AggMo's K momenta would need a state list sized by a hyperparameter: the language has none,
    and the error says so at the bracket, with what to write instead."""
    src = f"optimizer AggMo\nhyper K = 3 in [1, inf)\n{decl}\np -= g\n"
    with pytest.raises(optdsl.SpecError) as err:
        optdsl.compile(src, "aggmo.opt")
    text = str(err.value)
    assert "aggmo.opt:3:" in text and "state list" in text and "state m1, m2, m3" in text
    assert f"\n    {decl}\n" in text and "^" in text
