"""randn() and rand() (issue 16, item 4): draws shaped like p from the optimizer's own generator.

On the for-loop and foreach paths a tensor's draw k of a step comes from a generator keyed by the
step's seed (one number drawn from the optimizer's generator), the tensor's index in the step's list
and k, so the two paths draw the same numbers and a reference written from that contract matches
them to float64 round-off. The fused kernels hash (seed, tensor, element, k) instead: a stream of
their own, checked here by its statistics, its determinism and the arithmetic around it.
"""
from __future__ import annotations

import io
import math
import os
import sys
import zlib

import pytest
import torch

import optdsl
from test_differential import ON_GPU, run_pair  # noqa: E402 - the shared checker

# Annealed gradient noise (Neelakantan et al., 2015, "Adding gradient noise improves learning for very
# deep networks": sigma_t^2 = eta / (1 + t)^gamma) on a momentum SGD, and a SPAM-like random mask
# that keeps each element's update with probability `keep`, rescaled by 1/keep.
NOISY = """
optimizer NoisySGD "momentum SGD with annealed gradient noise and a random update mask"
hyper lr = 1e-2 in [0, inf), eta = 0.01 in [0, inf), gamma = 0.55 in [0, inf)
hyper mu = 0.9 in [0, 1), keep = 0.9 in (0, 1]
state m
g += sqrt(eta / (1 + t)^gamma) * randn()
m = mu * m + g
p -= lr * (rand() < keep) * m / keep
"""
SEED = 1234


def _draw(p, seed, index, draw, normal):
    """The documented contract of the torch paths (optdsl/templates/torch_optimizer.py.j2, _random_like)."""
    key = (seed + 0xBF58476D1CE4E5B9 * (index + 1) + 0x94D049BB133111EB * (draw + 1)) % 2**63
    local = torch.Generator(device=p.device).manual_seed(key)
    return (torch.randn if normal else torch.rand)(p.shape, generator=local, dtype=p.dtype, device=p.device)


class NoisyRef(torch.optim.Optimizer):
    """The spec's math written out, drawing as the contract says from a generator seeded as ours."""

    def __init__(self, params, seed, lr=1e-2, eta=0.01, gamma=0.55, mu=0.9, keep=0.9):
        super().__init__(params, dict(lr=lr, eta=eta, gamma=gamma, mu=mu, keep=keep))
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            seed = int(torch.randint(0, 2**62, (), generator=self.gen))  # one per step and group
            for i, p in enumerate(live):
                state = self.state[p]
                state["t"] = t = state.get("t", 0) + 1
                m = state.setdefault("m", torch.zeros_like(p))
                g = p.grad + math.sqrt(group["eta"] / (1 + t) ** group["gamma"]) * _draw(p, seed, i, 0, True)
                m.mul_(group["mu"]).add_(g)
                mask = (_draw(p, seed, i, 1, False) < group["keep"]).to(p.dtype)
                p.sub_(group["lr"] * mask * m / group["keep"])


SHAPES = [(1,), (7,), (13, 5), (4, 9), (3, 1, 4)]


def _fused_ok():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not ON_GPU:
        pytest.skip("the fused path runs under TRITON_INTERPRET=1, or compiled on a CUDA device")



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("settings", [dict(), dict(lr=0.05, eta=0.3, gamma=1.0, mu=0.5, keep=0.5)],
                         ids=["default", "other"])
def test_noisy_sgd_matches_the_contract_on_the_torch_paths(settings, dtype, request):
    """for-loop and foreach draw the same numbers (run_pair asserts equality after every step) and
    match a reference written from the documented key; some tensors miss their gradient on some
    steps, so the indices shift as they do in ours."""
    if dtype == torch.float64:
        request.getfixturevalue("float64_default")
    Noisy = optdsl.compile(NOISY, "noisy_sgd.opt")
    run_pair(lambda ps, **mode: Noisy(ps, **mode, **settings).manual_seed(SEED),
             lambda ps: NoisyRef(ps, SEED, **settings), SHAPES, dtype, 20, seed=zlib.crc32(repr(settings).encode()))


@pytest.mark.parametrize("old, new", [("randn()", "rand()"), ("rand() < keep", "rand() <= 0.99 * keep"),
                                      ("(1 + t)^gamma", "(2 + t)^gamma")])
def test_a_mutant_is_caught(old, new, float64_default):
    assert NOISY.count(old) == 1
    Mutant = optdsl.compile(NOISY.replace(old, new), "noisy_mutant.opt")
    with pytest.raises(AssertionError, match="differs from reference"):
        run_pair(lambda ps, **mode: Mutant(ps, **mode).manual_seed(SEED), lambda ps: NoisyRef(ps, SEED),
                 SHAPES, torch.float64, 20)


# One draw of each kind kept in a state, so that a test can read them and check what the step did with them.
DRAWS = """
optimizer Draws
hyper lr = 0.1 in [0, inf), s = 0.5 in [0, inf)
state z, u, w
z = randn()
u = rand()
w = randn()
p -= lr * (g + s * z) * u
"""


def _paths():
    paths = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True)}
    if os.environ.get("TRITON_INTERPRET") == "1" or ON_GPU:
        paths["fused"] = dict(fused=True)
    return paths


def _device(mode):
    return "cuda" if mode.get("fused") and ON_GPU else "cpu"


def _step(opt, params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
    opt.step()


@pytest.mark.parametrize("path", list(_paths()))
def test_draws_have_the_distributions_they_name(path):
    """Means, variances, a normal tail and independence, within 5 standard errors of n draws: a
    bias, a wrong scale, a uniform where a normal belongs, or one draw reused for another fails."""
    mode = _paths()[path]
    Draws = optdsl.compile(DRAWS, "draws.opt")
    shape = (160, 250) if path != "fused" or ON_GPU else (64, 250)  # the interpreter is slow
    params = [torch.nn.Parameter(torch.zeros(shape, device=_device(mode))) for _ in range(2)]
    opt = Draws(params, **mode).manual_seed(3)
    _step(opt, params, torch.Generator().manual_seed(0))
    first = opt.state[params[0]]["z"].clone().cpu().double().flatten()
    _step(opt, params, torch.Generator().manual_seed(1))
    z, u, w = (opt.state[params[0]][k].cpu().double().flatten() for k in "zuw")
    other = opt.state[params[1]]["z"].cpu().double().flatten()
    n = z.numel()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se and abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    tail = (z.abs() > 2).double().mean()  # P(|z| > 2) = 0.0455 for a standard normal
    assert abs(tail - 0.0455) < 5 * math.sqrt(0.0455 * 0.9545 / n)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n) and abs(u.var() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    for a, b in [(z, w), (z, u), (z, other), (z, first)]:  # two draws, two tensors, two steps
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(corr) < 5 * se, corr


@pytest.mark.parametrize("path", list(_paths()))
def test_the_update_uses_the_draws_as_written(path, float64_default):
    """p moves by lr * (g + s*z) * u with the z and u the step drew (the fused path's own stream too)."""
    mode = _paths()[path]
    Draws = optdsl.compile(DRAWS, "draws.opt")
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64, device=_device(mode))) for s in SHAPES]
    opt = Draws(params, lr=0.3, s=2.0, **mode).manual_seed(5)
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        _step(opt, params, gen)
        for p, old in zip(params, before):
            st = opt.state[p]
            want = old - 0.3 * (p.grad + 2.0 * st["z"]) * st["u"]
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", list(_paths()))
def test_a_resumed_run_draws_what_the_straight_run_draws(path):
    """Six steps straight, or three, a checkpoint (torch.save), and three in a new optimizer while
    torch's global generator is elsewhere: bit for bit the same. Without the saved generator, not."""
    mode = _paths()[path]
    Noisy = optdsl.compile(NOISY, "noisy_sgd.opt")
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(_device(mode)) for i, s in enumerate(SHAPES)]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    straight = Noisy(a, **mode)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        _step(straight, a, gen)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    mid = [p.detach().clone() for p in a]
    gen_state = gen.get_state()
    for _ in range(3):
        _step(straight, a, gen)

    torch.manual_seed(4321)
    torch.rand(5)
    for restore in (True, False):
        b = [torch.nn.Parameter(x.clone()) for x in mid]
        resumed = Noisy(b, **mode)
        buffer.seek(0)
        saved = torch.load(buffer)
        if not restore:  # the generator travels at the top level and, for DCP, in each group too
            del saved["rng_state"]
            for group in saved["param_groups"]:
                del group["rng_state"]
        resumed.load_state_dict(saved)
        gen.set_state(gen_state)
        for _ in range(3):
            _step(resumed, b, gen)
        same = all(torch.equal(x, y) for x, y in zip(a, b))
        assert same == restore, f"restore={restore}"


@pytest.mark.parametrize("path", list(_paths()))
def test_stepping_leaves_the_global_rng_alone(path):
    mode = _paths()[path]
    Noisy = optdsl.compile(NOISY, "noisy_sgd.opt")
    params = [torch.nn.Parameter(torch.randn(s).to(_device(mode))) for s in SHAPES]
    opt = Noisy(params, **mode)
    gen = torch.Generator().manual_seed(0)
    before = torch.get_rng_state()
    for _ in range(2):
        _step(opt, params, gen)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("path", list(_paths()))
def test_optimizers_made_one_after_the_other_draw_differently_and_reproducibly(path):
    """Each instance's generator is salted with how many of its class the process made before it:
    two made back to back differ (they used to draw alike); a script that makes them in the same
    order again, after torch.manual_seed, draws the same; manual_seed() makes two alike on purpose."""
    mode = _paths()[path]
    Draws = optdsl.compile(DRAWS, "draws.opt")
    made = sys.modules[Draws.__module__]._MADE

    def two_runs(seeds=(None, None)):
        out = []
        for seed in seeds:
            params = [torch.nn.Parameter(torch.zeros(4, 6, device=_device(mode)))]
            opt = Draws(params, **mode)
            if seed is not None:
                opt.manual_seed(seed)
            _step(opt, params, torch.Generator().manual_seed(0))
            out.append(opt.state[params[0]]["z"].clone())
        return out

    made[0] = 0
    torch.manual_seed(11)
    x, y = two_runs()
    assert not torch.equal(x, y)
    made[0] = 0
    torch.manual_seed(11)
    x2, y2 = two_runs()
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, y3 = two_runs((7, 7))
    assert torch.equal(x3, y3)


def test_the_fused_stream_is_deterministic_and_keyed_by_the_seed():
    _fused_ok()
    Draws = optdsl.compile(DRAWS, "draws.opt")

    def run(seed):
        params = [torch.nn.Parameter(torch.zeros(s, device=_device(dict(fused=True)))) for s in [(33, 40), (33, 40)]]
        opt = Draws(params, fused=True).manual_seed(seed)
        _step(opt, params, torch.Generator().manual_seed(0))
        return [opt.state[p]["z"].clone() for p in params]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])  # another seed; another tensor


@pytest.mark.parametrize("src, message, where", [
    ("state d: group\ngroup d = norm(randn())\np -= d * g\n", "cannot stand in a group statement", "3:16"),
    ("state m = randn()\np -= m * g\n", "a state's initial value", "2:11"),
    ("p -= randn(g)\n", "randn() takes 0 arguments, got 1", "2:6"),
    ("rule rand() > 0.5 {\np -= g\n}\nrule {\np -= 2 * g\n}\n", "a rule's condition", "2:6"),
    ("state z\nz = p\np -= g\non eval {\np = z + rand()\n}\non train {\np = z\n}\n",
     "'on eval' runs between steps", "6:9"),
])
def test_draw_errors_name_the_place(src, message, where):
    with pytest.raises(optdsl.SpecError) as err:
        optdsl.compile("optimizer R\n" + src, "r.opt")
    assert message in str(err.value) and f"r.opt:{where}:" in str(err.value), str(err.value)


def test_each_round_of_a_repeat_draws_anew():
    """`repeat 3 { s = s + randn() }` adds three independent draws (variance 3), not one draw
    three times (variance 9); for-loop and foreach alike."""
    Sum = optdsl.compile("optimizer Sum\nstate s\nrepeat 3 {\ns = s + randn()\n}\np -= 0 * g\n", "sum.opt")
    out = []
    for mode in (dict(foreach=False), dict(foreach=True)):
        params = [torch.nn.Parameter(torch.zeros(200, 100, dtype=torch.float64))]
        opt = Sum(params, **mode).manual_seed(2)
        _step(opt, params, torch.Generator().manual_seed(0))
        out.append(opt.state[params[0]]["s"])
    assert torch.equal(out[0], out[1])
    n = out[0].numel()
    assert abs(out[0].var() - 3) < 5 * 3 * math.sqrt(2 / n)


def test_a_compiled_step_draws_in_one_graph():
    """torch.compile(opt.step, fullgraph=True): the draws come from torch's generator there (as
    documented), in one graph, and the step still moves the parameters."""
    from torch._dynamo.testing import CompileCounter
    Noisy = optdsl.compile(NOISY, "noisy_sgd.opt")
    params = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    opt = Noisy(params)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        step()
    assert counter.frame_count == 1
    assert all(not torch.equal(p, q) and torch.isfinite(p).all() for p, q in zip(params, before))
