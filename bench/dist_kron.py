"""Bytes communicated per step by Kron's triangular factors on row-sharded parameters: the owner plan,
and the plan generated now, where a parameter whose placement leaves its factors whole steps on its shards.

A GPT-2-small-shaped block (bench/dist_bytes.py's matrices: qkv 2304x768, projection 768x768, MLP
3072x768 and 768x3072) and the token embedding (50257 x 768), each a DTensor split by rows over 4
ranks (FSDP2's Shard(0)), float32, Kron's defaults (max_size_triangular 8192). By default a block matrix
takes the rule of two triangular factors QL (gram_rows, m x m, split by rows like p) and QR (gram_cols,
n x n, replicated; split too where n = m); the embedding, whose 50257 rows pass 8192, a diagonal dL (rows)
and a triangular QR. With memory_save_mode="one_diag" (the larger side diagonal) the tall matrices (qkv,
MLP up) take dL and QR as the embedding does, the wide and square ones (MLP down, projection) QL and dR.

- `owner`: every parameter with a triangular factor steps whole on an owner rank (the generated
  `_on_owners` with replicated=None, as before): p, g and each state split by rows gathered there,
  p and those states scattered back, a replicated state broadcast.
- `generated`: the optimizer's functional as generated (kron_1, kron_2, kron_3): a parameter whose
  triangular factors its placement leaves whole (QR of a row-split matrix) steps on its shards; its
  products are local, or partial sums over the rows (mm(T(A), A), mm(T(B), B)) that DTensor combines by
  all-reduces of n x n numbers. A factor along the split rows (QL) still steps on an owner.
- `all-gather h` (projected, not generated): a block's QL by one all-gather of h (m x n) and the step
  whole on every rank, the factors replicated (each rank doing every matrix's work).

As bench/dist_bytes.py: each of the 4 ranks played in turn on torch's fake process group with meta
tensors (the random probes stubbed: drawn whole on every rank, they communicate nothing); bytes each
rank receives over the network, summed over ranks.

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
HYPER = dict(lr=1e-3, momentum=0.9, wd=0.0, weight_decouple=True, momentum_into_precondition_update=True, plr=0.1,
             scale=1.0, max_size=MAX_SIZE, min_ndim=2, max_prob=1.0, min_prob=0.03, decay=0.001, flat_start=500)
MODES = {"default": 0, "one_diag": 1}  # memory_save_mode: None, "one_diag"
PLANS = ("owner", "generated", "all-gather h")
# broadcast_: every rank but the root receives the tensor; _allgather_base_ (c10d's all_gather_into_tensor):
# the others' parts
dist_bytes.RECEIVED.setdefault("broadcast_", lambda args, out: 0 if args[2] == dist.get_rank() else _bytes(args[0]))
dist_bytes.RECEIVED.setdefault("_allgather_base_", lambda args, out: _bytes(args[0]) - _bytes(args[1]))


def rule(shape, mode):
    """Kron's rule of a matrix (its functional's number) and its two factors: 'L'/'R' triangular, 'dL'/'dR' diagonal."""
    m, n = shape
    left = m <= MAX_SIZE and not (mode == 1 and m > n)
    right = n <= MAX_SIZE and not (mode == 1 and n >= m)
    return {(False, True): 1, (True, False): 2, (True, True): 3}[(left, right)], left, right


def one_rank(rank: int) -> dict:
    from torch.distributed.tensor import DTensor, Replicate, Shard, init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from generated import kron
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=WORLD)
    drawn = kron._random_like
    kron._random_like = lambda p, *args, **kwargs: torch.empty_like(p)  # no meta generator; no communication
    try:
        mesh = init_device_mesh("cpu", (WORLD,))

        def dtensor(shape, placements):
            local = [-(-n // WORLD) if placements == [Shard(0)] and k == 0 else n for k, n in enumerate(shape)]
            return DTensor.from_local(torch.empty(local, device="meta"), mesh, placements, run_check=False,
                                      shape=shape, stride=torch.empty(shape, device="meta").stride())
        out = {}
        for mode_name, mode in MODES.items():
            for part, shapes in (("block", SHAPES), ("wte", EMBEDDING)):
                counts = {}
                for how in PLANS:
                    counter = CountBytes()
                    with counter:
                        for i, (m, n) in enumerate(shapes.values()):
                            p, g = dtensor((m, n), [Shard(0)]), dtensor((m, n), [Shard(0)])
                            number, left, right = rule((m, n), mode)
                            sides = [(m, m) if left else (m, 1), (n, n) if right else (1, n)]
                            lists = [[dtensor((m, n), [Shard(0)])], [dtensor((), [Replicate()])]]
                            lists += [[dtensor(s, kron._state_placements(p, s))] for s in sides]
                            hypers = dict(HYPER, mode=mode)
                            if how == "generated":
                                getattr(kron, f"kron_{number}")([p], [g], *lists, [torch.tensor(0.0)], foreach=False,
                                                                generator=torch.Generator(), **hypers)
                            elif how == "owner" or not left:  # all-gather h leaves QR-only rules as generated
                                if how == "owner":
                                    kron._on_owners(lambda *a, **k: None, [p], [g], lists, [torch.tensor(0.0)])
                                else:
                                    getattr(kron, f"kron_{number}")([p], [g], *lists, [torch.tensor(0.0)],
                                                                    foreach=False, generator=torch.Generator(), **hypers)
                            else:
                                dist.all_gather_into_tensor(torch.empty(m - m % -WORLD, n, device="meta"),
                                                            torch.empty(-(-m // WORLD), n, device="meta"))
                    counts[how] = counter.ops
                out[f"{mode_name} {part}"] = counts
        return out
    finally:
        kron._random_like = drawn
        dist.destroy_process_group()


def main():
    per_rank = [one_rank(r) for r in range(WORLD)]
    summary = {}
    for mode in MODES:
        for how in PLANS:
            row = summary.setdefault(f"{how}, {mode}", {})
            for part in ("block", "wte"):
                ops: dict[str, list[int]] = {}
                for r in per_rank:
                    for name, calls in r[f"{mode} {part}"][how].items():
                        total = ops.setdefault(name, [0, 0])
                        total[0], total[1] = total[0] + calls[0], total[1] + calls[1]
                row[part] = dict(collectives=ops, bytes=sum(v[1] for v in ops.values()))
            row["bytes_per_step"] = LAYERS * row["block"]["bytes"] + row["wte"]["bytes"]
    record = dict(world=WORLD, shapes=SHAPES, embedding=EMBEDDING, layers=LAYERS, dtype="float32", spec="kron",
                  results=summary, command="python bench/dist_kron.py",
                  note="owner and generated: the generated code's collectives; all-gather h: projected (not generated). "
                       "Bytes each rank receives over the network (ring all-reduce: 2 (W-1)/W of the buffer), "
                       "summed over collectives and ranks")
    lines = ["# Kron's triangular factors, 4 row-sharded ranks, GPT-2 small (12 blocks, d = 768, and the embedding), float32",
             "", "`python bench/dist_kron.py`: collectives (calls on all ranks) and the bytes each rank receives over",
             "the network, summed over ranks; meta tensors on torch's fake process group. `owner`: every parameter",
             "with a triangular factor on an owner rank (as before); `generated`: as generated now, a parameter",
             "whose factors its placement leaves whole (QR of a row-split matrix) on its shards; `all-gather h`:",
             "projected, a factor along the split rows (QL) by one all-gather of h and the step whole on every rank.",
             "", "| plan, memory_save_mode | a block | the embedding | bytes received per step, all ranks |",
             "|---|---|---|---|"]
    for name, s in summary.items():
        calls = ["; ".join(f"{k} {v[0]}" for k, v in s[part]["collectives"].items()) for part in ("block", "wte")]
        lines.append(f"| {name} | {calls[0]} ({s['block']['bytes'] / 2**20:.1f} MiB) | {calls[1]} "
                     f"({s['wte']['bytes'] / 2**20:.1f} MiB) | {s['bytes_per_step'] / 2**20:.1f} MiB |")
    write_results("dist-kron", record, lines)


if __name__ == "__main__":
    main()
