"""Collectives and bytes per step of Adafactor's reductions on row-sharded parameters, two ways.

The matrices of a GPT-2-small-shaped block (bench/dist_bytes.py's: qkv 2304x768, projection
768x768, MLP 3072x768 and 768x3072), each a DTensor split by rows over 4 ranks (FSDP2's Shard(0)),
stepped by Adafactor's foreach path (the generated `_multi_tensor_adafactor_0`): rms(p), the row
and column means of g^2, the column mean of the row state, rms(u):

- `dtensor`: each mean and rms computed by DTensor itself, as optdsl generated them before
  (`torch.mean` of a DTensor split along a reduced axis all-gathers the shard);
- `partial`: as generated now (`_mean`, `_rms`): each rank's sums over its shard divided by the
  whole count, left partial, and the reductions of a stage combined for all matrices by one
  all-reduce of a flat buffer (`_whole_lists`);
- `loop per tensor`: the for-loop path as it was (`_single_tensor_adafactor_0` on DTensors): the
  same partial sums, one all-reduce per tensor and reduction;
- `loop`: the for-loop path as generated now (`_staged_adafactor_0`): each tensor's step hands out
  its partial results at a stage's end, one all-reduce per stage for all matrices (`_in_stages`).

As bench/dist_bytes.py: each of the 4 ranks played in turn on torch's fake process group with meta
tensors; the bytes each rank receives over the network, summed over ranks, for one block.

    python bench/dist_reductions.py    # writes bench/results/dist-reductions.json and .md
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.dist_bytes import LAYERS, SHAPES, WORLD, CountBytes, write_results  # noqa: E402

HYPER = dict(lr=1e-2, beta2_decay=-0.8, eps1=1e-30, eps2=1e-3, d=1.0, wd=0.0)
PLAIN = {"_mean": lambda x, dim=None, keepdim=False: torch.mean(x) if dim is None and not keepdim
         else x.mean(dim=dim, keepdim=keepdim),
         "_rms": lambda x: torch.sqrt(torch.mean(torch.square(x)))}


# the token embedding (GPT-2's vocabulary, 50257 rows: split 12565 + 12565 + 12565 + 12562), once per model
EMBEDDING = {"wte": (50257, 768)}
PLANS = ("dtensor", "partial", "loop per tensor", "loop")  # see above


def one_rank(rank: int, shapes: dict) -> dict:
    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from generated import adafactor
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))

        def dtensor(shape, placement):
            local = [-(-n // WORLD) if placement == Shard(0) and k == 0 else n for k, n in enumerate(shape)]
            return DTensor.from_local(torch.empty(local, device="meta"), mesh, [placement], run_check=False,
                                      shape=shape, stride=torch.empty(shape, device="meta").stride())
        params = [dtensor(shape, Shard(0)) for shape in shapes.values()]
        grads = [dtensor(shape, Shard(0)) for shape in shapes.values()]
        rows = [dtensor((m, 1), Shard(0)) for m, _ in shapes.values()]  # split like p (optdsl's _new_zeros)
        cols = [dtensor((1, n), Replicate()) for _, n in shapes.values()]
        out = {}
        step = {"dtensor": adafactor._multi_tensor_adafactor_0, "partial": adafactor._multi_tensor_adafactor_0,
                "loop per tensor": adafactor._single_tensor_adafactor_0, "loop": adafactor._staged_adafactor_0}
        for how in PLANS:
            saved = {name: getattr(adafactor, name) for name in PLAIN}
            if how == "dtensor":
                for name, f in PLAIN.items():
                    setattr(adafactor, name, f)
            counter = CountBytes()
            try:
                with counter:
                    step[how](params, grads, rows, cols, [torch.tensor(0.0) for _ in params], **HYPER)
            finally:
                for name, f in saved.items():
                    setattr(adafactor, name, f)
            out[how] = counter.ops
        return out
    finally:
        dist.destroy_process_group()


def main():
    runs = {"block": [one_rank(r, SHAPES) for r in range(WORLD)], "wte": [one_rank(r, EMBEDDING) for r in range(WORLD)]}
    summary = {}
    for how in PLANS:
        summary[how] = {}
        for part, per_rank in runs.items():
            ops: dict[str, list[int]] = {}
            for r in per_rank:
                for name, row in r[how].items():
                    total = ops.setdefault(name, [0, 0])
                    total[0], total[1] = total[0] + row[0], total[1] + row[1]
            summary[how][part] = dict(collectives=ops, bytes=sum(v[1] for v in ops.values()))
        summary[how]["bytes_per_step"] = LAYERS * summary[how]["block"]["bytes"] + summary[how]["wte"]["bytes"]
    record = dict(world=WORLD, shapes=SHAPES, embedding=EMBEDDING, layers=LAYERS, dtype="float32", spec="adafactor", path="foreach and for-loop",
                  results=summary, command="python bench/dist_reductions.py",
                  note="bytes each rank receives over the network (ring all-reduce: 2 (W-1)/W of the buffer), "
                       "summed over collectives and ranks; calls counted on all ranks")
    lines = ["# Adafactor's reductions, foreach and for-loop paths, 4 row-sharded ranks, GPT-2 small (12 blocks, d = 768), float32",
             "", "`python bench/dist_reductions.py`: collectives (calls on all ranks) and the bytes each rank receives",
             "over the network (ring all-reduce), summed over ranks; meta tensors on torch's fake process group.",
             "A block's 4 matrices split evenly (DTensor's own mean is then a partial average, one all-reduce",
             "per tensor and reduction); the 50257-row embedding unevenly (DTensor all-gathers the shard).", "",
             "| plan | a block | the embedding | bytes received per step, all ranks |", "|---|---|---|---|"]
    for how, s in summary.items():
        calls = ["; ".join(f"{k} {v[0]}" for k, v in s[part]["collectives"].items()) for part in ("block", "wte")]
        lines.append(f"| {how} | {calls[0]} | {calls[1]} | {s['bytes_per_step'] / 2**20:.2f} MiB |")
    write_results("dist-reductions", record, lines)


if __name__ == "__main__":
    main()
