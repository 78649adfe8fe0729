"""The two regularisers of the survey that issue 16 names, each against a reference loop written from
its paper (and checked against the authors' code), on the for-loop, foreach and fused paths, in
float64 to 1e-10 and float32 to 1e-5, over a multi-tensor model (tall, wide, rank 3, 1-element):

- CPR (Franke et al., 2023, arXiv:2311.09058): Adam and, per tensor, a Lagrange multiplier on the
  squared L2 norm, its bound kappa taken at a warm-start step ("Kappa-WS");
- AdamS, stable weight decay (Xie et al., NeurIPS 2023, arXiv:2011.11152): decoupled decay divided by
  the square root of the group's mean bias-corrected second moment (a group value).
"""
from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import pytest
import torch

import optdsl
from test_differential import ON_GPU, run_pair  # noqa: E402 - the shared checker

SPECS = Path(__file__).resolve().parent.parent / "specs"
SHAPES = [(1,), (7,), (13, 5), (4, 9), (3, 1, 4)]
STEPS = 25
FUSED_STEPS = 12


def spec(name):
    return optdsl.load(SPECS / f"{name}.opt")


class CPRRef(torch.optim.Optimizer):
    """Franke et al. (2023), Algorithm 1 with Adam as the optimizer and R(p) = ||p||^2, kappa by warm
    start (section 4.2, "Kappa-WS"): after Adam's step, from step s + 1 on,
        lambda <- max(0, lambda + mu * (R(p) - kappa)),   p <- p - lambda * grad R(p) = p - 2 lambda p,
    and at step s itself kappa <- R(p). As the authors' AdamCPR does, mu is kappa_update / numel and
    R is taken after the Adam step."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, kappa_init_param=1000, kappa_update=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, warm_start=kappa_init_param, mu=kappa_update))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), lam=0.0, kappa=0.0)
                st["t"] = t = st["t"] + 1
                g = p.grad
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                p -= group["lr"] / (1 - b1**t) * st["m"] / (st["v"].sqrt() / math.sqrt(1 - b2**t) + group["eps"])
                if t > group["warm_start"]:
                    r = float((p * p).sum())
                    st["lam"] = max(0.0, st["lam"] + group["mu"] / p.numel() * (r - st["kappa"]))
                    p -= 2 * st["lam"] * p
                elif t == group["warm_start"]:
                    st["kappa"] = float((p * p).sum())


class AdamSRef(torch.optim.Optimizer):
    """Xie et al., Algorithm 2 (AdamS), as the authors' swd_optim/adams.py: every tensor's moments
    first, then vbar = mean over all elements of v / (1 - b2^t), then per tensor
        p <- p * (1 - lr * wd / sqrt(vbar)) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        total, count = 0.0, 0
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                st["t"] += 1
                st["m"] = b1 * st["m"] + (1 - b1) * p.grad
                st["v"] = b2 * st["v"] + (1 - b2) * p.grad * p.grad
                total += float(st["v"].sum()) / (1 - b2 ** st["t"])
                count += p.numel()
        vbar_sqrt = math.sqrt(total / count)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st, t = self.state[p], self.state[p]["t"]
                p.mul_(1 - group["lr"] * group["weight_decay"] / vbar_sqrt)
                p -= group["lr"] / (1 - b1**t) * st["m"] / (st["v"].sqrt() / math.sqrt(1 - b2**t) + group["eps"])


# (spec, our kwargs, reference factory, reference kwargs, run_pair options)
CASES = {
    # kappa at step 3 (the norms then grow past it: the multiplier acts) or step 8; another rate
    "adam_cpr-ws3": ("adam_cpr", dict(lr=0.05, kappa_init_param=3), CPRRef, dict(lr=0.05, kappa_init_param=3), {}),
    "adam_cpr-ws8": ("adam_cpr", dict(lr=0.1, betas=(0.8, 0.99), eps=1e-6, kappa_init_param=8, kappa_update=0.3),
                     CPRRef, dict(lr=0.1, betas=(0.8, 0.99), eps=1e-6, kappa_init_param=8, kappa_update=0.3), {}),
    "adam_cpr-off": ("adam_cpr", dict(lr=0.02), CPRRef, dict(lr=0.02), {}),  # warm start 1000: plain Adam
    # the group's step count is each tensor's while every tensor has a gradient at every step
    "adams-default": ("adams", dict(lr=0.01), AdamSRef, dict(lr=0.01), dict(skip=False)),
    "adams-wd": ("adams", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3), AdamSRef,
                 dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3), dict(skip=False)),
}


def _fused_ok():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")



def _makers(case):
    name, ours_kw, ref_make, ref_kw, _ = CASES[case]
    Ours = spec(name)
    return (lambda params, **mode: Ours(params, **mode, **ours_kw), lambda params: ref_make(params, **ref_kw))


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_regularisers_match_their_reference(case, dtype, fused, request):
    if fused:
        _fused_ok()
    if dtype == torch.float64:
        request.getfixturevalue("float64_default")
    steps = FUSED_STEPS if fused and not ON_GPU else STEPS
    run_pair(*_makers(case), SHAPES, dtype, steps, seed=zlib.crc32(case.encode()), fused=fused, **CASES[case][4])


@pytest.mark.parametrize("case, old, new", [
    ("adam_cpr-ws3", "(r - kappa)", "(r - 0.99 * kappa)"),
    ("adam_cpr-ws3", "where(t == warm_start, r, kappa)", "where(t == warm_start + 1, r, kappa)"),
    ("adam_cpr-ws8", "p -= 2 * lagmul * p", "p -= 2.02 * lagmul * p"),
    ("adams-wd", "/ (1 - b2^k)", "/ (1 - b2^(k + 1))"),
    ("adams-wd", "lr * wd / sqrt(vbar)", "lr * wd / sqrt(1.01 * vbar)"),
])
def test_a_mutant_is_caught(case, old, new, float64_default):
    name, ours_kw, _, _, options = CASES[case]
    text = (SPECS / f"{name}.opt").read_text()
    assert text.count(old) == 1
    Mutant = optdsl.compile(text.replace(old, new), f"{name}_mutant.opt")
    with pytest.raises(AssertionError, match="differs from reference"):
        run_pair(lambda ps, **mode: Mutant(ps, **mode, **ours_kw), _makers(case)[1], SHAPES, torch.float64, STEPS,
                 seed=zlib.crc32(case.encode()), **options)


def test_cpr_bounds_the_norm_it_took_at_the_warm_start(float64_default):
    """What CPR is for: with gradients that keep pushing the norm up, the squared norm after the
    warm start stays near kappa (plain Adam's keeps growing), and kappa is R(p) at that step."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 16, generator=gen))
    opt = spec("adam_cpr")([p], lr=0.05, kappa_init_param=5)
    drift = torch.randn(16, 16, generator=gen)
    norms, multipliers = [], []
    for _ in range(200):
        p.grad = -drift + 0.1 * torch.randn(16, 16, generator=gen)  # always away from 0
        opt.step()
        norms.append(float((p.detach() ** 2).sum()))
        multipliers.append(float(opt.state[p]["lagmul"]))
    kappa = float(opt.state[p]["kappa"])
    assert kappa == pytest.approx(norms[4], rel=1e-12)
    assert max(norms[100:]) < 1.05 * kappa and norms[-1] > 0.9 * kappa
    assert multipliers[4] == 0 and max(multipliers) > 0  # it acted, and only after the warm start
    plain = torch.nn.Parameter(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    adam = spec("adam_cpr")([plain], lr=0.05)  # warm start 1000: never regularised here
    for _ in range(200):
        plain.grad = -drift
        adam.step()
    assert float((plain.detach() ** 2).sum()) > 3 * kappa


def test_cpr_state_is_saved_under_its_names():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = spec("adam_cpr")([p], kappa_init_param=1)
    p.grad = torch.ones(3, 4)
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq", "lagmul", "kappa"}
    assert opt.param_groups[0]["kappa_init_param"] == 1 and opt.param_groups[0]["kappa_update"] == 1.0
