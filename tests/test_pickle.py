"""Classes from optdsl.load and optdsl.compile pickle: torch.save(opt), spawned workers."""
import io
import multiprocessing
import pickle
import sys

import torch

import optdsl

SPEC = "specs/adamw.opt"


def _trained(cls, steps=3):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in [(7,), (3, 5)]]
    opt = cls(params, lr=0.1, weight_decay=0.1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    return opt


def _continue(opt, steps=3):
    """Steps the optimizer on fixed gradients; its parameters after them."""
    gen = torch.Generator().manual_seed(1)
    params = [p for g in opt.param_groups for p in g["params"]]
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    return [p.detach().clone() for p in params]


def _assert_same(a, b):
    assert type(a).__name__ == type(b).__name__
    assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        for key, value in a.state[pa].items():
            torch.testing.assert_close(b.state[pb][key], value, rtol=0, atol=0)
    for x, y in zip(_continue(a), _continue(b)):  # and training goes on identically
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_an_optimizer_and_its_class_pickle_in_process():
    A = optdsl.load(SPEC)
    opt = _trained(A)
    copy = pickle.loads(pickle.dumps(opt))
    assert type(copy) is A  # this process has the class: no recompiling
    assert pickle.loads(pickle.dumps(A)) is A
    _assert_same(opt, copy)


def test_a_compiled_class_pickles_and_the_same_spec_gives_the_same_module_name():
    text = "optimizer Plain\nhyper lr = 0.1 in [0, inf)\np -= lr * g\n"
    A, B = optdsl.compile(text, "plain.opt"), optdsl.compile(text, "plain.opt")
    assert A.__module__ == B.__module__  # what a spawned worker loading the spec registers too
    assert optdsl.compile(text.replace("0.1", "0.2"), "plain.opt").__module__ != A.__module__
    opt = pickle.loads(pickle.dumps(B([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))])))
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.ones(3, dtype=torch.float64)  # a gradient is not pickled with its tensor
    opt.step()
    assert p.tolist() == [0.9] * 3


def test_torch_save_and_load_an_optimizer():
    opt = _trained(optdsl.load(SPEC))
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    _assert_same(opt, torch.load(buf, weights_only=False))


def _unpickle_and_continue(blob):
    """In a fresh (spawned) process: unpickle an optimizer whose spec this process never loaded."""
    fresh = not any(name.startswith("optdsl._spec_") for name in sys.modules)
    opt = pickle.loads(blob)
    return fresh, type(opt).__module__, [t.tolist() for t in _continue(opt)]


def test_an_optimizer_unpickles_in_a_spawned_process():
    opt = _trained(optdsl.load(SPEC))
    blob = pickle.dumps(opt)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        fresh, module, params = pool.apply(_unpickle_and_continue, (blob,))
    assert fresh  # the worker compiled the class from the spec text the pickle carries
    assert module == type(opt).__module__
    for got, want in zip(params, _continue(opt)):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=0, atol=0)
