"""Bytes communicated per step by Kron's triangular factors on row-sharded parameters: the owner plan
as generated, and what a plan of local work and all-reduces would move.

A GPT-2-small-shaped block (bench/dist_bytes.py's matrices: qkv 2304x768, projection 768x768, MLP
3072x768 and 768x3072) and the token embedding (50257 x 768), each a DTensor split by rows over 4
ranks (FSDP2's Shard(0)), float32, Kron's defaults (max_size_triangular 8192): a block matrix takes the
rule of two triangular factors QL (gram_rows, m x m, split by rows like p) and QR (gram_cols, n x n,
replicated; split by rows too where n = m: the 768 x 768 projection); the embedding, whose 50257 rows
pass 8192, a diagonal dL (rows) and a triangular QR.

- `owner` (measured): the generated `_on_owners`, which each step gathers p, g and each state split by
  rows to the parameter's owner rank, steps there, and scatters p and those states back (a replicated
  state broadcast). The rule's own step is left out (a no-op): the collectives depend on shapes and
  placements only.
- `local + all-reduce` (projected, not generated): for a factor along an axis the shard does not split
  (QR of a row-sharded matrix) every product the update takes is local to the rows or a sum over them:
  mm(h, T(QR)) and the triangular solve along the columns are row by row, mm(T(A), A) and mm(T(B), B) are
  partial n x n sums, one all-reduce for both, then the update is the same on every rank (QR
  replicated); the embedding's rule needs nothing else whole but its amax and rms (a few numbers).
  A factor along the split axis (QL: mm(A, T(A)) pairs rows held by different ranks, and QL h contracts
  the split rows) needs the rows whole; the cheapest such plan keeps QL replicated and every rank
  steps the whole matrix after one all-gather of h (m x n), each keeping its rows.

As bench/dist_bytes.py: each of the 4 ranks played in turn on torch's fake process group with meta
tensors; bytes each rank receives over the network, summed over ranks.

    python bench/dist_kron.py    # writes bench/results/dist-kron.json and .md
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import dist_bytes  # noqa: E402
from bench.dist_bytes import LAYERS, SHAPES, WORLD, CountBytes, _bytes, write_results  # noqa: E402

EMBEDDING = {"wte": (50257, 768)}
MAX_SIZE = 8192  # Kron's max_size_triangular: a side past it takes a diagonal factor
# broadcast_: every rank but the root receives the tensor; _allgather_base_ (c10d's all_gather_into_tensor):
# the others' parts
dist_bytes.RECEIVED.setdefault("broadcast_", lambda args, out: 0 if args[2] == dist.get_rank() else _bytes(args[0]))
dist_bytes.RECEIVED.setdefault("_allgather_base_", lambda args, out: _bytes(args[0]) - _bytes(args[1]))


def one_rank(rank: int) -> dict:
    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from generated import kron
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))

        def dtensor(shape, placements):
            local = [-(-n // WORLD) if placements == [Shard(0)] and k == 0 else n for k, n in enumerate(shape)]
            return DTensor.from_local(torch.empty(local, device="meta"), mesh, placements, run_check=False,
                                      shape=shape, stride=torch.empty(shape, device="meta").stride())
        out = {}
        for part, shapes in (("block", SHAPES), ("wte", EMBEDDING)):
            params = [dtensor(s, [Shard(0)]) for s in shapes.values()]
            grads = [dtensor(s, [Shard(0)]) for s in shapes.values()]
            states = []  # m, c, then the factors, per parameter (as the rule's lists)
            for p in params:
                m, n = p.shape
                left = (m, m) if m <= MAX_SIZE else (m, 1)  # QL (gram_rows) or dL (rows)
                right = (n, n)  # QR (gram_cols): n <= 8192 here
                states.append([dtensor(p.shape, [Shard(0)]), dtensor((), [Replicate()]),
                               dtensor(left, kron._state_placements(p, left)),
                               dtensor(right, kron._state_placements(p, right))])
            counter = CountBytes()
            with counter:
                for i, p in enumerate(params):  # each parameter's rule holds it alone: owner i % 4 within it
                    kron._on_owners(lambda *a, **k: None, [p], [grads[i]], [[x] for x in states[i]],
                                    [torch.tensor(0.0)])
            owner = counter.ops
            counter = CountBytes()
            with counter:
                for p in params:
                    m, n = p.shape
                    if m <= MAX_SIZE:  # QL along the split rows: h whole on every rank, the step there
                        dist.all_gather_into_tensor(torch.empty(m - m % -WORLD, n, device="meta"),
                                                    torch.empty(-(-m // WORLD), n, device="meta"))
                    else:  # QR alone: mm(T(A), A), mm(T(B), B) partial, one all-reduce; amax, rms: 2 numbers
                        dist.all_reduce(torch.empty(2 * n * n + 2, device="meta"))
            out[part] = {"owner": owner, "local + all-reduce": counter.ops}
        return out
    finally:
        dist.destroy_process_group()


def main():
    per_rank = [one_rank(r) for r in range(WORLD)]
    summary = {}
    for how in ("owner", "local + all-reduce"):
        summary[how] = {}
        for part in ("block", "wte"):
            ops: dict[str, list[int]] = {}
            for r in per_rank:
                for name, row in r[part][how].items():
                    total = ops.setdefault(name, [0, 0])
                    total[0], total[1] = total[0] + row[0], total[1] + row[1]
            summary[how][part] = dict(collectives=ops, bytes=sum(v[1] for v in ops.values()))
        summary[how]["bytes_per_step"] = LAYERS * summary[how]["block"]["bytes"] + summary[how]["wte"]["bytes"]
    record = dict(world=WORLD, shapes=SHAPES, embedding=EMBEDDING, layers=LAYERS, dtype="float32", spec="kron",
                  results=summary, command="python bench/dist_kron.py",
                  note="owner: measured (the generated _on_owners' collectives); local + all-reduce: projected "
                       "(the collectives such a plan would issue, not generated). Bytes each rank receives over "
                       "the network (ring all-reduce: 2 (W-1)/W of the buffer), summed over collectives and ranks")
    lines = ["# Kron's triangular factors, 4 row-sharded ranks, GPT-2 small (12 blocks, d = 768, and the embedding), float32",
             "", "`python bench/dist_kron.py`: collectives (calls on all ranks) and the bytes each rank receives over",
             "the network, summed over ranks; meta tensors on torch's fake process group. `owner` is the",
             "generated plan, measured; `local + all-reduce` is projected: the embedding's QR (along the columns,",
             "which the shard does not split) by one all-reduce of its two n x n partial Gram sums, a block",
             "matrix's QL (along the split rows) by an all-gather of h and the step whole on every rank.", "",
             "| plan | a block | the embedding | bytes received per step, all ranks |", "|---|---|---|---|"]
    for how, s in summary.items():
        calls = ["; ".join(f"{k} {v[0]}" for k, v in s[part]["collectives"].items()) for part in ("block", "wte")]
        lines.append(f"| {how} | {calls[0]} ({s['block']['bytes'] / 2**20:.1f} MiB) | {calls[1]} "
                     f"({s['wte']['bytes'] / 2**20:.1f} MiB) | {s['bytes_per_step'] / 2**20:.1f} MiB |")
    write_results("dist-kron", record, lines)


if __name__ == "__main__":
    main()
