"""Bytes communicated per step by Muon's matrix work on sharded parameters, two ways.

A GPT-2-small-shaped transformer block (d = 768: attention qkv 2304x768 and projection 768x768,
MLP 3072x768 and 768x3072), every matrix a DTensor sharded by rows over 4 ranks (FSDP2's
Shard(0)). Muon's Newton-Schulz iteration (the generated `_matrix_muon_0`: five rounds of
mm(x, T(x)) products) runs on each matrix

- `dtensor`: on the DTensors themselves, as the for-loop and foreach paths do: DTensor
  redistributes operands at every product;
- `owner`: as the fused path does (the generated `_Shards.matrix`): each matrix gathered whole to
  one owner rank (round-robin), computed there, the result scattered back as shards.

Which collectives run, and on how many bytes, depends on shapes and placements only, not on
values: each of the 4 ranks is played in turn by one process on torch's fake process group
(collectives that move nothing) with tensors on the meta device (no arithmetic), and a dispatch
mode records every c10d and functional collective it issues with the bytes of the tensors it
hands in and gets out, from which the bytes it receives over the network follow. The sums over
ranks are one block's; a GPT-2-small step has 12 blocks
(the embeddings aside). tests/test_distributed.py checks that both ways give one process's
numbers (Muon on FSDP2 and tensor parallel, 2 and 4 ranks).

    python bench/dist_bytes.py    # writes bench/results/dist-bytes.json and .md
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 4
SHAPES = {"attn.qkv": (2304, 768), "attn.proj": (768, 768), "mlp.fc": (3072, 768), "mlp.proj": (768, 3072)}
LAYERS = 12
HYPER = dict(a=3.4445, b=-4.775, c=2.0315, eps=1e-7, ns_steps=5, ns_bfloat16=True)  # Muon's defaults, as torch.optim.Muon


class CountBytes(TorchDispatchMode):
    """Per collective op: calls, bytes of the tensors handed in, bytes of those it returns."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor
        if any(t is DTensor for t in types):
            return NotImplemented  # DTensor first turns the op into local ops and collectives, seen here then
        out = func(*args, **(kwargs or {}))
        name = func.name().split("::")[-1]
        if name in RECEIVED:
            row = self.ops.setdefault(name, [0, 0])
            row[0] += 1
            row[1] += RECEIVED[name](args, out)
        return out


# collective -> the bytes this rank receives over the network (ring algorithms for the reductions)
RECEIVED = {
    "gather_": lambda args, out: max(_bytes(args[0]) - _bytes(args[1]), 0),  # the owner: the others' parts
    "scatter_": lambda args, out: 0 if _bytes(args[1]) else _bytes(args[0]),  # the others: their part
    "all_gather_into_tensor": lambda args, out: _bytes(out) - _bytes(args[0]),
    "reduce_scatter_tensor": lambda args, out: _bytes(args[0]) - _bytes(out),
    "all_reduce": lambda args, out: 2 * _bytes(args[0]) * (WORLD - 1) // WORLD,
    "allreduce_": lambda args, out: 2 * _bytes(args[0]) * (WORLD - 1) // WORLD,
}


def _bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(map(_bytes, x))
    return 0


def one_rank(rank: int) -> dict:
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from generated import muon
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        params = []
        for rows, cols in SHAPES.values():
            local = torch.empty(-(-rows // WORLD), cols, device="meta")
            params.append(DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(rows, cols),
                                             stride=(cols, 1)))
        # the one argument of the matrix work that is neither a hyperparameter nor the rule's c1: the momentum
        # (its SSA name follows the spec's statements, x1 or x2, so it is read, not written here)
        import inspect
        (arg,) = [a for a in inspect.signature(muon._matrix_muon_0).parameters if a not in HYPER and a != "c1"]
        out = {}
        for how in ("dtensor", "owner"):
            counter = CountBytes()
            with counter:
                for i, p in enumerate(params):
                    c1 = float(p.shape[0] > p.shape[1])
                    if how == "dtensor":
                        muon._matrix_muon_0(c1=c1, **{arg: p}, **HYPER)[0].redistribute(mesh, p.placements)
                    else:
                        muon._Shards(params).matrix(i, muon._matrix_muon_0, dict(c1=c1, **{arg: p.to_local()}, **HYPER),
                                                    1, torch.float32)
            out[how] = counter.ops
        return out
    finally:
        dist.destroy_process_group()


def main():
    sys.path.insert(0, ROOT)
    per_rank = [one_rank(r) for r in range(WORLD)]
    summary = {}
    for how in ("dtensor", "owner"):
        ops: dict[str, list[int]] = {}
        for r in per_rank:
            for name, row in r[how].items():
                total = ops.setdefault(name, [0, 0])
                total[0], total[1] = total[0] + row[0], total[1] + row[1]
        moved = sum(v[1] for v in ops.values())
        summary[how] = dict(collectives_per_block=ops, bytes_per_block=moved, bytes_per_step=moved * LAYERS)
    record = dict(world=WORLD, shapes=SHAPES, layers=LAYERS, dtype="float32", results=summary,
                  note="bytes each rank receives over the network (ring all-reduce: 2 (W-1)/W of the buffer), "
                       "summed over collectives and ranks; calls counted on all ranks", command="python bench/dist_bytes.py")
    lines = ["# Muon's matrix work, 4 row-sharded ranks, GPT-2 small (12 blocks, d = 768), float32", "",
             "`python bench/dist_bytes.py`: the bytes each rank receives over the network (ring all-reduce),",
             "summed over ranks; meta tensors on torch's fake process group. Weights: 85 M float32 (324 MiB).", "",
             "| plan | collectives per block (calls, all ranks) | bytes received per step, all ranks |",
             "|---|---|---|"]
    for how, s in summary.items():
        calls = ", ".join(f"{k} {v[0]}" for k, v in s["collectives_per_block"].items())
        lines.append(f"| {how} | {calls} | {s['bytes_per_step'] / 2**20:.1f} MiB |")
    write_results("dist-bytes", record, lines)


def write_results(name, record, lines):
    """bench/results/<name>.json (the record) and <name>.md (the table's lines), and the table printed."""
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", f"{name}.json"), "w") as fh:
        json.dump(record, fh, indent=1)
    with open(os.path.join(ROOT, "bench", "results", f"{name}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
