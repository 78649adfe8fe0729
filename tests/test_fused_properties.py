"""Property test of the fused path on the zoo's constructs: random specs with rows, cols, bool and
scalar states, row/column/whole-tensor reductions and matrix work; the fused kernels (Triton's
interpreter on CPU, or compiled with TRITON_INTERPRET=0 on a GPU) equal the foreach path,
parameters and states, after a few steps.

tests/test_properties.py does the same for random core-language specs; this generator writes the
shapes of what the zoo needs, where the fused path has its own machinery (stages, accumulators per
row and column, early stores, torch's matrix work between launches).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import optdsl

triton = pytest.importorskip("triton")
# under the interpreter on CPU (CI); with TRITON_INTERPRET=0 on a CUDA machine, compiled on the GPU
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

UNARY = ["abs({})", "sqrt(abs({}) + 1)", "exp(-abs({}))", "sign({})", "tanh({})", "({})^2"]
BINARY = ["({} + {})", "({} - {})", "({} * {})", "max({}, {})", "min({}, {})", "({} / (abs({}) + 1))"]
ROW, COL = ["row_mean", "row_max", "row_sum"], ["col_mean", "col_max", "col_sum"]
SHAPES = [[(5, 7)], [(3, 40, 30)], [(1, 9), (33, 2)], [(2, 1500)]]  # 1500: rows cross blocks


def expr(rng, names, depth):
    if depth == 0 or rng.random() < 0.3:
        return rng.choice(names + ["0.5", "lr"])
    if rng.random() < 0.4:
        return rng.choice(UNARY).format(expr(rng, names, depth - 1))
    return rng.choice(BINARY).format(expr(rng, names, depth - 1), expr(rng, names, depth - 1))


def random_spec(rng) -> str:
    kinds = rng.sample(["rows", "cols", "full", "bool", "scalar"], rng.randint(1, 4))
    states = [(f"s{k}", kind) for k, kind in enumerate(kinds)]
    decls = [f"state {n}" + ("" if kind == "full" else f": {kind}") for n, kind in states]
    reads, lines, local, matrix = ["p", "g"] + [n for n, _ in states], [], [], []
    for k in range(rng.randint(1, 4)):
        e, c = expr(rng, reads + local, 2), rng.random()
        if c < 0.25:
            e = f"{e} / (norm({expr(rng, reads, 1)}) + 1)"
        elif c < 0.4:
            e = f"{e} * {rng.choice(ROW + COL[:1] + COL[2:])}({expr(rng, reads, 1)})"
        elif c < 0.55:  # Newton-Schulz-like: a kernel normalises, torch's matmuls, then kernels again
            lines.append(f"v{k} = (g + 0.25 * tanh({e})) / (1 + norm(g + 0.25 * tanh({e})))")
            lines.append(f"u{k} = mm(mm(v{k}, T(v{k})), v{k})")
            matrix.append(f"u{k}")  # its shape is p's only at run time: read by p's update alone
            continue
        lines.append(f"u{k} = {e}")
        local.append(f"u{k}")
    for n, kind in states:
        e = expr(rng, reads + local, 2)
        lines.append({"rows": f"{n} = lerp({n}, {rng.choice(ROW)}({e}), 0.3)",
                      "cols": f"{n} = lerp({n}, {rng.choice(COL)}({e}), 0.3)",
                      "scalar": f"{n} = lerp({n}, mean({e}), 0.3)",
                      "bool": f"{n} = {e} > 0",
                      "full": f"{n} = lerp({n}, {e}, 0.3)"}[kind])
    lines.append(f"p -= lr * tanh({expr(rng, reads + local + matrix, 2)})")
    return "\n".join(["optimizer Z", "hyper lr = 0.1", *decls, *lines, ""])


def _steps(cls, shapes, seed, **mode):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE) for s in shapes]
    opt = cls(params, **mode)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(DEVICE)
        opt.step()
    return params, opt


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False), shapes=st.sampled_from(SHAPES), seed=st.integers(0, 2**16))
def test_random_zoo_spec_fused_equals_foreach(rng, shapes, seed):
    text = random_spec(rng)
    note(text)
    cls = optdsl.compile(text, "random_zoo.opt")
    why = __import__(cls.__module__, fromlist=["fused_available"]).fused_available(
        [torch.zeros(s, device=DEVICE) for s in shapes])
    assert not why, f"{why}\n{text}"
    (fused, fused_opt), (ref, ref_opt) = _steps(cls, shapes, seed, fused=True), _steps(cls, shapes, seed, foreach=True)
    for a, b in zip(fused, ref):
        if not torch.isfinite(b).all():
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * (1 + b.abs().max().item()), msg=text)
        for key, value in ref_opt.state[b].items():
            got = fused_opt.state[a][key]
            assert got.dtype == value.dtype and got.shape == value.shape, (key, text)
            if torch.isfinite(value).all():
                torch.testing.assert_close(got, value, rtol=1e-9, atol=1e-9 * (1 + value.double().abs().max().item()),
                                           msg=f"state {key}\n{text}")
