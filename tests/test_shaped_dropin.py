"""Where the two language lines meet: zoo-lang's state shapes (scalar, rows, bool) in a drop-in
spec (torch.optim keywords, a tuple, saved keys, eager states), with state_dtype and compiled.

The spec below reads every state into the update, so a state made in the wrong shape, lost on
a state_dict round trip or stored under the wrong key changes the parameters; the reference is
a plain per-parameter loop written here.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import optdsl

SPEC = """\
optimizer RowAdam "Adam with a second moment per row, a step counter and the gradient's last sign"
hyper lr = 1e-3 in [0, inf)
hyper b1 = 0.9 in [0, 1), b2 = 0.999 in [0, 1)
hyper betas = (b1, b2)
hyper eps = 1e-8 in (0, inf), wd = 0 in [0, inf) as weight_decay
state m as exp_avg eager, v: rows as row_sq, s: scalar as count eager, pos: bool as positive
m = b1 * m + (1 - b1) * g
v = b2 * v + (1 - b2) * row_mean(g^2)
s += 1
p *= 1 - lr * wd
p -= lr * (s / t) * (1 + 0.5 * pos) * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
pos = g > 0
"""
SHAPES = [(1,), (7,), (13, 5), (3, 1, 4)]
STEPS = 6


@pytest.fixture(scope="module")
def RowAdam():
    return optdsl.compile(SPEC, "row_adam.opt")


def reference(params, grads, lr, betas, eps, weight_decay):
    """The update of SPEC, one parameter at a time, from the paper-style description."""
    b1, b2 = betas
    state = [dict(m=torch.zeros_like(p), v=torch.zeros(p.shape[:-1] + (1,), dtype=p.dtype), s=0.0,
                  pos=torch.zeros_like(p, dtype=torch.bool)) for p in params]
    for t, gs in enumerate(grads, 1):
        for p, g, st in zip(params, gs, state):
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["v"] = b2 * st["v"] + (1 - b2) * (g * g).mean(dim=-1, keepdim=True)
            st["s"] += 1
            p.mul_(1 - lr * weight_decay)
            p.sub_(lr * (st["s"] / t) * (1 + 0.5 * st["pos"].to(p.dtype)) * (st["m"] / (1 - b1 ** t))
                   / ((st["v"] / (1 - b2 ** t)).sqrt() + eps))
            st["pos"] = g > 0
    return params


def _grads(dtype=torch.float64, steps=STEPS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) * 10.0 ** (i - 2) for i, s in enumerate(SHAPES)]
            for _ in range(steps)]


def _params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params


def _train(make, grads, dtype=torch.float64):
    """Fresh parameters after len(grads) steps of the optimizer make(params) builds."""
    params = _params(dtype)
    return _run(make(params), params, grads)


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("kw", [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
                                dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1)])
def test_matches_reference(RowAdam, foreach, kw):
    grads = _grads()
    ours = _train(lambda ps: RowAdam(ps, foreach=foreach, **kw), grads)
    ref = reference([p.detach().clone() for p in _params()], grads, **kw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)


def test_states_have_their_shapes_keys_and_dtypes(RowAdam):
    params = _params()
    opt = RowAdam(params)
    assert set(opt.state[params[2]]) == {"step", "exp_avg", "count"}  # eager: made with the optimizer
    _run(opt, params, _grads(steps=1))
    state = opt.state[params[2]]
    assert set(state) == {"step", "exp_avg", "row_sq", "count", "positive"}
    assert state["exp_avg"].shape == (13, 5) and state["row_sq"].shape == (13, 1)
    assert state["count"].shape == () and state["positive"].dtype == torch.bool
    assert state["step"].device.type == "cpu" and state["count"].item() == 1.0
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and "weight_decay" in opt.param_groups[0]


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_state_dict_round_trip_continues_the_same_run(RowAdam, foreach):
    grads = _grads()
    a, b = _params(), _params()
    first = RowAdam(a, lr=1e-2, foreach=foreach)
    second = RowAdam(b, lr=1e-2, foreach=foreach)
    _run(first, a, grads)
    _run(second, b, grads[:3])
    saved = second.state_dict()
    assert set(saved["state"][2]) == {"step", "exp_avg", "row_sq", "count", "positive"}
    second = RowAdam(b, lr=1e-2, foreach=foreach)
    second.load_state_dict(saved)
    assert second.state[b[2]]["positive"].dtype == torch.bool  # load_state_dict casts; bool comes back
    _run(second, b, grads[3:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_bfloat16_states_of_every_shape(RowAdam, foreach):
    """state_dtype=bfloat16 stores the float states in bfloat16 whatever their shape (the bool
    one stays bool), and the run stays near the float32 one (stochastic rounding, no drift)."""
    grads = _grads(torch.float32)
    low = _params(torch.float32)
    opt = RowAdam(low, lr=1e-2, foreach=foreach, state_dtype=torch.bfloat16)
    _run(opt, low, grads)
    p = low
    dtypes = {k: v.dtype for k, v in opt.state[p[2]].items()}
    assert dtypes == {"step": torch.float32, "exp_avg": torch.bfloat16, "row_sq": torch.bfloat16,
                      "count": torch.bfloat16, "positive": torch.bool}
    high = _train(lambda ps: RowAdam(ps, lr=1e-2, foreach=foreach), grads, torch.float32)
    start = _params(torch.float32)
    for x, y, z in zip(low, high, start):  # the steps moved the parameters by about 6 * lr
        assert (x - y).abs().max() < 0.05 * (y - z).abs().max()


def test_compiled_step_is_one_graph_and_matches_eager(RowAdam):
    grads = _grads(steps=3)
    eager = _train(lambda ps: RowAdam(ps, lr=1e-2), grads)
    params = _params()
    opt = RowAdam(params, lr=1e-2)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        step()
    assert counter.frame_count >= 1
    for a, b in zip(params, eager):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15)


RULES = """\
optimizer X
hyper lr = 0.1 in [0, inf), wd = 0 in [0, inf) as weight_decay
rule ndim == 2 {
  state r: rows as row_avg, m as momentum
  r = lerp(r, row_mean(g^2), 0.5)
  m = lerp(m, g, 0.1)
  p -= lr * m / sqrt(r + 1) + lr * wd * p
}
rule {
  state m as momentum
  m = lerp(m, g, 0.1)
  p -= lr * m
}
"""


def test_rules_take_saved_keys():
    """Each rule's states are saved under their keys; a state_dict loads whichever rule made them."""
    X = optdsl.compile(RULES, "x.opt")
    a, b = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float64)), torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = X([a, b], weight_decay=0.5)
    for _ in range(2):
        a.grad, b.grad = torch.full_like(a, 2.0), torch.full_like(b, 3.0)
        opt.step()
    state = opt.state_dict()["state"]
    assert set(state[0]) == {"step", "row_avg", "momentum"} and set(state[1]) == {"step", "momentum"}
    assert opt.param_groups[0]["weight_decay"] == 0.5
    again = X([torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())])
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[again.param_groups[0]["params"][0]]["row_avg"], opt.state[a]["row_avg"])


@pytest.mark.parametrize("rule, message", [
    ("  state m as moment\n", "state 'm' is saved as 'moment' here and as 'momentum' in another rule"),
    ("  state m as momentum eager\n", "'m' is a rule's state, so it cannot be 'eager'"),
])
def test_rule_key_errors_are_located(rule, message):
    src = RULES.replace("  state m as momentum\n  m = lerp(m, g, 0.1)\n  p -= lr * m\n",
                        rule + "  m = lerp(m, g, 0.1)\n  p -= lr * m\n")
    with pytest.raises(optdsl.SpecError) as err:
        optdsl.compile_source(src, "x.opt")
    text = str(err.value)
    assert "x.opt:10:" in text and message in text and "^" in text, text


def test_rule_conditions_combine_with_and_or():
    """`and` binds tighter than `or`; a flag in a condition is a per-group switch."""
    X = optdsl.compile("optimizer X\nhyper lr = 0.1, flag = True\n"
                       "rule ndim == 2 and flag or numel > 100 and ndim < 3 {\n  p -= lr * g\n}\n"
                       "rule ndim == 1 or flag and numel > 3 {\n  p -= 2 * lr * g\n}\n"
                       "rule {\n  p -= 3 * lr * g\n}\n", "x.opt")
    shapes = [(3, 3), (200,), (5,), (2, 2, 2), (3, 3), (2, 2, 2)]
    ps = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    opt = X([{"params": ps[:2] + ps[5:]}, {"params": ps[2:5], "flag": False}])
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    # (3,3) flag: 1; (200,) numel > 100: 1; (5,) no flag: 2; (2,2,2) no flag: 3; (3,3) no flag: 3; (2,2,2) flag: 2
    assert [p.flatten()[0].item() for p in ps] == [-0.1, -0.1, -0.2, pytest.approx(-0.3), pytest.approx(-0.3), -0.2]


def test_named_choices_read_as_their_index():
    X = optdsl.compile('optimizer X\nhyper lr = 0.1 in [0, inf), mode = None | "original" | "double" as adjust\n'
                       "p -= lr * where(mode == 2, 2, 1) * g\n", "x.opt")
    for choice, step in ((None, 0.1), ("original", 0.1), ("double", 0.2)):
        p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        opt = X([p], adjust=choice)
        p.grad = torch.ones_like(p)
        opt.step()
        assert torch.equal(p.detach(), torch.full((2,), -step, dtype=torch.float64))
        assert opt.param_groups[0]["adjust"] == choice
    with pytest.raises(ValueError, match=r"Invalid adjust value: 'triple' \(adjust \(mode\) must be one of None"):
        X([p], adjust="triple")
    with pytest.raises(optdsl.SpecError, match="is not a plain name"):
        optdsl.compile_source('optimizer Y\nhyper m = None | "a b"\np -= m * g\n', "y.opt")
