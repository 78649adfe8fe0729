"""Data-parallel (DDP) and fully-sharded (FSDP2 `fully_shard`) training with generated
optimizers give the parameters of one process training on the whole batch.

Two processes on the gloo backend, CPU, float64. Each rank takes half of every batch; the
loss is a mean, so the averaged gradient is the whole batch's. nSGDA divides by the norm of
each whole parameter: under FSDP2 a parameter is a DTensor sharded by rows, and the norm
must still be the norm of the whole parameter, not of the local shard. The model has a
(1,) parameter, so one rank holds an empty shard of it.

All scenarios run in one spawn (starting processes and process groups costs seconds);
the tests below check its results one scenario each.
"""
from __future__ import annotations

import importlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

WORLD = 2
STEPS = 4
SCENARIOS = [(mode, name, foreach) for mode in ("ddp", "fsdp") for name in ("adamw", "nsgda")
             for foreach in (False, True)]
KWARGS = {"adamw": dict(lr=0.05, wd=0.1), "nsgda": dict(lr=0.05, momentum=0.5, wd=0.1)}
BF16_STATES = ("fsdp-bf16-states", "adamw", True)  # stochastic rounding of sharded bfloat16 states


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 7)
        self.b = torch.nn.Linear(7, 3)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=gen, dtype=torch.float64),
             torch.randn(8, 3, generator=gen, dtype=torch.float64)) for _ in range(STEPS)]


def _net():
    torch.manual_seed(0)
    return Net().double()


def _train(model, opt, batches, rank=0, world=1):
    for x, y in batches:
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()


def _optimizer(name):
    # the committed generated module: compiling the spec again in every process costs seconds
    module = importlib.import_module(f"generated.{name}")
    return getattr(module, module.__all__[0])


def _worker(rank, init_file, out):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for mode, name, foreach in SCENARIOS + [BF16_STATES]:
            Opt = _optimizer(name)
            kwargs = dict(KWARGS[name], state_dtype=torch.bfloat16 if "bf16" in mode else None)
            model = _net()
            if mode == "ddp":
                wrapped = DistributedDataParallel(model)
                opt = Opt(wrapped.parameters(), foreach=foreach, **kwargs)
                _train(wrapped, opt, _batches(), rank, WORLD)
                params = [p.detach().clone() for p in model.parameters()]
            else:
                fully_shard(model.a)
                fully_shard(model.b)
                fully_shard(model)
                opt = Opt(model.parameters(), foreach=foreach, **kwargs)
                assert all(type(p).__name__ == "DTensor" for p in model.parameters())
                assert model.a.weight.to_local().shape[0] < model.a.weight.shape[0]  # rows split between ranks
                _train(model, opt, _batches(), rank, WORLD)
                params = [p.full_tensor().detach().clone() for p in model.parameters()]
                if kwargs["state_dtype"]:
                    assert {s["exp_avg"].dtype for s in opt.state.values()} == {torch.bfloat16}
            results[(mode, name, foreach)] = params
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available on this platform")
    import torch.distributed.fsdp  # noqa: F401 - imported once here, inherited by the forked ranks
    import torch.multiprocessing as mp
    for name in KWARGS:
        _optimizer(name)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        # fork, as DataLoader workers do (one thread each): a fresh interpreter per rank would spend
        # seconds importing torch again
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_worker, args=(os.path.join(tmp, "init"), out), nprocs=WORLD, join=True,
                           start_method=method)
        return torch.load(out)


@pytest.mark.parametrize("mode, name, foreach", SCENARIOS)
def test_distributed_training_matches_one_process(distributed, mode, name, foreach):
    Opt = _optimizer(name)
    model = _net()
    _train(model, Opt(model.parameters(), foreach=foreach, **KWARGS[name]), _batches())
    expected = [p.detach() for p in model.parameters()]
    got = distributed[(mode, name, foreach)]
    assert [p.shape for p in got] == [p.shape for p in expected]
    for p, q in zip(got, expected):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.equal(expected[0], _net().a.weight)  # training moved them


def test_shard_norm_would_differ():
    """What the nSGDA cases guard against: the norm of one shard is not the whole norm."""
    w = _net().a.weight
    assert abs(torch.linalg.vector_norm(w[:4]).item() - torch.linalg.vector_norm(w).item()) > 0.1


def test_sharded_bfloat16_states_train_like_float32_states(distributed):
    # Stochastic rounding draws its own noise on each rank: close to the float32-state run, not equal.
    model = _net()
    _train(model, _optimizer("adamw")(model.parameters(), **KWARGS["adamw"]), _batches())
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), _net().parameters()))
    for p, q in zip(distributed[BF16_STATES], model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=0.02 * moved)
