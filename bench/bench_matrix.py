#!/usr/bin/env python
"""Benchmark: one step of the generated Shampoo, SOAP and Kron against pytorch_optimizer's, on the CPU or a GPU.

This is a benchmark, not a test. Run it from the repository root::

    python bench/bench_matrix.py [--layers 1] [--width 768] [--windows 3] [--steps 2] [--threads N] [--only Kron] [--device cuda] [--out bench/results]

(`pip install -c constraints.txt -r bench/requirements.txt` first: opt_einsum, for Kron's reference.)

The parameters are one GPT-2-small block per `--layers` (float32): the fused qkv (768 x 2304),
the attention output (768 x 768), the two MLP matrices (768 x 3072, 3072 x 768), their biases
and two layer norms (vectors); `--width d` scales the block (d x 3d, d x d, d x 4d, 4d x d). Every row gets its own copy of the same parameters and the same
fixed gradients. Shampoo takes its roots at every step (preconditioning_compute_steps=1, the
reference's default), so a step is dominated by the eigendecompositions of a 768 x 768 and a
2304 x 2304 or 3072 x 3072 matrix per matrix; SOAP's steps between refreshes (the default
precondition_frequency=10) are matmuls, its refresh steps QR: the rows time `--steps` steps
from step 2 on (SOAP's first step only starts the bases), and SOAP's window holds one refresh
when it spans a multiple of 10. Kron updates its triangular factors at every step (the reference's
schedule for its first 500 steps; balance_prob=0 there, as its balancing changes no update): two
triangular solves and a dozen matmuls of up to 3072 x 3072 per matrix. Its probes are random and
drawn from other generators, so its "max abs diff" measures nothing but that (test_zoo_kron feeds
both the same probes). pytorch_optimizer's Kron contracts Q^T Q G in one five-operand einsum,
which torch evaluates pairwise only with opt_einsum installed (torch.backends.opt_einsum);
without it, left to right through an m x n x m x n intermediate (5.6e12 numbers for a
768 x 3072 matrix), so its row is left out then and the generated rows have no ratio
(bench/requirements.txt installs it).
pytorch_optimizer's optimizers step one tensor at a time;
the generated rows are its for-loop (foreach=False) and foreach paths. The number reported is
the median over windows of the time per step, the windows of all rows interleaved.

Results go to ``<out>/matrix-cpu.json`` and ``<out>/matrix-cpu.md``; with ``--only NAME[,NAME]`` (the
rows of those optimizers alone) to ``<out>/matrix-cpu-name.json`` and ``.md``. With ``--device cuda``
every row runs on the GPU (the generated fused path too: its matrix work in torch between the
kernels), timed with a synchronize around each window, into ``matrix-cuda-<gpu>[-name]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402


def shapes(layers: int, d: int = 768) -> list[tuple[int, ...]]:
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return block * layers


def rows(gpu=False):
    import pytorch_optimizer as PO

    from generated.shampoo import Shampoo
    from generated.kron import Kron
    from generated.soap import SOAP
    return [
        ("Shampoo", "pytorch_optimizer", lambda ps: PO.Shampoo(ps, lr=1e-3)),
        ("Shampoo", "generated for-loop", lambda ps: Shampoo(ps, lr=1e-3, foreach=False)),
        ("Shampoo", "generated foreach", lambda ps: Shampoo(ps, lr=1e-3, foreach=True)),
        ("SOAP", "pytorch_optimizer", lambda ps: PO.SOAP(ps, lr=1e-3, shampoo_beta=0.95)),
        ("SOAP", "generated for-loop", lambda ps: SOAP(ps, lr=1e-3, shampoo_beta=0.95, foreach=False)),
        ("SOAP", "generated foreach", lambda ps: SOAP(ps, lr=1e-3, shampoo_beta=0.95, foreach=True)),
        *([("Kron", "pytorch_optimizer", lambda ps: PO.Kron(ps, lr=1e-3, balance_prob=0.0))]
          if torch.backends.opt_einsum.is_available() else []),  # see the docstring
        ("Kron", "generated for-loop", lambda ps: Kron(ps, lr=1e-3, foreach=False)),
        ("Kron", "generated foreach", lambda ps: Kron(ps, lr=1e-3, foreach=True)),
        *([("Shampoo", "generated fused", lambda ps: Shampoo(ps, lr=1e-3, fused=True)),
           ("SOAP", "generated fused", lambda ps: SOAP(ps, lr=1e-3, shampoo_beta=0.95, fused=True)),
           ("Kron", "generated fused", lambda ps: Kron(ps, lr=1e-3, fused=True))] if gpu else []),
    ]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--width", type=int, default=768, help="the model width d (GPT-2 small: 768)")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated optimizers (Shampoo,SOAP,Kron): their rows alone")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    only = None if args.only is None else [n.strip() for n in args.only.split(",")]
    gpu = args.device != "cpu"
    where = "cpu" if not gpu else "cuda-" + torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "-")
    stem = f"matrix-{where}" if only is None else f"matrix-{where}-" + "-".join(n.lower() for n in only)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(args.device) for s in shapes(args.layers, args.width)]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(args.device) for s in shapes(args.layers, args.width)]
    table = []
    for name, path, make in rows(gpu):
        if only is not None and name not in only:
            continue
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make(params)
        table.append(dict(optimizer=name, path=path, params=params, opt=opt, times=[]))

    def step(row):
        for p, g in zip(row["params"], grads):
            p.grad = g.clone()  # pytorch_optimizer's Shampoo writes into p.grad
        row["opt"].step()

    for row in table:  # the first step: states made, SOAP's bases started
        step(row)
    for _ in range(args.windows):
        for row in table:
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(row)
            sync()
            row["times"].append((time.perf_counter() - start) / args.steps)
    machine = torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine()
    result = dict(machine=machine, device=args.device, threads=torch.get_num_threads(), opt_einsum=torch.backends.opt_einsum.is_available(),
                  torch=torch.__version__, layers=args.layers, width=args.width, steps=args.steps, windows=args.windows,
                  numel=sum(x.numel() for x in init), rows=[])
    for row in table:
        ref = next((r for r in table if r["optimizer"] == row["optimizer"] and r["path"] == "pytorch_optimizer"),
                   None)
        diff = None if ref is None else max((a - b).abs().max().item() for a, b in zip(row["params"], ref["params"]))
        result["rows"].append(dict(optimizer=row["optimizer"], path=row["path"],
                                   median_ms=1e3 * statistics.median(row["times"]),
                                   min_ms=1e3 * min(row["times"]),
                                   ratio=None if ref is None else statistics.median(row["times"]) / statistics.median(ref["times"]),
                                   max_abs_diff_vs_reference=diff))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    names = " and ".join(dict.fromkeys(r["optimizer"] for r in result["rows"]))
    on = f"{machine}" if gpu else f"CPU ({result['threads']} threads"
    lines = [f"# One step of {names}, {on}{'' if gpu else ','} torch {result['torch']}{'' if gpu else ')'}", "",
             f"{args.layers} GPT-2-small-like block(s) of width {args.width}, {result['numel']:,} parameters, "
             f"float32; median of "
             f"{args.windows} windows of {args.steps} steps (`python bench/bench_matrix.py --width {args.width} --windows {args.windows} "
             f"--steps {args.steps}" + ("" if only is None else f" --only {','.join(only)}")
             + ("" if not gpu else f" --device {args.device}") + "`).", "",
             "| optimizer | path | median ms/step | min ms/step | ratio to pytorch_optimizer | max abs diff |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        diff = "-" if r["max_abs_diff_vs_reference"] is None else f"{r['max_abs_diff_vs_reference']:.1e}"
        lines.append(f"| {r['optimizer']} | {r['path']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {ratio} | {diff} |")
    if any(r["optimizer"] == "Kron" for r in result["rows"]):
        lines += ["", "Kron's max abs diff is that of other random probes (its test feeds both the same ones)"
                  + ("." if torch.backends.opt_einsum.is_available() else "; its reference is left out without "
                     "opt_einsum (see bench/bench_matrix.py).")]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
