"""Issue 16 items 1 and 2: matrix-shaped states (`gram_rows`, `gram_cols`) and linear algebra
(`inv_root`, `eigvecs`, `qr`, `sortperm`), and the specs they unlock (Shampoo, SOAP), against their references on the
for-loop, foreach and fused paths (test_differential's `run_pair`: float64 to 1e-10 after every
step, the for-loop and foreach paths bitwise equal).

Shampoo's reference is pytorch_optimizer's `Shampoo`, one optimizer per parameter (it counts
steps per group). Its inverse fourth roots are taken by SVD, ours by eigh: equal for a symmetric
positive definite matrix, and the two roundings of L = eps I + sum G G^T differ by about u * |L|
(addmm_ against matmul then add), which moves an eigenvalue near eps by u * |L| / eps relatively.
A step that applies the root to a gradient outside the span of the earlier ones (every k > 1
steps) sees that: with |L| up to 1e6 (run_pair's gradients reach 100) the float64 comparison is
at 1e-10 only for eps >= 10 (u * 1e6 / 10 = 1e-11), so the k = 3 setting takes matrix_eps = 10.
Where the root is applied at once (k = 1) the gradient lies in the span of L's large eigenvalues
and the comparison holds to 1e-15 at the default eps. In float32 the same argument gives
u32 * |L| / eps: the float32 cases take matrix_eps = 1e3 and |L| stays below 1e6 (gradients up
to 100, 25 steps, 7 rows): 6e-8 * 1e3 = 6e-5, hence the tolerance 1e-4.
"""
from __future__ import annotations

import copy
import zlib
from pathlib import Path

import pytest
import torch

import optdsl
from test_differential import SPECS, run_pair
from test_zoo_frontier import FUSED_STEPS, _fused_ok
from test_zoo_specs import OnePerParameter

STEPS = 25
MATRICES = [(5, 3), (4, 4), (3, 7), (1, 6), (6, 1)]  # tall, square, wide, a row, a column
MODEL = MATRICES + [(7,), (3, 1, 4)]                  # a vector and a rank-3 tensor take the other rule


def _diagonal(p, g, state, t, lr, matrix_eps):
    # the spec's rule for tensors that are not matrices: AdaGrad's second root from matrix_eps
    v = state.setdefault("v", torch.full_like(p, matrix_eps))
    v.add_(g * g)
    p.sub_(lr * g / v.sqrt())


class _Diagonal(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, matrix_eps=1e-6, **_):
        super().__init__(params, dict(lr=lr, matrix_eps=matrix_eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["t"] = state.get("t", 0) + 1
                    _diagonal(p, p.grad, state, state["t"], group["lr"], group["matrix_eps"])


def shampoo_ref(params, **kw):
    """pytorch_optimizer's Shampoo for matrices, the spec's diagonal rule for the rest."""
    import pytorch_optimizer as PO
    return OnePerParameter(params, lambda ps: PO.Shampoo(ps, **kw) if ps[0].dim() == 2 else _Diagonal(ps, **kw))


SHAMPOO = {
    "default": dict(),
    "momentum-coupled-wd": dict(momentum=0.9, weight_decay=0.1),
    "decoupled-wd": dict(lr=0.01, weight_decay=0.05, weight_decouple=True),
    "fixed-decay": dict(weight_decay=0.05, weight_decouple=True, fixed_decay=True),
    "every-3": dict(preconditioning_compute_steps=3, matrix_eps=10.0, momentum=0.5),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}



def _settings(case, dtype):
    kw = dict(SHAMPOO[case])
    if dtype == torch.float32:
        kw["matrix_eps"] = 1e3  # see the module's docstring
    return kw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(SHAMPOO))
def test_shampoo_matches_pytorch_optimizer(case, dtype, request):
    if dtype == torch.float64:
        request.getfixturevalue("float64_default")
    Shampoo = optdsl.load(SPECS / "shampoo.opt")
    kw = _settings(case, dtype)
    run_pair(lambda ps, **mode: Shampoo(ps, **mode, **kw), lambda ps: shampoo_ref(ps, **kw), MODEL, dtype, STEPS,
             seed=zlib.crc32(case.encode()), tol=TOL[dtype])


@pytest.mark.parametrize("case", ["default", "every-3"])
def test_shampoo_fused_matches_pytorch_optimizer(case, float64_default):
    """fused=True: the matrix rule runs torch's code (its states are matrices), the other rule its kernel."""
    _fused_ok()
    Shampoo = optdsl.load(SPECS / "shampoo.opt")
    kw = SHAMPOO[case]
    run_pair(lambda ps, **mode: Shampoo(ps, **mode, **kw), lambda ps: shampoo_ref(ps, **kw), MODEL, torch.float64,
             FUSED_STEPS, seed=zlib.crc32(case.encode()), fused=True)


@pytest.mark.parametrize("old, new", [
    ("inv_root(L, 4)", "inv_root(L, 3.9)"),             # the root's order
    ("matrix_eps * eye as pre_cond_1", "1.01 * matrix_eps * eye as pre_cond_1"),
    ("lerp(g, buf, momentum)", "lerp(g, buf, 0.99 * momentum)"),
    ("buf = mm(mm(Li, g), Ri)", "buf = mm(mm(Li, g), Ri * 1.001)"),
])
def test_a_shampoo_mutant_is_caught(old, new, float64_default):
    text = (SPECS / "shampoo.opt").read_text()
    assert text.count(old) == 1
    Mutant = optdsl.compile(text.replace(old, new), "shampoo_mutant.opt")
    kw = dict(momentum=0.5, matrix_eps=10.0)
    with pytest.raises(AssertionError, match="differs from reference"):
        run_pair(lambda ps, **mode: Mutant(ps, **mode, **kw), lambda ps: shampoo_ref(ps, **kw), MODEL,
                 torch.float64, STEPS)


def test_matrix_states_are_saved_and_resume_exactly(float64_default):
    """L, R and their roots are in state_dict() under the reference's keys, of n x n and m x m, the
    L and R starting at matrix_eps * I; a run resumed from a state_dict goes on as the original."""
    Shampoo = optdsl.load(SPECS / "shampoo.opt")
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    grads = [torch.randn(5, 3, generator=gen) for _ in range(6)]
    opt = Shampoo([p], matrix_eps=0.5, preconditioning_compute_steps=2)
    p.grad = torch.zeros(5, 3)
    opt.step()
    state = opt.state[p]
    assert {k: tuple(v.shape) for k, v in state.items() if k != "step"} == {
        "pre_cond_0": (5, 5), "pre_cond_1": (3, 3), "inv_pre_cond_0": (5, 5), "inv_pre_cond_1": (3, 3),
        "momentum_buffer": (5, 3)}
    torch.testing.assert_close(state["pre_cond_0"], 0.5 * torch.eye(5), rtol=0, atol=0)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    resumed = Shampoo([q], matrix_eps=0.5, preconditioning_compute_steps=2)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint: no tensor shared
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert torch.equal(p, q)


def test_the_linear_algebra_is_float32_at_least_for_bfloat16_parameters():
    """torch.linalg has no bfloat16: the roots of a bfloat16 parameter's states are taken in float32."""
    Shampoo = optdsl.load(SPECS / "shampoo.opt")
    p = torch.nn.Parameter(torch.randn(6, 4).bfloat16())
    opt = Shampoo([p], lr=0.1, matrix_eps=1.0)
    for _ in range(3):
        p.grad = torch.randn(6, 4).bfloat16()
        opt.step()
    assert torch.isfinite(p.float()).all() and opt.state[p]["inv_pre_cond_0"].shape == (6, 6)


# ---------------------------------------------------------------- SOAP


def soap_ref(params, float32_qr=None, **kw):
    """pytorch_optimizer's SOAP, one per parameter. Its power iteration casts the QR's input to
    float32 whatever the parameter's dtype (for bfloat16's sake; the spec's qr() is float32 *at
    least*): float32_qr=False (the default for float64 parameters) takes the reference's
    get_orthogonal_matrix_qr, transcribed below, with the QR in the parameter's dtype."""
    import pytorch_optimizer as PO
    if float32_qr is None:
        float32_qr = params[0].dtype != torch.float64
    cls = PO.SOAP if float32_qr else type("SOAP", (PO.SOAP,), {"get_orthogonal_matrix_qr": _qr_uncast})
    return OnePerParameter(params, lambda ps: cls(ps, **kw))


def _qr_uncast(self, state, max_precondition_dim=10000, merge_dims=False):
    # pytorch_optimizer's SOAP.get_orthogonal_matrix_qr for merge_dims=False, the QR not cast to float32
    exp_avg_sq = state["exp_avg_sq"]
    matrices = []
    for ind, (m, o) in enumerate(zip(state["GG"], state["Q"])):
        if len(m) == 0:
            matrices.append([])
            continue
        matrix_product = m @ o
        est_eig = (o * matrix_product).sum(dim=0)
        sort_idx = torch.argsort(est_eig, descending=True)
        exp_avg_sq = exp_avg_sq.index_select(ind, sort_idx)
        matrices.append(torch.linalg.qr(matrix_product.index_select(1, sort_idx))[0])
    state["exp_avg_sq"] = exp_avg_sq
    return matrices


SOAP = {
    "default": dict(shampoo_beta=0.95),
    "every-3": dict(shampoo_beta=0.9, precondition_frequency=3, betas=(0.9, 0.99)),
    "normalized-wd": dict(shampoo_beta=0.95, normalize_gradient=True, correct_bias=False, weight_decay=0.1, lr=0.01,
                          precondition_frequency=2),
}
SOAP_SHAPES = MATRICES + [(7,), (1,)]  # vectors take the reference's path for them (no preconditioner)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(SOAP))
def test_soap_matches_pytorch_optimizer(case, dtype, request):
    """The first eigenbasis of a rank-deficient Gram matrix (every non-square one) is arbitrary in its
    null space: it matches because G G^T is bitwise the reference's (tensordot and matmul agree) and
    eigh is deterministic. float32: the reference as it is, to 1e-4 (test_differential's float32
    tolerance is 1e-5; the eigenbases' rounding, u32 over the gaps of the eigenvalues, adds to it)."""
    if dtype == torch.float64:
        request.getfixturevalue("float64_default")
    Soap = optdsl.load(SPECS / "soap.opt")
    kw = SOAP[case]
    run_pair(lambda ps, **mode: Soap(ps, **mode, **kw), lambda ps: soap_ref(ps, **kw), SOAP_SHAPES, dtype, STEPS,
             seed=zlib.crc32(case.encode()), tol=TOL[dtype])


def test_soap_differs_from_the_reference_by_its_float32_qr_alone(float64_default):
    """Against the reference as it is (QR in float32), float64 parameters agree to float32's rounding
    on square matrices, whose Gram matrices are of full rank (on a (6, 1) one the 6 x 6 Gram matrix
    is of rank 1 for six steps, and its power iteration's near-zero columns take float32's rounding
    to 1e-4 of p over 25 steps)."""
    Soap = optdsl.load(SPECS / "soap.opt")
    kw = SOAP["every-3"]
    worst = run_pair(lambda ps, **mode: Soap(ps, **mode, **kw), lambda ps: soap_ref(ps, float32_qr=True, **kw),
                     [(4, 4), (6, 6), (3, 3)], torch.float64, STEPS, tol=1e-6)
    assert worst > 1e-12  # the float32 QR shows


@pytest.mark.parametrize("case", ["default", "normalized-wd"])
def test_soap_fused_matches_pytorch_optimizer(case, float64_default):
    _fused_ok()
    Soap = optdsl.load(SPECS / "soap.opt")
    kw = SOAP[case]
    # the reference runs where ours does: at step 1 the Gram matrices are of rank 1 or 2, and which
    # basis eigh picks in their degenerate eigenspaces (Adam's second moment is not invariant to it)
    # is the device's linear algebra's choice; CUDA's and the CPU's differ (2e-3 at step 1 on an H200)
    run_pair(lambda ps, **mode: Soap(ps, **mode, **kw), lambda ps: soap_ref(ps, **kw), SOAP_SHAPES, torch.float64,
             FUSED_STEPS, seed=zlib.crc32(case.encode()), fused=True, ref_on_fused_device=True)


@pytest.mark.parametrize("old, new", [
    ("refresh = (s % f == 0) * (s > 0)", "refresh = (s % f == 1) * (s > 0)"),
    ("v = where(refresh, mm(mm(T(PL), v), PR), v)", "v = where(refresh, mm(v, PR), v)"),   # rows not reordered
    ("GL = lerp(GL, mm(g, T(g)), 1 - shampoo_beta)", "GL = lerp(GL, mm(g, T(g)), 1.01 - shampoo_beta)"),
    ("qr(mm(AR, PR))", "qr(mm(AR, T(PR)))"),
])
def test_a_soap_mutant_is_caught(old, new, float64_default):
    text = (SPECS / "soap.opt").read_text()
    assert text.count(old) == 1
    Mutant = optdsl.compile(text.replace(old, new), "soap_mutant.opt")
    kw = SOAP["normalized-wd"]
    with pytest.raises(AssertionError, match="differs from reference"):
        run_pair(lambda ps, **mode: Mutant(ps, **mode, **kw), lambda ps: soap_ref(ps, **kw), SOAP_SHAPES,
                 torch.float64, STEPS)


# ---------------------------------------------------------------- shapes and their errors

SPEC = """optimizer X
hyper lr = 0.1 in [0, inf)
rule ndim == 2 {{
  {body}
}}
rule {{
  p -= lr * g
}}
"""


@pytest.mark.parametrize("body, message, col", [
    ("x = g\n  p -= lr * (mm(x, T(x)) + x)", "'+' of values (nrows x nrows) and (nrows x ncols)", 14),
    ("state L: gram_rows\n  L = mm(T(g), g)\n  p -= lr * g", "state 'L' is (nrows x nrows) but this value is "
     "(ncols x ncols)", 3),
    ("state R: gram_cols = eye\n  p -= lr * mm(R, g)", "mm() of a (ncols x ncols) and a (nrows x ncols) value", 13),
    ("p -= lr * mm(inv_root(mm(T(g), g), 4), g)", "mm() of a (ncols x ncols) and a (nrows x ncols) value", 13),
    ("p -= lr * mm(inv_root(g, 4), g)", "inv_root() takes a symmetric matrix, but this value is (nrows x ncols)",
     25),
    ("state L: gram_rows\n  p -= lr * L", "'-' of values (nrows x ncols) and (nrows x nrows)", 3),
    ("state L: gram_rows\n  p = L", "p is (nrows x ncols) but this value is (nrows x nrows)", 3),
    ("state L: gram_rows = eye\n  p -= lr * mm(inv_root(L, 0), g)", "inv_root(a, k) takes a^(-1/k): k cannot be 0",
     28),  # a Shampoo mutant: ZeroDivisionError at step
    ("state L: gram_rows = eye\n  p -= lr * inv_root(L, t) * g", "the last argument of inv_root() must be a number "
     "or a hyperparameter", 25),
])
def test_shape_errors_are_located(body, message, col):
    with pytest.raises(optdsl.SpecError) as err:
        optdsl.compile(SPEC.format(body=body), "x.opt")
    assert message in str(err.value), str(err.value)
    if col:
        assert err.value.span.column == col, str(err.value)


WIDE = """optimizer Wide
hyper lr = 0.1 in [0, inf)
rule ndim == 2 {
  x = where(nrows > ncols, T(g), g)   # the wide side, as Muon iterates: its axes depend on p's shape
  A = mm(x, col_mean(x))
  p -= lr * where(nrows > ncols, T(A), A)
}
rule {
  p -= lr * g
}
"""


@pytest.mark.parametrize("path", ["for-loop", "foreach", "fused"])
def test_shapes_only_the_parameter_decides_raise_at_step_with_the_line(path):
    """Issue 12 item 3: mm(x, col_mean(x)) fits a (1, 1) parameter and no other, which no rule can
    say (fuzz seed 5671, a MuonClip mutant). At step it is a ShapeError naming the file, the line,
    the statement and the shapes, on every path, with torch's error as its cause; a parameter it
    fits steps."""
    cls = optdsl.compile(WIDE, "wide.opt")
    kw = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[path]
    ok = torch.nn.Parameter(torch.tensor([[2.0]], dtype=torch.float64))
    ok.grad = torch.tensor([[3.0]], dtype=torch.float64)
    cls([ok], **kw).step()
    assert ok.item() == pytest.approx(2.0 - 0.1 * 3.0 * 3.0)  # x = g, A = g * g
    bad = torch.nn.Parameter(torch.zeros(3, 5, dtype=torch.float64))
    bad.grad = torch.ones(3, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError) as err:
        cls([bad], **kw).step()
    assert type(err.value).__name__ == "ShapeError", repr(err.value)
    text = str(err.value)
    assert "wide.opt:5:3: A = mm(x, col_mean(x))\n      A = mm(x, col_mean(x))\n      ^^^^^^^^^^^^^^^^^^^^^^\n" in text
    assert "(3, 5)" in text and "3x5 and 1x5" in text and "reads: x (3, 5)" in text, text
    assert "wide.opt:4" not in text and "wide.opt:6" not in text  # the statement that fails, alone
    assert "cannot be multiplied" in str(err.value.__cause__)


def test_statements_whose_shapes_the_rules_decide_are_not_wrapped():
    """Only rules with such statements pay for the try (Muon, MuonClip among the shipped specs);
    per-unit reductions (unit_norm, unit_mean) broadcast against p at every rank and are not among them."""
    from optdsl.shapes import decided_at_step
    from optdsl import lower, parse
    lowered, _ = lower.lower_rules(parse.parse(WIDE, "wide.opt"))
    assert [eq.span.line for eq in decided_at_step(lowered[0][1])] == [5, 6]
    assert "_shape_error" not in optdsl.compile_source(SPEC.format(body="p -= lr * mm(mm(g, T(g)), g)"),
                                                        "x.opt").python
    agc = optdsl.compile_source((Path(__file__).parent.parent / "specs" / "sgd_agc.opt").read_text(), "sgd_agc.opt").python
    assert "_shape_error" not in agc


def test_inv_root_of_a_hyperparameter_at_0_says_so_at_step():
    cls = optdsl.compile(SPEC.format(body="state L: gram_rows = eye\n  p -= lr * mm(inv_root(L, lr), g)"), "x.opt")
    p = torch.nn.Parameter(torch.ones(2, 3))
    p.grad = torch.ones(2, 3)
    with pytest.raises(ValueError, match="inv_root\\(a, k\\) cannot run: k is 0"):
        cls([p], lr=0.0).step()


def test_a_matrix_state_needs_matrices():
    src = "optimizer X\nhyper lr = 0.1 in [0, inf)\nrule ndim >= 1 {\n  state L: gram_rows = eye\n  p -= lr * mm(L, g)\n}\nrule {\n  p -= lr * g\n}\n"
    with pytest.raises(optdsl.SpecError, match="needs parameters of rank 2 or more"):
        optdsl.compile(src, "x.opt")


def test_eye_is_read_in_a_matrix_states_initial_value_only():
    src = "optimizer X\nhyper lr = 0.1 in [0, inf)\nrule ndim == 2 {\n  state m = eye\n  p -= lr * m\n}\nrule {\n  p -= lr * g\n}\n"
    with pytest.raises(optdsl.SpecError, match="unknown name 'eye'"):
        optdsl.compile(src, "x.opt")


# test_differential.test_every_spec_is_covered reads the cases of every tests/test_zoo*.py
CASES = {f"shampoo-{case}": ("shampoo", kw, shampoo_ref, kw) for case, kw in SHAMPOO.items()}
CASES |= {f"soap-{case}": ("soap", kw, soap_ref, kw) for case, kw in SOAP.items()}


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_roots_and_bases_are_computed_on_their_steps_only(foreach, monkeypatch):
    """Shampoo's roots every k steps, SOAP's eigenbases at the first step and its QR every f steps:
    the linear algebra runs on those steps only, on both torch paths (every tensor stepped alike)."""
    calls = {"eigh": 0, "qr": 0}
    for name in calls:
        real = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda *a, _real=real, _name=name, **k: (
            calls.__setitem__(_name, calls[_name] + 1), _real(*a, **k))[1])
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4, 4))]
    shampoo = optdsl.load(SPECS / "shampoo.opt")(params, preconditioning_compute_steps=3, foreach=foreach)
    soap = optdsl.load(SPECS / "soap.opt")(params, precondition_frequency=3, foreach=foreach)
    for opt, per_refresh in ((shampoo, {"eigh": 4, "qr": 0}), (soap, {"eigh": 0, "qr": 4})):
        for t in range(1, 8):
            for p in params:
                p.grad = torch.randn(p.shape)
            before = dict(calls)
            opt.step()
            done = {k: calls[k] - before[k] for k in calls}
            if opt is shampoo:
                assert done == (per_refresh if t % 3 == 0 else {"eigh": 0, "qr": 0}), (t, done)
            else:  # the bases by eigh at t = 1, refreshed where (t - 1) % 3 == 0 after
                want = {"eigh": 4, "qr": 0} if t == 1 else per_refresh if (t - 1) % 3 == 0 else {"eigh": 0, "qr": 0}
                assert done == want, (t, done)


def test_info_counts_matrix_states():
    """optdsl info: a gram_rows state of a 768 x 3072 matrix holds 768^2 numbers, a gram_cols one 3072^2."""
    from optdsl import info, pipeline
    compiled = pipeline.compile_source((SPECS / "shampoo.opt").read_text(), "shampoo.opt")
    m = info.memory(compiled, (768, 3072))
    assert dict((k, n) for k, _, n in m.states) == {
        "pre_cond_0": 768**2, "pre_cond_1": 3072**2, "inv_pre_cond_0": 768**2, "inv_pre_cond_1": 3072**2,
        "momentum_buffer": 768 * 3072}
    assert "gram_cols" in info.report(compiled, (768, 3072))


@pytest.mark.parametrize("name, line", [("shampoo", "Ri ← where(mod(t, k) == 0, inv_root(R, 4), Ri)"),
                                        ("soap", "QL ← where(t == 1, eigvecs(GL), where(refresh, qr(mm(AL, PL)), QL))")])
def test_explain_prints_the_math(name, line):
    """optdsl explain prints each rule's statements; the element-wise analyses say why they skip the matrix rule."""
    from optdsl import explain, pipeline
    out = explain.report(explain.explain(pipeline.compile_source((SPECS / f"{name}.opt").read_text(), f"{name}.opt")))
    assert line in out
    assert "this rule does matrix work (mm, T, linear algebra)" in out


# Rules with two or more statements whose shapes only the parameter's shape decides, the second (or a
# later) one failing on a (3, 5) or (5, 3) parameter, the first fitting every shape: (body, parameter
# shape, the statement that fails as its ShapeError shows it, the values it reads, a statement it must not name).
SECOND_FAILS = [
    # mm: A is (k x k) for the wide side's k, B multiplies it by a (1 x m) row
    ("x = where(nrows > ncols, T(g), g)\n  A = mm(x, T(x))\n  B = mm(A, col_mean(x))\n"
     "  p -= lr * where(nrows > ncols, T(B), B)", (3, 5), "x.opt:6:3: B = mm(A, col_mean(x))",
     "reads: A (3, 3), x (3, 5)", "x.opt:5"),
    # element-wise: x + T(x) fits a square parameter alone
    ("x = where(nrows > ncols, T(g), g)\n  A = mm(x, T(x))\n  C = x + T(x)\n"
     "  p -= lr * where(nrows > ncols, T(C), C) + lr * mean(A)", (5, 3), "x.opt:6:3: C = x + T(x)",
     "reads: x (3, 5)", "x.opt:5"),
    # the assignment: mm(A, x) has x's shape, the transpose of a tall p
    ("x = where(nrows > ncols, T(g), g)\n  A = mm(x, T(x))\n  p -= lr * mm(A, x)", (5, 3),
     "x.opt:6:3: p -= lr * mm(A, x)", "reads: p (5, 3), A (3, 3), x (3, 5)", "x.opt:5"),
    # three candidates, the third failing: the second fits too
    ("x = where(nrows > ncols, T(g), g)\n  A = mm(x, T(x))\n  B = mm(A, x)\n  D = mm(B, A)\n"
     "  p -= lr * where(nrows > ncols, T(B), B) + lr * mean(D)", (3, 5), "x.opt:7:3: D = mm(B, A)",
     "reads: B (3, 5), A (3, 3)", "x.opt:6"),
]


@pytest.mark.parametrize("path", ["for-loop", "foreach", "fused"])
@pytest.mark.parametrize("body, shape, shown, reads, not_shown", SECOND_FAILS)
def test_a_step_shape_error_names_the_statement_that_fails(body, shape, shown, reads, not_shown, path):
    """Issue 12 item 3: the ShapeError names the one statement whose shapes do not fit (file:line:col,
    its line and a caret under it), the values it reads and their shapes, the parameter's shape and
    torch's message, on every path; not the candidates before it, which fit. A parameter of another
    shape in the same group steps (or fails) as its own shape says: the error names the failing one's."""
    cls = optdsl.compile(SPEC.format(body=body), "x.opt")
    kw = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[path]
    ok = torch.nn.Parameter(torch.ones(1, 1, dtype=torch.float64))  # every statement fits a (1, 1) matrix
    bad = torch.nn.Parameter(torch.ones(*shape, dtype=torch.float64))
    ok.grad, bad.grad = torch.ones_like(ok), torch.ones_like(bad)
    with pytest.raises(RuntimeError) as err:
        cls([ok, bad], **kw).step()
    assert type(err.value).__name__ == "ShapeError", repr(err.value)
    text = str(err.value)
    line = shown.split(": ", 1)[1]
    caret = "\n      " + line + "\n      " + "^" * len(line) + "\n"
    assert shown + caret in text, text
    assert reads in text and f"a parameter of shape {shape}" in text, text
    assert not_shown not in text, text  # the statement before it fits: it is not named
    assert str(err.value.__cause__).split("\n")[0] in text  # torch's own message, its cause


def test_the_step_itself_has_no_replay_markers():
    """The statement markers live in the replay alone (run after a step raised): the for-loop, foreach
    and fused functions a step runs read none of them, and the functional's try costs nothing."""
    import ast
    source = optdsl.compile_source(SPEC.format(body=SECOND_FAILS[0][0]), "x.opt").python
    tree = ast.parse(source)
    def marks(node):  # `n, values = 2, (...)`: the replay's marker of the statement it runs
        return [a for a in ast.walk(node) if isinstance(a, ast.Assign) and ast.unparse(a.targets[0]).strip("()") == "n, values"]
    functions = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    assert {name for name, f in functions.items() if marks(f)} == {"_shapes_x_0"}
    assert len(marks(functions["_shapes_x_0"])) == 1 + 4  # none yet, then one per statement that reads a tensor
    step = [functions[name] for name in ("_single_tensor_x_0", "_multi_tensor_x_0", "_fused_x_0", "_matrix_x_0")]
    assert not any(isinstance(n, ast.Name) and n.id in ("_shapes_x_0", "_STATEMENTS_0") for f in step for n in ast.walk(f))
    tries = [t for t in ast.walk(functions["x_0"]) if isinstance(t, ast.Try)]
    assert len(tries) == 1 and "_shapes_x_0" not in ast.unparse(tries[0].body)  # named in its handler alone
    assert "_STATEMENTS_0" in source and "def _shapes_x_1" not in source  # the rule without such shapes has none


def test_a_branch_a_tensor_picks_is_named_where_it_meets_other_shapes():
    """A condition on a tensor's value cannot pick a branch on the host: every path takes torch.where,
    whose branches must broadcast, and so does the replay. The where itself is named (the candidates
    after it are not), on every path."""
    body = ("x = where(nrows > ncols, T(g), g)\n  y = where(norm(g) > 0, x, T(x))\n  A = mm(y, T(x))\n"
            "  p -= lr * mean(A) * g")
    cls = optdsl.compile(SPEC.format(body=body), "x.opt")
    for kw in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        bad = torch.nn.Parameter(torch.ones(3, 5, dtype=torch.float64))
        bad.grad = torch.ones_like(bad)
        with pytest.raises(RuntimeError) as err:
            cls([bad], **kw).step()
        text = str(err.value)
        assert type(err.value).__name__ == "ShapeError" and "x.opt:5:3: y = where(norm(g) > 0, x, T(x))" in text, text
        assert "x.opt:6" not in text and "reads: g (3, 5), x (3, 5)" in text, text


@pytest.mark.parametrize("spec, rule", [("muon.opt", 0), ("muon_clip.opt", 0), (None, 0)])
@pytest.mark.parametrize("ns_bfloat16", [0, 1])
def test_the_replay_agrees_with_the_step(spec, rule, ns_bfloat16, monkeypatch):
    """The replay (run only after a step raised) says no statement fails wherever the step runs, and
    names one wherever it raises: Muon and MuonClip step every matrix, the Wide rule only (1, 1) ones.
    It reads the hyperparameters the step reads (captured from the for-loop function's call)."""
    import sys
    text = WIDE if spec is None else (Path(__file__).parent.parent / "specs" / spec).read_text()
    if ns_bfloat16 and "ns_bfloat16" not in text:
        pytest.skip("the spec has no ns_bfloat16")
    cls = optdsl.compile(text, spec or "wide.opt")
    module = sys.modules[cls.__module__]
    func = next(name[len("_shapes_"):] for name in vars(module) if name.startswith("_shapes_"))
    seen = {}
    step = getattr(module, f"_single_tensor_{func}")
    monkeypatch.setattr(module, f"_single_tensor_{func}", lambda *a, **kw: (seen.update(kw if a[0] else {}), step(*a, **kw))[1])
    for shape in [(1, 1), (3, 5), (5, 3), (4, 4), (2, 3, 5)]:
        p = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
        p.grad = torch.randn_like(p)
        kw = {"ns_bfloat16": ns_bfloat16} if ns_bfloat16 else {}
        seen.clear()
        try:
            cls([p], foreach=False, **kw).step()
            raised = None
        except RuntimeError as err:
            raised = err
        if not seen:  # another rule took the parameter (Wide's rule for every rank but 2)
            assert raised is None and len(shape) != 2
            continue
        hypers = {k: v for k, v in seen.items() if k not in ("generator", "stochastic")}
        at, _, why = getattr(module, f"_shapes_{func}")(p, 1.0, **hypers)
        assert (why is None) == (raised is None), (shape, why, raised)
        if raised is not None:
            assert type(raised).__name__ == "ShapeError" and at is not None
            assert module._STATEMENTS_0[at].split("\n")[0] in str(raised)
