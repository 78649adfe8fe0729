"""Issue 16: GaLore-AdamW (specs/galore_adamw.opt) against pytorch_optimizer's GaLore, and the two pieces
it needs: `matrix(A, B)` states whose sizes may be a hyperparameter (the rank), and the truncated SVD's
singular vectors `svd_u(x, k)` / `svd_vh(x, k)`.

The reference is one GaLore per parameter (it counts steps per group; one optimizer per parameter,
stepped only with a gradient, counts them per parameter as the spec does), `rank` and the rest in its
group, so matrices are projected and vectors and rank-3 tensors take its AdamW. It takes the SVD in
float32 whatever the dtype, as the spec's svd_vh/svd_u do: the same float32 input gives the same
float32 vectors, so in float64 the two differ only by the order of float64 roundings around them
(the step size folded into one host scalar: a few ulps per step), hence run_pair's 1e-10 after every
step. The for-loop and foreach paths are compared bitwise by run_pair.
"""
from __future__ import annotations

import copy
import zlib

import pytest
import torch

import optdsl
from optdsl import info
from optdsl.errors import SpecError
from optdsl.pipeline import compile_source
from test_differential import ON_GPU, SPECS, run_pair
from test_zoo_frontier import FUSED_STEPS, _fused_ok
from test_zoo_specs import OnePerParameter

STEPS = 25
MATRICES = [(5, 3), (4, 4), (3, 7), (1, 6), (6, 1), (8, 5)]  # tall, square, wide, a row, a column
MODEL = MATRICES + [(7,), (3, 2, 4)]                           # a vector and a rank-3 tensor: AdamW
GALORE = {
    "std-r2-gap3": dict(rank=2, update_proj_gap=3),
    "std-r1-gap1-scaled-wd": dict(lr=0.01, rank=1, update_proj_gap=1, scale=0.25, weight_decay=0.1),
    "std-r3-gap5-betas-eps": dict(betas=(0.8, 0.95), eps=1e-3, rank=3, update_proj_gap=5, scale=2.0),
    "std-rank-past-the-matrix": dict(rank=10, update_proj_gap=4),   # all singular vectors: min(rank, n, m)
    "reverse_std": dict(rank=2, update_proj_gap=4, projection_type="reverse_std", weight_decay=0.01),
    "right": dict(rank=2, update_proj_gap=2, projection_type="right"),
    "left": dict(rank=2, update_proj_gap=2, projection_type="left"),
    "full": dict(rank=2, update_proj_gap=3, projection_type="full", weight_decay=0.01),
    "full-r1-gap1-scaled": dict(lr=0.01, rank=1, update_proj_gap=1, projection_type="full", scale=0.5),
    "full-rank-past-the-matrix": dict(rank=10, update_proj_gap=4, projection_type="full", betas=(0.8, 0.95)),
    # the reference's 'random' is 'std' (see test_random_is_the_references_svd_projection)
    "random": dict(rank=2, update_proj_gap=3, projection_type="random", weight_decay=0.01),
    "random-r1-gap1-scaled": dict(lr=0.01, rank=1, update_proj_gap=1, projection_type="random", scale=0.5),
}
CASES = {f"galore-{case}": ("galore_adamw", kw, None, kw) for case, kw in GALORE.items()}  # for test_every_spec_is_covered


def galore_ref(params, **kw):
    import pytorch_optimizer as PO
    kw = {"scale": 1.0, "projection_type": "std", "update_proj_gap": 50, **kw}
    return OnePerParameter(params, lambda ps: PO.GaLore(ps, foreach=False, **kw))


def _ours(kw):
    GaLore = optdsl.load(SPECS / "galore_adamw.opt")
    return lambda ps, **mode: GaLore(ps, **mode, **kw)


@pytest.mark.parametrize("case", list(GALORE))
def test_galore_matches_pytorch_optimizer(case, float64_default):
    kw = GALORE[case]
    worst = run_pair(_ours(kw), lambda ps: galore_ref(ps, **kw), MODEL, torch.float64, STEPS,
                     seed=zlib.crc32(case.encode()), tol=1e-10)
    assert worst < 1e-14  # rounding order only: measured 0 to 1.3e-16 over these cases


def test_random_is_the_references_svd_projection(float64_default):
    """pytorch_optimizer's GaLore with projection_type='random' draws no random matrix: GaLore.step calls
    GaLoreProjector.project(grad, step) without from_random_matrix (only APOLLO passes True), so the
    projection is the SVD's, on the smaller side as 'std'. The reference's steps leave torch's global
    generator as it was (a draw would move it), and the spec's 'random' is its 'std' to the bit on
    every shape of MODEL."""
    kw = dict(rank=2, update_proj_gap=2, projection_type="random")
    gen = torch.Generator().manual_seed(5)
    ref_params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in MATRICES]
    ref = galore_ref(ref_params, **kw)
    before = torch.get_rng_state()
    for _ in range(5):
        for p in ref_params:
            p.grad = torch.randn(p.shape, generator=gen)
        ref.step()
    assert torch.equal(torch.get_rng_state(), before)
    runs = []
    for kind in ("random", "std"):
        gen = torch.Generator().manual_seed(6)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in MODEL]
        opt = _ours(dict(kw, projection_type=kind))(ps)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append([p.detach().clone() for p in ps])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], [torch.randn(s, generator=torch.Generator().manual_seed(6))
                                                               for s in MODEL]))  # the runs moved p


def test_rank_zero_is_the_references_adamw(float64_default):
    """rank=0: every parameter takes AdamW, as the reference's group without `rank` does."""
    import pytorch_optimizer as PO
    kw = dict(lr=0.01, weight_decay=0.1)
    run_pair(_ours(dict(rank=0, **kw)), lambda ps: OnePerParameter(ps, lambda q: PO.GaLore(q, foreach=False, **kw)),
             MODEL, torch.float64, STEPS, seed=7, tol=1e-10)


@pytest.mark.parametrize("case", ["std-r2-gap3", "reverse_std", "full", "random"])
def test_galore_fused_matches_pytorch_optimizer(case, float64_default):
    """fused=True: the matrix rules run torch's code (their states are matrices), AdamW its kernel."""
    _fused_ok()
    if ON_GPU:  # ours on the GPU, the reference on the CPU
        pytest.skip("cuSOLVER's float32 SVD is not LAPACK's: the projections differ by float32 rounding (and a "
                    "singular vector's sign may differ, which GaLore's moments do not follow at a refresh)")
    kw = GALORE[case]
    run_pair(_ours(kw), lambda ps: galore_ref(ps, **kw), MODEL, torch.float64, FUSED_STEPS,
             seed=zlib.crc32(case.encode()), fused=True, tol=1e-10)


@pytest.mark.parametrize("old, new", [
    ("m = lerp(m, r, 1 - b1)", "m = lerp(m, r, 1 - 0.99 * b1)"),                 # a moment's constant
    ("(t % update_proj_gap == 0), svd_vh", "(t % update_proj_gap == 1), svd_vh"),  # when the SVD is taken
    ("svd_u(g, rank)", "svd_u(g + 0.01 * p, rank)"),                             # of what
    ("mm(P, m / (sqrt(v) + eps))", "mm(P, m / (sqrt(v) + 1.01 * eps))"),
])
def test_a_galore_mutant_is_caught(old, new, float64_default):
    text = (SPECS / "galore_adamw.opt").read_text()
    head, tall = text.split("\nrule ndim == 2 and rank > 0 and where(")
    assert old in tall
    Mutant = optdsl.compile(head + "\nrule ndim == 2 and rank > 0 and where(" + tall.replace(old, new, 1),
                            "galore_mutant.opt")  # in the rule for 'std' on tall matrices
    kw = dict(rank=2, update_proj_gap=3, eps=0.1)
    with pytest.raises(AssertionError, match="differs from reference"):
        run_pair(lambda ps, **mode: Mutant(ps, **mode, **kw), lambda ps: galore_ref(ps, **kw), MODEL,
                 torch.float64, STEPS)


@pytest.mark.parametrize("old, new", [
    ("svd_u(g, rank), L)", "svd_u(g + 0.01 * p, rank), L)"),          # of what the left vectors are
    ("(t % update_proj_gap == 0), svd_vh(g, rank), R)", "(t % update_proj_gap == 1), svd_vh(g, rank), R)"),
    ("mm(mm(L, m / (sqrt(v) + eps)), R)", "mm(mm(L, m / (sqrt(v) + 1.01 * eps)), R)"),
])
def test_a_galore_full_mutant_is_caught(old, new, float64_default):
    text = (SPECS / "galore_adamw.opt").read_text()
    assert text.count(old) == 1
    Mutant = optdsl.compile(text.replace(old, new), "galore_mutant.opt")
    kw = dict(rank=2, update_proj_gap=3, eps=0.1, projection_type="full")
    with pytest.raises(AssertionError, match="differs from reference"):
        run_pair(lambda ps, **mode: Mutant(ps, **mode, **kw), lambda ps: galore_ref(ps, **kw), MODEL,
                 torch.float64, STEPS)


def test_rank_r_states_are_saved_with_their_shapes(float64_default):
    """The projection and the moments are rank x n / m x rank matrices in state_dict(), rank clamped
    to the matrix's smaller side; a run resumed from a state_dict goes on as the original."""
    GaLore = optdsl.load(SPECS / "galore_adamw.opt")
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 4), (3, 8), (2, 9), (5,)]]
    grads = [[torch.randn(p.shape, generator=gen) for p in ps] for _ in range(6)]
    opt = GaLore(ps, rank=3, update_proj_gap=2)
    for p, g in zip(ps, grads[0]):
        p.grad = g
    opt.step()
    shapes = [{k: tuple(v.shape) for k, v in opt.state[p].items() if k != "step"} for p in ps]
    assert shapes == [{"ortho_matrix": (3, 4), "exp_avg": (6, 3), "exp_avg_sq": (6, 3)},
                      {"ortho_matrix": (3, 3), "exp_avg": (3, 8), "exp_avg_sq": (3, 8)},
                      {"ortho_matrix": (2, 2), "exp_avg": (2, 9), "exp_avg_sq": (2, 9)},
                      {"exp_avg": (5,), "exp_avg_sq": (5,)}]
    P = opt.state[ps[0]]["ortho_matrix"]
    torch.testing.assert_close(P @ P.T, torch.eye(3), atol=1e-6, rtol=0)  # orthonormal rows (float32 SVD)
    saved = copy.deepcopy(opt.state_dict())  # load_state_dict keeps tensors of the right dtype as they are
    clones = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = GaLore(clones, rank=3, update_proj_gap=2)
    resumed.load_state_dict(saved)
    for gs in grads[1:]:
        for p, q, g in zip(ps, clones, gs):
            p.grad, q.grad = g, g.clone()
        opt.step()
        resumed.step()
    for p, q in zip(ps, clones):
        assert torch.equal(p, q)


def test_info_counts_the_rank_r_states():
    """optdsl info: GaLore's 768 x 3072 matrix at rank 128 keeps a 128 x 3072 projection and two
    768 x 128 moments (wide: the left vectors, 768 x 128, and moments 128 x 3072)."""
    compiled = compile_source((SPECS / "galore_adamw.opt").read_text(), "galore_adamw.opt")
    tall = info.memory(compiled, (3072, 768))
    assert tall.states == (("ortho_matrix", "matrix(rank, ncols)", 128 * 768),
                           ("exp_avg", "matrix(nrows, rank)", 3072 * 128),
                           ("exp_avg_sq", "matrix(nrows, rank)", 3072 * 128))
    wide = info.memory(compiled, (768, 3072))
    assert [n for _, _, n in wide.states] == [768 * 128, 128 * 3072, 128 * 3072]
    assert info.memory(compiled, (4, 6)).states[0][2] == 4 * 4      # the rank past the matrix: min(128, 4, 6)
    assert info.memory(compiled, (768,)).total == 2 * 768             # a vector: AdamW
    assert "matrix(rank, ncols)" in info.report(compiled, (3072, 768))
    assert "at the default rank = 128" in info.report(compiled, (3072, 768))


@pytest.mark.parametrize("body, message, line, col", [
    ("state P: matrix(nrows, k)\n  p -= lr * g", "unknown size 'k' of a matrix state", 4, 12),
    ("state P: mat(nrows, ncols)\n  p -= lr * g", "unknown state shape 'mat(nrows, ncols)'", 4, 12),
    ("state P: matrix(nrows, r)\n  P = svd_vh(g, r)\n  p -= lr * g", "state 'P' is (nrows x r) but this value is "
     "(r x ncols)", 5, 3),
    ("state P: matrix(r, ncols)\n  p -= lr * mm(P, g)", "mm() of a (r x ncols) and a (nrows x ncols) value", 5, 13),
    ("state P: matrix(nrows, r) = eye\n  p -= lr * g", "'eye'", 4, 0),   # the identity of a square matrix only
])
def test_matrix_state_errors_are_located(body, message, line, col):
    src = f"optimizer X\nhyper lr = 0.1 in [0, inf), r = 2 in [1, inf)\nrule ndim == 2 {{\n  {body}\n}}\nrule {{\n  p -= lr * g\n}}\n"
    with pytest.raises(SpecError) as err:
        optdsl.compile(src, "x.opt")
    assert message in str(err.value)
    assert err.value.span.line == line
    assert col == 0 or err.value.span.column == col


def test_svd_functions_are_the_truncated_svd_in_float32():
    """svd_u(x, k) and svd_vh(x, k) are torch.linalg.svd's U[:, :k] and Vh[:k] of x in float32, back in x's dtype."""
    Probe = optdsl.compile("optimizer SvdProbe\nhyper k = 2 in [1, inf)\nrule ndim == 2 {\n"
                           "  state U: matrix(nrows, k), V: matrix(k, ncols)\n  U = svd_u(g, k)\n  V = svd_vh(g, k)\n"
                           "  p -= mm(mm(U, T(U)), g)\n}\nrule {\n  p -= g\n}\n", "svd_probe.opt")
    gen = torch.Generator().manual_seed(0)
    for shape in [(5, 3), (3, 5), (4, 4)]:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
        p.grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        for foreach in (False, True):
            opt = Probe([p], foreach=foreach)
            opt.step()
            u, _, vh = torch.linalg.svd(p.grad.float(), full_matrices=False)
            assert opt.state[p]["U"].dtype == torch.float64
            assert torch.equal(opt.state[p]["U"], u[:, :2].double())
            assert torch.equal(opt.state[p]["V"], vh[:2].double())


def test_explain_prints_the_math_and_the_rank_r_memory():
    """optdsl explain: each projected rule's statements (the SVD on the refresh steps) and its states'
    sizes per matrix; the element-wise analyses say why they skip it; the AdamW rule is analysed."""
    from optdsl import explain
    x = explain.explain(compile_source((SPECS / "galore_adamw.opt").read_text(), "galore_adamw.opt"))
    out = explain.report(x)
    assert "P ← where((t == 1) + (mod(t, update_proj_gap) == 0), svd_vh(g, rank), P)" in out
    assert "P ← where((t == 1) + (mod(t, update_proj_gap) == 0), svd_u(g, rank), P)" in out
    assert "plus L (nrows x rank), R (rank x ncols), m (rank x rank), v (rank x rank) per parameter" in x.property(
        "state memory per element", 0).value
    assert "plus P (rank x ncols), m (nrows x rank), v (nrows x rank) per parameter" in x.property(
        "state memory per element", 1).value
    assert "plus P (nrows x rank), m (rank x ncols), v (rank x ncols) per parameter" in x.property(
        "state memory per element", 2).value
    assert out.count("this rule does matrix work (mm, T, linear algebra)") == 3
    assert x.property("range of state v", 3).value == "[0, inf)"


@pytest.mark.parametrize("shape, k, rule", [((4, 4), 0, 0), ((3, 5), 0, 1), ((3, 5), 1, 0), ((5, 3), 1, 1)])
def test_a_rule_condition_may_compare_comparisons(shape, k, rule):
    """`(nrows >= ncols) == (k == 0)` in a rule's condition (GaLore's projection side, written as
    one comparison): each inner comparison is a number, not Python's chained `a >= b == k == 0`."""
    Side = optdsl.compile("optimizer Side\nhyper lr = 0.1 in [0, inf), k = 0 in [0, inf)\n"
                          "rule ndim == 2 and (nrows >= ncols) == (k == 0) and (nrows >= 1) * 2 > 1 {\n"
                          "  p -= lr * g\n}\nrule {\n  p -= 2 * lr * g\n}\n", "side.opt")
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = Side([p], k=k)
    assert opt._rule_of(p, opt.param_groups[0]) == rule
    p.grad = torch.ones(shape)
    opt.step()
    assert torch.equal(p, torch.full(shape, -0.1 * (rule + 1)))
