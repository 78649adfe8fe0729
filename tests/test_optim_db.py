"""torch's own conformance database, run on our drop-ins.

`torch.testing._internal.common_optimizers.optim_db` (shipped with torch) holds, for each
torch.optim class, the keyword combinations torch tests (`optim_inputs_func`) and the errors it
expects (`optim_error_inputs_func`). Every drop-in class below goes through both:

- each input gives the numbers of torch.optim's class (its for-loop path) over a few steps, on
  our for-loop, foreach and fused (Triton interpreter) paths, in float64 and float32, on
  parameters of awkward shapes; an input ours does not implement must be refused with a
  ValueError saying so, and is skipped with that reason;
- each error input raises the exception type torch raises (ours may say more); where our
  message does not contain torch's, the case says why in KNOWN_MESSAGES.

At the end a per-class tally (run / passed / skipped with reason) is printed. Only CPU inputs are
used: the CUDA-only ones need capturable=True, which no drop-in implements.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import re
import sys
import types
import unittest
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass

import pytest
import torch

try:  # torch's test helpers import expecttest (a test extra); only its TestCase base is needed
    import expecttest  # noqa: F401
except ImportError:  # pragma: no cover - the pinned environment has it
    sys.modules["expecttest"] = types.SimpleNamespace(TestCase=unittest.TestCase)
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db  # noqa: E402

SHAPES = [(1,), (7,), (5, 3), (2, 3, 4), (0,)]  # a scalar-like, a vector, a matrix, rank 3, empty
MATRICES = [(1, 1), (7, 3), (4, 5), (2, 3, 4)]  # for optimizers that need rank >= 2


@dataclass(frozen=True)
class Row:
    """A drop-in: its generated module (class of torch.optim's name), and the shapes it steps.
    float64_default: torch.optim keeps this class's scalar states (NAdam's mu_product, ASGD's eta
    and mu) in the default dtype, so its float64 inputs run with float64 as the default dtype
    (ours keep them in the parameter's dtype; with float32 torch's differ by float32 roundings)."""
    module: str
    shapes: tuple = tuple(SHAPES)
    float64_default: bool = False


# torch.optim class name -> our drop-in. A new drop-in adds its row here.
DROPINS = {
    "Adam": Row("adam"),
    "AdamW": Row("adamw"),
    "SGD": Row("sgd"),
    "RMSprop": Row("rmsprop"),
    "Adagrad": Row("adagrad"),
    "Adamax": Row("adamax"),
    "NAdam": Row("nadam", float64_default=True),
    "RAdam": Row("radam"),
    "Adadelta": Row("adadelta"),
    "Rprop": Row("rprop"),
    "ASGD": Row("asgd", float64_default=True),
    # torch.optim.Adafactor divides by numel(): an empty parameter is a ZeroDivisionError there
    "Adafactor": Row("adafactor", shapes=tuple(s for s in SHAPES if s != (0,))),
    "Muon": Row("muon", shapes=tuple(s for s in MATRICES if len(s) == 2)),  # torch.optim.Muon takes matrices only
}
INFOS = {info.name: info for info in optim_db}
PATHS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
STEPS = 4

# (class, error input's desc) -> why ours raises nothing there: what torch refuses, ours computes,
# and the case checks that ours then steps exactly as torch's for-loop does with the same values.
ACCEPTED = {
    ("Adam", "lr as Tensor doesn't work with foreach & not capturable"):
        "a Tensor lr is read on the host (.item()), so the foreach path takes it",
    ("Adam", "betas must be either both floats or both Tensors"):
        "each member of betas is read on the host, tensor or float",
    ("Adam", r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True"):
        "Tensor betas are read on the host, so the foreach path takes them",
}
ACCEPTED |= {("AdamW", desc): why for (cls, desc), why in list(ACCEPTED.items()) if cls == "Adam"}
# (class, error input's desc) -> why ours takes what torch refuses: a documented extension
EXTENDS = {
    ("Muon", "only support 2D parameters"):
        "ours takes every parameter: those that are not matrices step with AdamW (the adam_ keywords)",
}
# (class, input's desc, dtype) -> (the input torch's class runs with instead, why): where torch's
# numbers carry a rounding of its own that ours does not make. The case still runs and must match;
# test_adapted_inputs_differ_unadapted checks that the adaptation is needed.
ADAPTED = {
    ("Muon", "Tensor lr", "float64"): (
        lambda kw: kw | {"lr": kw["lr"].double()},
        "torch.optim.Muon keeps a Tensor lr a tensor, so 1 - lr * weight_decay and lr times the shape's "
        "ratio are float32 tensors (rounded to float32) even for a float64 parameter; ours reads lr as "
        "a number. Torch's class runs with the same lr as a float64 tensor"),
}
# (class, error input's desc) -> why our message does not contain torch's (the type still matches)
KNOWN_MESSAGES = {
    (name, f"beta{i + 1} should be between 0 and 1"): f"ours names the keyword: 'Invalid betas[{i}] value: 1.0'"
    for name, i in [("Adam", 0), ("AdamW", 0), ("Adamax", 1), ("NAdam", 0), ("RAdam", 0)]
} | {("Rprop", "0 < eta1 < 1 < eta2"): "ours names the member out of range: 'Invalid etas[0] value: 1.0'",
      ("Adafactor", "epsilon1 should be >= 0"): "ours names the member: 'Invalid eps[0] value: -1e-30'",
      ("Adafactor", "invalid d"): "ours says 'Invalid d value: 0.0 (d must be in [1, inf))'",
      ("Adafactor", "invalid beta2_decay"): "ours says 'Invalid beta2_decay value: 0.8 (... must be in (-inf, 0])'",
      ("Muon", "only support `original` and `match_rms_adamw`"):
          "ours says 'Invalid adjust_lr_fn value: 'arbitrary' (... must be one of None, 'original', ...)'"}

TALLY: dict[str, Counter] = defaultdict(Counter)
REASONS: dict[str, Counter] = defaultdict(Counter)


def _class(name):
    return getattr(importlib.import_module(f"generated.{DROPINS[name].module}"), name)


def _forloop(name):
    """torch's for-loop path, where its class has others (torch.optim.Muon has one path only)."""
    return dict(foreach=False) if "foreach" in inspect.signature(INFOS[name].optim_cls).parameters else {}


def _inputs():
    for name in DROPINS:
        for inp in INFOS[name].optim_inputs_func(device="cpu"):
            for path in PATHS:
                for dt in DTYPES:
                    yield pytest.param(name, inp, path, dt, id=f"{name}-{inp.desc}-{path}-{dt}")


def _error_inputs():
    for name in DROPINS:
        for err in INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32):
            yield pytest.param(name, err, id=f"{name}-{err.optimizer_error_input.desc}")


@pytest.fixture(scope="module", autouse=True)
def tally(request):
    """Print the per-class tally after the module's tests (where a terminal is attached)."""
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is None or not TALLY:
        return
    lines = ["", "optim_db conformance (run / passed / skipped, by class):"]
    for name, c in TALLY.items():
        lines.append(f"  {name:8s} inputs: {c['run']} run, {c['passed']} passed, {c['skipped']} skipped; "
                     f"errors: {c['errors']} run, {c['errors_passed']} same type, "
                     f"{c['messages']} with torch's message, {c['accepted']} accepted")
        lines += [f"      skipped {n}x: {reason}" for reason, n in REASONS[name].items()]
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


def _params(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _grads(shapes, dtype, seed):
    """Gradients of differing scales; parameter 1 has none at step 2 (torch skips it then)."""
    gen = torch.Generator().manual_seed(seed + 1)
    rows = []
    for step in range(STEPS):
        row = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) * 10.0 ** (i % 3 - 1)
               for i, s in enumerate(shapes)]
        if step == 2:
            row[1] = None
        rows.append(row)
    return rows


def _run(opt, params, grads):
    for row in grads:
        for p, g in zip(params, row):
            p.grad = None if g is None else g.clone()
        opt.step()


def _check(ours, ref, init, dtype, what):
    """float64: ours within 1e-12 of torch's, relative to the largest value (a few roundings of
    2^-53 per operation, over a few steps). float32: each step's update may differ in its last bit,
    and adding it to p rounds to p's spacing, so a parameter may be STEPS half-ulps of |p| apart
    (2 ulp a step allowed); states (no such cancellation) within 64 ulp of their largest value."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float64:
        rel = 1e-12
    else:
        rel = 64 * eps
    # the parameters' displacement from the start, so a tiny update is not hidden by a large p
    scale = max((r - x).abs().max().item() if r.numel() else 0.0 for r, x in zip(ref[0], init))
    bound = rel * scale if dtype == torch.float64 else 2 * STEPS * eps * max(
        x.abs().max().item() if x.numel() else 0.0 for x in init) + rel * scale
    for i, (a, b) in enumerate(zip(ours[0], ref[0])):
        err = (a - b).abs().max().item() if a.numel() else 0.0
        assert err <= bound, f"{what}: parameter {i} {tuple(a.shape)} off by {err:.3e} (bound {bound:.3e})"
    for i, (a, b) in enumerate(zip(ours[1], ref[1])):
        assert a.keys() >= b.keys(), f"{what}: parameter {i} lacks states {sorted(b.keys() - a.keys())}"
        for key, value in b.items():
            mine = a[key]
            if key == "step":
                assert float(mine) == float(value), f"{what}: step {float(mine)} != torch's {float(value)}"
                continue
            assert mine.shape == value.shape and mine.dtype == value.dtype, (what, key)
            if not value.numel():
                continue
            err = (mine.double() - value.double()).abs().max().item()
            limit = rel * value.abs().max().item()
            assert err <= limit, f"{what}: state {key!r} of parameter {i} off by {err:.3e} (limit {limit:.3e})"


def _states(opt, params):
    """Each parameter's tensor states as torch.optim keeps them (a None buffer is no state)."""
    return [{k: v.detach().clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
            if p in opt.state else {} for p in params]


@pytest.mark.parametrize("name,inp,path,dt", list(_inputs()))
def test_optim_inputs_match_torch(name, inp, path, dt, request):
    dtype, shapes = DTYPES[dt], DROPINS[name].shapes
    if dtype == torch.float64 and DROPINS[name].float64_default:
        request.getfixturevalue("float64_default")
    init = _params(shapes, dtype, seed=len(inp.desc))
    grads = _grads(shapes, dtype, seed=len(inp.desc))
    TALLY[name]["run"] += 1
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    try:
        ours = _class(name)(ps, **copy.deepcopy(inp.kwargs), **PATHS[path])
    except ValueError as e:  # a keyword combination the spec does not implement
        assert "does not implement" in str(e), f"refused for another reason: {e}"
        TALLY[name]["skipped"] += 1
        REASONS[name][str(e)] += 1
        pytest.skip(str(e))
    adapt = ADAPTED.get((name, inp.desc, dt), (lambda kw: kw, ""))[0]
    qs = [torch.nn.Parameter(x.clone()) for x in init]
    ref = INFOS[name].optim_cls(qs, **adapt(copy.deepcopy(inp.kwargs)), **_forloop(name))
    _run(ours, ps, grads)
    _run(ref, qs, grads)
    _check(([p.detach() for p in ps], _states(ours, ps)), ([q.detach() for q in qs], _states(ref, qs)),
           init, dtype, f"{name} {inp.desc!r} {path} {dt}")
    TALLY[name]["passed"] += 1


@pytest.mark.parametrize("name,desc,dt", list(ADAPTED))
def test_adapted_inputs_differ_unadapted(name, desc, dt):
    """Each ADAPTED case, torch's class run with the input as the database gives it: its numbers are
    off ours by more than the bound (so the adaptation is needed, and its reason is what differs)."""
    (inp,) = [i for i in INFOS[name].optim_inputs_func(device="cpu") if i.desc == desc]
    dtype, shapes = DTYPES[dt], DROPINS[name].shapes
    init, grads = _params(shapes, dtype, seed=len(desc)), _grads(shapes, dtype, seed=len(desc))
    ps, qs = ([torch.nn.Parameter(x.clone()) for x in init] for _ in range(2))
    ours = _class(name)(ps, **copy.deepcopy(inp.kwargs))
    ref = INFOS[name].optim_cls(qs, **copy.deepcopy(inp.kwargs), **_forloop(name))
    _run(ours, ps, grads)
    _run(ref, qs, grads)
    with pytest.raises(AssertionError, match="off by"):
        _check(([p.detach() for p in ps], _states(ours, ps)), ([q.detach() for q in qs], _states(ref, qs)),
               init, dtype, f"{name} {desc!r} unadapted")



def _raises(cls, err):
    """Construct (and for a step error, step) as torch's test does; the exception or warning caught."""
    inp = err.optimizer_error_input
    params, kwargs = inp.params, copy.deepcopy(inp.kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt = cls(params, **kwargs)
            if err.error_on == OptimizerErrorEnum.STEP_ERROR:
                opt.step()
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            return e
    hits = [w.message for w in caught if issubclass(w.category, err.error_type)]
    return hits[0] if hits else None


@pytest.mark.parametrize("name,err", list(_error_inputs()))
def test_optim_error_inputs_raise_as_torch(name, err):
    desc = err.optimizer_error_input.desc
    TALLY[name]["errors"] += 1
    theirs = _raises(INFOS[name].optim_cls, err)  # the database describes this torch
    assert isinstance(theirs, err.error_type) and re.search(err.error_regex, str(theirs)), theirs
    if (name, desc) in EXTENDS:  # ours takes it on purpose
        assert _raises(_class(name), err) is None, EXTENDS[name, desc]
        TALLY[name]["accepted"] += 1
        return
    if (name, desc) in ACCEPTED:  # ours takes it (on real parameters: the input's are None)
        _accepted_steps_as_torch(name, err.optimizer_error_input.kwargs)
        TALLY[name]["accepted"] += 1
        return
    ours = _raises(_class(name), err)
    assert isinstance(ours, err.error_type), f"{desc}: torch raises {err.error_type.__name__}, ours {ours!r}"
    TALLY[name]["errors_passed"] += 1
    if re.search(err.error_regex, str(ours)):
        assert (name, desc) not in KNOWN_MESSAGES, "ours now says what torch says: drop the KNOWN_MESSAGES entry"
        TALLY[name]["messages"] += 1
    else:
        assert (name, desc) in KNOWN_MESSAGES, f"{desc}: {str(ours)!r} does not contain torch's {err.error_regex!r}"


def _accepted_steps_as_torch(name, kwargs):
    """What torch refuses and ours takes steps as torch's for-loop does with the values as floats."""
    floats = {k: (tuple(map(float, v)) if isinstance(v, tuple) else float(v) if torch.is_tensor(v) else v)
              for k, v in kwargs.items() if k != "foreach"}
    init = _params(SHAPES, torch.float64, seed=0)
    grads = _grads(SHAPES, torch.float64, seed=0)
    ps, qs = ([torch.nn.Parameter(x.clone()) for x in init] for _ in range(2))
    ours = _class(name)(ps, **copy.deepcopy(kwargs))
    ref = INFOS[name].optim_cls(qs, **floats, **_forloop(name))
    _run(ours, ps, grads)
    _run(ref, qs, grads)
    _check(([p.detach() for p in ps], _states(ours, ps)), ([q.detach() for q in qs], _states(ref, qs)),
           init, torch.float64, f"{name} {kwargs}")


class _CudaAsMeta(torch.overrides.TorchFunctionMode):
    """Tensors made for device='cuda' are made on 'meta': torch's CUDA-only error inputs on a CPU machine."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _cuda_error_inputs():
    for name in DROPINS:
        with _CudaAsMeta():
            errors = INFOS[name].optim_error_inputs_func(device="cuda", dtype=torch.float32)
        for err in errors:
            yield pytest.param(name, err, id=f"{name}-{err.optimizer_error_input.desc}")


@pytest.mark.parametrize("name,err", list(_cuda_error_inputs()))
def test_cuda_error_inputs_raise_as_torch(name, err):
    """torch's CUDA-only error inputs (fused=True with foreach=True or differentiable=True), on
    CUDA-made (here: meta) parameters: the same type and message from ours, before anything
    touches the parameters' memory."""
    desc = err.optimizer_error_input.desc
    with _CudaAsMeta():
        theirs, ours = _raises(INFOS[name].optim_cls, err), _raises(_class(name), err)
        assert isinstance(theirs, err.error_type) and re.search(err.error_regex, str(theirs)), theirs
        if (name, desc) in EXTENDS:
            assert ours is None, EXTENDS[name, desc]
            return
        assert isinstance(ours, err.error_type), ours
        assert (name, desc) in KNOWN_MESSAGES or re.search(err.error_regex, str(ours)), ours


@pytest.mark.parametrize("name", list(DROPINS))
def test_fused_on_meta_parameters_is_a_clean_error(name):
    """torch raises a RuntimeError at the first step; ours at construction, never touching memory."""
    p = torch.nn.Parameter(torch.zeros(4, 3, device="meta"))
    with pytest.raises(RuntimeError, match="fused path runs on CUDA tensors.*not meta"):
        _class(name)([p], fused=True)


@pytest.mark.parametrize("name", list(DROPINS))
def test_hyperparameters_are_checked_before_params(name):
    """As torch.optim: a bad value is the error, even when `params` is bad too."""
    key = "lr"
    with pytest.raises(ValueError, match="Invalid lr value: -1.0"):
        _class(name)(None, **{key: -1.0})
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        _class(name)(None, lr=torch.tensor([1e-3, 1e-3]))
