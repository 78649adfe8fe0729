"""State you can trust: load_state_dict refuses what it cannot go on from, at load and with a
clear message (never a KeyError at the next step), leaving the optimizer as it was; an older
torch.optim's numeric `step` loads; bfloat16 states round from the optimizer's own generator,
so a resumed run is bit-identical and stepping never moves torch's global random stream."""
from __future__ import annotations

import io
import pickle

import pytest
import torch

from generated.adabelief import AdaBelief  # a spec without torch.optim names
from generated.adafactor import Adafactor  # two rules, states shaped by rows and columns
from generated.adam import Adam
from generated.sgd import SGD

PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
SHAPES = [(3,), (4, 5), (2, 1, 3)]


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _params(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _train(opt, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _stepped(cls=Adam, **kw):
    ps = _params()
    opt = cls(ps, **kw)
    _train(opt, ps, 2, seed=1)
    return opt, ps


def _same(a, b):
    """Two state_dicts hold the same: keys, groups and every tensor bit for bit."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)


def _corrupt(edit):
    def make(saved):
        edit(saved)
        return saved
    return make


# case -> (how the saved dict is spoiled, the message that says so)
CASES = {
    "not a state_dict": (lambda s: [1, 2], "not an optimizer's state_dict"),
    "no param_groups": (lambda s: {"state": s["state"]}, "not an optimizer's state_dict"),
    "a group fewer": (_corrupt(lambda s: s["param_groups"].append(dict(s["param_groups"][0], params=[]))),
                      "2 parameter groups, this optimizer 1"),
    "a parameter fewer": (_corrupt(lambda s: s["param_groups"][0]["params"].pop()), "holds 2 parameters"),
    "a hyperparameter out of range": (_corrupt(lambda s: s["param_groups"][0].update(lr=-1.0)),
                                      "Invalid lr value: -1.0"),
    "a state of another optimizer": (_corrupt(lambda s: s["state"][0].update(momentum_buffer=torch.zeros(3))),
                                     "states \\['momentum_buffer'\\] that Adam does not keep"),
    "a state of the wrong shape": (_corrupt(lambda s: s["state"][1].update(exp_avg=torch.zeros(5, 4))),
                                   "'exp_avg' of parameter 1 has shape \\(5, 4\\); for a parameter of shape "
                                   "\\(4, 5\\) it is \\(4, 5\\)"),
    "a state missing": (_corrupt(lambda s: s["state"][1].pop("exp_avg")),
                        "parameter 1 has no \\['exp_avg'\\] \\(it has \\['exp_avg_sq', 'step'\\]\\), which Adam reads"),
    "a state of integers": (_corrupt(lambda s: s["state"][0].update(exp_avg_sq=torch.zeros(3, dtype=torch.int64))),
                            "'exp_avg_sq' of parameter 0 is torch.int64, not a real floating-point tensor"),
    "a state that is no tensor": (_corrupt(lambda s: s["state"][0].update(exp_avg=[0.0, 0.0, 0.0])),
                                  "'exp_avg' of parameter 0 is list"),
    "a step that is no number": (_corrupt(lambda s: s["state"][2].update(step="3")), "step is '3', not a number"),
    # red-team (issue 12): a nan step loaded and made every parameter nan at the next step, a negative
    # one stopped it with "math domain error"; a hyperparameter that is no number was a TypeError of
    # the range's comparison; lr=inf passed the range [0, inf) and the step wrote nan
    "a step that is nan": (_corrupt(lambda s: s["state"][2].update(step=torch.tensor(float("nan")))),
                           "step is nan, not a count of steps"),
    "a negative step": (_corrupt(lambda s: s["state"][0].update(step=torch.tensor(-5.0))),
                        "step is -5.0, not a count of steps"),
    "an infinite step": (_corrupt(lambda s: s["state"][0].update(step=float("inf"))), "step is inf, not a count"),
    "a hyperparameter that is no number": (_corrupt(lambda s: s["param_groups"][0].update(lr="1e-3")),
                                           "Invalid lr value: '1e-3' \\(lr must be a number\\)"),
    "a hyperparameter that is None": (_corrupt(lambda s: s["param_groups"][0].update(eps=None)),
                                      "Invalid eps value: None"),
    "a tuple member that is no number": (_corrupt(lambda s: s["param_groups"][0].update(betas=(0.9, "x"))),
                                         "Invalid betas\\[1\\] value: 'x'"),
    "an infinite learning rate": (_corrupt(lambda s: s["param_groups"][0].update(lr=float("inf"))),
                                  "Invalid lr value: inf \\(lr must be in \\[0, inf\\)\\)"),
    "a broken generator state": (_corrupt(lambda s: s.update(rng_state=torch.zeros(3, dtype=torch.uint8))),
                                 "'rng_state' is not a CPU generator's state"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_spoiled_state_dict_is_refused_at_load_and_changes_nothing(case):
    spoil, message = CASES[case]
    src, _ = _stepped(state_dtype=torch.bfloat16)
    dst, ps = _stepped()
    before = _roundtrip(dst.state_dict())
    with pytest.raises(ValueError, match=message):
        dst.load_state_dict(spoil(_roundtrip(src.state_dict())))
    _same(dst.state_dict(), before)
    _train(dst, ps, 1, seed=5)  # and it goes on


def test_another_optimizers_state_dict_is_refused_both_ways():
    ref = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    _train(ref, ref.param_groups[0]["params"], 2, seed=1)
    ours, _ = _stepped()
    with pytest.raises(ValueError, match="'momentum_buffer'\\] that Adam does not keep .*another optimizer"):
        ours.load_state_dict(ref.state_dict())
    sgd = SGD(_params(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="that SGD does not keep"):
        sgd.load_state_dict(_roundtrip(ours.state_dict()) | {"param_groups": sgd.state_dict()["param_groups"]})


def test_a_spec_without_torch_names_checks_as_well():
    """No drop-in: every state is required once a parameter has stepped (its lazy start reads them
    all), and the groups' hyperparameters are range-checked at load as at construction."""
    src, _ = _stepped(AdaBelief)
    for edit, message in [(lambda s: s["state"][0].pop("m"), "parameter 0 has states but not \\['m'\\]"),
                          (lambda s: s["state"][1].pop("step"), "parameter 1 has states but not \\['step'\\]"),
                          (lambda s: s["param_groups"][0].update(b1=1.5), "Invalid b1 value: 1.5"),
                          (lambda s: s["param_groups"][0].pop("eps"), "has no eps")]:
        saved = _roundtrip(src.state_dict())
        edit(saved)
        dst, ps = _stepped(AdaBelief)
        with pytest.raises(ValueError, match=message):
            dst.load_state_dict(saved)
        _train(dst, ps, 1, seed=5)
    with pytest.raises(ValueError, match="Invalid b1 value"):  # a group added later is checked too
        src.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "b1": 2.0})


def test_states_shaped_by_rows_and_columns_are_checked_by_rule():
    src, _ = _stepped(Adafactor)
    saved = _roundtrip(src.state_dict())
    key = next(k for k in saved["state"][1] if k != "step")  # of the (4, 5) matrix: a row or column state
    saved["state"][1][key] = torch.zeros(4, 5)
    dst, _ = _stepped(Adafactor)
    with pytest.raises(ValueError, match=f"'{key}' of parameter 1 has shape \\(4, 5\\)"):
        dst.load_state_dict(saved)


@pytest.mark.parametrize("path", list(PATHS))
def test_an_older_torch_step_as_a_number_loads(path):
    """torch.optim before 1.12 saved `step` as a Python number; its __setstate__ takes it, so ours does."""
    init = _params()
    ref = torch.optim.Adam([torch.nn.Parameter(x.detach().clone()) for x in init], lr=0.01, foreach=False)
    _train(ref, ref.param_groups[0]["params"], 3, seed=1)
    old = _roundtrip(ref.state_dict())
    for s in old["state"].values():
        s["step"] = int(s["step"])
    ps = [torch.nn.Parameter(q.detach().clone()) for q in ref.param_groups[0]["params"]]
    ours = Adam(ps, **PATHS[path])
    ours.load_state_dict(old)
    step = ours.state[ps[0]]["step"]
    assert torch.is_tensor(step) and float(step) == 3.0
    assert step.device == ps[0].device and step.dtype == torch.float32
    _train(ours, ps, 2, seed=2)
    _train(ref, ref.param_groups[0]["params"], 2, seed=2)
    for p, q in zip(ps, ref.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # float32, several paths' orders


@pytest.mark.parametrize("path", list(PATHS))
def test_bfloat16_states_resume_bit_for_bit_without_the_global_rng(path):
    """Seven steps straight, or three, a save, and four more in a new optimizer while torch's global
    generator is somewhere else: the same bits, parameters and states."""
    kw = dict(lr=0.01, weight_decay=0.1, state_dtype=torch.bfloat16, **PATHS[path])
    torch.manual_seed(0)
    a = _params()
    straight = Adam(a, **kw)
    _train(straight, a, 3, seed=1)
    saved = _roundtrip(straight.state_dict())
    assert "rng_state" in saved
    mid = [p.detach().clone() for p in a]
    _train(straight, a, 4, seed=2)

    torch.manual_seed(1234)  # the user's generator is elsewhere now
    torch.rand(17)
    b = [torch.nn.Parameter(x) for x in mid]
    resumed = Adam(b, **kw)
    resumed.load_state_dict(saved)
    _train(resumed, b, 4, seed=2)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    for p, q in zip(a, b):
        for key in ("exp_avg", "exp_avg_sq"):
            assert straight.state[p][key].dtype == torch.bfloat16
            assert torch.equal(straight.state[p][key], resumed.state[q][key])
    # without the saved generator the rounding differs (so the test above could fail)
    c = [torch.nn.Parameter(x.clone()) for x in mid]
    fresh = Adam(c, **kw)
    fresh.load_state_dict({k: v for k, v in saved.items() if k != "rng_state"})
    fresh._rng.manual_seed(99)
    _train(fresh, c, 4, seed=2)
    assert any(not torch.equal(straight.state[p]["exp_avg"], fresh.state[q]["exp_avg"]) for p, q in zip(a, c))


@pytest.mark.parametrize("path", list(PATHS))
def test_stepping_leaves_the_global_rng_alone(path):
    torch.manual_seed(3)
    before = torch.get_rng_state()
    ps = _params()
    opt = Adam(ps, state_dtype=torch.bfloat16, **PATHS[path])
    _train(opt, ps, 3, seed=1)
    opt.load_state_dict(opt.state_dict())
    assert torch.equal(torch.get_rng_state(), before)


def test_the_generator_travels_with_a_pickled_optimizer():
    ps = _params()
    opt = Adam(ps, lr=0.01, state_dtype=torch.bfloat16, foreach=True)
    _train(opt, ps, 2, seed=1)
    copy_ps, copy = pickle.loads(pickle.dumps((ps, opt)))
    _train(opt, ps, 2, seed=2)
    _train(copy, copy_ps, 2, seed=2)
    for p, q in zip(ps, copy_ps):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["exp_avg"], copy.state[q]["exp_avg"])


def test_state_dict_is_torchs_without_bfloat16_states():
    """The generator is saved only where it decides something, so a state_dict is torch.optim's."""
    opt, _ = _stepped()
    assert set(opt.state_dict()) == {"state", "param_groups"}


from generated.muon import Muon  # noqa: E402
from generated.rmsprop import RMSprop  # noqa: E402

# (ours, torch.optim's, keywords, shapes): every state torch.optim saves, taken away one at a time
TORCH_STATES = {
    "adam-amsgrad": (Adam, torch.optim.Adam, dict(lr=0.01, amsgrad=True), SHAPES),
    "muon": (Muon, torch.optim.Muon, dict(lr=0.01), [(4, 5), (3, 2)]),
    "adafactor": (Adafactor, torch.optim.Adafactor, dict(lr=0.01), SHAPES),
    "rmsprop-centered-momentum": (RMSprop, torch.optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.9), SHAPES),
    "sgd-momentum": (SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9), SHAPES),
}


@pytest.mark.parametrize("case", list(TORCH_STATES))
def test_a_state_dict_missing_a_state_is_refused_at_load(case):
    """Each state torch.optim's state_dict (and ours) holds, removed: a clear ValueError at load
    naming it (never a silent restart from zero, nor a KeyError at the next step), the optimizer
    left as it was. A parameter left with no state at all reads as one never stepped, as in torch
    (torch.optim.SGD and Muon save momentum_buffer alone, so their own dicts are checked from ours)."""
    Ours, Torch, kw, shapes = TORCH_STATES[case]
    ref_params = _params(shapes=shapes)
    ref = Torch(ref_params, **kw)
    _train(ref, ref_params, 2, seed=1)
    mine, mine_params = Ours(_params(shapes=shapes), **kw), None
    _train(mine, mine.param_groups[0]["params"], 2, seed=1)
    tried = 0
    for saved in (_roundtrip(ref.state_dict()), _roundtrip(mine.state_dict())):
        for key in [k for k in saved["state"][0] if k != "step"]:
            spoiled = _roundtrip(saved)
            del spoiled["state"][0][key]
            if not spoiled["state"][0]:
                continue
            ps = _params(shapes=shapes)
            ours = Ours(ps, **kw)
            ours.load_state_dict(_roundtrip(saved))  # the whole one loads
            before = _roundtrip(ours.state_dict())
            with pytest.raises(ValueError, match=f"parameter 0 has no \\['{key}'\\].*reads at its next step"):
                ours.load_state_dict(spoiled)
            _same(ours.state_dict(), before)
            _train(ours, ps, 1, seed=5)
            tried += 1
    assert tried >= 1


@pytest.mark.parametrize("Ours, Torch, kw", [
    (RMSprop, torch.optim.RMSprop, dict(lr=0.01)),  # no grad_avg (not centered), no momentum_buffer
    (RMSprop, torch.optim.RMSprop, dict(lr=0.01, centered=True)),  # no momentum_buffer
    (SGD, torch.optim.SGD, dict(lr=0.1)),  # momentum_buffer None, no step
])
def test_states_torch_leaves_out_where_they_are_unread_still_load(Ours, Torch, kw):
    """torch.optim omits a state its settings never read; such a state_dict loads and the run goes
    on as torch's does (the states the step reads under the loaded values are all there)."""
    ref_params = _params()
    ref = Torch(ref_params, **kw)
    _train(ref, ref_params, 2, seed=1)
    ps = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    ours = Ours(ps, **kw)
    ours.load_state_dict(_roundtrip(ref.state_dict()))
    _train(ref, ref_params, 2, seed=7)
    _train(ours, ps, 2, seed=7)
    for a, b in zip(ps, ref_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    if kw.get("centered") is None and Ours is RMSprop:  # a centered group needs grad_avg, which is not there
        saved = _roundtrip(ref.state_dict())
        saved["param_groups"][0]["centered"] = True
        with pytest.raises(ValueError, match="has no \\['grad_avg'\\]"):
            Ours(_params(), **kw).load_state_dict(saved)

# drop-ins whose update reads the step count (bias corrections, schedules), with a keyword that
# makes every state they keep (Adam's amsgrad), and a shape their counting rule takes
STEP_READERS = {"adam": ("Adam", dict(amsgrad=True), (4, 5)), "adamw": ("AdamW", dict(amsgrad=True), (4, 5)),
                "adamax": ("Adamax", {}, (4, 5)), "nadam": ("NAdam", {}, (4, 5)), "radam": ("RAdam", {}, (4, 5)),
                "adafactor": ("Adafactor", {}, (4, 5)), "asgd": ("ASGD", {}, (4, 5)),
                "adagrad": ("Adagrad", dict(lr_decay=0.1), (4, 5)),
                "muon": ("Muon", {}, (5,))}  # Muon's AdamW rule (not its matrices: torch.optim.Muon keeps no step)


@pytest.mark.parametrize("module", list(STEP_READERS))
def test_a_started_state_without_its_step_is_refused_by_every_dropin(module):
    """Without `step` the count would restart at 1 (bias corrections as at the first step): torch.optim
    fails at the next step with a KeyError, ours at load, naming the parameter, and stays as it was."""
    import importlib
    name, kw, shape = STEP_READERS[module]
    cls = getattr(importlib.import_module(f"generated.{module}"), name)
    ps = _params(shapes=[(3,), shape])
    src = cls(ps, **kw)
    _train(src, ps, 2, seed=1)
    saved = _roundtrip(src.state_dict())
    assert "step" in saved["state"][1] and len(saved["state"][1]) > 1
    saved["state"][1].pop("step")
    qs = _params(shapes=[(3,), shape])
    dst = cls(qs, **kw)
    _train(dst, qs, 1, seed=2)
    before = _roundtrip(dst.state_dict())
    with pytest.raises(ValueError, match="parameter 1 has states .* but no step, which its update reads"):
        dst.load_state_dict(saved)
    _same(dst.state_dict(), before)
    saved["state"][1]["step"] = torch.tensor(2.0)  # with it, it loads
    dst.load_state_dict(saved)


def test_torch_sgd_state_without_step_still_loads():
    """torch.optim.SGD keeps no step (momentum_buffer alone): its state_dict loads into ours."""
    ref = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    _train(ref, ref.param_groups[0]["params"], 2, seed=1)
    assert all("step" not in s for s in ref.state_dict()["state"].values())
    ours = SGD(_params(), lr=0.1, momentum=0.9)
    ours.load_state_dict(_roundtrip(ref.state_dict()))


@pytest.mark.parametrize("path", PATHS)
def test_a_group_state_of_a_spec_without_torch_names_loads_before_and_after_the_first_step(path):
    """A group state (`state k: group`) goes into param_groups at the first step, so a state_dict saved
    before it has none: the load check required it as a hyperparameter, and refused the state_dict of
    a fresh optimizer of the same class (red-team, issue 12)."""
    import optdsl
    cls = optdsl.compile("optimizer GroupDecay\nhyper lr = 0.1\nstate k: group = 1\ngroup k = k * 0.5\n"
                         "p -= lr * k * g\n", "group_decay.opt")
    (p,) = _params(shapes=[(3,)])
    fresh = cls([p], **PATHS[path])
    cls([p], **PATHS[path]).load_state_dict(_roundtrip(fresh.state_dict()))
    p.grad = torch.ones(3)
    fresh.step()
    resumed = cls([p], **PATHS[path])
    resumed.load_state_dict(_roundtrip(fresh.state_dict()))
    fresh.step()
    resumed.step()
    assert resumed.param_groups[0]["k"] == fresh.param_groups[0]["k"] == 0.25
    saved = _roundtrip(fresh.state_dict())
    saved["param_groups"][0].pop("lr")
    with pytest.raises(ValueError, match="has no lr"):  # a hyperparameter is still required
        cls([p]).load_state_dict(saved)


def test_a_range_that_includes_inf_or_is_not_written_still_takes_it():
    """`in (0, inf]` (LAMB's max_w) takes inf; a hyperparameter with no range (Rprop's step_max) takes
    any number; Adafactor's eps1 takes its None; a range written open at inf refuses it."""
    from generated.adafactor import Adafactor as TorchNamedAdafactor
    from generated.lamb import LAMB
    from generated.rprop import Rprop
    for make in (lambda ps: LAMB(ps, max_w=float("inf")), lambda ps: Rprop(ps, step_sizes=(1e-6, float("inf"))),
                 lambda ps: TorchNamedAdafactor(ps, eps=(None, 1e-3))):
        ps = _params()
        _train(make(ps), ps, 2, seed=0)
    with pytest.raises(ValueError, match="Invalid lr value: inf"):
        Adam(_params(), lr=float("inf"))
    with pytest.raises(ValueError, match="Invalid eps\\[1\\] value: None"):
        TorchNamedAdafactor(_params(), eps=(None, None))
