"""Differential tests: every spec in specs/ against a handwritten reference.

The references are torch.optim on its for-loop path (foreach=False) where torch has the
optimizer, and short transcriptions of the papers' update rules otherwise (Lion, Adam-atan2,
nSGDA). Each case runs the generated optimizer twice, on its for-loop path and on its
foreach path, and checks after every step that

* the two generated paths are bitwise equal (torch.equal), and
* both agree with the reference to a relative error of 1e-10 (float64) or 1e-5 (float32),
  where the error of a tensor is max|ours - ref| / (its scale + tiny), its scale being the
  largest |ref| it has had so far, its initial value included (so that a tensor whose value
  passes near zero, e.g. the (1,) one, is not judged relative to that near-zero value).

Gradients come from a fixed torch.Generator seed, are identical on all sides, contain some
exact zeros and differ in scale between tensors; one parameter has no gradient on every
third step and another none on the first two, so the per-parameter step counts differ.
Small shapes run STEPS steps in float64 and float32; each family also runs once with a
large (1823, 781) tensor in float64.
"""
from __future__ import annotations

import functools
import sys
import os
import zlib
from pathlib import Path

import pytest
import torch

import optdsl

SPECS = Path(__file__).resolve().parent.parent / "specs"

SMALL = [(1,), (7,), (13, 5), (3, 1, 4)]
LARGE = SMALL + [(1823, 781)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
STEPS = 60
LARGE_STEPS = 8


@functools.lru_cache(maxsize=None)
def spec(name):
    return optdsl.load(SPECS / f"{name}.opt")


# With TRITON_INTERPRET=0 on a CUDA machine the fused kernels run compiled on the GPU, for every
# case, small and large shapes; under the interpreter (CI) on CPU tensors, small shapes, fewer steps.
ON_GPU = os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available()
FUSED_DEVICE = "cuda" if ON_GPU else "cpu"


def run_pair(make_ours, make_ref, shapes, dtype, steps, seed=0, tol=None, skip=True, loss=False, feed=None,
             fused=False, ref_on_fused_device=False):
    """Step ours (for-loop and foreach) and the reference side by side; assert after every step.

    skip: some parameters miss their gradient on some steps (so step counts differ per
    parameter); off for references that count steps per group. loss: step(closure) with a
    closure returning a positive, changing loss. feed: {input name: sampler(generator)}, fed to
    every parameter of all three optimizers before each step (opt.feed), as a training loop would.
    fused: ours is one optimizer on the fused Triton path instead, make_ours(params, fused=True),
    its parameters on FUSED_DEVICE (the GPU where the kernels run compiled).
    ref_on_fused_device: the reference's parameters there too, for references whose answer depends
    on the device's linear algebra (an eigenbasis of a degenerate eigenspace, as SOAP's at step 1).
    """
    tol = TOL[dtype] if tol is None else tol
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    ref_device = FUSED_DEVICE if fused and ref_on_fused_device else "cpu"
    ref = [torch.nn.Parameter(x.clone().to(ref_device)) for x in init]
    if fused:
        sides = [[torch.nn.Parameter(x.clone().to(FUSED_DEVICE)) for x in init]]
        opts = [make_ours(sides[0], fused=True)]
    else:
        sides = [[torch.nn.Parameter(x.clone()) for x in init] for _ in range(2)]
        opts = [make_ours(sides[0], foreach=False), make_ours(sides[1], foreach=True)]
    opts.append(make_ref(ref))
    scale = [x.abs().max().item() for x in init]
    worst = 0.0
    for step in range(steps):
        for i, s in enumerate(shapes):
            g = torch.randn(s, generator=gen, dtype=dtype) * 10.0 ** (i - 2)
            g = g * (torch.rand(s, generator=gen) > 0.15)  # some exact zeros
            missing = skip and ((i == 1 and step % 3 == 2) or (i == 3 and step < 2))
            for side in sides + [ref]:
                side[i].grad = None if missing else g.clone().to(side[i].device)
        value = torch.rand((), generator=gen, dtype=dtype).item() * 3.0 if loss else None
        for name, sample in (feed or {}).items():
            for i in range(len(shapes)):
                fed = sample(gen)
                for opt, side in zip(opts, sides + [ref]):
                    opt.feed(side[i], **{name: fed})
        for opt in opts:
            opt.step(lambda: value) if loss else opt.step()
        for i in range(len(shapes)):
            if not fused:
                loop, fe = sides[0][i], sides[1][i]
                assert torch.equal(loop, fe), (
                    f"foreach and for-loop paths differ at step {step}, tensor {i} {tuple(shapes[i])}: "
                    f"max |diff| {(loop - fe).abs().max().item():.3e}")
            scale[i] = max(scale[i], ref[i].abs().max().item())
            err = max((x[i].detach().cpu() - ref[i].detach().cpu()).abs().max().item()
                      for x in sides) / (scale[i] + 1e-300)
            path = "fused" if fused else "ours"
            assert err <= tol, (f"{path} differs from reference at step {step}, tensor {i} {tuple(shapes[i])}: "
                                f"relative error {err:.3e} > {tol:.0e}")
            worst = max(worst, err)
    return worst


# ---------------------------------------------------------------- references from the papers


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



def lion_update(p, g, state, t, lr, b1, b2, wd):
    # Chen et al. 2023, Algorithm 2 (decoupled weight decay).
    m = state.setdefault("m", torch.zeros_like(p))
    c = b1 * m + (1 - b1) * g
    p.mul_(1 - lr * wd).sub_(lr * torch.sign(c))
    m.copy_(b2 * m + (1 - b2) * g)


def adam_atan2_update(p, g, state, t, lr, b1, b2, wd, a, b):
    m = state.setdefault("m", torch.zeros_like(p))
    v = state.setdefault("v", torch.zeros_like(p))
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - b1)
    v.lerp_(g * g, 1 - b2)
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    p.sub_(lr * a * torch.atan2(m_hat, b * torch.sqrt(v_hat)))


def lamb_update(p, g, state, t, lr, b1, b2, eps, wd, max_w):
    # You et al. 2020, Algorithm 2, with the scaling function phi(x) = min(x, max_w).
    m = state.setdefault("m", torch.zeros_like(p))
    v = state.setdefault("v", torch.zeros_like(p))
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps) + wd * p
    w = torch.linalg.vector_norm(p).clamp(max=max_w)
    r_norm = torch.linalg.vector_norm(r)
    ratio = w / r_norm if w > 0 and r_norm > 0 else 1.0
    p.sub_(lr * ratio * r)


def nsgda_update(p, g, state, t, lr, momentum, eps, wd):
    m = state.setdefault("m", torch.zeros_like(p))
    g = g + wd * p
    m.lerp_(g, 1 - momentum)
    m_hat = m / (1 - momentum**t)
    p.sub_(lr * m_hat / (torch.linalg.vector_norm(m_hat) + eps))


# ---------------------------------------------------------------- the cases

# (spec, our kwargs, reference factory(params, **kwargs), reference kwargs)
T = torch.optim


def paper(update):
    return lambda params, **kw: PaperRef(params, update, **kw)


CASES = {
    "sgd-plain": ("sgd", dict(lr=0.1), T.SGD, dict(lr=0.1)),
    "sgd-momentum": ("sgd", dict(lr=0.05, momentum=0.9), T.SGD, dict(lr=0.05, momentum=0.9)),
    "sgd-dampening": ("sgd", dict(lr=0.05, momentum=0.8, dampening=0.3), T.SGD,
                      dict(lr=0.05, momentum=0.8, dampening=0.3)),
    "sgd-nesterov": ("sgd", dict(lr=0.05, momentum=0.9, nesterov=1), T.SGD,
                     dict(lr=0.05, momentum=0.9, nesterov=True)),
    "sgd-wd": ("sgd", dict(lr=0.1, wd=0.1), T.SGD, dict(lr=0.1, weight_decay=0.1)),
    "sgd-momentum-wd": ("sgd", dict(lr=0.05, momentum=0.7, dampening=0.1, wd=0.05), T.SGD,
                        dict(lr=0.05, momentum=0.7, dampening=0.1, weight_decay=0.05)),
    "adagrad-plain": ("adagrad", dict(lr=0.1), T.Adagrad, dict(lr=0.1)),
    "adagrad-lr_decay": ("adagrad", dict(lr=0.1, lr_decay=0.05), T.Adagrad, dict(lr=0.1, lr_decay=0.05)),
    "adagrad-wd": ("adagrad", dict(lr=0.05, wd=0.1), T.Adagrad, dict(lr=0.05, weight_decay=0.1)),
    "adagrad-init_acc": ("adagrad", dict(lr=0.1, initial_accumulator_value=0.3, eps=1e-6), T.Adagrad,
                         dict(lr=0.1, initial_accumulator_value=0.3, eps=1e-6)),
    "adagrad-all": ("adagrad", dict(lr=0.2, lr_decay=0.01, wd=0.02, initial_accumulator_value=0.1),
                    T.Adagrad, dict(lr=0.2, lr_decay=0.01, weight_decay=0.02, initial_accumulator_value=0.1)),
    "rmsprop-plain": ("rmsprop", dict(lr=0.01), T.RMSprop, dict(lr=0.01)),
    "rmsprop-centered": ("rmsprop", dict(lr=0.01, centered=1), T.RMSprop, dict(lr=0.01, centered=True)),
    "rmsprop-momentum": ("rmsprop", dict(lr=0.01, momentum=0.9, alpha=0.9), T.RMSprop,
                         dict(lr=0.01, momentum=0.9, alpha=0.9)),
    "rmsprop-centered-momentum": ("rmsprop", dict(lr=0.005, momentum=0.5, centered=1, wd=0.1, eps=1e-6),
                                  T.RMSprop, dict(lr=0.005, momentum=0.5, centered=True, weight_decay=0.1,
                                                  eps=1e-6)),
    "adam-plain": ("adam", dict(lr=0.01), T.Adam, dict(lr=0.01)),
    "adam-wd": ("adam", dict(lr=0.01, wd=0.1, b1=0.8, b2=0.99), T.Adam,
                dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.99))),
    "adam-eps": ("adam", dict(lr=0.003, b1=0.5, b2=0.9, eps=1e-3), T.Adam,
                 dict(lr=0.003, betas=(0.5, 0.9), eps=1e-3)),
    "adamw-default": ("adamw", dict(lr=0.01), T.AdamW, dict(lr=0.01)),
    "adamw-wd": ("adamw", dict(lr=0.01, wd=0.3, b2=0.99), T.AdamW,
                 dict(lr=0.01, weight_decay=0.3, betas=(0.9, 0.99))),
    "adamw-nowd": ("adamw", dict(lr=0.02, wd=0.0, b1=0.0, eps=1e-6), T.AdamW,
                   dict(lr=0.02, weight_decay=0.0, betas=(0.0, 0.999), eps=1e-6)),
    "adamax-plain": ("adamax", dict(lr=0.01), T.Adamax, dict(lr=0.01)),
    "adamax-wd": ("adamax", dict(lr=0.01, wd=0.1, b2=0.9, eps=1e-3), T.Adamax,
                  dict(lr=0.01, weight_decay=0.1, betas=(0.9, 0.9), eps=1e-3)),
    "amsgrad-plain": ("amsgrad", dict(lr=0.01), T.Adam, dict(lr=0.01, amsgrad=True)),
    "amsgrad-wd": ("amsgrad", dict(lr=0.01, wd=0.1, b1=0.8, b2=0.9), T.Adam,
                   dict(lr=0.01, weight_decay=0.1, betas=(0.8, 0.9), amsgrad=True)),
    "radam-plain": ("radam", dict(lr=0.01), T.RAdam, dict(lr=0.01)),
    "radam-wd": ("radam", dict(lr=0.01, wd=0.1), T.RAdam, dict(lr=0.01, weight_decay=0.1)),
    "radam-b2": ("radam", dict(lr=0.01, b1=0.8, b2=0.99, eps=1e-6, wd=0.01), T.RAdam,
                 dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)),
    "lion-plain": ("lion", dict(lr=1e-3), paper(lion_update), dict(lr=1e-3, b1=0.9, b2=0.99, wd=0.0)),
    "lion-wd": ("lion", dict(lr=3e-3, b1=0.95, b2=0.98, wd=0.5), paper(lion_update),
                dict(lr=3e-3, b1=0.95, b2=0.98, wd=0.5)),
    "lion-ends": ("lion", dict(lr=1e-2, b1=0.0, b2=1.0, wd=0.1), paper(lion_update),
                  dict(lr=1e-2, b1=0.0, b2=1.0, wd=0.1)),
    "adam_atan2-plain": ("adam_atan2", dict(lr=0.01), paper(adam_atan2_update),
                         dict(lr=0.01, b1=0.9, b2=0.999, wd=0.0, a=1.27, b=1.0)),
    "adam_atan2-wd": ("adam_atan2", dict(lr=0.01, b1=0.8, b2=0.95, wd=0.1, a=2.0, b=0.5),
                      paper(adam_atan2_update), dict(lr=0.01, b1=0.8, b2=0.95, wd=0.1, a=2.0, b=0.5)),
    "nsgda-default": ("nsgda", dict(lr=0.01), paper(nsgda_update),
                      dict(lr=0.01, momentum=0.9, eps=1e-8, wd=1e-2)),
    "nsgda-nomomentum": ("nsgda", dict(lr=0.05, momentum=0.0, wd=0.0, eps=1e-3), paper(nsgda_update),
                         dict(lr=0.05, momentum=0.0, eps=1e-3, wd=0.0)),
    "nsgda-wd": ("nsgda", dict(lr=0.02, momentum=0.5, wd=0.3), paper(nsgda_update),
                 dict(lr=0.02, momentum=0.5, eps=1e-8, wd=0.3)),
    "lamb-default": ("lamb", dict(lr=0.01), paper(lamb_update),
                     dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-6, wd=1e-2, max_w=10.0)),
    "lamb-clamped": ("lamb", dict(lr=0.02, b1=0.8, b2=0.99, wd=0.1, max_w=0.5), paper(lamb_update),
                     dict(lr=0.02, b1=0.8, b2=0.99, eps=1e-6, wd=0.1, max_w=0.5)),
    "lamb-paper": ("lamb", dict(lr=0.01, eps=1e-3, wd=0.0, max_w=float("inf")), paper(lamb_update),
                   dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-3, wd=0.0, max_w=float("inf"))),
}

# The first case of each family also runs in float64 with the large (1823, 781) tensor, for
# LARGE_STEPS steps only (enough for RAdam's rectified branch, which starts at t = 6).
_FIRST = {}
for _case, (_spec, *_rest) in CASES.items():
    _FIRST.setdefault(_spec, _case)
LARGE_CASES = list(_FIRST.values())


def _makers(case):
    name, ours_kw, ref_cls, ref_kw = CASES[case]
    Ours = spec(name)
    if ref_cls.__module__.startswith("torch.optim"):
        ref_kw = dict(ref_kw, foreach=False)
    return (lambda params, **mode: Ours(params, **mode, **ours_kw),
            lambda params: ref_cls(params, **ref_kw))


def test_every_spec_is_covered():
    """Every spec has a reference case here or in the CASES dict of tests/test_zoo*.py,
    tests/test_galore.py or tests/test_dropin.py (the drop-ins, against torch.optim in float64 with scalar states in float64)."""
    import importlib
    covered = {c[0] for c in CASES.values()}
    for path in [*Path(__file__).parent.glob("test_zoo*.py"), Path("test_dropin.py"), Path("test_galore.py")]:
        covered |= {c[0] for c in getattr(importlib.import_module(path.stem), "CASES", {}).values()}
    assert covered >= {p.stem for p in SPECS.glob("*.opt")}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    run_pair(*_makers(case), SMALL, dtype, STEPS, seed=zlib.crc32(case.encode()))


@pytest.mark.parametrize("case", LARGE_CASES)
def test_matches_reference_large(case):
    # One intra-op thread: under `-n 2` two threads per worker more than double the CPU time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_pair(*_makers(case), LARGE, torch.float64, LARGE_STEPS, seed=1)
    finally:
        torch.set_num_threads(threads)


def test_wrong_constant_is_caught():
    text = (SPECS / "adamw.opt").read_text()
    assert text.count("b2 = 0.999") == 1
    Wrong = optdsl.compile(text.replace("b2 = 0.999", "b2 = 0.998"), "adamw_wrong.opt")
    # Loaded after Wrong, so that sys.modules (which both claim) is left with the genuine AdamW.
    Right = optdsl.load(SPECS / "adamw.opt")

    def ref(params):
        return torch.optim.AdamW(params, lr=0.01, betas=(0.9, 0.999), weight_decay=0.01, foreach=False)

    for dtype in (torch.float64, torch.float32):
        run_pair(lambda ps, foreach: Right(ps, lr=0.01, foreach=foreach), ref, SMALL, dtype, STEPS)
        with pytest.raises(AssertionError, match="differs from reference"):
            run_pair(lambda ps, foreach: Wrong(ps, lr=0.01, foreach=foreach), ref, SMALL, dtype, STEPS)


# ---------------------------------------------------------------- the fused Triton path

# float32: arithmetic in float32 against a float64 reference. bfloat16 parameters (float32 states)
# against a float64 reference that rounds its parameters to bfloat16 after every step, as a bfloat16
# parameter is stored: the two differ only where float32 and float64 round a value to different
# bfloat16 neighbours, so we allow one bfloat16 step at the tensor's scale and require 95% of the
# elements to be equal. (Seen under the interpreter: float32 1e-8..5e-7, bfloat16 all equal.)
FUSED_TOL = {torch.float32: 2e-6, torch.bfloat16: 2.0**-7}


def run_fused(case, dtype, shapes, steps, seed):
    name, ours_kw, ref_cls, ref_kw = CASES[case]
    if ref_cls.__module__.startswith("torch.optim"):
        ref_kw = dict(ref_kw, foreach=False)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    ours = [torch.nn.Parameter(x.to(FUSED_DEVICE)) for x in init]
    ref = [torch.nn.Parameter(x.double()) for x in init]
    opts = spec(name)(ours, fused=True, **ours_kw), ref_cls(ref, **ref_kw)
    scale = [x.abs().max().item() for x in ref]
    worst = 0.0
    for step in range(steps):
        for i, s in enumerate(shapes):
            g = (torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** (i - 2)).to(dtype)
            g = g * (torch.rand(s, generator=gen) > 0.15)
            skip = (i == 1 and step % 3 == 2) or (i == 3 and step < 2)
            ours[i].grad = None if skip else g.to(FUSED_DEVICE)
            ref[i].grad = None if skip else g.double()
        for opt in opts:
            opt.step()
        with torch.no_grad():
            for x in ref:
                x.copy_(x.to(dtype).double())  # stored in the parameter's dtype
        for i in range(len(shapes)):
            got = ours[i].detach().double().cpu()
            scale[i] = max(scale[i], ref[i].abs().max().item())
            err = (got - ref[i]).abs().max().item() / (scale[i] + 1e-300)
            assert err <= FUSED_TOL[dtype], (
                f"fused differs from reference at step {step}, tensor {i} {tuple(shapes[i])}: "
                f"relative error {err:.3e} > {FUSED_TOL[dtype]:.0e}")
            worst = max(worst, err)
    if dtype == torch.bfloat16:
        same = sum((x.detach().double().cpu() == r).sum().item() for x, r in zip(ours, ref))
        assert same >= 0.95 * sum(x.numel() for x in ref)
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_reference(case, dtype):
    run_fused(case, dtype, SMALL, STEPS if ON_GPU else 12, seed=zlib.crc32(case.encode()))


@pytest.mark.skipif(not ON_GPU, reason="large shapes are checked compiled on a GPU (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", LARGE_CASES)
def test_fused_matches_reference_large(case, dtype):
    run_fused(case, dtype, LARGE, LARGE_STEPS, seed=1)


def test_fused_wrong_constant_is_caught(monkeypatch):
    text = (SPECS / "adamw.opt").read_text()
    Wrong = optdsl.compile(text.replace("b2 = 0.999", "b2 = 0.998"), "adamw_wrong_fused.opt")
    monkeypatch.setitem(CASES, "wrong", ("adamw_wrong", *CASES["adamw-default"][1:]))
    monkeypatch.setattr(sys.modules[__name__], "spec", lambda name: Wrong)
    with pytest.raises(AssertionError, match="fused differs from reference"):
        run_fused("wrong", torch.float32, SMALL, 12, seed=0)
