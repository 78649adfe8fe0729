"""Bytes communicated per step by Muon's matrix work on sharded parameters, two ways.

A GPT-2-small-shaped transformer block (d = 768: attention qkv 768x2304 and projection 768x768,
MLP 768x3072 and 3072x768), every matrix a DTensor sharded by rows over 4 gloo ranks (FSDP2's
Shard(0)). Muon's Newton-Schulz iteration (the generated `_matrix_muon_0`, five rounds of
mm(x, T(x)) products) runs on each matrix

- `dtensor`: on the DTensors themselves, as the for-loop and foreach paths do: DTensor
  redistributes operands at every product;
- `owner`: as the fused path does (the generated `_Shards.matrix`): each matrix gathered whole to
  one owner rank (round-robin), computed there, the result scattered back as shards.

Every collective any rank issues is counted by a dispatch mode that sees the c10d and functional
collective ops: the bytes of the tensors each rank hands to them (its shard for a gather or an
all-gather, its buffer for an all-reduce, the chunks it sends for a scatter) and the bytes it
gets back, summed over ranks. A GPT-2-small step is twelve such blocks (the embeddings aside):
the totals are one block's times 12. Both results agree with one process's to float32 rounding.

    python bench/dist_bytes.py    # writes bench/results/dist-bytes.json and .md
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 4
SHAPES = {"attn.qkv": (2304, 768), "attn.proj": (768, 768), "mlp.fc": (3072, 768), "mlp.proj": (768, 3072)}
LAYERS = 12


class CountBytes(TorchDispatchMode):
    """Per collective op: calls, bytes handed in and bytes received, on this rank."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ns = func.namespace
        if ns in ("c10d", "_c10d_functional"):
            sent = sum(t.numel() * t.element_size() for t in _tensors(args[:1]))
            got = sum(t.numel() * t.element_size() for t in _tensors(out))
            row = self.ops.setdefault(func.name(), [0, 0, 0])
            row[0] += 1
            row[1] += sent
            row[2] += got if "wait" not in func.name() else 0
        return out


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _worker(rank, init_file, out):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    sys.path.insert(0, ROOT)
    from generated import muon
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        gen = torch.Generator().manual_seed(0)
        whole = [torch.randn(shape, generator=gen) for shape in SHAPES.values()]
        params = [distribute_tensor(w, mesh, [Shard(0)]) for w in whole]
        hyper = dict(a=3.4445, b=-4.775, c=2.0315, eps=1e-7)
        results = {}
        for how in ("dtensor", "owner"):
            shards = muon._Shards(params)
            counter = CountBytes()
            start = time.time()
            with counter:
                if how == "dtensor":
                    got = [muon._matrix_muon_0(c1=float(p.shape[0] > p.shape[1]), x1=p, **hyper)[0] for p in params]
                else:
                    got = [shards.matrix(i, muon._matrix_muon_0, dict(c1=float(p.shape[0] > p.shape[1]),
                                                                       x1=p.to_local(), **hyper), 1, torch.float32)[0]
                           for i, p in enumerate(params)]
            seconds = time.time() - start
            full = [g.full_tensor() if hasattr(g, "full_tensor") else shards.whole(i, g) for i, g in enumerate(got)]
            gathered = [None] * WORLD
            dist.all_gather_object(gathered, counter.ops)
            results[how] = dict(ops=gathered, seconds=seconds, full=full)
        if rank == 0:
            ref = [muon._matrix_muon_0(c1=float(w.shape[0] > w.shape[1]), x1=w, **hyper)[0] for w in whole]
            for how in results:
                results[how]["max_error"] = max((f - r).abs().max().item() for f, r in zip(results[how]["full"], ref))
                del results[how]["full"]
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def main():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.start_processes(_worker, args=(os.path.join(tmp, "init"), out), nprocs=WORLD, join=True,
                           start_method="fork")
        results = torch.load(out)
    summary = {}
    for how, r in results.items():
        ops: dict[str, list[int]] = {}
        for per_rank in r["ops"]:
            for name, (calls, sent, got) in per_rank.items():
                row = ops.setdefault(name, [0, 0, 0])
                row[0], row[1], row[2] = row[0] + calls, row[1] + sent, row[2] + got
        sent = sum(v[1] for v in ops.values())
        summary[how] = dict(collectives_per_block=ops, bytes_handed_in_per_block=sent,
                            bytes_handed_in_per_step=sent * LAYERS, seconds_per_block=r["seconds"],
                            max_error_vs_one_process=r["max_error"])
    record = dict(world=WORLD, shapes=SHAPES, layers=LAYERS, dtype="float32", results=summary,
                  command="python bench/dist_bytes.py")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "dist-bytes.json"), "w") as fh:
        json.dump(record, fh, indent=1)
    lines = ["# Muon's matrix work on 4 row-sharded ranks: bytes per step (GPT-2 small, 12 blocks)", "",
             "| plan | collectives per block (calls) | bytes handed to collectives per step, all ranks | max error |",
             "|---|---|---|---|"]
    for how, s in summary.items():
        calls = ", ".join(f"{k} {v[0]}" for k, v in s["collectives_per_block"].items())
        lines.append(f"| {how} | {calls} | {s['bytes_handed_in_per_step'] / 2**20:.1f} MiB | "
                     f"{s['max_error_vs_one_process']:.2g} |")
    with open(os.path.join(ROOT, "bench", "results", "dist-bytes.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
