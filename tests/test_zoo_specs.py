"""The post-Adam zoo written in the core language: each spec against a handwritten reference.

The references are pytorch_optimizer's implementations where it has one (DiffGrad, AdaBelief,
Lion with `cautious=True`) and short transcriptions otherwise: of the authors' code for Sadam and
C-AdamW's mask, of the papers' update rules for cautious weight decay and Adam on normalised
gradients. Each case runs
through test_differential's `run_pair`: the generated for-loop and foreach paths are bitwise
equal, and both within 1e-10 (float64) or 1e-5 (float32) of the reference after every step,
on small awkward shapes for 60 steps and, for the first case of each spec, with a large
(1823, 781) tensor for 8 steps. Each spec is also changed in the line that makes it what it is,
and the same comparison must then fail.

pytorch_optimizer counts steps per parameter group (`group['step']`), torch.optim and optdsl per
parameter; `run_pair` leaves some parameters without a gradient on some steps, so its optimizers
are wrapped one per parameter, each stepped only when its parameter has a gradient.

Every spec here also runs on the fused Triton path (under the interpreter on CPU, see
tests/conftest.py) against its foreach path, and a few have `optdsl explain` expectations.
"""
from __future__ import annotations

import importlib
import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

from test_differential import LARGE, LARGE_STEPS, SMALL, STEPS, PaperRef, run_pair, spec

# ---------------------------------------------------------------- references written here


def sadam_update(p, g, state, t, lr, b1, b2, beta, wd):
    # Tong et al. 2019, Sadam as in the authors' Sadam.py (transformer='softplus', amsgrad off):
    # softplus_beta(sqrt(v)) replaces sqrt(v) + eps, the bias corrections are in the step size.
    m = state.setdefault("m", torch.zeros_like(p))
    v = state.setdefault("v", torch.zeros_like(p))
    g = g + wd * p
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).add_((1 - b2) * g**2)
    step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
    p.addcdiv_(m, F.softplus(v.sqrt(), beta=beta), value=-step_size)


def cautious_adamw_update(p, g, state, t, lr, b1, b2, eps, wd):
    # Liang et al. 2024, C-AdamW: torch.optim.AdamW's step, masked where m and g disagree in
    # sign, the mask divided by its mean clamped below at 1e-3 (the authors' c_adamw.py).
    m = state.setdefault("m", torch.zeros_like(p))
    v = state.setdefault("v", torch.zeros_like(p))
    p.mul_(1 - lr * wd)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    mask = (m * g > 0).to(g.dtype)
    mask.div_(mask.mean().clamp(min=1e-3))
    u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    p.sub_(lr * u * mask)


def cwd_adamw_update(p, g, state, t, lr, b1, b2, eps, wd):
    # Chen et al. 2025, cautious weight decay: x <- x - lr * (u + wd * I(u * x >= 0) * x).
    m = state.setdefault("m", torch.zeros_like(p))
    v = state.setdefault("v", torch.zeros_like(p))
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    decay = (u * p >= 0).to(p.dtype)
    p.sub_(lr * (u + wd * decay * p))


def adam_ng_update(p, g, state, t, lr, b1, b2, eps, norm_eps, wd):
    # Yu et al. 2017, Algorithm 1 with Adam: the gradient of each block (here each tensor) is
    # divided by its L2 norm before the Adam update; decoupled weight decay as in AdamW.
    m = state.setdefault("m", torch.zeros_like(p))
    v = state.setdefault("v", torch.zeros_like(p))
    g = g / (torch.linalg.vector_norm(g) + norm_eps)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    p.mul_(1 - lr * wd)
    p.sub_(lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))


def paper(update):
    return lambda params, **kw: PaperRef(params, update, **kw)


# ---------------------------------------------------------------- pytorch_optimizer


class OnePerParameter:
    """One pytorch_optimizer optimizer per parameter, stepped only when it has a gradient."""

    def __init__(self, params, make):
        self.pairs = [(p, make([p])) for p in params]

    def step(self):
        for p, opt in self.pairs:
            if p.grad is not None:
                opt.step()


def po(name, sqrt_guard=True):
    """A factory for pytorch_optimizer's `name` on its per-parameter path (imported when used).

    sqrt_guard=False drops the 1e-15 that pytorch_optimizer adds under the square root of the
    second moment (`apply_ams_bound`, used by DiffGrad): neither the paper nor the authors' code
    has it, and in float64 it moves DiffGrad's first step by about 5e-9 relative, 50 times
    the tolerance. test_diffgrad_differs_from_pytorch_optimizer_only_by_its_sqrt_guard shows
    that this is the only difference.
    """
    def make(params, **kw):
        cls = getattr(pytest.importorskip("pytorch_optimizer"), name)
        if not sqrt_guard:
            cls = type(name, (cls,), {"apply_ams_bound": staticmethod(_without_sqrt_guard(cls.apply_ams_bound))})
        return OnePerParameter(params, lambda ps: cls(ps, foreach=False, **kw))
    return make


def _without_sqrt_guard(apply_ams_bound):
    return lambda *args, **kw: apply_ams_bound(*args, **{**kw, "exp_avg_sq_eps": 0.0})


# ---------------------------------------------------------------- the cases

DIFFGRAD = po("DiffGrad", sqrt_guard=False)

# (spec, our kwargs, reference factory(params, **kwargs), reference kwargs), as in test_differential
CASES = {
    "sadam-default": ("sadam", dict(lr=0.01), paper(sadam_update),
                      dict(lr=0.01, b1=0.9, b2=0.999, beta=50.0, wd=0.0)),
    "sadam-beta-wd": ("sadam", dict(lr=0.01, beta=10.0, wd=0.1), paper(sadam_update),
                      dict(lr=0.01, b1=0.9, b2=0.999, beta=10.0, wd=0.1)),
    "sadam-betas": ("sadam", dict(lr=0.003, b1=0.5, b2=0.9, beta=500.0), paper(sadam_update),
                    dict(lr=0.003, b1=0.5, b2=0.9, beta=500.0, wd=0.0)),
    "diffgrad-default": ("diffgrad", dict(lr=0.01), DIFFGRAD, dict(lr=0.01, weight_decouple=False)),
    "diffgrad-wd": ("diffgrad", dict(lr=0.01, wd=0.1, b1=0.8, b2=0.99), DIFFGRAD,
                    dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.99), weight_decouple=False)),
    "diffgrad-eps": ("diffgrad", dict(lr=0.003, b1=0.5, b2=0.9, eps=1e-3), DIFFGRAD,
                     dict(lr=0.003, betas=(0.5, 0.9), eps=1e-3, weight_decouple=False)),
    "adabelief-default": ("adabelief", dict(lr=0.01), po("AdaBelief"), dict(lr=0.01)),
    "adabelief-wd": ("adabelief", dict(lr=0.01, wd=0.3, b1=0.8, b2=0.99), po("AdaBelief"),
                     dict(lr=0.01, weight_decay=0.3, betas=(0.8, 0.99))),
    "adabelief-eps": ("adabelief", dict(lr=0.003, b1=0.5, b2=0.9, eps=1e-6), po("AdaBelief"),
                      dict(lr=0.003, betas=(0.5, 0.9), eps=1e-6)),
    "cautious_adamw-default": ("cautious_adamw", dict(lr=0.01), paper(cautious_adamw_update),
                               dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=1e-2)),
    "cautious_adamw-wd": ("cautious_adamw", dict(lr=0.01, wd=0.3, b1=0.5, b2=0.99),
                          paper(cautious_adamw_update), dict(lr=0.01, b1=0.5, b2=0.99, eps=1e-8, wd=0.3)),
    "cautious_adamw-nomomentum": ("cautious_adamw", dict(lr=0.02, wd=0.0, b1=0.0, eps=1e-6),
                                  paper(cautious_adamw_update), dict(lr=0.02, b1=0.0, b2=0.999, eps=1e-6, wd=0.0)),
    "cautious_lion-default": ("cautious_lion", dict(lr=1e-3), po("Lion"), dict(lr=1e-3, cautious=True)),
    "cautious_lion-wd": ("cautious_lion", dict(lr=3e-3, b1=0.95, b2=0.98, wd=0.5), po("Lion"),
                         dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5, cautious=True)),
    # b1 = 0: the update is sign(g), so the mask keeps every nonzero gradient (pytorch_optimizer
    # refuses b2 = 1, which the spec allows)
    "cautious_lion-b1zero": ("cautious_lion", dict(lr=1e-2, b1=0.0, b2=0.5, wd=0.1), po("Lion"),
                             dict(lr=1e-2, betas=(0.0, 0.5), weight_decay=0.1, cautious=True)),
    "cwd_adamw-default": ("cwd_adamw", dict(lr=0.01), paper(cwd_adamw_update),
                          dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=1e-2)),
    "cwd_adamw-wd": ("cwd_adamw", dict(lr=0.01, wd=0.5, b1=0.8, b2=0.99), paper(cwd_adamw_update),
                     dict(lr=0.01, b1=0.8, b2=0.99, eps=1e-8, wd=0.5)),
    "cwd_adamw-eps": ("cwd_adamw", dict(lr=0.02, wd=0.1, b1=0.0, eps=1e-3), paper(cwd_adamw_update),
                      dict(lr=0.02, b1=0.0, b2=0.999, eps=1e-3, wd=0.1)),
    "adam_ng-default": ("adam_ng", dict(lr=0.01), paper(adam_ng_update),
                        dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-8, norm_eps=1e-8, wd=0.0)),
    "adam_ng-wd": ("adam_ng", dict(lr=0.01, wd=0.1, b1=0.8, b2=0.99, norm_eps=1e-3), paper(adam_ng_update),
                   dict(lr=0.01, b1=0.8, b2=0.99, eps=1e-8, norm_eps=1e-3, wd=0.1)),
    "adam_ng-eps": ("adam_ng", dict(lr=0.003, b1=0.5, b2=0.9, eps=1e-3), paper(adam_ng_update),
                    dict(lr=0.003, b1=0.5, b2=0.9, eps=1e-3, norm_eps=1e-8, wd=0.0)),
}


def _makers(case):
    name, ours_kw, make_ref, ref_kw = CASES[case]
    Ours = spec(name)
    return (lambda params, foreach: Ours(params, foreach=foreach, **ours_kw),
            lambda params: make_ref(params, **ref_kw))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    run_pair(*_makers(case), SMALL, dtype, STEPS, seed=zlib.crc32(case.encode()))


# The first case of each spec also runs in float64 with a large (1823, 781) tensor, for a few
# steps: the masks' means and the gradient norm then reduce over many blocks.
_FIRST: dict[str, str] = {}
for _case, (_name, *_) in CASES.items():
    _FIRST.setdefault(_name, _case)
LARGE_CASES = list(_FIRST.values())


@pytest.mark.parametrize("case", LARGE_CASES)
def test_matches_reference_large(case):
    # One intra-op thread, as in test_differential: under `-n 2` more threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_pair(*_makers(case), LARGE, torch.float64, LARGE_STEPS, seed=1)
    finally:
        torch.set_num_threads(threads)


def test_diffgrad_differs_from_pytorch_optimizer_only_by_its_sqrt_guard():
    """Against the unmodified DiffGrad: equal to what its sqrt(v + 1e-15) explains, no closer."""
    def ours(params, foreach):
        return spec("diffgrad")(params, foreach=foreach, lr=0.01)

    def ref(params):
        return po("DiffGrad")(params, lr=0.01, weight_decouple=False)

    worst = run_pair(ours, ref, SMALL, torch.float64, STEPS, seed=1, tol=1e-7)
    assert worst > 1e-10  # the guard is visible in float64, so the tolerance above is needed
    run_pair(ours, ref, SMALL, torch.float32, STEPS, seed=1)  # and invisible in float32


# ---------------------------------------------------------------- a changed rule is caught

# spec: (text in the spec, its replacement): each removes what makes the optimizer what it is,
# and the reference cases above must notice.
MUTANTS = {
    "sadam": ("m * beta / softplus(beta * sqrt(v))", "m / (sqrt(v) + 1e-8)"),
    "diffgrad": ("friction = sigmoid(abs(g_prev - g))\ng_prev = g",
                 "g_prev = g\nfriction = sigmoid(abs(g_prev - g))"),
    "adabelief": ("m = lerp(m, g, 1 - b1)\ns = lerp(s, (g - m)^2, 1 - b2) + eps",
                  "s = lerp(s, (g - m)^2, 1 - b2) + eps\nm = lerp(m, g, 1 - b1)"),
    "cautious_adamw": ("lr * mask / max(mean(mask), 1e-3)", "lr * mask"),
    "cautious_lion": ("(sum(mask) + 1)", "sum(mask)"),
    "cwd_adamw": ("wd * (u * p >= 0)", "wd * (u * p > 0)"),  # only where u * p == 0: m == 0 after g == 0
    "adam_ng": ("g = g / (norm(g) + norm_eps)", "g = g / (1 + norm_eps)"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("stem", sorted(MUTANTS))
def test_a_changed_rule_is_caught(stem, dtype):
    import re

    import optdsl
    from test_differential import SPECS

    old, new = MUTANTS[stem]
    text = (SPECS / f"{stem}.opt").read_text()
    assert text.count(old) == 1
    # A class name of its own, so that sys.modules keeps the genuine optimizer's module.
    text = re.sub(r"^optimizer (\w+)", r"optimizer \1Mutant", text.replace(old, new), flags=re.M)
    Mutant = optdsl.compile(text, f"{stem}_mutant.opt")
    case = next(c for c, (s, *_) in CASES.items() if s == stem)
    _, ours_kw, make_ref, ref_kw = CASES[case]
    with pytest.raises(AssertionError, match="differs from reference"):
        run_pair(lambda ps, foreach: Mutant(ps, foreach=foreach, **ours_kw),
                 lambda ps: make_ref(ps, **ref_kw), SMALL, dtype, STEPS, seed=zlib.crc32(case.encode()))


# ---------------------------------------------------------------- the fused Triton path

# Specs with a whole-tensor reduction run in two launches per step: accumulate, then update.
FUSED_STAGES = {"sadam": 1, "diffgrad": 1, "adabelief": 1, "cwd_adamw": 1,
                "cautious_adamw": 2, "cautious_lion": 2, "adam_ng": 2}
FUSED_SHAPES = [(1,), (7,), (13, 5), (2100,)]  # 2100 spans three blocks of 1024
FUSED_STEPS = 5


def _fused_run(cls, kw, dtype, device, **mode):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in FUSED_SHAPES]
    opt = cls(params, **kw, **mode)
    for step in range(FUSED_STEPS):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            g = g * (torch.rand(p.shape, generator=gen) > 0.15)  # exact zeros: the masks' boundary
            p.grad = None if (i == 1 and step % 3 == 1) else g.to(dtype).to(device)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("stem", sorted(FUSED_STAGES))
def test_fused_equals_foreach(stem, dtype):
    pytest.importorskip("triton")
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 needs a CUDA device")
    module = importlib.import_module(f"generated.{stem}")
    cls = getattr(module, spec(stem).__name__)
    kw = next(kw for s, kw, *_ in CASES.values() if s == stem)
    before = module.LAUNCHES
    fused, fused_opt = _fused_run(cls, kw, dtype, device, fused=True)
    assert module.LAUNCHES - before == FUSED_STEPS * FUSED_STAGES[stem]  # one device, one dtype
    ref, ref_opt = _fused_run(cls, kw, dtype, device, foreach=True)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for pa, pb in zip(fused, ref):
        for key, value in ref_opt.state[pb].items():
            # `step` lives on the device when fused, on the CPU in foreach, as in torch.optim
            torch.testing.assert_close(fused_opt.state[pa][key], value, rtol=tol, atol=tol, check_device=False)


# ---------------------------------------------------------------- explain

BOUND = "bound on |Δp| per element at step 1 (from p = 0)"

# spec: {property: value} that `optdsl explain` derives and the papers agree with
EXPLAINED = {
    # At step 1, s = (1 - b2) * b1^2 * g^2 + eps, so |Δp| -> lr / b1 as |g| -> inf: AdaBelief's
    # first step can exceed Adam's lr bound, by 1/b1.
    "adabelief": {BOUND: "lr/b1",
                  "invariant to g -> c*g (c > 0)": "only when eps = 0", "range of state s": "[0, inf)"},
    # Normalising g removes its scale before Adam sees it, whatever Adam's eps.
    "adam_ng": {"invariant to g -> c*g (c > 0)": "only when norm_eps = 0"},
    # A reduction inside max(): explain used to fail on it with a TypeError.
    "cautious_adamw": {"invariant to g -> c*g (c > 0)": "only when eps = 0",
                       "first step moves against the gradient (from p = 0)": "yes"},
}


@pytest.mark.parametrize("stem", sorted(EXPLAINED))
def test_explain(stem, monkeypatch):
    from optdsl import explain as explain_module
    from optdsl.pipeline import compile_source
    from test_differential import SPECS

    if BOUND in EXPLAINED[stem]:
        # SymPy's limit runs under a wall-clock budget; on a loaded CI machine the bound can run
        # out of it and read "no bound found". What is tested is the derivation, not its speed.
        # (Only here: the same budget also stops simplify() from proving what is checked anyway.)
        monkeypatch.setattr(explain_module, "SYMPY_SECONDS", 60)
    explain = explain_module.explain
    path = SPECS / f"{stem}.opt"
    x = explain(compile_source(path.read_text(), path.as_posix()))
    assert {name: x.property(name).value for name in EXPLAINED[stem]} == EXPLAINED[stem]
