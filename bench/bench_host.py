#!/usr/bin/env python
"""Host-side cost of one fused step: the Python work around the kernel launches, without a GPU.

On a GPU, 1000 small tensors make the fused step host-bound: the GPU waits for Python to gather
the parameters, states and pointers (bench/results/gpu-*.md, suite `small`: GPU time = CPU time).
This script times that Python work on the CPU, for the generated AdamW and SGD with ``fused=True``
and for torch.optim's ``fused=True``, with the kernels themselves taken out: the Triton launches of
the generated module and torch's ``torch._fused_adamw_`` / ``torch._fused_sgd_`` are replaced by
no-ops. What is left is what each step costs the host before its kernels run.

Run it from the repository root::

    python bench/bench_host.py [--suites small,gpt2] [--windows 7] [--steps 20] [--out bench/results]

Both sides increment `step` with ``torch._foreach_add_``; on a CPU that is a loop over every
tensor (one ~1.5 us op each), on CUDA a few multi-tensor launches. It is the same call on both
sides and is left out too (``--keep-step-add`` keeps it). Gradients are replaced by fresh tensors
every step, as ``zero_grad(set_to_none=True)`` and a backward pass would leave them (``--fixed-grads``
keeps the same ones), so no pointer table is reused by luck.

These are host timings on this machine's CPU, not GPU timings: what a GPU run adds (the launches
themselves, the kernels) is not in them. Results: ``<out>/host.json`` and ``<out>/host.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused path's checks accept CPU tensors then

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import generated.adamw as gen_adamw  # noqa: E402
import generated.sgd as gen_sgd  # noqa: E402
from bench.bench_gpu import gpt2_shapes, small_shapes  # noqa: E402

SUITES = {"small": small_shapes, "gpt2": gpt2_shapes}
OPTIMIZERS = {  # name: (generated module, generated class, torch class, torch's fused op, kwargs)
    "adamw": (gen_adamw, gen_adamw.AdamW, torch.optim.AdamW, "_fused_adamw_", dict(lr=1e-3)),
    "sgd": (gen_sgd, gen_sgd.SGD, torch.optim.SGD, "_fused_sgd_", dict(lr=1e-2, momentum=0.9)),
}


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _no_op(*args, **kwargs):
    return None


def stub_kernels(module):
    """Replace every Triton kernel of a generated module by a no-op; returns how to undo it."""
    saved = {name: value for name, value in vars(module).items()
             if type(value).__name__ in ("JITFunction", "InterpretedFunction")}
    for name in saved:
        setattr(module, name, _NoLaunch())
    return lambda: [setattr(module, name, value) for name, value in saved.items()]


def time_rows(rows, args):
    """Median ms per step of each row, windows interleaved across rows."""
    times = {name: [] for name in rows}
    for step in rows.values():
        for _ in range(args.warmup):
            step()
    for _ in range(args.windows):
        for name, step in rows.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def make_row(opt_class, shapes, fresh, kwargs):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(2 if fresh else 1)]
    opt = opt_class(params, fused=True, **kwargs)
    count = [0]

    def step():
        for p, g in zip(params, grads[count[0] % len(grads)]):
            p.grad = g
        count[0] += 1
        opt.step()

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="small,gpt2")
    ap.add_argument("--optimizers", default="adamw,sgd")
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fixed-grads", action="store_true", help="the same gradient tensors every step")
    ap.add_argument("--keep-step-add", action="store_true", help="keep torch._foreach_add_ on the steps")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    undo = [stub_kernels(mod) for mod, *_ in OPTIMIZERS.values()]
    saved_torch = {name: getattr(torch, name) for name in ("_fused_adamw_", "_fused_sgd_", "_foreach_add_")}
    records = []
    try:
        for name in ("_fused_adamw_", "_fused_sgd_"):
            setattr(torch, name, _no_op)
        if not args.keep_step_add:
            torch._foreach_add_ = _no_op
        for suite in args.suites.split(","):
            shapes = SUITES[suite]()
            for opt_name in args.optimizers.split(","):
                _, gen_class, torch_class, _, kwargs = OPTIMIZERS[opt_name]
                rows = {"optdsl fused": make_row(gen_class, shapes, not args.fixed_grads, kwargs),
                        "torch fused": make_row(torch_class, shapes, not args.fixed_grads, kwargs)}
                medians = time_rows(rows, args)
                for impl, ms in medians.items():
                    records.append(dict(suite=suite, tensors=len(shapes), optimizer=opt_name, impl=impl,
                                        host_ms=round(ms, 4),
                                        x_torch=round(medians["torch fused"] / ms, 3)))
                    print(f"{suite:6} {opt_name:6} {impl:13} {ms:8.3f} ms/step  "
                          f"{medians['torch fused'] / ms:5.2f}x torch fused", flush=True)
    finally:
        for name, value in saved_torch.items():
            setattr(torch, name, value)
        for u in undo:
            u()

    meta = dict(torch=torch.__version__, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(["python bench/bench_host.py", *(argv if argv is not None else sys.argv[1:])]),
                fresh_grads=not args.fixed_grads, step_add=args.keep_step_add,
                windows=args.windows, steps=args.steps, cpus=os.cpu_count())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1) + "\n")
    lines = ["# Host cost of one fused step (kernels stubbed out)", "",
             f"torch {meta['torch']}, {meta['date']}, `{meta['command']}`; fresh gradients every step: "
             f"{meta['fresh_grads']}; step increment timed: {meta['step_add']}. Median over "
             f"{args.windows} windows of {args.steps} steps, one thread. CPU time of the Python work "
             "around the launches, not GPU time.", "",
             "| suite | tensors | optimizer | impl | host ms/step | x torch fused |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['suite']} | {r['tensors']} | {r['optimizer']} | {r['impl']} | {r['host_ms']:.3f} | "
              f"{r['x_torch']:.2f} |" for r in records]
    (args.out / "host.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
