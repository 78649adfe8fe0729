"""The post-Adam zoo specs that need the language extensions, each against a handwritten reference.

References: torch.optim (NAdam, Adafactor, Muon), pytorch_optimizer where it has the optimizer
(SM3, Amos, AdaNorm, Lookahead, its agc and centralize_gradient helpers), otherwise a short
transcription of the paper's algorithm box written here (AdaLo, SMMF, soft clipping, MuonClip).

Like tests/test_differential.py, every case steps the generated optimizer on its for-loop and
its foreach path beside the reference and checks after every step that the two paths are
bitwise equal and both within a relative 1e-10 (float64) / 1e-5 (float32) of the reference;
and again on its fused Triton path (under the interpreter on CPU, compiled with
TRITON_INTERPRET=0 on a GPU), where matrix rules (Muon's) run torch's matmul.
"""
from __future__ import annotations

import functools
import math
import os
import re
import zlib
from pathlib import Path

import pytest
import torch

import optdsl
from test_differential import ON_GPU, PaperRef, run_pair  # noqa: E402 - the shared checker and paper-reference loop

SPECS = Path(__file__).resolve().parent.parent / "specs"
SMALL = [(1,), (7,), (13, 5), (3, 1, 4)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
STEPS = 25
FUSED_STEPS = 10


@functools.lru_cache(maxsize=None)
def spec(name):
    return optdsl.load(SPECS / f"{name}.opt")


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


def adafactor_momentum_update(p, g, state, t, lr, beta2_decay, eps1, eps2, d, wd, b1):
    # torch.optim.Adafactor's step, with Shazeer & Stern's first moment of the clipped update.
    alpha = max(eps2, p.norm(2).item() / p.numel() ** 0.5) * min(lr, 1 / t**0.5)
    p.mul_(1 - lr * wd)
    w = t**beta2_decay
    if g.dim() > 1:
        row = state.setdefault("row", torch.zeros(p.shape[:-1] + (1,), dtype=p.dtype))
        col = state.setdefault("col", torch.zeros(p.shape[:-2] + (1,) + p.shape[-1:], dtype=p.dtype))
        row.lerp_((g * g).mean(dim=-1, keepdim=True), w)
        col.lerp_((g * g).mean(dim=-2, keepdim=True), w)
        var = (row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
    else:
        v = state.setdefault("v", torch.zeros_like(p))
        v.lerp_(g * g, w)
        var = v.clone()
    u = var.clamp(min=eps1 * eps1).rsqrt() * g
    u = u / max(1.0, u.norm(2).item() / (u.numel() ** 0.5 * d))
    m = state.setdefault("m", torch.zeros_like(p))
    m.lerp_(u, 1 - b1)
    p.sub_(alpha * m)


def _nnmf(a):
    """The survey's SMMF _nnmf: row and column sums, the shorter side normalised by the total."""
    r, c = a.sum(dim=1), a.sum(dim=0)
    if a.shape[0] < a.shape[1]:
        r = r / r.sum() if r.sum() != 0 else r
    else:
        c = c / c.sum() if c.sum() != 0 else c
    return r, c


def smmf_update(p, g, state, t, lr, b1, b2, eps, wd):
    # SMMF's step (Park & Lee, 2024, Algorithm 1) with constant betas, on a matrix as it is
    # (its square-matricisation is the identity for the test's matrices, 13x5 and 4x6);
    # anything else runs AdamW.
    if g.dim() == 2:
        if "m" not in state:
            state["m"] = (torch.zeros(p.shape[0], dtype=p.dtype), torch.zeros(p.shape[1], dtype=p.dtype))
            state["v"] = (torch.zeros(p.shape[0], dtype=p.dtype), torch.zeros(p.shape[1], dtype=p.dtype))
            state["sign"] = torch.zeros(p.shape, dtype=torch.bool)
        m_hat = torch.where(state["sign"], 1.0, -1.0).to(p.dtype) * torch.outer(*state["m"])
        v_hat = torch.outer(*state["v"])
        m = b1 * m_hat + (1 - b1) * g
        v = b2 * v_hat + (1 - b2) * g * g
        state["sign"] = m >= 0
        state["m"], state["v"] = _nnmf(m.abs()), _nnmf(v)
    else:
        m = state.setdefault("m", torch.zeros_like(p)).lerp_(g, 1 - b1)
        v = state.setdefault("v", torch.zeros_like(p)).lerp_(g * g, 1 - b2)
    p.mul_(1 - lr * wd)
    p.sub_(lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))


class Pre:
    """A reference optimizer run on transformed gradients: transform(p, g) -> the gradient to use."""

    def __init__(self, params, transform, inner, **kw):
        self.transform, self.inner = transform, inner(params, **kw)

    def step(self, closure=None):
        for group in self.inner.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = self.transform(p, p.grad.clone())
        return self.inner.step(closure)


def pre(transform, inner):
    return lambda params, **kw: Pre(params, transform, inner, **kw)


def centralize(p, g):
    PO.centralize_gradient(g, gc_conv_only=False)
    return g


def soft_clip(p, g, epsilon=1e-12):
    # The survey's _soft_clip, as written there.
    dim = None if (r := p.dim()) <= 1 else tuple(range(1, r))
    var_norm = p.square().mean(dim=dim, keepdim=True).sqrt_().clamp_min_(epsilon)
    grad_norm = g.square().mean(dim=dim, keepdim=True).sqrt_().clamp_min_(epsilon)
    clipped_norm = grad_norm.clamp_max(var_norm)
    return g.mul_(clipped_norm / grad_norm)


def agc(clip, unit_eps, eps):
    from pytorch_optimizer.optimizer.agc import agc as po_agc
    return lambda p, g: po_agc(p, g, agc_eps=unit_eps, agc_clip_val=clip, eps=eps)


def _newton_schulz_exact(grad, ns_coefficients, ns_steps, eps):
    """torch.optim's _zeropower_via_newtonschulz without its cast to bfloat16, so that the
    comparison can be exact; test_muon_matches_torch_in_bfloat16 runs the real one."""
    a, b, c = ns_coefficients
    x = grad.T if grad.size(0) > grad.size(1) else grad
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


class MuonRef:
    """torch.optim.Muon for the matrices and torch.optim.AdamW for the rest, as Muon's docs advise."""

    def __init__(self, params, muon, adamw, exact=True):
        self.exact = exact
        mats = [p for p in params if p.ndim == 2]
        self.opts = [T.Muon(mats, **muon), T.AdamW([p for p in params if p.ndim != 2], foreach=False, **adamw)]

    def step(self, closure=None):
        import torch.optim._muon as m
        real = m._zeropower_via_newtonschulz
        if self.exact:
            m._zeropower_via_newtonschulz = _newton_schulz_exact
        try:
            for opt in self.opts:
                opt.step()
        finally:
            m._zeropower_via_newtonschulz = real


def muon_ref(exact=True):
    return lambda params, **kw: MuonRef(params, exact=exact, **kw)


class MuonClipRef(MuonRef):
    """Muon, then the survey's QK-clip: W <- W * sqrt(tau / S_max) for each matrix whose S_max > tau."""

    def __init__(self, params, tau, **kw):
        super().__init__(params, **kw)
        self.tau, self.logits = tau, {}

    def feed(self, param, max_logit):
        self.logits[param] = max_logit

    def step(self, closure=None):
        super().step(closure)
        with torch.no_grad():
            for p in self.opts[0].param_groups[0]["params"]:
                s = self.logits.get(p, 0.0)
                if p.grad is not None and s > self.tau:
                    p.mul_(math.sqrt(self.tau / s))


def muon_clip_ref(params, **kw):
    return MuonClipRef(params, **kw)


def lookahead(params, k, alpha, **adam):
    return PO.Lookahead(T.Adam(params, foreach=False, **adam), k=k, alpha=alpha)


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
    "adafactor-default": ("adafactor", dict(lr=0.01, eps1=1e-3), T.Adafactor, dict(lr=0.01, eps=(1e-3, 1e-3))),
    "adafactor-wd": ("adafactor", dict(lr=0.05, beta2_decay=-0.5, eps1=1e-12, eps2=1e-2, d=2.0, wd=0.1),
                     T.Adafactor, dict(lr=0.05, beta2_decay=-0.5, eps=(1e-12, 1e-2), d=2.0, weight_decay=0.1)),
    "adafactor_momentum-default": ("adafactor_momentum", dict(lr=0.01, eps1=1e-3), paper(adafactor_momentum_update),
                                   dict(lr=0.01, beta2_decay=-0.8, eps1=1e-3, eps2=1e-3, d=1.0, wd=0.0, b1=0.9)),
    "adafactor_momentum-wd": ("adafactor_momentum", dict(lr=0.05, eps1=1e-12, d=1.5, wd=0.1, b1=0.5),
                              paper(adafactor_momentum_update),
                              dict(lr=0.05, beta2_decay=-0.8, eps1=1e-12, eps2=1e-3, d=1.5, wd=0.1, b1=0.5)),
    "sm3-default": ("sm3", dict(lr=0.1), po("SM3"), dict(lr=0.1)),
    "sm3-momentum-beta": ("sm3", dict(lr=0.05, momentum=0.9, beta=0.9, eps=1e-12), po("SM3"),
                          dict(lr=0.05, momentum=0.9, beta=0.9, eps=1e-12)),
    "adam_gc-default": ("adam_gc", dict(lr=0.01), pre(centralize, T.Adam), dict(lr=0.01, foreach=False)),
    "adam_gc-wd": ("adam_gc", dict(lr=0.01, b1=0.8, wd=0.1), pre(centralize, T.Adam),
                   dict(lr=0.01, betas=(0.8, 0.999), weight_decay=0.1, foreach=False)),
    "sgd_agc-default": ("sgd_agc", dict(lr=0.05), pre(agc(1e-2, 1e-3, 1e-6), T.SGD),
                        dict(lr=0.05, momentum=0.9, foreach=False)),
    "sgd_agc-loose": ("sgd_agc", dict(lr=0.05, momentum=0.5, clip=0.5, unit_eps=1e-2, eps=1e-4),
                      pre(agc(0.5, 1e-2, 1e-4), T.SGD), dict(lr=0.05, momentum=0.5, foreach=False)),
    "adamw_softclip-default": ("adamw_softclip", dict(lr=0.01), pre(soft_clip, T.AdamW),
                               dict(lr=0.01, foreach=False)),
    "adamw_softclip-wd": ("adamw_softclip", dict(lr=0.01, wd=0.3, b2=0.99), pre(soft_clip, T.AdamW),
                          dict(lr=0.01, weight_decay=0.3, betas=(0.9, 0.99), foreach=False)),
    # ns_bfloat16=False: Newton-Schulz in the parameter's dtype, against torch's without its bfloat16 cast
    "muon-default": ("muon", dict(lr=0.02, ns_bfloat16=False), muon_ref(),
                     dict(muon=dict(lr=0.02), adamw=dict(lr=1e-3))),
    "muon-plain": ("muon", dict(lr=0.05, wd=0.0, momentum=0.9, nesterov=0, adam_lr=0.01, b1=0.8, adam_wd=0.1,
                                ns_bfloat16=False),
                   muon_ref(), dict(muon=dict(lr=0.05, weight_decay=0.0, momentum=0.9, nesterov=False),
                                    adamw=dict(lr=0.01, betas=(0.8, 0.999), weight_decay=0.1))),
    "muon_clip-default": ("muon_clip", dict(lr=0.02), muon_clip_ref,
                          dict(tau=100.0, muon=dict(lr=0.02), adamw=dict(lr=1e-3))),
    "muon_clip-tight": ("muon_clip", dict(lr=0.05, tau=30.0, wd=0.0), muon_clip_ref,
                        dict(tau=30.0, muon=dict(lr=0.05, weight_decay=0.0), adamw=dict(lr=1e-3))),
    "lookahead_adam-default": ("lookahead_adam", dict(lr=0.01), lookahead, dict(lr=0.01, k=5, alpha=0.5)),
    "lookahead_adam-k3": ("lookahead_adam", dict(lr=0.02, b1=0.8, wd=0.1, k=3, alpha=0.3), lookahead,
                          dict(lr=0.02, betas=(0.8, 0.999), weight_decay=0.1, k=3, alpha=0.3)),
    "amos-default": ("amos", dict(lr=0.01), po("Amos"), dict(lr=0.01, foreach=False)),
    "amos-momentum": ("amos", dict(lr=0.05, beta=0.99, momentum=0.9, extra_l2=0.01, c_coef=0.5, d_coef=0.1),
                      po("Amos"), dict(lr=0.05, beta=0.99, momentum=0.9, extra_l2=0.01, c_coef=0.5, d_coef=0.1,
                                       foreach=False)),
    "smmf-default": ("smmf", dict(lr=0.01), paper(smmf_update), dict(lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.0)),
    "smmf-wd": ("smmf", dict(lr=0.02, b1=0.5, b2=0.9, eps=1e-6, wd=0.1), paper(smmf_update),
                dict(lr=0.02, b1=0.5, b2=0.9, eps=1e-6, wd=0.1)),
}
# Muon orthogonalises matrices, tall and wide, and leaves the rest to AdamW.
MATRICES = [(1,), (7,), (13, 5), (4, 9), (3, 1, 4)]
# pytorch_optimizer's SM3 covers every axis of a tensor; the spec factors matrices only, and
# its unit_norm reduces axis 1 alone for rank 3: those families run on shapes of rank 1, 2, 4.
NO_RANK3 = [(1,), (7,), (13, 5), (2, 3, 2, 2)]
# How each family runs beside its reference (default: SMALL shapes, per-parameter step counts).
OPTIONS = {
    "adanorm": dict(skip=False),  # pytorch_optimizer counts steps per group
    "adalo": dict(loss=True),
    "sm3": dict(shapes=NO_RANK3[:3] + [(4, 6)]),
    "sgd_agc": dict(shapes=NO_RANK3),
    "muon": dict(shapes=MATRICES),
    # logits around tau: some steps clip, some do not
    "muon_clip": dict(shapes=MATRICES, feed={"max_logit": lambda gen: 20.0 + 160.0 * torch.rand((), generator=gen).item()}),
    "lookahead_adam": dict(skip=False),
    "smmf": dict(shapes=[(1,), (7,), (13, 5), (4, 6), (3, 1, 4)]),
    # Amos's scale reads p.size(1) beyond rank 2, the spec ncols: ranks up to 2 (and one step count per group)
    "amos": dict(skip=False, shapes=[(1,), (7,), (13, 5), (4, 9)]),  # pytorch_optimizer's Lookahead counts steps per group
}


def _makers(case):
    name, ours_kw, ref_make, ref_kw = CASES[case]
    Ours = spec(name)
    if getattr(ref_make, "__module__", "").startswith("torch.optim"):
        ref_kw = dict(ref_kw, foreach=False)
    return (lambda params, **mode: Ours(params, **mode, **ours_kw),
            lambda params: ref_make(params, **ref_kw))



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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_reference(case, dtype, request):
    """The same cases on the fused Triton path: rows and cols states, axis and unit reductions,
    scalar states, rules by shape (each rule its own kernels), matrix rules through torch."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")
    name = CASES[case][0]
    if dtype == torch.float64:
        request.getfixturevalue("float64_default")
    options = dict(OPTIONS.get(name, {}))
    shapes = options.pop("shapes", SMALL)
    steps = options.pop("steps", STEPS) if ON_GPU else FUSED_STEPS  # the interpreter is slow
    run_pair(*_makers(case), shapes, dtype, steps, seed=zlib.crc32(case.encode()), fused=True, **options)


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
    assert state["mu_product"].shape == () and state["exp_avg"].shape == (13, 5)
    mu = 0.9 * (1 - 0.5 * 0.96 ** 0.004)
    assert state["mu_product"].item() == pytest.approx(mu, rel=1e-6)


# Launches per step on one device and dtype, (matrices' rule, other parameters' rule): stages of
# reductions, the update, then rows/cols states written by a last launch (their old values are read
# across blocks). Muon's matrix rule runs torch's matmul: no Triton launch.
RULE_LAUNCHES = {"adafactor": (5, 2), "adafactor_momentum": (5, 2), "sm3": (3, 1), "smmf": (3, 1),
                 "muon": (2, 1), "muon_clip": (2, 1)}
# (1823, 781)-like in miniature: rows of 60 cross blocks of 1024, columns span every block
RULE_SHAPES = [(7,), (13, 5), (40, 60), (64, 32), (3,)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(RULE_LAUNCHES))
def test_rules_by_shape_each_fuse_their_own_kernels(name, dtype):
    """Each rule is its own set of kernels over its own parameters; fused equals foreach, states too."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")
    device = "cuda" if ON_GPU else "cpu"
    cls = spec(name)
    module = __import__(cls.__module__, fromlist=["LAUNCHES"])
    kw = next(kw for n, kw, *_ in CASES.values() if n == name)

    def run(**mode):
        gen = torch.Generator().manual_seed(1)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in RULE_SHAPES]
        opt = cls(params, **kw, **mode)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
            opt.step()
        return params, opt

    before = module.LAUNCHES
    fused, fused_opt = run(fused=True)
    assert module.LAUNCHES - before == 4 * sum(RULE_LAUNCHES[name])
    ref, ref_opt = run(foreach=True)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 1e-5)  # low precision: float32 states
    for a, b in zip(fused, ref):
        if dtype in (torch.bfloat16, torch.float16):  # the same value, or one rounding step apart
            ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10) * (2 if ON_GPU else 1)
            torch.testing.assert_close(a.float(), b.float(), rtol=ulp, atol=1e-6)
            assert (a == b).float().mean() > 0.95
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        assert fused_opt.state[a].keys() == ref_opt.state[b].keys()
        for key, value in ref_opt.state[b].items():
            assert fused_opt.state[a][key].dtype == value.dtype
            torch.testing.assert_close(fused_opt.state[a][key].to(value.device), value, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["adafactor", "smmf", "sm3"])
def test_reduced_states_in_bfloat16_round_stochastically_on_the_fused_path(name):
    """state_dtype=bfloat16: rows/cols states too are bfloat16, rounded stochastically, and the step
    stays near the one with float32 states."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")
    device = "cuda" if ON_GPU else "cpu"
    kw = next(kw for n, kw, *_ in CASES.values() if n == name)
    out = []
    for state_dtype in (torch.bfloat16, None):
        gen = torch.Generator().manual_seed(2)
        params = [torch.randn(s, generator=gen).to(device) for s in RULE_SHAPES]
        opt = spec(name)(params, **kw, fused=True, state_dtype=state_dtype)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            opt.step()
        out.append((params, opt))
    (low, low_opt), (exact, _) = out
    kept = {v.dtype for p in low for k, v in low_opt.state[p].items() if k != "step" and v.dtype != torch.bool}
    assert kept == {torch.bfloat16}
    for a, b in zip(low, exact):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2)


def test_rows_and_cols_states_need_matrices_on_the_fused_path():
    """A spec without a rule that keeps rows/cols states says, under fused=True, why a vector cannot."""
    cls = optdsl.compile("optimizer RowsOnly\nstate r: rows\nr = lerp(r, row_mean(g^2), 0.1)\n"
                         "p -= 0.1 * g / sqrt(r + 1)\n", "rows_only.opt")
    with pytest.raises(RuntimeError, match="rank 2 or more"):
        cls([torch.nn.Parameter(torch.randn(3))], fused=True)


# ---------------------------------------------------------------- memory: optdsl info


def _compiled(name):
    return optdsl.compile_source((SPECS / f"{name}.opt").read_text(), f"specs/{name}.opt")


@pytest.mark.parametrize("name, shape, second_moment", [
    ("adafactor", (4096, 4096), 8192),            # one per row and one per column, not 16.7M
    ("adafactor", (4096,), 4096),                  # a vector keeps a full second moment
    ("adafactor", (8, 4096, 1024), 8 * (4096 + 1024)),  # a stack of matrices: factors per matrix
    ("sm3", (4096, 4096), 8192),
    ("sm3", (4096,), 4096),
    ("smmf", (4096, 4096), 4 * 4096),              # rows and columns of |m| and of v
])
def test_info_counts_the_factored_second_moment(name, shape, second_moment):
    from optdsl.info import memory
    m = memory(_compiled(name), shape)
    moments = sum(n for s, kind, n in m.states if s != "m" and kind != "bool")
    assert moments == second_moment


@pytest.mark.parametrize("name", ["adafactor", "adafactor_momentum", "sm3", "nadam", "smmf", "muon_clip"])
@pytest.mark.parametrize("shape", [(1,), (7,), (13, 5), (3, 1, 4)])
def test_info_matches_what_the_optimizer_allocates(name, shape):
    """The sizes `optdsl info` reports are the sizes of the tensors a step really keeps."""
    from optdsl.info import memory
    if name == "sm3" and len(shape) == 3:
        shape = (4, 6)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = spec(name)([p])
    p.grad = torch.randn(shape)
    opt.step()
    kept = {k: v.numel() for k, v in opt.state[p].items() if k != "step"}
    assert kept == {s: n for s, _, n in memory(_compiled(name), shape).states}


def test_info_command_prints_the_memory(capsys):
    from optdsl.cli import main
    assert main(["info", str(SPECS / "adafactor.opt"), "--shape", "4096x4096"]) == 0
    out = capsys.readouterr().out
    assert "rule taken: ndim >= 2" in out and "total state: 8,192 numbers" in out
    assert main(["info", str(SPECS / "adafactor.opt"), "--shape", "4096xx"]) == 1


def test_muon_matches_torch_in_bfloat16():
    """torch.optim.Muon runs Newton-Schulz in bfloat16, and so does ours by default (each product
    and the norm rounded to bfloat16): the same numbers on CPU. With ns_bfloat16=False ours runs
    it in the parameter's dtype: the updates then agree to bfloat16's precision only."""
    real = lambda ps: MuonRef(ps, muon=dict(lr=0.02), adamw=dict(lr=1e-3), exact=False)  # noqa: E731
    Muon = spec("muon")
    assert run_pair(lambda ps, **mode: Muon(ps, lr=0.02, **mode), real, MATRICES, torch.float32, 8, tol=1e-6) == 0
    worst = run_pair(*_makers("muon-default")[:1], real, MATRICES, torch.float32, 5, tol=2e-2)
    assert worst > 1e-5  # the bfloat16 rounding shows: the exact comparison above is not vacuous


def test_muon_clip_clips_only_above_tau():
    """QK-clip is a no-op while the fed logit stays below tau, and shrinks W by sqrt(tau/s) above."""
    torch.manual_seed(0)
    w, bias = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(4))
    plain = torch.nn.Parameter(w.detach().clone())
    opts = spec("muon_clip")([w, bias], lr=0.02, tau=10.0), spec("muon")([plain], lr=0.02, ns_bfloat16=False)
    for s, clipped in ((5.0, False), (40.0, True)):
        g = torch.randn(6, 4, dtype=torch.float64)
        w.grad, plain.grad, bias.grad = g.clone(), g.clone(), torch.ones(4)
        opts[0].feed(w, max_logit=s)
        opts[0].feed(bias, max_logit=s)   # a rule that does not read it ignores it
        for opt in opts:
            opt.step()
        assert torch.allclose(w, plain * (0.5 if clipped else 1.0), rtol=1e-12)
        plain.data.copy_(w)
    with pytest.raises(KeyError, match="no input 'logit'"):
        opts[0].feed(w, logit=1.0)


def test_smmf_keeps_the_sign_in_one_byte():
    from optdsl.info import memory
    m = memory(_compiled("smmf"), (4096, 4096))
    assert m.bytes == 4 * 4 * 4096 + 4096 * 4096  # four factors in float32, the sign in bytes
    p = torch.nn.Parameter(torch.randn(13, 5))
    opt = spec("smmf")([p])
    p.grad = torch.randn(13, 5)
    opt.step()
    assert opt.state[p]["positive"].dtype == torch.bool


# ---------------------------------------------------------------- errors in the new syntax

HEAD = "optimizer X\nhyper lr = 0.1 in [0, inf), k = 2 in [1, inf)\n"


@pytest.mark.parametrize("body, message, where", [
    ("state r: rows\nr = g\np -= lr * r\n", "state 'r' is declared ': rows' but this value is shaped like p",
     (4, 1)),
    ("state r: diag\np -= lr * r\n", "unknown state shape 'diag'", (3, 10)),
    ("state s: scalar\ns = g\np -= lr * s\n", "state 's' is declared ': scalar'", (4, 1)),
    ("repeat 2.5 {\np -= lr * g\n}\n", "'repeat' takes a whole number of rounds", (3, 8)),
    ("repeat 1e400 {\np -= lr * g\n}\n", "'repeat' takes a whole number of rounds", (3, 8)),  # inf: int() raised
    ("repeat 2 {\nrepeat 1e400 {\np -= lr * g\n}\n}\n", "'repeat' takes a whole number of rounds", (4, 8)),
    ("every t {\np -= lr * g\n}\n", "the period of 'every' must be a number or a hyperparameter", (3, 7)),
    ("rule numel > g {\np -= lr * g\n}\n", "a rule's condition cannot read 'g'", (3, 14)),
    ("rule {\np -= lr * g\n}\nrule ndim > 1 {\np -= g\n}\n", "a rule without a condition takes every parameter",
     (3, 1)),
    ("input s = 0\ns = 1\np -= lr * g * s\n", "cannot assign the input 's'", (4, 1)),
    ("ndim = 2\np -= lr * g\n", "cannot assign the built-in 'ndim'", (3, 1)),
])
def test_new_syntax_errors_name_the_place(body, message, where):
    with pytest.raises(optdsl.SpecError) as err:
        optdsl.compile_source(HEAD + body, "x.opt")
    text = str(err.value)
    assert message in text, text
    assert f"x.opt:{where[0]}:{where[1]}:" in text, text
    assert "^" in text and "hint:" in text


def test_every_runs_on_multiples_of_k_only():
    Every = optdsl.compile(HEAD + "every k {\np -= lr * g\n}\n", "every.opt")
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Every([p], lr=1.0, k=3)
    for step in range(1, 8):
        p.grad = torch.ones(3)
        opt.step()
        assert p[0].item() == -(step // 3)


@pytest.mark.parametrize("name", ["nadam", "adafactor", "smmf", "muon_clip", "lookahead_adam"])
def test_state_dict_round_trip_continues_the_same_run(name):
    """Scalar, reduced-shape, bool and fed states survive state_dict() and load_state_dict()."""
    torch.manual_seed(0)
    shapes = [(6, 4), (5,)]
    a = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    Opt = spec(name)
    first, second = Opt(a), Opt(b)
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(6)]
    for step, gs in enumerate(grads):
        if step == 3:  # rebuild the second from its state_dict, half way through
            saved = second.state_dict()
            second = Opt(b)
            second.load_state_dict(saved)
        for opt, params in ((first, a), (second, b)):
            for p, g in zip(params, gs):
                p.grad = g.clone()
                if hasattr(opt, "feed"):
                    opt.feed(p, max_logit=150.0)
            opt.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(a, b):
        for key, value in second.state[y].items():
            assert value.dtype == first.state[x][key].dtype, key  # a bool state stays bool


@pytest.mark.parametrize("case, old, new", [
    ("adafactor-default", "row_mean(g^2)", "row_max(g^2)"),
    ("sm3-momentum-beta", "max(r, row_max(nu))", "max(r, row_mean(nu))"),
    ("muon-default", "c * mm(A, A)", "1.001 * c * mm(A, A)"),
    ("amos-default", "c_coef * sqrt(lr)", "c_coef * sqrt(1.01 * lr)"),
    ("smmf-default", "cv = col_sum(v)", "cv = 1.001 * col_sum(v)"),
    ("adam_gc-default", "g - unit_mean(g)", "g - 0.999 * unit_mean(g)"),
    ("lookahead_adam-default", "lerp(p, slow, 1 - alpha)", "lerp(p, slow, 1.001 - alpha)"),
])
def test_a_mutant_is_caught(case, old, new, request):
    """The comparison is sharp enough to see a small change to the spec's math."""
    request.getfixturevalue("float64_default")
    name, ours_kw, _, _ = CASES[case]
    text = (SPECS / f"{name}.opt").read_text()
    assert text.count(old) >= 1
    Mutant = optdsl.compile(text.replace(old, new), f"{name}_mutant.opt")
    options = dict(OPTIONS.get(name, {}))
    shapes = options.pop("shapes", SMALL)
    with pytest.raises(AssertionError, match="differs from reference"):
        run_pair(lambda ps, foreach: Mutant(ps, foreach=foreach, **ours_kw), _makers(case)[1], shapes,
                 torch.float64, STEPS, **options)
    spec.cache_clear()  # the mutant took the class's module name


@pytest.mark.parametrize("name", ["nadam", "adafactor", "smmf", "muon"])
def test_bfloat16_parameters_keep_float32_states(name):
    """Low-precision parameters step in float32 with float32 states (bool states stay bool),
    the two paths agree exactly, and a step moves them as the float32 step does, to bfloat16."""
    torch.manual_seed(0)
    shapes = [(13, 5), (7,)]
    init = [torch.randn(s) for s in shapes]
    low = {fe: [torch.nn.Parameter(x.bfloat16()) for x in init] for fe in (False, True)}
    high = [torch.nn.Parameter(x.bfloat16().float()) for x in init]
    opts = [spec(name)(low[fe], lr=0.01, foreach=fe) for fe in (False, True)] + [spec(name)(high, lr=0.01)]
    for i, s in enumerate(shapes):
        g = torch.randn(s).bfloat16().float()  # the same gradient on both sides
        for params in (low[False], low[True], high):
            params[i].grad = g.to(params[i].dtype)
    for opt in opts:
        opt.step()
    for a, b, c in zip(low[False], low[True], high):
        assert torch.equal(a, b)
        assert torch.equal(a, c.bfloat16())  # one rounding of the float32 result
    for state in opts[0].state.values():
        assert all(v.dtype in (torch.float32, torch.bool) for k, v in state.items() if k != "step")


def test_blocks_lower_to_plain_ssa():
    """repeat unrolls, every becomes a where on t, and the declared shapes print in the IR."""
    from optdsl.lower import lower
    from optdsl.parse import parse
    src = ("optimizer X\nhyper lr = 0.1, k = 2 in [1, inf)\nstate s: scalar = 1, r: rows\n"
           "repeat 2 {\n  s *= 2\n}\nr = lerp(r, row_mean(g^2), 0.5)\np -= lr * s * g / sqrt(r + 1)\n"
           "every k {\n  p = 0.5 * p\n}\n")
    assert str(lower(parse(src))[0]).split("\n", 3)[3] == """\
  state s: scalar = 1
  state r: rows = 0
  in p·0, g·0, s·0, r·0, t
  s·1 = s·0 * 2    # scalar
  s·2 = s·1 * 2    # scalar
  r·1 = lerp(r·0, row_mean(g·0^2), 0.5)
  p·1 = p·0 - lr * s·2 * g·0 / sqrt(r·1 + 1)
  p·2 = 0.5 * p·1
  p·3 = where(mod(t, k) == 0, p·2, p·1)
  out p = p·3, s = s·2, r = r·1"""


@pytest.mark.parametrize("src, message, where", [
    ("optimizer X\nrule ndim > 1 {\np -= g\n", "unclosed block", (3, 7)),
    ("optimizer X\nrepeat 3 { p -= g }\n", "a block's statements go on their own lines", (2, 12)),
    ("optimizer X\nhyper k = 2\nevery k {\np -= g\nm = g }\n", "a block's statements go on their own lines",
     (5, 7)),
    # LALR shares a condition's state: the list names what follows a rule's ('{' and refuse), not the
    # 'else' of a state list's `if COND else`, and that one's else, not refuse
    ("optimizer X\nrule ndim > 1\n{\np -= g\n}\n", "expected one of: and, '{', or, refuse", (2, 14)),
    ("optimizer X\nrule ndim >= 3 {\nstate Q[a]: axis(a) if a > 1 gram(a)\np -= g\n}\n", "else", (3, 30)),
])
def test_block_syntax_errors_say_what_to_do(src, message, where):
    with pytest.raises(optdsl.SpecError) as err:
        optdsl.compile_source(src, "x.opt")
    text = str(err.value)
    assert message in text and f"x.opt:{where[0]}:{where[1]}:" in text, text


# rows of one element, columns of one, rows longer than a block, a batch of matrices, rank 4
AWKWARD = [(1, 1), (1, 2000), (2000, 1), (3, 1, 700), (5, 2049), (4, 2, 3, 5), (7,)]


@pytest.mark.parametrize("name", ["adafactor", "sm3", "smmf"])
def test_rows_and_columns_fused_on_awkward_shapes(name):
    """The fused row/column accumulators equal foreach, states too, where rows and columns are
    degenerate or cross blocks (float64, 3 steps)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")
    device = "cuda" if ON_GPU else "cpu"
    out = []
    for mode in (dict(fused=True), dict(foreach=True)):
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in AWKWARD]
        opt = spec(name)(params, **mode)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device)
            opt.step()
        out.append((params, opt))
    (fused, fused_opt), (ref, ref_opt) = out
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for key, value in ref_opt.state[b].items():  # `step` lives on the device when fused, on the CPU in foreach, as in torch
            torch.testing.assert_close(fused_opt.state[a][key], value, rtol=1e-12, atol=1e-12, check_device=False)
