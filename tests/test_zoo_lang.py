"""The post-Adam zoo specs that need the language extensions, each against a handwritten reference.

References: torch.optim (NAdam, Adafactor, Muon), pytorch_optimizer where it has the optimizer
(SM3, Amos, AdaNorm, Lookahead, its agc and centralize_gradient helpers), otherwise a short
transcription of the paper's algorithm box written here (AdaLo, SMMF, soft clipping, MuonClip).

Like tests/test_differential.py, every case steps the generated optimizer on its for-loop and
its foreach path beside the reference and checks after every step that the two paths are
bitwise equal and both within a relative 1e-10 (float64) / 1e-5 (float32) of the reference.
"""
from __future__ import annotations

import functools
import math
import zlib
from pathlib import Path

import pytest
import torch

import optdsl

SPECS = Path(__file__).resolve().parent.parent / "specs"
SMALL = [(1,), (7,), (13, 5), (3, 1, 4)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
STEPS = 25


@functools.lru_cache(maxsize=None)
def spec(name):
    return optdsl.load(SPECS / f"{name}.opt")


def run_pair(make_ours, make_ref, shapes, dtype, steps, seed=0, tol=None, skip=True, loss=False):
    """Step ours (for-loop and foreach) and the reference side by side; assert after every step.

    skip: some parameters miss their gradient on some steps (so step counts differ per
    parameter); off for references that count steps per group. loss: step(closure) with a
    closure returning a positive, changing loss.
    """
    tol = TOL[dtype] if tol is None else tol
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    loop, fe, ref = ([torch.nn.Parameter(x.clone()) for x in init] for _ in range(3))
    opts = make_ours(loop, foreach=False), make_ours(fe, foreach=True), make_ref(ref)
    scale = [x.abs().max().item() for x in init]
    worst = 0.0
    for step in range(steps):
        for i, s in enumerate(shapes):
            g = torch.randn(s, generator=gen, dtype=dtype) * 10.0 ** (i - 2)
            g = g * (torch.rand(s, generator=gen) > 0.15)  # some exact zeros
            missing = skip and ((i == 1 and step % 3 == 2) or (i == 3 and step < 2))
            for side in (loop, fe, ref):
                side[i].grad = None if missing else g.clone()
        value = torch.rand((), generator=gen, dtype=dtype).item() * 3.0
        for opt in opts:
            opt.step((lambda: value) if loss else None)
        for i in range(len(shapes)):
            assert torch.equal(loop[i], fe[i]), (
                f"foreach and for-loop paths differ at step {step}, tensor {i} {tuple(shapes[i])}: "
                f"max |diff| {(loop[i] - fe[i]).abs().max().item():.3e}")
            scale[i] = max(scale[i], ref[i].abs().max().item())
            err = max((x - ref[i]).abs().max().item() for x in (loop[i], fe[i])) / (scale[i] + 1e-300)
            assert err <= tol, (f"differs from reference at step {step}, tensor {i} {tuple(shapes[i])}: "
                                f"relative error {err:.3e} > {tol:.0e}")
            worst = max(worst, err)
    return worst


class PaperRef(torch.optim.Optimizer):
    """A plain per-parameter loop around `update(p, g, state, t, **hypers)`; `loss` when asked."""

    def __init__(self, params, update, **hypers):
        super().__init__(params, hypers)
        self.update = update

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            hypers = {k: v for k, v in group.items() if k != "params"}
            if loss is not None:
                hypers["loss"] = loss
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["t"] = state.get("t", 0) + 1
                self.update(p, p.grad, state, state["t"], **hypers)
        return loss


def paper(update):
    return lambda params, **kw: PaperRef(params, update, **kw)


# ---------------------------------------------------------------- references from the papers

def adalo_update(p, g, state, t, b1, b2, kappa, eps, wd, loss):
    # The survey's AdaLo (adversarial mode): the squashed loss's running average is the step size.
    m = state.setdefault("m", torch.zeros_like(p))
    loss_ema = state.setdefault("loss_ema", torch.zeros((), dtype=p.dtype))
    m.lerp_(g, 1 - b1)
    scaled = torch.log1p(torch.as_tensor(loss, dtype=p.dtype))
    loss_ema.lerp_((torch.tanh(-scaled * 0.5) + 1.0) * 0.5, 1 - b2)
    lr_t = loss_ema.div(kappa).clamp_min_(eps)
    p.mul_(1 - lr_t * wd)
    p.sub_(m * lr_t)


# ---------------------------------------------------------------- the cases

T = torch.optim
try:
    import pytorch_optimizer as PO
except ImportError:  # pragma: no cover - a declared test dependency
    PO = None


def po(name):
    return lambda params, **kw: getattr(PO, name)(params, **kw)


# (spec, our kwargs, reference factory(params, **kwargs), reference kwargs)
CASES = {
    "nadam-default": ("nadam", dict(lr=0.01), T.NAdam, dict(lr=0.01)),
    "nadam-wd": ("nadam", dict(lr=0.01, b1=0.8, b2=0.99, wd=0.1, momentum_decay=0.01), T.NAdam,
                 dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, momentum_decay=0.01)),
    "adanorm-default": ("adanorm", dict(lr=0.01), po("AdaNorm"), dict(lr=0.01)),
    "adanorm-wd": ("adanorm", dict(lr=0.01, b1=0.8, b2=0.9, r=0.5, wd=0.1, eps=1e-6), po("AdaNorm"),
                   dict(lr=0.01, betas=(0.8, 0.9), r=0.5, weight_decay=0.1, eps=1e-6)),
    "adalo-default": ("adalo", dict(), paper(adalo_update), dict(b1=0.9, b2=0.999, kappa=3.0, eps=1e-8, wd=1e-2)),
    "adalo-fast": ("adalo", dict(b1=0.5, b2=0.6, kappa=1.5, wd=0.3), paper(adalo_update),
                   dict(b1=0.5, b2=0.6, kappa=1.5, eps=1e-8, wd=0.3)),
}
# How each family runs beside its reference (default: SMALL shapes, per-parameter step counts).
OPTIONS = {
    "adanorm": dict(skip=False),  # pytorch_optimizer counts steps per group
    "adalo": dict(loss=True),
}


def _makers(case):
    name, ours_kw, ref_make, ref_kw = CASES[case]
    Ours = spec(name)
    if getattr(ref_make, "__module__", "").startswith("torch.optim"):
        ref_kw = dict(ref_kw, foreach=False)
    return (lambda params, foreach: Ours(params, foreach=foreach, **ours_kw),
            lambda params: ref_make(params, **ref_kw))


@pytest.fixture
def float64_default():
    # torch.optim keeps NAdam's mu_product in the default dtype: float64 for a float64 comparison.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, request):
    name = CASES[case][0]
    if dtype == torch.float64:
        request.getfixturevalue("float64_default")
    options = dict(OPTIONS.get(name, {}))
    shapes = options.pop("shapes", SMALL)
    run_pair(*_makers(case), shapes, dtype, options.pop("steps", STEPS), seed=zlib.crc32(case.encode()),
             **options)


def test_wrong_constant_is_caught(float64_default):
    """The harness catches NAdam's momentum-decay base off in the third digit."""
    text = (SPECS / "nadam.opt").read_text()
    Wrong = optdsl.compile(text.replace("0.96^((t + 1)", "0.961^((t + 1)"), "nadam_wrong.opt")
    with pytest.raises(AssertionError, match="differs from reference"):
        run_pair(lambda ps, foreach: Wrong(ps, lr=0.01, foreach=foreach),
                 lambda ps: T.NAdam(ps, lr=0.01, foreach=False), SMALL, torch.float64, STEPS)
    spec.cache_clear()  # Wrong took the class's module name


def test_scalar_state_is_one_number_per_parameter():
    p = torch.nn.Parameter(torch.randn(13, 5))
    opt = spec("nadam")([p])
    p.grad = torch.randn(13, 5)
    opt.step()
    state = opt.state[p]
    assert state["mu_prod"].shape == () and state["m"].shape == (13, 5)
    mu = 0.9 * (1 - 0.5 * 0.96 ** 0.004)
    assert state["mu_prod"].item() == pytest.approx(mu, rel=1e-6)


@pytest.mark.parametrize("name", ["nadam", "adanorm", "adalo"])
def test_fused_says_why_not(name):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError, match="not fused yet"):
        spec(name)([p], fused=True)
