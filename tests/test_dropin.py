"""The shipped counterparts of torch.optim's optimizers are drop-ins for them: Adam, AdamW, SGD,
RMSprop, Adagrad, Adamax, NAdam, RAdam, Adadelta, Rprop, ASGD and Adafactor.

Each case constructs ours with exactly the keyword arguments torch.optim takes; a state_dict
saved by torch.optim (after some steps) loads into ours and both go on identically, and the
reverse. Parameters are float64 of awkward shapes, gradients differ in scale, one parameter
skips some steps and another has no gradient before the save (so it has no state then, except
in Adagrad, which makes its state at construction); the comparison is relative to the largest
value of a tensor, at 1e-12.
"""
from __future__ import annotations

import inspect
import io
import os
from pathlib import Path

import pytest
import torch

import optdsl
from optdsl.errors import SpecError
from test_differential import ON_GPU, run_pair  # the shared step-by-step checker

SPECS = Path(__file__).resolve().parent.parent / "specs"
SHAPES = [(1,), (7,), (13, 5), (3, 1, 4)]
TOL = 1e-12
T = torch.optim

# case id -> (spec, torch.optim class, keyword arguments exactly as torch.optim takes them)
CASES = {
    "adam": ("adam", T.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=False)),
    "adam-defaults": ("adam", T.Adam, dict()),
    "adamw": ("adamw", T.AdamW, dict(lr=0.02, betas=(0.5, 0.9), eps=1e-7, weight_decay=0.3)),
    "sgd-momentum": ("sgd", T.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    "sgd-nesterov": ("sgd", T.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1)),
    "sgd-plain": ("sgd", T.SGD, dict(lr=0.1)),
    "rmsprop-centered-momentum": ("rmsprop", T.RMSprop,
                                  dict(lr=0.005, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5,
                                       centered=True)),
    "rmsprop-plain": ("rmsprop", T.RMSprop, dict(lr=0.01, alpha=0.95)),
    "adagrad": ("adagrad", T.Adagrad,
                dict(lr=0.2, lr_decay=0.01, weight_decay=0.02, initial_accumulator_value=0.1, eps=1e-8)),
    "adamax": ("adamax", T.Adamax, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    "adamax-defaults": ("adamax", T.Adamax, dict()),
    "nadam": ("nadam", T.NAdam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, momentum_decay=0.01)),
    "nadam-decoupled": ("nadam", T.NAdam, dict(lr=0.01, weight_decay=0.3, decoupled_weight_decay=True)),
    "nadam-defaults": ("nadam", T.NAdam, dict()),
    "radam": ("radam", T.RAdam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    "radam-decoupled": ("radam", T.RAdam, dict(lr=0.01, betas=(0.9, 0.9), weight_decay=0.3,
                                               decoupled_weight_decay=True)),
    "radam-defaults": ("radam", T.RAdam, dict()),
    "adadelta": ("adadelta", T.Adadelta, dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.1)),
    "adadelta-defaults": ("adadelta", T.Adadelta, dict()),
    "rprop": ("rprop", T.Rprop, dict(lr=0.02, etas=(0.3, 1.5), step_sizes=(1e-3, 0.05))),
    "rprop-defaults": ("rprop", T.Rprop, dict()),
    "asgd": ("asgd", T.ASGD, dict(lr=0.05, lambd=0.01, alpha=0.5, t0=3, weight_decay=0.1)),
    "asgd-defaults": ("asgd", T.ASGD, dict()),
    "adafactor": ("adafactor", T.Adafactor, dict(lr=0.05, beta2_decay=-0.5, eps=(1e-12, 1e-2), d=2.0,
                                                  weight_decay=0.1)),
    "adafactor-defaults": ("adafactor", T.Adafactor, dict()),  # eps=(None, 1e-3): float64's epsilon here
    # AMSGrad is torch.optim.Adam(amsgrad=True), and with decoupled_weight_decay AdamW(amsgrad=True)
    "amsgrad": ("amsgrad", T.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True)),
    "amsgrad-decoupled": ("amsgrad", T.Adam, dict(lr=0.01, weight_decay=0.3, amsgrad=True,
                                                  decoupled_weight_decay=True)),
    # torch.optim.Adam's decoupled_weight_decay=True is AdamW's decay, per group, with and without amsgrad
    "adam-decoupled": ("adam", T.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.3,
                                            decoupled_weight_decay=True)),
    "adam-amsgrad-decoupled": ("adam", T.Adam, dict(lr=0.01, weight_decay=0.3, amsgrad=True,
                                                    decoupled_weight_decay=True)),
    # ... and Adam and AdamW take amsgrad=True themselves (their second rule), as torch users pass it
    "adam-amsgrad": ("adam", T.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True)),
    "adamw-amsgrad": ("adamw", T.AdamW, dict(lr=0.02, betas=(0.5, 0.9), weight_decay=0.3, amsgrad=True)),
    # maximize=True: every drop-in steps with -g (decided once, in the template), as torch.optim
    "adamw-maximize": ("adamw", T.AdamW, dict(lr=0.02, weight_decay=0.3, amsgrad=True, maximize=True)),
    "sgd-maximize": ("sgd", T.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)),
    "rprop-maximize": ("rprop", T.Rprop, dict(lr=0.02, maximize=True)),
    "adafactor-maximize": ("adafactor", T.Adafactor, dict(lr=0.05, weight_decay=0.1, maximize=True)),
}


# torch.optim keeps its scalar states (step, NAdam's mu_product, ASGD's eta and mu) in the default
# dtype and computes them there: float64 for every test here, so a float64 comparison is exact
pytestmark = pytest.mark.usefixtures("float64_default")


def spec(name):
    return optdsl.load(SPECS / f"{name}.opt")


# Beside torch.optim step by step (tests/test_differential.py covers the older five): many steps,
# every path, each setting above; run_pair's tolerance is relative 1e-10 in float64, 1e-5 in float32.
NEW = {"adamax", "nadam", "radam", "adadelta", "rprop", "asgd", "adafactor", "amsgrad", "adam-amsgrad", "adamw-amsgrad", "adam-decoupled", "adam-amsgrad-decoupled",
       "adamw-maximize", "sgd-maximize", "rprop-maximize"}
STEPS, FUSED_STEPS = 60, 8  # the fused path runs under the Triton interpreter on CPU


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] in NEW or c in NEW])
def test_matches_torch_step_by_step(case, dtype):
    name, Torch, kwargs = CASES[case]
    Ours = spec(name)
    run_pair(lambda ps, **mode: Ours(ps, **kwargs, **mode), lambda ps: Torch(ps, **kwargs, foreach=False),
             SHAPES, dtype, STEPS, seed=len(case))


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] in NEW or c in NEW])
def test_fused_matches_torch(case):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")
    name, Torch, kwargs = CASES[case]
    Ours = spec(name)
    run_pair(lambda ps, **mode: Ours(ps, **kwargs, **mode), lambda ps: Torch(ps, **kwargs, foreach=False),
             SHAPES, torch.float64, STEPS if ON_GPU else FUSED_STEPS, seed=len(case), fused=True)


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _grads(steps, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        row = []
        for i, s in enumerate(SHAPES):
            g = torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** (i - 2)
            # (3, 1, 4) has no gradient before the state_dict is saved (after 3 steps)
            row.append(None if i == 1 and step % 3 == 2 or i == 3 and step < 3 else g)
        out.append(row)
    return out


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()


def _close(ours, ref, what):
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item() / (scale + 1e-300)
    assert err <= TOL, f"{what}: relative error {err:.3e}"


def _resume(first, second, before=3, after=5, seed=0):
    """Step `first` (a factory of params -> optimizer) `before` times, load its state_dict into
    `second`, then step a copy of both sides `after` more times; they must stay together."""
    gen = torch.Generator().manual_seed(seed + 1)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = _grads(before + after, seed)
    a = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = first(a)
    for row in grads[:before]:
        _step(opt_a, a, row)
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    opt_b = second(b)
    opt_b.load_state_dict(_roundtrip(opt_a.state_dict()))
    for row in grads[before:]:
        _step(opt_a, a, row)
        _step(opt_b, b, row)
    for i, (p, q) in enumerate(zip(a, b)):
        _close(q, p, f"parameter {i} {tuple(p.shape)}")
    return opt_a, opt_b, a, b


def _kept(Torch, kwargs):
    """The state keys torch.optim keeps itself with these settings (SGD: no step; RMSprop:
    grad_avg only when centered; Adafactor: row_var and col_var for matrices, variance for the
    rest): others it was given by a state_dict stay as they were."""
    ps = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, 2))]
    opt = Torch(ps, **kwargs)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    return set().union(*(opt.state[p] for p in ps))


def _compare_states(ours, ref, ps, qs, kept):
    """Every state torch.optim keeps is in ours under the same key, with the same values."""
    for i, (p, q) in enumerate(zip(ps, qs)):
        for key, value in ref.state[q].items():
            if key in kept:
                assert key in ours.state[p], f"ours has no state {key!r}"
                _close(ours.state[p][key].to(value.dtype), value, f"state {key!r} of parameter {i}")


@pytest.mark.parametrize("case", list(CASES))
def test_takes_torch_keywords_and_defaults(case):
    name, Torch, kwargs = CASES[case]
    Ours = spec(name)
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    ours, ref = Ours([p], **kwargs), Torch([torch.nn.Parameter(p.detach().clone())], **kwargs)
    ours_sig, theirs = inspect.signature(Ours).parameters, inspect.signature(Torch).parameters
    for key, param in theirs.items():  # every torch.optim keyword, with its default
        assert key in ours_sig, f"{Ours.__name__} lacks torch.optim's {key}"
        if name == "amsgrad" and key in ("amsgrad", "decoupled_weight_decay", "weight_decay"):
            continue  # AMSGrad is Adam(amsgrad=True) (and AdamW(amsgrad=True), whose defaults differ)
        if key not in ("params", "foreach", "fused"):  # ours pick their own paths
            assert ours_sig[key].default == param.default, key
    flags = {"foreach", "fused", "maximize", "capturable", "differentiable"}  # keyword-only in ours
    positional = [k for k, v in theirs.items() if v.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                  and k not in flags]
    assert list(ours_sig)[:len(positional)] == positional
    # beyond torch.optim's: the spec's aliases, torch.optim's flags other classes have, bfloat16 and
    # low-bit states, and whether low-bit states checkpoint as their numbers (reshardable)
    assert set(ours_sig) - set(theirs) <= {"spec_names", "state_dtype", "reshardable"} | flags
    group, torch_group = ours.param_groups[0], ref.param_groups[0]
    for key in ours_sig:
        if key in torch_group and key != "params":
            assert group[key] == torch_group[key], key  # param_groups hold torch.optim's names


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_state_dict_loads_into_ours_and_continues(case, foreach):
    name, Torch, kwargs = CASES[case]
    Ours = spec(name)
    ref, ours, a, b = _resume(lambda ps: Torch(ps, **kwargs, foreach=False),
                              lambda ps: Ours(ps, lr=0.123, foreach=foreach), seed=len(case))
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]  # the saved groups win
    _compare_states(ours, ref, b, a, _kept(Torch, kwargs))


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", list(CASES))
def test_our_state_dict_loads_into_torch_and_continues(case, foreach):
    name, Torch, kwargs = CASES[case]
    Ours = spec(name)
    ours, ref, a, b = _resume(lambda ps: Ours(ps, **kwargs, foreach=foreach),
                              lambda ps: Torch(ps, lr=0.123, foreach=False), seed=2 * len(case))
    assert ref.param_groups[0]["lr"] == ours.param_groups[0]["lr"]
    _compare_states(ours, ref, a, b, _kept(Torch, kwargs))


def test_positional_arguments_as_torch():
    Adam = spec("adam")
    ps = [torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]
    group = Adam(ps, 0.01, (0.8, 0.9), 1e-6, 0.1).param_groups[0]
    ref = T.Adam(ps, 0.01, (0.8, 0.9), 1e-6, 0.1).param_groups[0]
    assert {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")} == {
        k: ref[k] for k in ("lr", "betas", "eps", "weight_decay")}


@pytest.mark.parametrize("name,keyword", [("adam", "beta1"), ("sgd", "wdecay"), ("adagrad", "betas")])
def test_wrong_keyword_is_a_type_error_naming_the_accepted(name, keyword):
    Ours = spec(name)
    with pytest.raises(TypeError) as err:
        Ours([torch.nn.Parameter(torch.ones(2))], **{keyword: 0.5})
    text = str(err.value)
    assert repr(keyword) in text
    for accepted in ("lr", "weight_decay", "foreach", "maximize", "state_dtype", "reshardable"):
        assert accepted in text  # every keyword __init__ takes, optdsl's own ones too


def test_spec_names_stay_accepted_as_aliases():
    AdamW = spec("adamw")
    a, b = (torch.nn.Parameter(torch.ones(2)) for _ in range(2))
    opt = AdamW([a], b2=0.9, wd=0.5)
    assert opt.param_groups[0]["betas"] == (0.9, 0.9) and opt.param_groups[0]["weight_decay"] == 0.5
    assert "b2" not in opt.param_groups[0] and "wd" not in opt.param_groups[0]
    opt.add_param_group({"params": [b], "b1": 0.5, "wd": 0.0})  # per group, too
    assert opt.param_groups[1]["betas"] == (0.5, 0.9) and opt.param_groups[1]["weight_decay"] == 0.0


def test_flags_take_booleans_and_refuse_other_values():
    SGD, RMSprop = spec("sgd"), spec("rmsprop")
    p = torch.nn.Parameter(torch.ones(2))
    assert SGD([p], momentum=0.9, nesterov=True).param_groups[0]["nesterov"] is True
    assert RMSprop([p], centered=True).param_groups[0]["centered"] is True
    with pytest.raises(ValueError, match=r"nesterov.*True or False"):
        SGD([p], nesterov=2)
    with pytest.raises(ValueError, match=r"centered.*True or False"):
        RMSprop([p], centered=0.5)
    with pytest.raises(ValueError, match=r"betas.*2 values"):
        spec("adam")([p], betas=(0.9,))
    with pytest.raises(ValueError, match=r"weight_decay \(wd\)"):  # per-group values are checked too
        SGD([{"params": [p], "weight_decay": -1.0}])


@pytest.mark.parametrize("name,kwargs,what", [
    ("amsgrad", dict(amsgrad=False), "amsgrad=False"),
    ("adamw", dict(capturable=True), "capturable=True"),
    ("sgd", dict(differentiable=True), "differentiable=True"),
    ("rmsprop", dict(capturable=True), "capturable=True"),
])
def test_torch_features_not_implemented_are_refused(name, kwargs, what):
    Ours = spec(name)
    with pytest.raises(ValueError, match=f"does not implement {what}"):
        Ours([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_torch_state_dict_with_a_feature_not_implemented_is_refused():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    ref = T.Adam([p], lr=0.1, amsgrad=False)
    p.grad = torch.ones_like(p)
    ref.step()
    ours = spec("amsgrad")([torch.nn.Parameter(p.detach().clone())])
    with pytest.raises(ValueError, match="does not implement amsgrad=False"):
        ours.load_state_dict(ref.state_dict())


def test_sgd_state_without_momentum_buffer_or_step():
    """torch.optim.SGD keeps no step and, before its first step with momentum, no buffer."""
    SGD = spec("sgd")
    # Saved before any step: nothing is there; both sides then start the buffer afresh.
    _resume(lambda ps: T.SGD(ps, lr=0.1, momentum=0.9, foreach=False), lambda ps: SGD(ps), before=0)
    # Saved after steps without momentum (no buffer kept), resumed with momentum.
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(5, generator=gen, dtype=torch.float64)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ref = T.SGD([a], lr=0.1, foreach=False)
    for _ in range(2):
        a.grad = torch.randn(5, generator=gen, dtype=torch.float64)
        ref.step()
    assert len(ref.state_dict()["state"]) == 0
    b.data.copy_(a.data)
    ours = SGD([b])
    ours.load_state_dict(ref.state_dict())
    for opt in (ref, ours):
        opt.param_groups[0]["momentum"] = 0.9
    for _ in range(4):
        g = torch.randn(5, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    _close(b, a, "parameter")
    _close(ours.state[b]["momentum_buffer"], ref.state[a]["momentum_buffer"], "momentum_buffer")


def test_state_dict_with_the_spec_names_still_loads():
    """A state_dict saved under the spec's names (before the specs named torch.optim's) loads."""
    AdamW = spec("adamw")
    ps = [torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(2)]
    opt = AdamW(ps, lr=0.01, betas=(0.8, 0.9), weight_decay=0.2)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    new = opt.state_dict()
    names = {"exp_avg": "m", "exp_avg_sq": "v"}
    old = {"state": {i: {names.get(k, k): v for k, v in s.items()} for i, s in new["state"].items()},
           "param_groups": [{**{k: v for k, v in g.items() if k not in ("betas", "weight_decay")},
                             "b1": g["betas"][0], "b2": g["betas"][1], "wd": g["weight_decay"]}
                            for g in new["param_groups"]]}
    fresh = AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps])
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.9) and fresh.param_groups[0]["weight_decay"] == 0.2
    for p, q in zip(ps, fresh.param_groups[0]["params"]):
        assert torch.equal(fresh.state[q]["exp_avg"], opt.state[p]["exp_avg"])


# ---------------------------------------------------------------------------------------------
# the language: keywords, tuples, flags, `only` and saved keys

HEAD = "optimizer X\nhyper lr = 1e-3 in [0, inf), b1 = 0.9 in [0, 1), b2 = 0.99 in [0, 1)\n"
BODY = "state m\nm = lerp(m, g, 1 - b1)\np -= lr * b2 * m\n"


@pytest.mark.parametrize("decl,message,line,caret", [
    ("hyper betas = (b1, b3)", "'b3' in the tuple 'betas' is not a hyperparameter", 3, "b3"),
    ("hyper betas = (b1, b1)", "'b1' is passed twice", 3, "b1)"),
    ("hyper betas = (b1, b2), gammas = (b2, lr)", "'b2' is passed already in 'betas'", 3, "b2, lr"),
    ("hyper wd = 0 in [0, inf) as lr", "'lr' would name two keywords", 3, "lr"),
    ("hyper wd = 0 in [0, inf) as b1\nhyper betas = (b1, b2)", "'b1' would name two keywords", 3, "b1"),
    ("hyper wd = 0 in [0, inf) as maximize", "'maximize' is reserved", 3, "maximize"),
    ("hyper wd = 0 in [0, inf) as foreach", "'foreach' is reserved", 3, "foreach"),
    ("hyper wd = 0 in [0, inf) as unknown", "'unknown' is reserved", 3, "unknown"),
    ("hyper flag = True in [0, 1]", "the flag 'flag' takes no range", 3, "[0, 1]"),
    ("hyper amsgrad = False only in [0, 1]", "syntax error", 3, "in"),  # `only` comes after a range
    ("hyper amsgrad = 0 in [0, 1] only", "fixed by 'only'", 3, "[0, 1]"),
    ("hyper wd = 0 as weight_decay\nhyper betas = (b1, wd)", "'wd' has its own keyword 'weight_decay'", 4,
     "wd)"),
    ("state v as step", "'step' cannot be a state's key", 3, "step"),
    ("state v as m", "state 'v' is saved as 'm', the name of another state", 3, "m\n"),
    ("state v as k\nstate w as k", "states 'v' and 'w' are both saved as 'k'", 4, "k\n"),
    ("hyper betas = (b1)", "a tuple keyword groups declared hyperparameters", 3, ")"),
    ("hyper wd = 0 as", "'as' names a keyword", 3, None),
])
def test_interface_errors_are_located_with_a_caret(decl, message, line, caret):
    text = HEAD + decl + "\n" + BODY + ("v = g\np -= v\n" if "state v" in decl else "")
    with pytest.raises(SpecError) as err:
        optdsl.compile(text, "x.opt")
    e = err.value
    shown = str(e)
    assert e.line == line, shown
    assert shown.startswith(f"x.opt:{e.line}:{e.column}: error: ")
    assert message in shown
    assert "^" in shown and "hint: " in shown
    if caret:
        assert (text.splitlines()[line - 1] + "\n")[e.column - 1:].startswith(caret), shown


def test_spec_without_interface_names_is_unchanged():
    """No `as`, tuple, flag or `only`: the keywords and group keys are the hyperparameters' names."""
    Plain = optdsl.compile(HEAD + BODY, "plain.opt")
    assert list(inspect.signature(Plain).parameters)[:4] == ["params", "lr", "b1", "b2"]
    assert not hasattr(Plain, "_ALIASES")
    with pytest.raises(TypeError):
        Plain([torch.nn.Parameter(torch.ones(1))], betas=(0.9, 0.9))


def test_interface_in_a_small_spec():
    """Tuple, keyword, flag, `only` and a saved key together, against a reference written here."""
    X = optdsl.compile(HEAD + "hyper betas = (b1, b2)\nhyper wd = 0 in [0, inf) as weight_decay\n"
                       "hyper flip = False, legacy = False only\nstate m as moment\n"
                       "m = lerp(m, g, 1 - b1)\np -= lr * (b2 * m + wd * p) * (1 - 2 * flip)\n", "x.opt")
    names = list(inspect.signature(X).parameters)
    assert names[:6] == ["params", "lr", "betas", "weight_decay", "flip", "legacy"]
    gen = torch.Generator().manual_seed(5)
    for flip in (False, True):
        p = torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.float64))
        ref = p.detach().clone()
        m = torch.zeros_like(ref)
        opt = X([p], lr=0.1, betas=(0.7, 0.6), weight_decay=0.05, flip=flip)
        for _ in range(3):
            g = torch.randn(3, 2, generator=gen, dtype=torch.float64)
            p.grad = g.clone()
            opt.step()
            m = 0.7 * m + 0.3 * g
            ref = ref - 0.1 * (0.6 * m + 0.05 * ref) * (-1 if flip else 1)
        _close(p.detach(), ref, "parameter")
        assert set(opt.state_dict()["state"][0]) == {"step", "moment"}
        assert opt.param_groups[0]["legacy"] is False
    with pytest.raises(ValueError, match="does not implement legacy=True"):
        X([p], legacy=True)


def test_new_words_are_words_only_where_expected():
    """`only` and `eager` stay good names; `as` may follow a state's initial value."""
    X = optdsl.compile("optimizer X\nhyper lr = 0.5 in [0, inf)\nstate slow = 2 * p as anchor\n"
                       "only = g * lr\nslow = slow - only\np = slow\n", "x.opt")
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = X([p])
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, -5.0], dtype=torch.float64))
    assert set(opt.state_dict()["state"][0]) == {"step", "anchor"}
    # a hyperparameter `only` and a state `eager` in a spec without the new forms: as before
    Y = optdsl.compile("optimizer Y\nhyper only = 0.5 in [0, 1]\nstate m, eager\n"
                       "eager = g\nm = m + eager\np -= only * m\n", "y.opt")
    q = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = Y([q], only=0.25)
    for _ in range(2):
        q.grad = torch.ones_like(q)
        opt.step()
    assert torch.equal(q.detach(), torch.full((2,), -0.75, dtype=torch.float64))
    assert set(opt.state[q]) == {"step", "m", "eager"}


def test_initial_values_read_hyperparameters_under_their_keywords():
    X = optdsl.compile("optimizer X\nhyper lr = 0.5 in [0, inf), a = 2 in [0, inf), b = 3 in [0, inf)\n"
                       "hyper ab = (a, b)\nhyper c = 4 in [0, inf) as scale\n"
                       "state s = a * b + c * p as start\np = p - lr * s * g\n", "x.opt")
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = X([p], ab=(5.0, 7.0), scale=0.5)
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(opt.state[p]["start"], torch.tensor([35.5, 36.0], dtype=torch.float64))


def test_adagrad_makes_its_state_with_the_optimizer_as_torch():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    ours = spec("adagrad")([p], initial_accumulator_value=0.25)
    ref = T.Adagrad([torch.nn.Parameter(p.detach().clone())], initial_accumulator_value=0.25)
    saved, expected = ours.state_dict()["state"], ref.state_dict()["state"]
    assert saved.keys() == expected.keys() == {0} and saved[0].keys() == expected[0].keys() == {"step", "sum"}
    assert torch.equal(saved[0]["sum"], expected[0]["sum"]) and float(saved[0]["step"]) == 0


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_has_torch_keys_and_dtypes(case):
    """After the same steps, ours saves what torch.optim saves: keys, dtypes, shapes, values."""
    name, Torch, kwargs = CASES[case]
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    q = torch.nn.Parameter(p.detach().clone())
    ours, ref = spec(name)([p], **kwargs), Torch([q], **kwargs, foreach=False)
    for step in range(2):
        g = torch.full_like(p, 0.5 * step - 0.2)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    saved, expected = ours.state_dict(), ref.state_dict()
    kept = _kept(Torch, kwargs)
    for key, value in expected["state"].get(0, {}).items():  # SGD without momentum keeps none
        assert key in kept or not torch.is_tensor(value)
        mine = saved["state"][0][key]
        assert mine.dtype == value.dtype and mine.shape == value.shape, key
        _close(mine, value, key)
    assert {k: v for k, v in saved["param_groups"][0].items() if k in expected["param_groups"][0]} == {
        k: v for k, v in expected["param_groups"][0].items() if k in saved["param_groups"][0] and k != "foreach"
    } | {"foreach": None}


def test_a_state_saved_as_none_is_made_afresh_like_a_missing_one():
    """A state_dict may hold None for a state never made (torch.optim.SGD's momentum_buffer): it
    loads, and the next step makes the state, as torch.optim.SGD does (the buffer from the gradient);
    the same state simply absent beside a step is refused (tests/test_state_trust.py)."""
    SGD = spec("sgd")
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(6, generator=gen, dtype=torch.float64)
    g0 = torch.randn(6, generator=gen, dtype=torch.float64)
    finals = []
    for saved_buffer in ("none", "absent"):
        p = torch.nn.Parameter(init.clone())
        opt = SGD([p], lr=0.1, momentum=0.9)
        p.grad = g0.clone()
        opt.step()
        saved = opt.state_dict()
        if saved_buffer == "none":
            saved["state"][0]["momentum_buffer"] = None
        else:
            del saved["state"][0]["momentum_buffer"]
            with pytest.raises(ValueError, match=r"has no \['momentum_buffer'\]"):
                SGD([p], lr=0.1, momentum=0.9).load_state_dict(saved)
            del saved["state"][0]["step"]  # no state at all: a parameter never stepped
        opt = SGD([p], lr=0.1, momentum=0.9)
        opt.load_state_dict(saved)
        for step in range(3):
            p.grad = g0 * (step + 2)
            opt.step()
        finals.append((p.detach().clone(), opt.state[p]["momentum_buffer"].clone()))
    (p_none, buf_none), (p_absent, buf_absent) = finals
    assert torch.equal(p_none, p_absent) and torch.equal(buf_none, buf_absent)


# ---------------------------------------------------------------------------------------------
# Lion: no torch.optim class; it takes the keywords every popular Lion takes (betas, weight_decay)


@pytest.mark.parametrize("fused", [False, True], ids=["loop-foreach", "fused"])
def test_lion_matches_pytorch_optimizer_and_loads_its_state(fused):
    PO = pytest.importorskip("pytorch_optimizer")
    if fused and os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")
    Lion = spec("lion")
    kwargs = dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5)
    run_pair(lambda ps, **mode: Lion(ps, **kwargs, **mode), lambda ps: PO.Lion(ps, **kwargs, foreach=False),
             SHAPES, torch.float64, FUSED_STEPS if fused else STEPS, fused=fused)
    # pytorch_optimizer's state_dict (exp_avg, betas, weight_decay) loads into ours and goes on the same
    _resume(lambda ps: PO.Lion(ps, **kwargs, foreach=False), lambda ps: Lion(ps))


def test_lion_betas_follow_one_cycle_momentum():
    """OneCycleLR(cycle_momentum=True) cycles betas[0] of Lion as it does torch.optim.Adam's."""
    seen = []
    for Opt in (spec("lion"), T.Adam):
        p = torch.nn.Parameter(torch.ones(3))
        opt = Opt([p], lr=1e-3, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, base_momentum=0.8,
                                                    max_momentum=0.95)
        betas = []
        for _ in range(8):
            p.grad = torch.ones(3)
            opt.step()
            sched.step()
            betas.append(opt.param_groups[0]["betas"])
        seen.append(betas)
    assert seen[0] == seen[1]
    assert len({b1 for b1, _ in seen[0]}) > 4 and {b2 for _, b2 in seen[0]} == {0.99}


# ---------------------------------------------------------------------------------------------
# Adafactor's eps=(None, 1e-3): None is the machine epsilon of the parameter's dtype, as torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adafactor_unset_epsilon_is_the_dtypes(dtype):
    """eps1 = None floors the estimate at finfo(dtype).eps^2: a zero gradient row shows it."""
    Ours = spec("adafactor")
    out = []
    for Opt in (Ours, T.Adafactor):
        p = torch.nn.Parameter(torch.ones(3, 4, dtype=dtype))
        opt = Opt([p], lr=0.1)
        g = torch.zeros(3, 4, dtype=dtype)
        g[0] = 1e-3  # row 0 moves; the others' estimate is the floor eps1^2
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
        out.append(p.detach().float())
    torch.testing.assert_close(out[0], out[1], rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-6, atol=0)


def test_adafactor_unset_epsilon_in_a_group_of_two_dtypes_is_refused():
    ps = [torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float32)), torch.nn.Parameter(torch.ones(3, 2))]
    opt = spec("adafactor")(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="machine epsilon of the parameters' dtype"):
        opt.step()
    opt.param_groups[0]["eps"] = (1e-30, 1e-3)  # a number: each dtype takes it
    opt.step()


# ---------------------------------------------------------------------------------------------
# Muon: torch.optim.Muon for matrices (its keywords first, in its order), AdamW for the rest

MUON_SHAPES = [(13, 5), (4, 9), (1, 7), (6, 6)]


def test_muon_takes_torch_keywords_defaults_and_order():
    Muon = spec("muon")
    ours, theirs = inspect.signature(Muon).parameters, inspect.signature(T.Muon).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    for key, param in theirs.items():
        assert ours[key].default == param.default, key
    p = torch.nn.Parameter(torch.zeros(3, 2))
    group, ref = Muon([p]).param_groups[0], T.Muon([torch.nn.Parameter(torch.zeros(3, 2))]).param_groups[0]
    assert {k: group[k] for k in ref if k != "params"} == {k: v for k, v in ref.items() if k != "params"}
    assert Muon([p], ns_steps=3).param_groups[0]["ns_steps"] == 3  # the loop follows it (tests/test_repeat_count.py)
    assert Muon([p], ns_steps=99).param_groups[0]["ns_steps"] == 99  # as torch: a Python loop, not unrolled
    with pytest.raises(ValueError, match=r"ns_steps must be in \(-inf, 100\)"):  # torch: ValueError at step
        Muon([p], ns_steps=100)
    with pytest.raises(ValueError, match="adjust_lr_fn value: 'sqrt'.*one of None, 'original', 'match_rms_adamw'"):
        Muon([p], adjust_lr_fn="sqrt")


@pytest.mark.parametrize("path", ["single", "foreach", "fused"])
@pytest.mark.parametrize("kwargs", [
    dict(lr=0.02),
    dict(lr=0.05, weight_decay=0.0, momentum=0.9, nesterov=False, ns_coefficients=(3.0, -4.0, 2.0), eps=1e-5),
    dict(lr=0.02, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.02, adjust_lr_fn="original", weight_decay=0.3),
], ids=["defaults", "plain", "match_rms_adamw", "original"])
def test_muon_matches_torch_in_bfloat16_and_swaps_state_dicts(kwargs, path):
    """float32 matrices: ours (Newton-Schulz in bfloat16, as torch) steps as torch.optim.Muon does
    (the for-loop and foreach paths exactly; fused within a few float32 roundings of the
    momentum, which its kernel computes), and each loads the other's state_dict mid-run."""
    if path == "fused" and os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")
    Muon = spec("muon")
    mode = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[path]
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen) for s in MUON_SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in MUON_SHAPES] for _ in range(6)]
    device = "cuda" if ON_GPU and path == "fused" else "cpu"
    ps = [torch.nn.Parameter(x.clone().to(device)) for x in init]
    qs = [torch.nn.Parameter(x.clone()) for x in init]
    ours, ref = Muon(ps, **kwargs, **mode), T.Muon(qs, **kwargs)
    for step, row in enumerate(grads):
        if step == 3:  # swap: each side goes on from the other's state_dict
            ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
            assert set(ref_sd["state"][0]) == {"momentum_buffer"} <= set(ours_sd["state"][0])
            ours, ref = Muon(ps, **mode), T.Muon(qs)
            ours.load_state_dict(_roundtrip(ref_sd))
            ref.load_state_dict(_roundtrip(ours_sd))
            assert ours.param_groups[0]["adjust_lr_fn"] == kwargs.get("adjust_lr_fn")
        for p, q, g in zip(ps, qs, row):
            p.grad, q.grad = g.clone().to(device), g.clone()
        ours.step()
        ref.step()
    tol = 0 if path != "fused" else 1e-5
    for p, q, x in zip(ps, qs, init):
        moved = (q.detach() - x).abs().max().item()
        assert (p.detach().cpu() - q.detach()).abs().max().item() <= tol * moved


class _CountMatmuls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["single", "foreach", "fused"])
def test_muon_runs_ns_steps_rounds_and_no_more(path):
    """The Newton-Schulz loop is a Python loop of ns_steps rounds on every path: the matrix
    products grow linearly with ns_steps, up to torch's 99."""
    if path == "fused" and os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")
    Muon = spec("muon")
    mode = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[path]
    device = "cuda" if ON_GPU and path == "fused" else "cpu"
    top = 99  # the top of ns_steps' range in specs/muon.opt, as torch.optim.Muon
    calls = {}
    for n in (1, 2, top):
        ps = [torch.nn.Parameter(torch.ones(s, device=device)) for s in MUON_SHAPES]
        opt = Muon(ps, ns_steps=n, **mode)
        for p in ps:
            p.grad = torch.ones_like(p)
        with _CountMatmuls() as counter:
            opt.step()
        calls[n] = counter.calls
    per_round = calls[2] - calls[1]
    assert per_round > 0 and calls[top] - calls[1] == (top - 1) * per_round, calls


def test_muon_sends_a_groups_matrices_to_adamw_with_use_muon_false():
    """A per-group flag, as Muon's users write it: the embedding and the head take AdamW."""
    Muon = spec("muon")
    gen = torch.Generator().manual_seed(3)
    hidden, embed, bias = (torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
                           for s in [(8, 4), (10, 4), (4,)])
    opt = Muon([{"params": [hidden]}, {"params": [embed, bias], "use_muon": False}], lr=0.02, adam_lr=0.01,
               adam_betas=(0.8, 0.95), adam_wd=0.1, ns_bfloat16=False)
    e_ref, b_ref = (torch.nn.Parameter(x.detach().clone()) for x in (embed, bias))
    adamw = T.AdamW([e_ref, b_ref], lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, foreach=False)
    for _ in range(4):
        for p, q in ((embed, e_ref), (bias, b_ref)):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            q.grad = p.grad.clone()
        hidden.grad = torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
        opt.step()
        adamw.step()
    for p, q in ((embed, e_ref), (bias, b_ref)):
        _close(p.detach(), q.detach(), "AdamW's parameter")
    assert set(opt.state[embed]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[hidden]) == {"step", "momentum_buffer"}


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("path", ["loop-foreach", "fused"])
def test_amsgrad_is_per_group_as_torch(name, path):
    """amsgrad is a group's flag in torch.optim: a group with it keeps max_exp_avg_sq, one without
    does not, and a state_dict of the two loads into torch.optim's class and back."""
    if path == "fused" and os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")
    Ours, Torch = spec(name), getattr(T, "Adam" if name == "adam" else "AdamW")

    def groups(ps):
        return [{"params": ps[:2], "amsgrad": True}, {"params": ps[2:], "lr": 0.02}]
    run_pair(lambda ps, **mode: Ours(groups(ps), lr=0.01, weight_decay=0.1, **mode),
             lambda ps: Torch(groups(ps), lr=0.01, weight_decay=0.1, foreach=False),
             SHAPES, torch.float64, FUSED_STEPS if path == "fused" else STEPS, seed=3, fused=path == "fused")
    ps = [torch.nn.Parameter(torch.ones(s, dtype=torch.float64)) for s in SHAPES]
    opt = Ours(groups(ps), lr=0.01)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert [sorted(opt.state[p]) for p in ps] == [["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]] * 2 + [
        ["exp_avg", "exp_avg_sq", "step"]] * 2
    ref = Torch(groups([torch.nn.Parameter(p.detach().clone()) for p in ps]), lr=0.01)
    ref.load_state_dict(_roundtrip(opt.state_dict()))
    opt.load_state_dict(_roundtrip(ref.state_dict()))
    assert [g["amsgrad"] for g in opt.param_groups] == [True, False]


@pytest.mark.parametrize("path", ["single", "foreach", "fused"])
def test_maximize_leaves_the_gradients_alone(path):
    """-g is a new tensor: p.grad keeps what backward() wrote (torch.optim's maximize does not write it)."""
    if path == "fused" and os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")
    device = "cuda" if ON_GPU and path == "fused" else "cpu"
    ps = [torch.nn.Parameter(torch.ones(s, dtype=torch.float64, device=device)) for s in SHAPES]
    opt = spec("adam")(ps, lr=0.1, maximize=True, **({"fused": True} if path == "fused" else {"foreach": path == "foreach"}))
    for p in ps:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    assert all((p.grad == 0.5).all() and (p > 1).all() for p in ps)  # it ascended, the gradient as it was


def test_adamw_amsgrad_state_dict_loads_into_amsgrad():
    """torch.optim.AdamW(amsgrad=True) keeps decoupled_weight_decay=True in its groups: AMSGrad
    takes its state_dict and goes on as AdamW does."""
    _resume(lambda ps: T.AdamW(ps, lr=0.01, betas=(0.5, 0.9), weight_decay=0.3, amsgrad=True, foreach=False),
            lambda ps: spec("amsgrad")(ps))
