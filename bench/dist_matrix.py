"""Every generated optimizer, sharded, against one process: the scenario matrix of issue 15.

A scenario is (mode, spec, path, dtype): mode `ddp` (DistributedDataParallel, replicated
parameters), `fsdp` (FSDP2 `fully_shard`, every parameter a DTensor sharded by rows) or `tp`
(tensor parallel: `a` ColwiseParallel, `b` RowwiseParallel, the gain a plain tensor; every rank
trains on the whole batch), `shapes` (FSDP2 on `Shapes`: parameters of length 1, or shorter than
the mesh, along the axis it splits) or `2d` (4 ranks: FSDP2 over tensor parallelism on a 2 x 2 mesh, as
torchtitan; `--modes 2d --world 4`); path `loop`, `foreach` or `fused` (the Triton kernels, run by the
interpreter on CPU). Under ddp and fsdp each rank trains on its slice of every batch; the loss is a mean, so the averaged gradient is the whole
batch's and the parameters after STEPS steps must equal one process's.

The model's shapes make the shards uneven and some empty: over 2 ranks the 7 rows of `a` split
4 + 3 and the (1,) `scale` 1 + 0; over 4 ranks `b`'s 3 rows split 1 + 1 + 1 + 0.

    python bench/dist_matrix.py                      # 2 and 4 processes, every scenario: the tally
    python bench/dist_matrix.py --world 2 --paths fused --specs adamw,muon -v

All scenarios of one world size run in one spawn of processes (starting process groups costs
seconds); tests/test_distributed.py uses `run` for its own matrix.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = sorted(f[:-4] for f in os.listdir(os.path.join(ROOT, "specs")) if f.endswith(".opt"))
PATHS = {"loop": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False),
         "fused": dict(foreach=False, fused=True)}
MODES = ("ddp", "fsdp", "tp", "tp1", "shapes", "rank3", "rank3diag", "onediag", "shapesonediag")
# the model's hidden width, where not 7: torch's tensor parallelism splits it evenly; `tp1`: tensor
# parallelism of a hidden width of 1 (a's 1 x 5 weight split by rows, b's 3 x 1 by columns: one rank
# holds each, the other an empty shard; reductions over that axis are the identity)
HIDDEN = {"tp": 8, "2d": 8, "tp1": 1}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
DTYPES_NAME = {v: k for k, v in DTYPES.items()}
STATE_DTYPES = {"bf16": torch.bfloat16, "int8": "int8", "int4": "int4",  # a mode's suffix: the states' state_dtype
                "int8s": "int8_stochastic", "int4s": "int4_stochastic"}
LOWBIT = {"int8", "int4", "int8s", "int4s"}  # the suffixes of low-bit states
CHECKPOINTS = tempfile.gettempdir()  # where `save` scenarios write and `load` ones read (set before a run)
STEPS = 3
TIMEOUT = 300  # seconds a rank waits in a collective (a loaded 2-core machine is slow)
# float64: the shards' partial sums add in another order than one process's sums, a few ulps
# (1e-16) per step, grown by at most the optimizers' normalisations; 1e-10 leaves that room and
# catches any real difference (a shard's norm instead of the whole's is off by 10%).
# float32: the same, at float32's 1e-7 ulps.
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


class Net(torch.nn.Module):
    def __init__(self, hidden=7):
        super().__init__()
        self.a = torch.nn.Linear(5, hidden)
        self.b = torch.nn.Linear(hidden, 3)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


class Shapes(torch.nn.Module):
    """Parameters FSDP2's Shard(0) splits into empty shards, of length 1 along an axis a reduction
    or a state (rows, cols) reduces: a 1 x 5 and a 5 x 1 matrix, a (1,) and a (3,) vector. Over 4
    ranks: 1 + 0 + 0 + 0 rows, 2 + 2 + 1 + 0, 1 + 0 + 0 + 0, 1 + 1 + 1 + 0 (over 2: 1 + 0, 3 + 2,
    1 + 0, 2 + 1). A 1 x n matrix's column state is the matrix's own shape: DTensor will not split
    it over more ranks than its one row, and replicated it meets p's split row in every update."""

    def __init__(self):
        super().__init__()
        self.e = torch.nn.Parameter(torch.randn(1, 5))
        self.f = torch.nn.Parameter(torch.randn(5, 1))
        self.s = torch.nn.Parameter(torch.randn(1))
        self.v = torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.tanh(x * self.e) @ self.f * self.s + torch.tanh(x[:, :3] * self.v)


class Rank3(torch.nn.Module):
    """Rank-3 parameters (Kron's per-axis factors: gram(K) and axis(K) states) that FSDP2's Shard(0)
    splits along axis 0: (4, 3, 5), (5, 1, 3) with an axis of length 1, (3, 2, 4). Over 2 ranks 2 + 2,
    3 + 2, 2 + 1 slabs; over 4 ranks 1 + 1 + 1 + 1, 2 + 2 + 1 + 0 and 1 + 1 + 1 + 0 (empty shards)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 3, 5) / 2)
        self.k = torch.nn.Parameter(torch.randn(5, 1, 3) / 2)
        self.c = torch.nn.Parameter(torch.randn(3, 2, 4) / 2)

    def forward(self, x):
        h = torch.tanh(torch.einsum("bi,jki->bjk", x, self.w)).mean(1)  # (batch, 3)
        return h + torch.einsum("bi,iok->bk", x, self.k) + torch.einsum("bl,kjl->bk", torch.tanh(x[:, :4]), self.c)


# The modes on Rank3 (Kron): its rule of three triangular gram(K) factors, and (all_diag) of three axis(K) ones
RANK3 = {"rank3": {}, "rank3diag": dict(memory_save_mode="all_diag")}
# Kron with memory_save_mode="one_diag" (the larger side's factor diagonal): on Net, a's 7 x 5 takes dL and a
# triangular QR (5 x 5, replicated under Shard(0): a steps on its shards, _on_owners' `replicated`), b's 3 x 7
# QL (split like b: b steps on its owner); on Shapes, f's 5 x 1 takes dL and QR (1 x 1), split 2 + 2 + 1 + 0 at
# 4 ranks (an empty shard)
ONEDIAG = {"onediag": "net", "shapesonediag": "shapes"}
MODE_KWARGS = {**RANK3, **{mode: dict(memory_save_mode="one_diag") for mode in ONEDIAG}}


def model_of(mode, dtype):
    """The model a scenario of `mode` trains, seeded: Shapes for `shapes`, Rank3 for RANK3's, else Net."""
    mode = ONEDIAG.get(mode, mode)
    if mode == "shapes":
        torch.manual_seed(0)
        return Shapes().to(dtype)
    if mode in RANK3:
        torch.manual_seed(0)
        return Rank3().to(dtype)
    return net(dtype, HIDDEN.get(mode, 7))


def batches(dtype):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype))
            for _ in range(STEPS)]


def net(dtype, hidden=7):
    torch.manual_seed(0)
    return Net(hidden).to(dtype)


class LowBitNet(torch.nn.Module):
    """The model of the low-bit scenarios: states of at least 4096 numbers (quant.MIN_NUMEL), sharded
    unevenly by FSDP2 over 2 ranks: a's 5 rows of 4100 split 3 + 2 (12300 and 8200 numbers, each
    over 4096, so one process holding either piece quantises it too; blocks straddle rows, and rank
    1's shard needs fewer rows of codes than rank 0's), and e's one row held by rank 0 (rank 1's
    shard is empty). b and the biases stay float32."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4100, 5)
        self.b = torch.nn.Linear(5, 3)
        self.e = torch.nn.Parameter(torch.randn(1, 4100))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + torch.tanh(self.e).pow(2).mean() * x[:, :3]


def lowbit_batches(dtype):
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 4100, generator=gen).to(dtype) / 30, torch.randn(8, 3, generator=gen).to(dtype))
            for _ in range(STEPS)]


def lowbit_net(dtype):
    torch.manual_seed(0)
    return LowBitNet().to(dtype)


# Specs whose update is element by element: under FSDP2 each rank quantises its own shard, in blocks
# laid from the shard's first number, and one process with each shard's piece as a parameter of its
# own quantises the same blocks (others, Adafactor: one process with the whole parameters, whose
# low-bit states, the column factors, are laid alike: replicated, or held whole by one rank)
ELEMENTWISE = {"adamw", "lion"}


def train_recorded(model, opt, data, rank=0, world=1):
    """train(), returning each step's gradient of every parameter (whole): what one_process_lowbit
    steps on. FSDP2's gradients differ from one process's by an ulp (its matmuls on the gathered
    parameters), which may turn a low-bit code: stepping on the same gradients, the optimizers'
    steps must agree to the bit."""
    grads = []
    for x, y in data:
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        grads.append([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                      for p in model.parameters()])
        opt.step()
    return grads


def one_process_lowbit(name, path, dtype, state_dtype, grads, world=2, model=None, cuts=None):
    """One process stepping on the gradients `grads` (per step, per parameter: train_recorded's), its
    optimizer given each parameter cut into the pieces FSDP2's Shard(0) gives the ranks
    (torch.chunk's split) for the specs in ELEMENTWISE, else whole. `model`: the model's parameters
    (lowbit_net's); `cuts`: per parameter, the splits (axis, parts) that cut it into the ranks' pieces
    (_boxes; [] whole), in place of Shard(0)'s. Stochastic rounding: the optimizer seeded as the
    ranks' (seeded)."""
    params = [p.detach() for p in (model or lowbit_net(dtype)).parameters()]
    if cuts is None:
        cuts = [[(0, world)] if name in ELEMENTWISE else [] for _ in params]
    boxes = [_boxes(p.shape, c) for p, c in zip(params, cuts)]
    pieces = [[p[box].contiguous().clone().requires_grad_() for box in bs] for p, bs in zip(params, boxes)]
    opt = seeded(make(name, [x for ps in pieces for x in ps], path, state_dtype=state_dtype))
    return _step_pieces(opt, params, pieces, boxes, grads), opt


def _step_pieces(opt, params, pieces, boxes, grads):
    """Step `opt` over the pieces (each its box of a parameter's gradient), then each parameter whole
    again from its pieces."""
    for step in grads:
        for ps, bs, g in zip(pieces, boxes, step):
            for x_, box in zip(ps, bs):
                x_.grad = g[box].contiguous().clone()
        opt.step()
    out = []
    for p, ps, bs in zip(params, pieces, boxes):
        whole = p.clone()
        for x_, box in zip(ps, bs):
            whole[box] = x_.detach()
        out.append(whole)
    return out


def _boxes(shape, splits):
    """The pieces (index tuples) a tensor of `shape` is cut into by the splits (axis, parts) one after
    the other, each as torch.chunk (DTensor's Shard) cuts: the first parts the larger, the last empty."""
    boxes = [tuple(slice(0, n) for n in shape)]
    for axis, parts in splits:
        cut = []
        for box in boxes:
            start, stop = box[axis].start, box[axis].stop
            chunk = -(-(stop - start) // parts)
            for k in range(parts):
                lo, hi = min(start + k * chunk, stop), min(start + (k + 1) * chunk, stop)
                if hi > lo:
                    cut.append(box[:axis] + (slice(lo, hi),) + box[axis + 1:])
        boxes = cut
    return boxes


class WideNet(torch.nn.Module):
    """The model of the tensor-parallel and stochastic-rounding low-bit scenarios: states of at least
    4096 numbers whose shards start on a block boundary (int8's 2048 and int4's 256 numbers) at 2 and
    4 ranks, so a shard's blocks are one process's blocks. `a` (8 x 2048) is split by rows (FSDP2,
    ColwiseParallel), `b` (2048 x 8) by rows (FSDP2) or columns (RowwiseParallel: a shard of 2048 x 4
    is 2048 runs of 4 numbers in the whole matrix), or both on a 2-D mesh."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(2048, 8)
        self.b = torch.nn.Linear(8, 2048)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def wide_batches(dtype):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 2048, generator=gen).to(dtype) / 30, torch.randn(8, 2048, generator=gen).to(dtype))
            for _ in range(STEPS)]


def wide_net(dtype):
    torch.manual_seed(0)
    return WideNet().to(dtype)


# WideNet's pieces per mode: the splits (axis, parts) of a.weight, a.bias, b.weight, b.bias that
# give each rank its shard (tensor parallelism's first, then FSDP2's on the 2-D mesh)
WIDE_CUTS = {"tp": [[(0, 2)], [(0, 2)], [(1, 2)], []], "2d": [[(0, 2), (0, 2)], [(0, 2), (0, 2)], [(0, 2), (1, 2)], [(0, 2)]]}


def seeded(opt):
    """The optimizer, its own generator seeded where it rounds stochastically (every rank and the
    reference alike; the generator is otherwise salted with how many were made in the process)."""
    if any(isinstance(g.get("state_dtype"), str) and g["state_dtype"].endswith("_stochastic") for g in opt.param_groups):
        opt.manual_seed(7)
    return opt


def spec_module(name):
    """The committed generated module (compiling the spec again in every process costs seconds); a
    name with a slash is a spec under tests/specs/ (sharding/kept_loop_norms), compiled once per process,
    before the ranks fork (run() makes each scenario's optimizer first)."""
    if "/" not in name:
        return importlib.import_module(f"generated.{name}")
    key = "_optdsl_test_spec_" + name.replace("/", "_")
    if key not in sys.modules:
        import types

        from optdsl.pipeline import compile_source
        path = os.path.join(ROOT, "tests", "specs", f"{name}.opt")
        with open(path, encoding="utf-8") as f:
            code = compile_source(f.read(), path).python
        mod = types.ModuleType(key)
        sys.modules[key] = mod
        exec(compile(code, path, "exec"), mod.__dict__)
    return sys.modules[key]


def optimizer(name):
    mod = spec_module(name)
    return getattr(mod, mod.__all__[0])


# Lookahead steps back every k steps: within the steps run
KWARGS = {"lookahead_adam": dict(k=2)}


def train(model, opt, data, rank=0, world=1):
    for x, y in data:
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
            loss.backward()
            return loss
        opt.step(closure)


def one_process(name, path, dtype, hidden=7, world=1, mode=None):
    """One process training on the whole batch; for the specs in AVERAGED with world > 1, on the
    ranks' gradient instead: each of `world` slices' own, averaged. `mode` "shapes": on Shapes."""
    model = model_of(mode, dtype) if mode == "shapes" or mode in MODE_KWARGS else net(dtype, hidden)
    opt = make(name, model.parameters(), path, **MODE_KWARGS.get(mode, {}))
    if name in AVERAGED and world > 1:
        train_averaged(model, opt, batches(dtype), world)
    else:
        train(model, opt, batches(dtype))
    return [p.detach() for p in model.parameters()]


# SOAP's eigenbases: at its first step the Gram matrices of a 7 x 5 gradient (G G^T of rank 5, and
# the 3 x 7 one's G^T G of rank 3) have a repeated eigenvalue 0, whose eigenvectors eigh may return
# in any rotation, and the next steps' updates depend on that rotation. The ranks' averaged gradient
# differs from one process's whole-batch gradient in the last bit (each rank's loss is a mean over
# its slice), which turns it: 7e-8 off in float64 under DDP, where nothing is sharded. Its reference
# is one process given the ranks' gradient: each slice's, averaged. At 2 ranks that is the
# collectives' value to the bit ((g0 + g1) / 2 and g0 / 2 + g1 / 2 round alike); at 4 the ranks
# may add in another order.
AVERAGED = {"soap"}


def train_averaged(model, opt, data, world):
    """One process stepping on the average of `world` slices' gradients, as data-parallel ranks do."""
    params = list(model.parameters())
    for x, y in data:

        def closure():
            total, losses = None, []
            for rank in range(world):
                rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
                loss.backward()
                losses.append(loss.detach())
                grads = [p.grad.clone() for p in params]
                total = grads if total is None else [a + b for a, b in zip(total, grads)]
            for p, g in zip(params, total):
                p.grad = g / world
            return sum(losses) / world
        opt.step(closure)


def make(name, params, path, **kwargs):
    opt = optimizer(name)(params, **PATHS[path], **KWARGS.get(name, {}), **kwargs)
    if hasattr(spec_module(name), "_random_like"):
        # a spec drawing randn()/rand() (Kron): the optimizer's own generator is salted with how many
        # were made before it in the process; seeded, every rank and the reference draw alike
        opt.manual_seed(1)
    return opt


def sharded(mode, name, path, dtype, rank, world):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    mode, _, low = mode.partition("-")
    kwargs = dict(state_dtype=STATE_DTYPES[low]) if low else {}  # sharded bfloat16, int8, int4 states
    model = net(dtype) if low in ("", "bf16") else lowbit_net(dtype)
    if mode == "shapes":  # FSDP2 on parameters of length 1 (or shorter than the mesh) along the split axis
        model, mode = model_of("shapes", dtype), "fsdp"
    if mode in MODE_KWARGS or mode.startswith("count") and mode[5:] in MODE_KWARGS:  # FSDP2 on rank-3 parameters
        # (Kron's per-axis states), or with Kron's one_diag; count<mode>: the collectives of a step of them
        rank3 = mode.removeprefix("count")
        model, kwargs = model_of(rank3, dtype), {**kwargs, **MODE_KWARGS[rank3]}
        mode = "count" if mode != rank3 else "fsdp"
    data = batches(dtype) if low in ("", "bf16") else lowbit_batches(dtype)
    if mode.startswith(("wsave", "wload")):  # WideNet's reshardable checkpoints across layouts
        return wide_resharded(mode, name, path, dtype, rank, world, STATE_DTYPES[low])
    if low in LOWBIT and (mode in ("tp", "2d") or low.endswith("s")):  # WideNet: shards on block boundaries
        return wide(mode, name, path, dtype, rank, world, kwargs)
    if mode == "ddp":
        wrapped = DistributedDataParallel(model)
        train(wrapped, make(name, wrapped.parameters(), path, **kwargs), batches(dtype), rank, world)
        return [p.detach().clone() for p in model.parameters()]
    if mode in ("tp", "tp1"):  # tensor parallel, as Megatron's MLP: a's rows split, b's columns; every rank the whole batch
        from torch.distributed.tensor import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        model = net(dtype, HIDDEN[mode])
        # a's output stays a DTensor into b: from a local shard torch infers the whole shape as even (2 x 1)
        parallelize_module(model, init_device_mesh("cpu", (world,)),
                           {"a": ColwiseParallel(use_local_output=mode == "tp"), "b": RowwiseParallel()})
        train(model, make(name, model.parameters(), path, **kwargs), batches(dtype))
        return [p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
                for p in model.parameters()]
    if mode == "2d":  # FSDP2 over tensor parallelism, as torchtitan: a 2-D mesh, data parallel x tensor parallel
        from torch.distributed.tensor import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        model = net(dtype, HIDDEN["2d"])
        parallelize_module(model, mesh["tp"], {"a": ColwiseParallel(), "b": RowwiseParallel()})
        for module in (model.a, model.b, model):
            fully_shard(module, mesh=mesh["dp"])
        train(model, make(name, model.parameters(), path, **kwargs), batches(dtype), mesh["dp"].get_local_rank(),
              world // 2)
        return [p.full_tensor().detach().clone() for p in model.parameters()]
    for module in (model.a, model.b) if isinstance(model, (Net, LowBitNet)) else ():
        fully_shard(module)
    fully_shard(model)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    if mode in ("rsave", "rload"):  # low-bit checkpoints with reshardable=True: resharded()
        return resharded(mode, name, path, dtype, rank, world, model, STATE_DTYPES[low])
    if low == "bf16" and mode in ("save", "load", "loadkeep"):  # bfloat16 states through DCP: bf16_checkpoint()
        return bf16_checkpoint(mode, name, path, dtype, rank, world, model)
    if mode in ("save", "load"):  # torch.distributed.checkpoint: saved by some ranks, loaded by others
        opt = make(name, model.parameters(), path, **kwargs)
        step = train_recorded if low in LOWBIT else train
        grads = step(model, opt, data, rank, world) if mode == "save" else None
        where = f"{name}-{path}-{DTYPES_NAME[dtype]}" + (f"-{low}" if low else "")
        checkpoint(model, opt, os.path.join(CHECKPOINTS, where), save=mode == "save")
        states = whole_states(model, opt)  # as saved, or as loaded
        if mode == "load":
            grads = step(model, opt, data, rank, world)
        params = [p.full_tensor().detach().clone() for p in model.parameters()]
        if low not in LOWBIT:
            return params, states
        if mode == "save":
            return params, states, grads
        # and the codes after training, read back into float32 states: the state_dict's groups say state_dtype=None
        plain = make(name, model.parameters(), path)
        saved = opt.state_dict()
        plain.load_state_dict({**saved, "param_groups": [{**g, "state_dtype": None} for g in saved["param_groups"]]})
        return params, states, grads, (whole_states(model, opt), whole_states(model, plain))
    if mode == "count":  # the collectives each step makes (forward and backward outside: FSDP2's own)
        from torch.distributed.tensor.debug import CommDebugMode
        opt, calls = make(name, model.parameters(), path, **kwargs), {}  # {collective: calls per step}
        for x, y in batches(dtype):
            rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
            # CommDebugMode counts at the dispatcher: torch.distributed's calls (the fused path's and
            # _whole_list's all-reduces, the owners' gathers) and DTensor's functional collectives alike
            with CommDebugMode() as comm:
                opt.step()
            for op, n in comm.get_comm_counts().items():  # c10d.allreduce_ and _c10d_functional.all_reduce: allreduce
                key = str(op).split(".")[-1].replace("_", "")
                calls[key] = calls.get(key, 0) + n / STEPS
        return [p.full_tensor().detach().clone() for p in model.parameters()], calls
    opt = make(name, model.parameters(), path, **kwargs)
    if low in LOWBIT:  # the gradients stepped on, the states, the bytes each rank's states take
        grads = train_recorded(model, opt, data, rank, world)
        mine = {(i, k): (v.to_local() if hasattr(v, "to_local") else v).nbytes
                for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items() if torch.is_tensor(v)}
        every = [None] * world
        dist.all_gather_object(every, mine)
        return ([p.full_tensor().detach().clone() for p in model.parameters()], whole_states(model, opt), grads,
                {key: [r[key] for r in every] for key in mine})
    train(model, opt, data, rank, world)
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def wide_laid(layout, dtype, rank, world):
    """WideNet laid out under FSDP2 (`fsdp`), tensor parallelism (`tp`: a ColwiseParallel, b
    RowwiseParallel, every rank the whole batch), both on a 2-D mesh (`2d`, 4 ranks) or in one process
    without a process group (`one`): the model, and this rank's place among the data-parallel ranks
    and their number (its slice of every batch)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    model, dp, dps = wide_net(dtype), rank, world
    if layout == "fsdp":
        for module in (model.a, model.b, model):
            fully_shard(module)
    elif layout in ("tp", "2d"):
        mesh = init_device_mesh("cpu", (world,) if layout == "tp" else (world // 2, 2),
                                mesh_dim_names=None if layout == "tp" else ("dp", "tp"))
        parallelize_module(model, mesh if layout == "tp" else mesh["tp"], {"a": ColwiseParallel(), "b": RowwiseParallel()})
        dp, dps = (0, 1) if layout == "tp" else (mesh["dp"].get_local_rank(), world // 2)
        if layout == "2d":
            for module in (model.a, model.b, model):
                fully_shard(module, mesh=mesh["dp"])
    return model, dp, dps


def wide(mode, name, path, dtype, rank, world, kwargs):
    """Low-bit states of WideNet laid out as `mode` says (wide_laid): the parameters, the states
    (whole) and the gradients stepped on (whole, per step)."""
    model, dp, dps = wide_laid(mode, dtype, rank, world)
    data = wide_batches(dtype)
    opt = seeded(make(name, model.parameters(), path, **kwargs))
    grads = train_recorded(model, opt, data, dp, dps)
    return ([p.full_tensor().detach().clone() for p in model.parameters()], whole_states(model, opt), grads,
            {(i, k): [tuple(v.placements), tuple(v.shape)] for i, p in enumerate(model.parameters())
             for k, v in opt.state[p].items() if hasattr(v, "placements")}, places(name, model))


def places(name, model):
    """Per parameter, whether the places of its shard's numbers in the whole tensor, as the stochastic
    rounding counts them (the torch paths' _global_index, the kernels' _place over _place_table's
    row), are where DTensor puts them (distribute_tensor of 0 .. numel - 1, each rank its part)."""
    from torch.distributed.tensor import distribute_tensor
    mod = spec_module(name)
    out = []
    for p in model.parameters():
        where = distribute_tensor(torch.arange(p.numel()).view(p.shape), p.device_mesh, p.placements,
                                  src_data_rank=None).to_local().reshape(-1)
        base, l1, l2, s0, s1, s2 = mod._place_table([p.to_local()], [p], p.device)[0].tolist()
        k = torch.arange(where.numel())
        kernel = base + k // (l1 * l2) * s0 + k // l2 % l1 * s1 + k % l2 * s2
        out.append(torch.equal(mod._global_index(p), where) and torch.equal(kernel, where))
    return out


def whole_states(model, opt):
    """{(parameter index, state name): the whole state tensor} of every parameter."""
    out = {}
    for i, p in enumerate(model.parameters()):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                out[(i, key)] = (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
    return out


def checkpoint(model, opt, where, save):
    """Save (or load) model and optimizer through torch.distributed.checkpoint, as torchtitan does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd
    state = {"model": sd.get_model_state_dict(model), "optim": sd.get_optimizer_state_dict(model, opt)}
    if save:
        dcp.save(state, checkpoint_id=where)
        return
    dcp.load(state, checkpoint_id=where)
    sd.set_model_state_dict(model, state["model"])
    sd.set_optimizer_state_dict(model, opt, state["optim"])


def bf16_checkpoint(mode, name, path, dtype, rank, world, model):
    """bfloat16 states (stochastic rounding) through torch.distributed.checkpoint. `save` trains STEPS
    steps from the generator seeded 7, saves, and trains STEPS more: the uninterrupted run. `load`
    seeds its generator otherwise (11), loads, and trains STEPS: it goes on as the uninterrupted run
    only if the saved generator came back (the groups carry it). `loadkeep`: loads with
    checkpoint_generator=False (a checkpoint without the generator loads so), going on from 11.
    Returns the parameters (whole), the states as saved or loaded, the gradients stepped on, and
    (`save`) the uninterrupted run's parameters. `model`: FSDP2's, or None: one process, unsharded."""
    model = model or net(dtype)
    opt = make(name, model.parameters(), path, state_dtype=torch.bfloat16).manual_seed(7 if mode == "save" else 11)
    where = os.path.join(CHECKPOINTS, f"{name}-{path}-{DTYPES_NAME[dtype]}-bf16")
    if mode == "save":
        grads = train_recorded(model, opt, batches(dtype), rank, world)
    if mode == "loadkeep":
        opt.checkpoint_generator = False
    checkpoint(model, opt, where, save=mode == "save")
    states = whole_states(model, opt)
    if mode == "save":
        params = [_whole(p) for p in model.parameters()]
        train(model, opt, batches(dtype), rank, world)
        return params, states, grads, [_whole(p) for p in model.parameters()]
    grads = train_recorded(model, opt, batches(dtype), rank, world)
    return [_whole(p) for p in model.parameters()], states, grads


def one_process_bf16(name, path, dtype, grads):
    """One process, whole parameters, bfloat16 states, the generator seeded as bf16_checkpoint's `save`:
    stepping on `grads` (each step's whole gradients: the saving ranks', then the loading ones'), never
    interrupted. Element-wise updates (AdamW) on the same gradients round the same numbers at the
    same places (stochastic rounding draws by a number's place in the whole tensor), so a resumed
    sharded run equals it to the bit."""
    model = net(dtype)
    opt = make(name, model.parameters(), path, state_dtype=torch.bfloat16).manual_seed(7)
    params = list(model.parameters())
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def resumed(name, path, dtype, low=""):
    """One process, no process group: the checkpoint that `save` wrote loaded, and training resumed
    (`low`: that of `save-<low>`, with those states)."""
    model = net(dtype) if low in ("", "bf16") else lowbit_net(dtype)
    opt = make(name, model.parameters(), path, **(dict(state_dtype=STATE_DTYPES[low]) if low else {}))
    checkpoint(model, opt, os.path.join(CHECKPOINTS, f"{name}-{path}-{DTYPES_NAME[dtype]}" + (f"-{low}" if low else "")),
               save=False)
    train(model, opt, batches(dtype) if low in ("", "bf16") else lowbit_batches(dtype))
    return [p.detach() for p in model.parameters()]


def resharded(mode, name, path, dtype, rank, world, model, fmt):
    """Low-bit states checkpointed with reshardable=True (state_dict() holds their float32 numbers):
    `rsave` trains STEPS steps and saves; `rload` (at another world size, or the same) loads, then
    trains STEPS more. Returns the parameters, the states as stored (whole: low-bit ones as the uint8
    DTensor of every rank's rows), the gradients stepped on, and `rsave` the numbers its state_dict
    held (whole), `rload` the states as loaded, before training on (as stored, and their numbers)."""
    opt = make(name, model.parameters(), path, state_dtype=fmt, reshardable=True)
    where = os.path.join(CHECKPOINTS, f"reshardable-{name}-{path}-{fmt}")
    if mode == "rsave":
        grads = train_recorded(model, opt, lowbit_batches(dtype), rank, world)
        checkpoint(model, opt, where, save=True)
        return [p.full_tensor().detach().clone() for p in model.parameters()], whole_states(model, opt), grads, \
            state_numbers(opt)
    checkpoint(model, opt, where, save=False)
    loaded = whole_states(model, opt), state_numbers(opt)
    grads = train_recorded(model, opt, lowbit_batches(dtype), rank, world)
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()], \
        whole_states(model, opt), grads, loaded


# WideNet's low-bit checkpoints with reshardable=True across layouts: `wsave_<layout>` trains STEPS steps
# and saves; `wload_<saved layout>_<layout>` loads that checkpoint in another layout and trains on
WIDE_LAYOUT_CUTS = {**WIDE_CUTS, "fsdp": [[(0, 2)]] * 4, "one": [[]] * 4}


def wide_resharded(mode, name, path, dtype, rank, world, fmt):
    """resharded() on WideNet, from one layout to another (wide_laid's: tensor parallelism, the 2-D
    mesh, FSDP2, one process): the parameters, the states as stored (whole), the gradients stepped on,
    and `wsave` the numbers its state_dict held (whole), its generator's state and the parameters after
    STEPS more steps (the uninterrupted run), `wload` the states as loaded (as stored, and their numbers)."""
    kind, saved, layout = (mode.split("_") + [None])[:3]
    layout = layout or saved
    model, dp, dps = wide_laid(layout, dtype, rank, world)
    opt = seeded(make(name, model.parameters(), path, state_dtype=fmt, reshardable=True))
    where = os.path.join(CHECKPOINTS, f"wide-{saved}-{name}-{path}-{fmt}")
    if kind == "wsave":  # and then STEPS more: what a resumed run in this layout must give, to the bit
        grads = train_recorded(model, opt, wide_batches(dtype), dp, dps)
        checkpoint(model, opt, where, save=True)
        saved = [_whole(p) for p in model.parameters()], whole_states(model, opt), grads, state_numbers(opt), \
            opt._rng.get_state()
        train(model, opt, wide_batches(dtype), dp, dps)
        return *saved, [_whole(p) for p in model.parameters()]
    opt.manual_seed(11)  # a resumed run draws from the saved generator, not from its own seed
    checkpoint(model, opt, where, save=False)
    loaded = whole_states(model, opt), state_numbers(opt)
    grads = train_recorded(model, opt, wide_batches(dtype), dp, dps)
    return [_whole(p) for p in model.parameters()], whole_states(model, opt), grads, loaded


def _whole(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def state_numbers(opt):
    """{(parameter index, state name): the whole tensor} of a one-group optimizer's state_dict() (with
    reshardable=True, low-bit states as the float32 numbers their codes hold)."""
    return {(i, key): (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
            for i, state in opt.state_dict()["state"].items() for key, value in state.items()}


def resumed_reshardable(name, path, dtype, fmt):
    """One process, no process group: `rload` of resharded() (the checkpoint `rsave` wrote on 2 ranks)."""
    return resharded("rload", name, path, dtype, 0, 1, lowbit_net(dtype), fmt)


def one_process_reshardable(name, path, dtype, fmt, params, numbers, grads, world, cuts=None, rng_state=None):
    """The run a reshardable low-bit checkpoint resumes as: one process starting from the saved
    parameters `params` and the float32 numbers `numbers` of the saved state_dict (whole), its
    optimizer holding each parameter cut into the pieces FSDP2's Shard(0) gives `world` ranks (the
    specs in ELEMENTWISE, else whole: the low-bit states of the others, Adafactor's column factors,
    are whole on a rank too), so that load_state_dict requantises each piece's numbers in the blocks
    a rank lays over its shard; then stepping on `grads`. Returns the parameters and the states right
    after loading ({(parameter index, state name): whole numbers, each piece dequantised}). `cuts`: per
    parameter, the splits (axis, parts) into the new layout's pieces (_boxes), in place of Shard(0)'s;
    `rng_state`: the saved generator's state (stochastic rounding), loaded with the states."""
    if cuts is None:
        cuts = [[(0, world)] if name in ELEMENTWISE else [] for _ in params]
    boxes = [_boxes(p.shape, c) for p, c in zip(params, cuts)]
    pieces = [[p[box].contiguous().clone().requires_grad_() for box in bs] for p, bs in zip(params, boxes)]
    flat = [x for ps in pieces for x in ps]
    opt = make(name, flat, path, state_dtype=fmt, reshardable=True)
    state, at = {}, 0
    for i, (p, bs) in enumerate(zip(params, boxes)):
        for box in bs:
            state[at] = {key: (v[box] if v.shape == p.shape else v).clone() for (j, key), v in numbers.items() if j == i}
            at += 1
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"],
                         **({} if rng_state is None else {"rng_state": rng_state})})
    numbers, loaded, at = opt.state_dict()["state"], {}, 0  # reshardable: each piece's numbers
    for i, (p, bs) in enumerate(zip(params, boxes)):
        for key in state[at]:
            if key != "step":
                parts = [numbers[at + k][key] for k in range(len(bs))]
                whole = parts[0].clone() if len(bs) == 1 else p.new_zeros(p.shape, dtype=parts[0].dtype)  # not the live state
                for part, box in zip(parts, bs) if len(bs) > 1 else ():
                    whole[box] = part
                loaded[(i, key)] = whole
        at += len(bs)
    return _step_pieces(opt, params, pieces, boxes, grads), loaded


def one_process_twice(name, path, dtype):
    """The run a checkpoint interrupts: STEPS steps, then the same batches again."""
    model = net(dtype)
    train(model, make(name, model.parameters(), path), batches(dtype) * 2)
    return [p.detach() for p in model.parameters()]


def why(e) -> str:
    """An error as a scenario records it: its first line; torch.distributed.checkpoint's (a
    BaseException, not an Exception) by the first rank's error within it."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _worker(rank, world, scenarios, init_file, out):
    torch.set_num_threads(1)
    # a scenario that fails on some ranks only leaves the others in a collective: time out, not hang
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    try:
        results = {}
        for mode, name, path, dtype in scenarios:
            try:
                results[(mode, name, path, dtype)] = sharded(mode, name, path, DTYPES[dtype], rank, world)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - recorded, the next scenario runs
                results[(mode, name, path, dtype)] = why(e)
                if os.environ.get("OPTDSL_DIST_TRACE"):
                    traceback.print_exc()
            # a scenario that failed on one rank only must not leave the others in a collective
            dist.barrier()
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def run(scenarios, world):
    """{scenario: full parameters after STEPS steps, or the error} from `world` gloo processes."""
    import torch.distributed.fsdp  # noqa: F401 - imported once here, inherited by the forked ranks
    import torch.multiprocessing as mp
    for name in {s[1] for s in scenarios}:
        optimizer(name)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        # fork, as DataLoader workers do (one thread each): a fresh interpreter per rank would spend
        # seconds importing torch again
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        try:
            mp.start_processes(_worker, args=(world, scenarios, os.path.join(tmp, "init"), out), nprocs=world,
                               join=True, start_method=method)
        except Exception as e:  # noqa: BLE001 - a rank killed by a signal: every scenario is lost
            why = [line for line in str(e).splitlines() if line.strip()][-1:] or ["?"]
            return {s: f"process died: {why[0]}" for s in scenarios}
        return torch.load(out)


def compare(got, expected, dtype) -> str:
    """'' when the sharded parameters equal one process's, else why not."""
    if isinstance(got, str):
        return got
    if [p.shape for p in got] != [p.shape for p in expected]:
        return f"shapes {[tuple(p.shape) for p in got]}"
    for k, (p, q) in enumerate(zip(got, expected)):
        try:
            torch.testing.assert_close(p, q, **TOLERANCE[dtype])
        except AssertionError:
            return f"parameter {k} off by {(p - q).abs().max().item():.3g}"
    return ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="2,4")
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("-v", "--verbose", action="store_true", help="print every failing scenario")
    args = parser.parse_args(argv)
    scenarios = [(m, s, p, d) for m in args.modes.split(",") for s in args.specs.split(",")
                 for p in args.paths.split(",") for d in args.dtypes.split(",")]
    total = matched = 0
    for world in map(int, args.world.split(",")):
        start = time.time()
        results = run(scenarios, world)
        expected = {}
        tally = {}
        for scenario in scenarios:
            mode, name, path, dtype = scenario
            hidden = HIDDEN.get(mode, 7)
            ranks = world if mode in ("ddp", "fsdp", "shapes") and name in AVERAGED else 1
            which = (name, path, dtype, hidden, ranks, mode if mode == "shapes" or mode in MODE_KWARGS else None)
            if which not in expected:
                try:
                    expected[which] = one_process(name, path, DTYPES[dtype], hidden, ranks, mode)
                except Exception as e:  # noqa: BLE001
                    expected[which] = f"one process fails: {e}"
            ref = expected[which]
            why = ref if isinstance(ref, str) else compare(results[scenario], ref, DTYPES[dtype])
            key = (mode, path, dtype)
            ok, n = tally.get(key, (0, 0))
            tally[key] = (ok + (not why), n + 1)
            if why and args.verbose:
                print(f"  world {world} {mode:4} {path:7} {dtype:7} {name:18} {why}")
        for (mode, path, dtype), (ok, n) in sorted(tally.items()):
            print(f"world {world} {mode:4} {path:7} {dtype:7} {ok:3} of {n} match")
            total, matched = total + n, matched + ok
        print(f"world {world}: {time.time() - start:.0f} s")
    print(f"{matched} of {total} scenarios match")
    return matched == total


if __name__ == "__main__":
    sys.path.append(ROOT)  # after PYTHONPATH: `PYTHONPATH=/other/checkout` measures that one
    sys.exit(0 if main() else 1)
