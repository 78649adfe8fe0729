"""Issue 16: PSGD-Kron (specs/kron.opt) against pytorch_optimizer's Kron, and the linear algebra
rows it needs (`triu`, `rsolve_triu`, `norm_lb`), on the for-loop, foreach and fused paths.

The probe. Kron fits its preconditioner to a random V ~ randn at every update. The spec draws V by
`randn()` from the optimizer's own generator; the reference by torch.randn_like from torch's
global one. The test feeds the reference the spec's numbers: the generated module's `_random_like`
is wrapped to record each draw by the parameter it was drawn for (the for-loop instance's
parameters), and pytorch_optimizer's `update_precondition` (a module function Kron.step calls once
per parameter with a gradient, in parameter order) is wrapped to replace its V by the draw of the
matching parameter. Nothing else of the reference changes, except in float64:

- its `solve_triangular_right` casts to float32 whatever the dtype (for bfloat16's sake; the spec's
  `rsolve_triu` is float32 *at least*): float64 runs replace it by the same solve without the cast;
  and the reference is made with precondition_dtype=float64 (its default keeps Q in float32).
  float32 runs take the reference as it is, at run_pair's float32 tolerance.

The schedule. The reference updates the preconditioner when a counter reaches 1/probability, the
probability 1 for its first 500 steps by default (not random): every step here, as in the spec.
Its random balancing (numpy's generator, probability balance_prob) rescales QL by c and QR by 1/c,
which changes no update: the "balanced" setting balances at every step and still matches the
parameters (run_pair compares parameters); the others take balance_prob=0.

Tolerance: float64 to 1e-10 (run_pair's), as each step is a few dozen products of small
matrices and two triangular solves of well-conditioned factors (Q starts at I and moves by at most
precondition_lr relatively per step): measured, the worst relative difference over 20 steps is
2e-16 in float64 and 2e-7 in float32 (run_pair's tolerance there: 1e-5).

Fused: the matrix rule runs the multi-tensor path's torch code (its states are matrices), so its
probes are `_random_like`'s and are fed to the reference as above; the vector rule runs in a
kernel whose draws are a counter-based hash of its own that no wrapper sees, so the fused
comparison takes matrices only (the vector rule's arithmetic is the for-loop path's, compared above).
"""
from __future__ import annotations

import sys
import zlib

import pytest
import torch

import optdsl
from test_differential import SPECS, run_pair
from test_zoo_frontier import FUSED_STEPS, _fused_ok
from test_zoo_specs import OnePerParameter

psgd = pytest.importorskip("pytorch_optimizer.optimizer.psgd")

STEPS = 20
SHAPES = [(5, 3), (4, 4), (3, 7), (1, 6), (6, 1), (7,), (1,)]  # tall, square, wide, a row, a column; vectors

KRON = {
    "default": dict(),
    "no-momentum-coupled-wd": dict(momentum=0.0, weight_decay=0.1, weight_decouple=False, lr=0.01),
    "decoupled-wd-grad-probe": dict(weight_decay=0.05, momentum_into_precondition_update=False, lr=0.02),
    "balanced": dict(balance_prob=1.0, momentum=0.5),
}

# for test_differential's coverage check (the reference needs the probes injected: _Injected below)
CASES = {f"kron-{case}": ("kron", kw, psgd.Kron, kw) for case, kw in KRON.items()}


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _solve_right_uncast(x, a):
    # pytorch_optimizer's psgd.solve_triangular_right without its cast to float32
    return torch.linalg.solve_triangular(a, x.reshape(-1, x.size(-1)), upper=True, left=False).reshape_as(x)


class _Injected:
    """Ours (for-loop and foreach) and the reference with the same probes (see the docstring)."""

    def __init__(self, cls, monkeypatch, dtype, kw):
        self.cls, self.kw, self.draws, self.queue = cls, kw, {}, []
        self.spec_kw = {k: v for k, v in kw.items() if k != "balance_prob"}
        module = sys.modules[cls.__module__]
        inner = module._random_like

        def recording(p, seed, index, draw, normal):
            out = inner(p, seed, index, draw, normal)
            self.draws[id(p)] = out.clone()
            return out

        monkeypatch.setattr(module, "_random_like", recording)
        update = psgd.update_precondition
        monkeypatch.setattr(psgd, "update_precondition", lambda qs, ex, v, g, step, eps: update(
            qs, ex, self.queue.pop(0).to(v.dtype), g, step, eps))
        if dtype == torch.float64:
            monkeypatch.setattr(psgd, "solve_triangular_right", _solve_right_uncast)
        self.precondition_dtype = dtype

    def ours(self, params, **mode):
        if mode.get("foreach") is False or mode.get("fused"):
            self.mine = params  # the for-loop instance's parameters: their draws feed the reference
        opt = self.cls(params, **mode, **self.spec_kw)
        opt.manual_seed(1234)  # both instances draw the same probes (each has its own generator)
        return opt

    def ref(self, params):
        kw = dict(balance_prob=0.0, precondition_dtype=self.precondition_dtype) | self.kw
        inner = OnePerParameter(params, lambda ps: psgd.Kron(ps, **kw))
        outer = self

        class Ref:
            def step(self):
                outer.queue = [outer.draws[id(q)] for q, r in zip(outer.mine, params) if r.grad is not None]
                inner.step()
                assert not outer.queue  # every draw was taken, one per parameter with a gradient

        return Ref()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(KRON))
def test_kron_matches_pytorch_optimizer(case, dtype, monkeypatch, request):
    if dtype == torch.float64:
        request.getfixturevalue("float64_default")
    pair = _Injected(optdsl.load(SPECS / "kron.opt"), monkeypatch, dtype, KRON[case])
    run_pair(pair.ours, pair.ref, SHAPES, dtype, STEPS, seed=zlib.crc32(case.encode()))


MATRICES = SHAPES[:5]


@pytest.mark.parametrize("case", ["default", "no-momentum-coupled-wd"])
def test_kron_fused_matches_pytorch_optimizer(case, monkeypatch, float64_default):
    _fused_ok()
    pair = _Injected(optdsl.load(SPECS / "kron.opt"), monkeypatch, torch.float64, KRON[case])
    run_pair(pair.ours, pair.ref, MATRICES, torch.float64, FUSED_STEPS, seed=zlib.crc32(case.encode()), fused=True)


@pytest.mark.parametrize("old, new", [
    ("1.1 / (rms(u) + 1e-6), 1)\n  p -= lr * (u +", "1.0 / (rms(u) + 1e-6), 1)\n  p -= lr * (u +"),  # the clamp
    ("triu(plr * (AL - BL))", "triu(0.9 * plr * (AL - BL))"),                # QL's step size
    ("triu(plr * (AR - BR))", "plr * (AR - BR)"),                            # QR's step not triangular
    ("h = m / (1 - momentum^t)  ", "h = m / (1 - momentum^(t + 1))  "),  # the de-biasing
    ("rsolve_triu(T(randn()), QL)), QR)", "rsolve_triu(T(randn()), QL)), T(QR))"),  # the probe's solve
    ("u = q * q * h", "u = q * h"),                                          # the vectors' preconditioner
    ("a = q * where", "a = 1.01 * q * where"),
], ids=["clamp", "QL-step", "QR-triu", "debias", "probe-solve", "vector-precond", "vector-a"])
def test_a_kron_mutant_is_caught(old, new, monkeypatch, float64_default):
    text = (SPECS / "kron.opt").read_text()
    assert text.count(old) == 1
    Mutant = optdsl.compile(text.replace(old, new), "kron_mutant.opt")
    pair = _Injected(Mutant, monkeypatch, torch.float64, dict(momentum=0.5, weight_decay=0.1, lr=0.05))
    with pytest.raises(AssertionError, match="differs from reference"):
        run_pair(pair.ours, pair.ref, SHAPES, torch.float64, STEPS)


# ---------------------------------------------------------------- the rows: triu, rsolve_triu, norm_lb


def _helpers():
    from optdsl.backends.torch import LINALG_HELPERS
    ns = {"torch": torch}
    for name in ("_rsolve_triu", "_norm_lb"):
        exec(LINALG_HELPERS[name], ns)
    return ns


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_norm_lb_is_pytorch_optimizers_norm_lower_bound(n):
    """One matrix: the reference's number to rounding (its matrix-vector products are ours batched);
    a batch of matrices: each its own; a bound indeed (at most the spectral norm, at least max|a|)."""
    from pytorch_optimizer.optimizer.utils.psgd import norm_lower_bound
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(3, 2, n, n, generator=gen, dtype=torch.float64)
    a = torch.cat([a, a @ a.mT])  # non-symmetric and symmetric (PSGD's terms are the latter)
    got = _helpers()["_norm_lb"](a)
    assert got.shape == (6, 2, 1, 1)
    for idx in [(i, j) for i in range(6) for j in range(2)]:
        want = norm_lower_bound(a[idx].clone())
        assert abs(got[idx].item() - want.item()) <= 1e-14 * want.item()
        assert a[idx].abs().max() * (1 - 1e-12) <= got[idx].item() <= torch.linalg.matrix_norm(a[idx], 2) * (1 + 1e-12)
    assert _helpers()["_norm_lb"](torch.zeros(4, 4)).item() == 0.0  # no 0/0


def test_rsolve_triu_solves_on_the_right_reading_the_upper_triangle_only():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64).triu() + 4 * torch.eye(4, dtype=torch.float64)
    b = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    x = _helpers()["_rsolve_triu"](b, a + torch.randn(4, 4, generator=gen, dtype=torch.float64).tril(-1))
    torch.testing.assert_close(x @ a, b, rtol=0, atol=1e-14)
    half = _helpers()["_rsolve_triu"](b.bfloat16(), a.bfloat16())  # torch.linalg has no bfloat16: float32 inside
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


ROWS = """optimizer X
hyper lr = 0.1 in [0, inf)
rule ndim == 2 {{
  state L: gram_rows = eye, R: gram_cols = eye
  {body}
}}
rule {{
  p -= lr * g
}}
"""


def test_the_rows_on_every_path(float64_default):
    """triu, rsolve_triu and norm_lb as written, on the for-loop, foreach and fused paths (fused:
    the rule's torch code) against the same formula in torch."""
    X = optdsl.compile(ROWS.format(body="L = L + triu(mm(g, T(g))) / norm_lb(mm(g, T(g)))\n"
                                        "  p -= lr * rsolve_triu(mm(L, g), R + triu(mm(T(g), g)))"), "rows.opt")
    h = _helpers()
    gen = torch.Generator().manual_seed(1)
    x, grad = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    gg = grad @ grad.T
    ell = torch.eye(5) + gg.triu() / h["_norm_lb"](gg)
    want = x - 0.1 * torch.linalg.solve_triangular(torch.eye(3) + (grad.T @ grad).triu(), ell @ grad, upper=True,
                                                   left=False)
    modes = [dict(foreach=False), dict(foreach=True)]
    try:
        _fused_ok()
        modes.append(dict(fused=True))
    except pytest.skip.Exception:
        pass
    for mode in modes:
        p = torch.nn.Parameter(x.clone())
        opt = X([p], **mode)
        p.grad = grad.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-14, msg=str(mode))


@pytest.mark.parametrize("body, message, col", [
    ("p -= lr * rsolve_triu(g, L)", "rsolve_triu(B, A) takes a square A of B's column size, but B is "
     "(nrows x ncols) and A (nrows x nrows)", 13),
    ("p -= lr * rsolve_triu(g, g)", "takes a square A", 13),
    ("p -= lr * g / norm_lb(g)", "norm_lb() takes a symmetric matrix, but this value is (nrows x ncols)", 25),
    ("p -= lr * mm(triu(L), g) + triu(R)", "'+' of values (nrows x ncols) and (ncols x ncols)", 0),
    ("p -= lr * g * norm_lb(L) + 0 * triu(R, 1)", "triu() takes 1 argument", 0),
])
def test_row_errors_are_located(body, message, col):
    with pytest.raises(optdsl.SpecError) as err:
        optdsl.compile(ROWS.format(body=body + "\n  p -= 0 * mm(mm(L, g), R)"), "x.opt")  # both states read
    assert message in str(err.value), str(err.value)
    if col:
        assert err.value.span.column == col, str(err.value)


def test_what_the_spec_does_not_write_is_refused():
    """Matrices beyond max_size_triangular and tensors of rank 3 (the reference's diagonal factors
    there) take no rule: a RuntimeError at step, never another optimizer; min_ndim_triangular is
    accepted at 2 only."""
    Kron = optdsl.load(SPECS / "kron.opt")
    for shape, kw in [((5, 3), dict(max_size_triangular=4)), ((2, 3, 4), dict())]:
        p = torch.nn.Parameter(torch.randn(shape))
        opt = Kron([p], **kw)
        p.grad = torch.randn(shape)
        with pytest.raises(RuntimeError, match="no rule of Kron takes a parameter of shape"):
            opt.step()
    with pytest.raises(ValueError, match="min_ndim_triangular"):
        Kron([torch.nn.Parameter(torch.randn(3, 3))], min_ndim_triangular=3)
