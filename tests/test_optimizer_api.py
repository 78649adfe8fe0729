"""The generated optimizer classes behave as a torch.optim user expects.

Mostly specs/adamw.opt and specs/sgd.opt, compared against torch.optim.AdamW / torch.optim.SGD,
in float64 where possible and on both the single-tensor and the foreach path.
"""
from __future__ import annotations

import copy
import inspect
import io
from pathlib import Path

import pytest
import torch

import optdsl

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"

FOREACH = pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])

# torch.optim.AdamW and the generated AdamW compute sqrt(v / bc2) in a slightly different order.
TOL = dict(rtol=1e-11, atol=1e-13)


@pytest.fixture(scope="module")
def AdamW():
    return optdsl.load(SPECS / "adamw.opt")


@pytest.fixture(scope="module")
def SGD():
    return optdsl.load(SPECS / "sgd.opt")


def make_params(seed=0, dtype=torch.float64, shapes=((4, 3), (5,), ())):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def clones(params):
    return [p.detach().clone().requires_grad_() for p in params]


def make_grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params] for _ in range(steps)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def torch_adamw_kwargs(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=1e-2):
    return dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)


def assert_adam_states_close(ours, ref, p_ours, p_ref, **tol):
    s, r = ours.state[p_ours], ref.state[p_ref]
    assert float(s["step"]) == float(r["step"])
    torch.testing.assert_close(s["exp_avg"], r["exp_avg"], **tol)
    torch.testing.assert_close(s["exp_avg_sq"], r["exp_avg_sq"], **tol)


# ---------------------------------------------------------------------------------------------
# hyperparameters: keyword arguments and param_groups keys


def test_hypers_are_keyword_args_and_group_keys(AdamW, SGD):
    # The shipped specs take torch.optim's keywords (specs/adamw.opt: `as weight_decay`, `betas = (b1, b2)`).
    sig = inspect.signature(AdamW)
    expected = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
    for name, default in expected.items():
        assert sig.parameters[name].default == default
    assert sig.parameters["foreach"].kind is inspect.Parameter.KEYWORD_ONLY

    p = make_params()[0]
    opt = AdamW([p], lr=0.5, b2=0.9, wd=0.0)  # the spec's own names stay accepted
    assert isinstance(opt, torch.optim.Optimizer)
    group = opt.param_groups[0]
    assert {k: group[k] for k in expected} == {**expected, "lr": 0.5, "betas": (0.9, 0.9), "weight_decay": 0.0}
    assert opt.defaults["lr"] == 0.5 and "foreach" in group

    sgd = SGD([p], lr=0.1, momentum=0.9, nesterov=1)
    assert {k: sgd.param_groups[0][k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")} == {
        "lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0, "nesterov": 1}


# ---------------------------------------------------------------------------------------------
# learning-rate schedulers


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + 0.3 * e)),
}


@FOREACH
@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
def test_scheduler_drives_adamw_like_torch(AdamW, sched, foreach):
    params = make_params()
    ref_params = clones(params)
    hp = dict(lr=0.05, b1=0.8, b2=0.99, eps=1e-6, wd=0.1)
    ours = AdamW(params, **hp, foreach=foreach)
    ref = torch.optim.AdamW(ref_params, **torch_adamw_kwargs(**hp), foreach=False)
    s_ours, s_ref = SCHEDULERS[sched](ours), SCHEDULERS[sched](ref)
    lrs = set()
    for grads in make_grads(params, 40):
        set_grads(params, grads)
        set_grads(ref_params, grads)
        ours.step()
        ref.step()
        s_ours.step()
        s_ref.step()
        assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        lrs.add(ours.param_groups[0]["lr"])
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, **TOL)
    assert len(lrs) > 3  # the schedule really moved the learning rate
    for p, q in zip(params, ref_params):
        assert_adam_states_close(ours, ref, p, q, **TOL)


SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "dampening_wd": dict(lr=0.05, momentum=0.8, dampening=0.3, wd=0.01),
    "nesterov": dict(lr=0.05, momentum=0.9, wd=0.001, nesterov=1),
}


@FOREACH
@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_sgd_matches_torch_under_scheduler(SGD, case, foreach):
    hp = SGD_CASES[case]
    params = make_params(seed=3)
    ref_params = clones(params)
    ours = SGD(params, **hp, foreach=foreach)
    ref = torch.optim.SGD(ref_params, lr=hp["lr"], momentum=hp.get("momentum", 0),
                          dampening=hp.get("dampening", 0), weight_decay=hp.get("wd", 0),
                          nesterov=bool(hp.get("nesterov", 0)), foreach=False)
    s_ours, s_ref = SCHEDULERS["StepLR"](ours), SCHEDULERS["StepLR"](ref)
    for grads in make_grads(params, 30, seed=4):
        set_grads(params, grads)
        set_grads(ref_params, grads)
        ours.step()
        ref.step()
        s_ours.step()
        s_ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
        if hp.get("momentum"):
            torch.testing.assert_close(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                       rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# parameter groups


@FOREACH
def test_per_group_overrides_and_add_param_group(AdamW, foreach):
    a, b, c, d = make_params(seed=5, shapes=((3, 2), (4,), (2, 2), (3,)))
    ra, rb, rc, rd = clones([a, b, c, d])
    ours = AdamW([{"params": [a], "lr": 0.1, "wd": 0.0}, {"params": [b], "wd": 0.5}],
                 lr=0.01, b1=0.85, foreach=foreach)
    ref = torch.optim.AdamW([{"params": [ra], "lr": 0.1, "weight_decay": 0.0},
                             {"params": [rb], "weight_decay": 0.5}],
                            lr=0.01, betas=(0.85, 0.999), weight_decay=1e-2, foreach=False)
    assert ours.param_groups[0]["lr"] == 0.1 and ours.param_groups[0]["weight_decay"] == 0.0
    assert ours.param_groups[1]["lr"] == 0.01 and ours.param_groups[1]["weight_decay"] == 0.5

    def run(steps, ps, rps, seed):
        for grads in make_grads(ps, steps, seed=seed):
            set_grads(ps, grads)
            set_grads(rps, grads)
            ours.step()
            ref.step()

    run(10, [a, b], [ra, rb], seed=6)
    ours.add_param_group({"params": [c]})  # takes every default
    ref.add_param_group({"params": [rc]})
    ours.add_param_group({"params": [d], "b1": 0.5, "lr": 0.2})
    ref.add_param_group({"params": [rd], "betas": (0.5, 0.999), "lr": 0.2})
    added = ours.param_groups[2]
    for k in ("lr", "betas", "eps", "weight_decay", "foreach"):
        assert added[k] == ours.defaults[k]
    assert ours.param_groups[3]["betas"] == (0.5, 0.999)
    run(15, [a, b, c, d], [ra, rb, rc, rd], seed=7)

    for p, q in zip([a, b, c, d], [ra, rb, rc, rd]):
        torch.testing.assert_close(p, q, **TOL)
        assert_adam_states_close(ours, ref, p, q, **TOL)
    assert float(ours.state[a]["step"]) == 25 and float(ours.state[c]["step"]) == 15


def test_add_param_group_duplicate_param_refused(AdamW):
    a, b = make_params(shapes=((2,), (3,)))
    opt = AdamW([a])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [a, b]})


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("spec,kwargs,name", [
    ("adamw", dict(lr=-1), "lr"),
    ("adamw", dict(lr=float("nan")), "lr"),
    ("adamw", dict(b1=1.0), "b1"),
    ("adamw", dict(b1=-0.1), "b1"),
    ("adamw", dict(b2=1.5), "b2"),
    ("adamw", dict(eps=0), "eps"),
    ("adamw", dict(eps=-1e-8), "eps"),
    ("adamw", dict(wd=-0.01), "wd"),
    ("sgd", dict(lr=-0.1), "lr"),
    ("sgd", dict(momentum=-0.9), "momentum"),
    ("sgd", dict(dampening=1.01), "dampening"),
    ("sgd", dict(nesterov=2), "nesterov"),
])
def test_out_of_range_hyper_raises(AdamW, SGD, spec, kwargs, name):
    cls = {"adamw": AdamW, "sgd": SGD}[spec]
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        cls(make_params(), **kwargs)


@pytest.mark.parametrize("spec,kwargs", [
    ("adamw", dict(lr=0)),
    ("adamw", dict(lr=1e6)),
    ("adamw", dict(betas=(0.0, 0.0))),
    ("adamw", dict(betas=(0.999999, 0.999999))),
    ("adamw", dict(eps=1e-300)),
    ("adamw", dict(weight_decay=0)),
    ("sgd", dict(lr=0, momentum=0, dampening=0, weight_decay=0, nesterov=0)),
    ("sgd", dict(momentum=5.0, dampening=1, weight_decay=1e3, nesterov=True)),
])
def test_in_range_hyper_accepted(AdamW, SGD, spec, kwargs):
    cls = {"adamw": AdamW, "sgd": SGD}[spec]
    opt = cls(make_params(), **kwargs)
    for k, v in kwargs.items():
        assert opt.param_groups[0][k] == v


# ---------------------------------------------------------------------------------------------
# step() and closures


@FOREACH
def test_step_closure_returns_loss_with_grad_enabled(AdamW, foreach):
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = AdamW([w], lr=0.1, foreach=foreach)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    with torch.no_grad():  # the closure gets grad all the same
        out = opt.step(closure)
    assert seen == [True]
    assert torch.is_tensor(out) and out.item() == pytest.approx((before ** 2).sum().item())
    assert out.grad_fn is not None
    assert not torch.equal(w.detach(), before)

    w.grad = torch.ones_like(w)
    assert opt.step() is None


@FOREACH
@pytest.mark.parametrize("spec", ["adamw", "sgd"])
def test_params_without_grad_are_skipped(AdamW, SGD, spec, foreach):
    cls = {"adamw": AdamW, "sgd": SGD}[spec]
    a, b = make_params(shapes=((3,), (2, 2)))
    b_before = b.detach().clone()
    opt = cls([a, b], lr=0.1, foreach=foreach)
    a.grad = torch.ones_like(a)
    opt.step()
    assert torch.equal(b, b_before)
    assert b not in opt.state and len(opt.state) == 1
    assert float(opt.state[a]["step"]) == 1

    # a whole group without gradients is fine too
    a.grad = None
    opt.step()
    assert float(opt.state[a]["step"]) == 1 and torch.equal(b, b_before)


@FOREACH
@pytest.mark.parametrize("spec", ["adamw", "sgd"])
def test_sparse_gradients_refused(AdamW, SGD, spec, foreach):
    cls = {"adamw": AdamW, "sgd": SGD}[spec]
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2, 4])).sum().backward()
    assert emb.weight.grad.is_sparse
    opt = cls(emb.parameters(), lr=0.1, foreach=foreach)
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before)


# ---------------------------------------------------------------------------------------------
# state_dict


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _check_resume(cls, kwargs, params, grads, n, foreach, fresh_kwargs=None):
    opt = cls(params, **kwargs, foreach=foreach)
    for gs in grads[:n]:
        set_grads(params, gs)
        opt.step()
    saved = _roundtrip(opt.state_dict())
    copies = clones(params)
    # Constructed with other hyperparameters: the state_dict's param_groups must win.
    fresh = cls(copies, **(fresh_kwargs or {}), foreach=foreach)
    fresh.load_state_dict(saved)
    assert [{k: v for k, v in g.items() if k != "params"} for g in fresh.param_groups] == \
           [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    for gs in grads[n:]:
        set_grads(params, gs)
        set_grads(copies, gs)
        opt.step()
        fresh.step()
    for p, q in zip(params, copies):
        assert p.dtype == q.dtype and torch.equal(p, q)
        s, r = opt.state[p], fresh.state[q]
        assert s.keys() == r.keys()
        for k in s:
            assert s[k].dtype == r[k].dtype, k
            assert torch.equal(s[k], r[k]), k
    return opt, fresh


@FOREACH
@pytest.mark.parametrize("spec", ["adamw", "sgd"])
def test_state_dict_roundtrip_is_bit_identical(AdamW, SGD, spec, foreach):
    cls, kwargs = {"adamw": (AdamW, dict(lr=0.02, b1=0.8, wd=0.05)),
                   "sgd": (SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, nesterov=0))}[spec]
    params = make_params(seed=8)
    grads = make_grads(params, 12, seed=9)
    _check_resume(cls, kwargs, params, grads, 5, foreach, fresh_kwargs=dict(lr=0.7))


@FOREACH
def test_state_dict_roundtrip_bfloat16_keeps_float32_states(AdamW, foreach):
    params = make_params(seed=10, dtype=torch.bfloat16)
    grads = make_grads(params, 10, seed=11)
    opt, fresh = _check_resume(AdamW, dict(lr=0.01), params, grads, 4, foreach)
    for q in fresh.state:
        assert fresh.state[q]["exp_avg"].dtype == torch.float32
        assert fresh.state[q]["exp_avg_sq"].dtype == torch.float32


def test_state_dict_keys_and_hypers(AdamW):
    p = make_params()[0]
    opt = AdamW([p], lr=0.3)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # torch.optim.AdamW's keys
    assert sd["param_groups"][0]["lr"] == 0.3 and sd["param_groups"][0]["params"] == [0]


# ---------------------------------------------------------------------------------------------
# the step count is per parameter


@FOREACH
def test_step_count_is_per_parameter(AdamW, foreach):
    a, b = make_params(seed=12, shapes=((4,), (2, 3)))
    ra, rb = clones([a, b])
    ours = AdamW([a, b], lr=0.05, foreach=foreach)
    ref = torch.optim.AdamW([ra, rb], **torch_adamw_kwargs(lr=0.05), foreach=False)
    b_updates = 0
    for i, (ga, gb) in enumerate(make_grads([a, b], 20, seed=13)):
        gb = gb if i % 3 == 1 else None
        b_updates += gb is not None
        set_grads([a, b], [ga, gb])
        set_grads([ra, rb], [ga, gb])
        ours.step()
        ref.step()
    assert float(ours.state[a]["step"]) == 20
    assert float(ours.state[b]["step"]) == b_updates == 7
    for p, q in zip([a, b], [ra, rb]):
        torch.testing.assert_close(p, q, **TOL)
        assert_adam_states_close(ours, ref, p, q, **TOL)


# ---------------------------------------------------------------------------------------------
# a model


@FOREACH
def test_linear_regression_trains(AdamW, foreach):
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.3
    model = torch.nn.Linear(3, 1)
    opt = AdamW(model.parameters(), lr=0.05, foreach=foreach)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(100):
        last = opt.step(closure).item()
    assert last < 0.05 * first
    assert all(float(opt.state[p]["step"]) == 100 for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# specs that read `loss`

LOSS_SPEC = """
optimizer LossScaledSGD "SGD whose step is scaled by the loss"
hyper lr = 0.1 in [0, inf)
p -= lr * loss * g
"""


@FOREACH
def test_spec_reading_loss_needs_a_closure(foreach):
    cls = optdsl.compile(LOSS_SPEC)
    w = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    opt = cls([w], lr=0.1, foreach=foreach)
    w.grad = torch.ones_like(w)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()  # 14 at the start
        loss.backward()
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert loss.item() == 14.0
    torch.testing.assert_close(w.detach(), before - 0.1 * 14.0 * 2 * before)


# ---------------------------------------------------------------------------------------------
# low precision


@FOREACH
def test_bfloat16_uses_float32_states_and_matches_rounded_float32(AdamW, foreach):
    params = make_params(seed=14, dtype=torch.bfloat16, shapes=((8, 4), (16,)))
    ref_params = [p.detach().float().requires_grad_() for p in params]
    hp = dict(lr=0.01, wd=0.1)
    ours = AdamW(params, **hp, foreach=foreach)
    ref = AdamW(ref_params, **hp, foreach=foreach)
    for grads in make_grads(params, 20, seed=15):
        set_grads(params, grads)
        set_grads(ref_params, [g.float() for g in grads])
        ours.step()
        ref.step()
        with torch.no_grad():
            for q in ref_params:  # what the bf16 parameter stores after each step
                q.copy_(q.to(torch.bfloat16).float())
    for p, q in zip(params, ref_params):
        assert p.dtype == torch.bfloat16
        st = ours.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
        assert st["step"].dtype == torch.float32
        torch.testing.assert_close(p.float(), q, rtol=0, atol=0)
        torch.testing.assert_close(st["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(st["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-6, atol=1e-7)


def test_deepcopy_and_repr(AdamW):
    p = make_params()[0]
    opt = AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    dup = copy.deepcopy(opt)
    assert dup.param_groups[0]["lr"] == 0.1
    assert "AdamW" in repr(opt) and "lr: 0.1" in repr(opt)
