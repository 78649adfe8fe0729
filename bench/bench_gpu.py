#!/usr/bin/env python
"""GPU benchmark: the generated fused optimizers against torch.optim and torch.compile.

One command, from the repository root::

    python bench/bench_gpu.py [--suites large,gpt2,llama1b,small] [--dtypes fp32,bf16]
                              [--optimizers adamw,lion,sgd,lamb[,adafactor]] [--windows 5] [--steps 10]
                              [--no-compile] [--sweep] [--sweep-lowbit] [--out bench/results]

What it measures
----------------
For each suite of parameter shapes (one 256M-element tensor; GPT-2 124M's 148 tensors; Llama-3.2-1B's
146 tensors; 1000 small tensors of 64..8192 elements) and each dtype (fp32; bf16 parameters and
gradients, our states in float32), one optimizer step of AdamW, Lion, SGD with momentum and LAMB:

* ``optdsl fused``   the generated class, ``fused=True`` (Triton, one launch per stage);
* ``optdsl foreach`` the generated class, ``foreach=True``;
* ``optdsl fused bf16 states`` (bf16 suites) ``fused=True, state_dtype=torch.bfloat16``: states in
  bfloat16 with stochastic rounding, the same bytes per element as torch.optim's bf16 rows;
* ``torch loop``     torch.optim with ``foreach=False`` (AdamW, SGD), or the handwritten reference
  loop (Lion, LAMB: the paper's update, one tensor at a time);
* ``torch foreach``  torch.optim with ``foreach=True`` (AdamW, SGD);
* ``torch fused``    torch.optim with ``fused=True`` (AdamW, SGD);
* ``torch.compile``  ``torch.compile`` of torch.optim's step with a tensor learning rate (AdamW, SGD), or
  of the handwritten reference (Lion, LAMB).

``--optimizers ...,adafactor`` adds Adafactor (fused: row and column accumulators, 5 launches for the
matrices, 2 for the rest) against torch.optim.Adafactor's loop, foreach and compiled step.

Every row steps the same parameters and gradients (gradients are fixed: an optimizer never writes
them). After ``--warmup`` untimed steps (compilation happens there and is reported as ``warm-up s``),
``--windows`` windows of ``--steps`` steps are timed: GPU time per step from CUDA events around the
window, CPU time per step from ``time.perf_counter`` around the loop that issues the steps (before the
final synchronisation); the table reports the medians over windows.

The roofline is the time to move the bytes one step must move (each tensor read once, written once:
fp32 AdamW reads p, g, m, v and writes p, m, v = 28 B per element) at the bandwidth of a large
device-to-device copy measured in the same run (bytes read + bytes written over time). ``roofline %``
is roofline time / measured time. torch's bf16 rows keep bf16 states (torch.optim creates states in
the parameter's dtype), ours float32 states, so they move fewer bytes; the table says so.

Results: ``<out>/gpu-<device>.json``, ``<out>/gpu-<device>.md`` and ``<out>/gpu-<device>.png``.
Without a CUDA device this script runs the CPU comparison (bench/bench_cpu.py) and says plainly that
the GPU figures are missing: they are measured, never estimated.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

# ----------------------------------------------------------------------------------- suites


def gpt2_shapes():
    """GPT-2 124M: 148 tensors (tied LM head)."""
    d, ff, vocab, ctx = 768, 3072, 50257, 1024
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, ff), (ff,), (ff, d), (d,)]
    return shapes + [(d,), (d,)]


def llama1b_shapes():
    """Llama-3.2-1B: 146 tensors (tied embeddings, grouped-query attention with 8 KV heads)."""
    d, ff, vocab, kv = 2048, 8192, 128256, 512
    shapes = [(vocab, d)]
    for _ in range(16):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ff, d), (ff, d), (d, ff)]
    return shapes + [(d,)]


def small_shapes():
    gen = torch.Generator().manual_seed(0)
    return [(int(2 ** (6 + 7 * torch.rand((), generator=gen).item())),) for _ in range(1000)]


SUITES = {
    "large": lambda: [(256 * 2**20,)],
    "gpt2": gpt2_shapes,
    "llama1b": llama1b_shapes,
    "small": small_shapes,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# ------------------------------------------------------------------- handwritten references


def lion_update(p, g, m, t, lr, b1, b2, wd):
    # Chen et al. 2023, Algorithm 2 (decoupled weight decay)
    p.mul_(1 - lr * wd).add_(torch.sign(m.lerp(g, 1 - b1)), alpha=-lr)
    m.lerp_(g, 1 - b2)


def lamb_update(p, g, m, v, t, lr, b1, b2, eps, wd, max_w):
    # You et al. 2020, Algorithm 2, phi(x) = min(x, max_w); no host sync (compiles in one graph)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps) + wd * p
    w = torch.linalg.vector_norm(p).clamp(max=max_w)
    r = torch.linalg.vector_norm(u)
    p.sub_(lr * torch.where((w > 0) & (r > 0), w / r, 1.0) * u)


class Handwritten:
    """A reference optimizer: a plain loop over the tensors, states in the parameter's dtype."""

    def __init__(self, params, update, n_states, **hypers):
        self.params, self.update, self.hypers = params, update, hypers
        self.states = [[torch.zeros_like(p) for p in params] for _ in range(n_states)]
        self.t = torch.zeros((), device=params[0].device)  # a tensor: compiled code never specialises on it

    def step(self):
        self.t += 1
        for i, p in enumerate(self.params):
            self.update(p, p.grad, *(s[i] for s in self.states), self.t, **self.hypers)


HYPERS = {  # the same setting on every side
    "adamw": dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=1e-2),
    "lion": dict(lr=1e-4, b1=0.9, b2=0.99, wd=1e-2),
    "sgd": dict(lr=1e-2, momentum=0.9),
    "lamb": dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-6, wd=1e-2, max_w=10.0),
    "adafactor": dict(lr=1e-2),  # torch.optim.Adafactor's defaults otherwise, as the spec's
}
# bytes per element one step must move (p, g read; p written; each state read and written).
# Adafactor's factors are a row and a column per matrix: next to p and g they count for nothing.
N_STATES = {"adamw": 2, "lion": 1, "sgd": 1, "lamb": 2, "adafactor": 0}


def bytes_per_element(opt, p_bytes, s_bytes):
    return 3 * p_bytes + 2 * N_STATES[opt] * s_bytes


def torch_kwargs(opt):
    h = HYPERS[opt]
    if opt == "adamw":
        return dict(lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"], weight_decay=h["wd"])
    return dict(lr=h["lr"], momentum=h["momentum"])


def make_rows(opt, params, compile_ok):
    """impl name -> (factory returning a step callable, bytes per element of its states)."""
    import generated.adafactor
    import generated.adamw
    import generated.lamb
    import generated.lion
    import generated.sgd
    ours = {"adamw": generated.adamw.AdamW, "lion": generated.lion.Lion, "sgd": generated.sgd.SGD,
            "lamb": generated.lamb.LAMB, "adafactor": generated.adafactor.Adafactor}[opt]
    exact = params[0].dtype in (torch.float32, torch.float64)
    ours_state = params[0].element_size() if exact else 4
    torch_state = params[0].element_size()
    rows = {
        "optdsl fused": (lambda: ours(params, fused=True, **HYPERS[opt]).step, ours_state),
        "optdsl foreach": (lambda: ours(params, foreach=True, **HYPERS[opt]).step, ours_state),
    }
    if params[0].dtype == torch.bfloat16:  # like torch.optim: bfloat16 states (rounded stochastically)
        rows["optdsl fused bf16 states"] = (
            lambda: ours(params, fused=True, state_dtype=torch.bfloat16, **HYPERS[opt]).step, 2)
    if opt in ("adamw", "lion"):  # blockwise codes + one float32 scale per block (optdsl/quant.py)
        from optdsl import quant
        for fmt in ("int8", "int4"):
            nbytes = quant.BITS[fmt] / 8 + 4 / quant.BLOCK[fmt]  # codes + a float32 scale per block
            rows[f"optdsl fused {fmt} states"] = (
                lambda fmt=fmt: ours(params, fused=True, state_dtype=fmt, **HYPERS[opt]).step, nbytes)
    if opt == "adafactor":  # torch.optim has no fused Adafactor; the compiled step takes a float lr
        kw = HYPERS[opt]
        rows["torch loop"] = (lambda: torch.optim.Adafactor(params, foreach=False, **kw).step, torch_state)
        rows["torch foreach"] = (lambda: torch.optim.Adafactor(params, foreach=True, **kw).step, torch_state)
        if compile_ok:
            rows["torch.compile"] = (lambda: torch.compile(torch.optim.Adafactor(params, **kw).step), torch_state)
    elif opt in ("adamw", "sgd"):
        cls = torch.optim.AdamW if opt == "adamw" else torch.optim.SGD
        kw = torch_kwargs(opt)
        rows["torch loop"] = (lambda: cls(params, foreach=False, **kw).step, torch_state)
        rows["torch foreach"] = (lambda: cls(params, foreach=True, **kw).step, torch_state)
        rows["torch fused"] = (lambda: cls(params, fused=True, **kw).step, torch_state)
        if compile_ok:
            def compiled():
                o = cls(params, **dict(kw, lr=torch.tensor(kw["lr"])))  # tensor lr: no recompile on change
                return torch.compile(o.step)
            rows["torch.compile"] = (compiled, torch_state)
    else:
        update, n = (lion_update, 1) if opt == "lion" else (lamb_update, 2)
        h = {k: v for k, v in HYPERS[opt].items() if not (opt == "lion" and k == "eps")}
        rows["torch loop"] = (lambda: Handwritten(params, update, n, **h).step, torch_state)
        if compile_ok:
            rows["torch.compile"] = (lambda: torch.compile(Handwritten(params, update, n, **h).step), torch_state)
    return rows


# ----------------------------------------------------------------------------------- timing


def time_steps(step, warmup, windows, steps):
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    gpu, cpu = [], []
    for _ in range(windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        h0 = time.perf_counter()
        for _ in range(steps):
            step()
        h1 = time.perf_counter()
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) / steps)
        cpu.append((h1 - h0) * 1e3 / steps)
    return statistics.median(gpu), statistics.median(cpu), warm_s


def copy_bandwidth(n_bytes=2 * 2**30):
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(n_bytes // 4, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms, _, _ = time_steps(lambda: dst.copy_(src), 3, 5, 10)
    del src, dst
    return 2 * n_bytes / (ms * 1e-3)


def make_params(shapes, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, device="cuda", generator=gen, dtype=torch.float32).to(dtype)
        p.grad = torch.randn(s, device="cuda", generator=gen, dtype=torch.float32).to(dtype) * 1e-2
        params.append(p)
    return params


def sweep_lowbit(args):
    """Fused AdamW and Lion with int8 and int4 states per warps (a launch's warps are _NUM_WARPS per
    _BLOCK numbers of its block: int8's 2048 get twice as many): chooses that rule."""
    import generated.adamw
    import generated.lion
    out = []
    for suite in ("large", "gpt2"):
        params = make_params(SUITES[suite](), torch.float32)
        for mod, cls in ((generated.adamw, "AdamW"), (generated.lion, "Lion")):
            for fmt in ("int8", "int4"):
                for per_block in (2, 4, 8):
                    mod._NUM_WARPS = per_block
                    warps = per_block * max(mod._BLOCK, mod._LOWBIT[fmt][1]) // mod._BLOCK
                    step = getattr(mod, cls)(params, fused=True, state_dtype=fmt, **HYPERS[cls.lower()]).step
                    ms, _, _ = time_steps(step, 3, args.windows, args.steps)
                    out.append(dict(suite=suite, optimizer=cls, fmt=fmt, warps=warps, gpu_ms=ms))
                    print(f"sweep-lowbit {suite:6s} {cls:6s} {fmt} warps {warps:2d}: {ms:.3f} ms", flush=True)
                mod._NUM_WARPS = 4
        del params
        torch.cuda.empty_cache()
    return out


def sweep(args):
    """Fused AdamW per (block, warps) on the large and GPT-2 suites: chooses the generated defaults."""
    import generated.adamw as mod
    out = []
    for suite, dname in (("large", "fp32"), ("large", "bf16"), ("gpt2", "fp32")):
        params = make_params(SUITES[suite](), DTYPES[dname])
        for block, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (2048, 16), (4096, 8),
                             (4096, 16)):
            mod._BLOCK, mod._NUM_WARPS = block, warps
            step = mod.AdamW(params, fused=True, **HYPERS["adamw"]).step
            ms, _, _ = time_steps(step, 3, args.windows, args.steps)
            out.append(dict(suite=suite, dtype=dname, block=block, warps=warps, gpu_ms=ms))
            print(f"sweep {suite:6s} {dname} block {block:5d} warps {warps:2d}: {ms:.3f} ms", flush=True)
        del params
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="large,gpt2,llama1b,small")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--optimizers", default="adamw,lion,sgd,lamb")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--compile-suites", default=None,
                    help="suites that get torch.compile rows (default: all); compiling is minutes per row")
    ap.add_argument("--impls", default=None, help="only these rows, e.g. 'torch.compile' (default: all)")
    ap.add_argument("--append", action="store_true",
                    help="merge into the existing results file (rows measured again replace old ones)")
    ap.add_argument("--profile", default=None, metavar="SUITE",
                    help="only profile the host side of 20 fused AdamW steps on SUITE (cProfile)")
    ap.add_argument("--sweep", action="store_true", help="only time fused AdamW per block size and warps")
    ap.add_argument("--sweep-lowbit", action="store_true", help="only time int8/int4-state AdamW and Lion per warps")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("No CUDA device: the GPU figures are missing (they are measured, never estimated).\n"
              "Running the CPU comparison instead (bench/bench_cpu.py).\n", flush=True)
        sys.path.insert(0, str(REPO_ROOT / "bench"))
        import bench_cpu
        return bench_cpu.main(["--out", str(args.out)])

    device = torch.cuda.get_device_name()
    tag = device.replace("NVIDIA ", "").replace(" ", "-").lower()
    import triton
    meta = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(["bench/bench_gpu.py", *sys.argv[1:]]))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        import cProfile
        import pstats
        import generated.adamw as mod
        params = make_params(SUITES[args.profile](), torch.float32)
        step = mod.AdamW(params, fused=True, **HYPERS["adamw"]).step
        ms, cpu_ms, _ = time_steps(step, 3, args.windows, args.steps)
        print(f"fused AdamW on {args.profile}: GPU {ms:.3f} ms, CPU {cpu_ms:.3f} ms per step")
        with cProfile.Profile() as prof:
            for _ in range(20):
                step()
            torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        return 0
    if args.sweep:
        meta["sweep"] = sweep(args)
        (args.out / f"gpu-sweep-{tag}.json").write_text(json.dumps(meta, indent=1) + "\n")
        return 0
    if args.sweep_lowbit:
        meta["sweep"] = sweep_lowbit(args)
        (args.out / f"gpu-sweep-lowbit-{tag}.json").write_text(json.dumps(meta, indent=1) + "\n")
        return 0

    bw = copy_bandwidth()
    meta["copy_bandwidth_GBps"] = bw / 1e9
    print(f"{device}: device-to-device copy {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    records = []
    compile_suites = (args.compile_suites or args.suites).split(",")
    for suite in args.suites.split(","):
        shapes = SUITES[suite]()
        numel = sum(math.prod(s) for s in shapes)
        for dname in args.dtypes.split(","):
            params = make_params(shapes, DTYPES[dname])
            for opt in args.optimizers.split(","):
                rows = make_rows(opt, params, not args.no_compile and suite in compile_suites)
                for impl, (factory, s_bytes) in rows.items():
                    if args.impls and impl not in args.impls.split(","):
                        continue
                    rec = dict(suite=suite, tensors=len(shapes), elements=numel, dtype=dname, optimizer=opt,
                               impl=impl, bytes=numel * bytes_per_element(opt, params[0].element_size(), s_bytes))
                    try:
                        mod = sys.modules.get(f"generated.{opt}")
                        before = mod.LAUNCHES
                        ms, cpu_ms, warm = time_steps(factory(), args.warmup, args.windows, args.steps)
                        launches = (mod.LAUNCHES - before) / (args.warmup + args.windows * args.steps)
                        rec.update(gpu_ms=ms, cpu_ms=cpu_ms, warmup_s=warm,
                                   roofline_ms=rec["bytes"] / bw * 1e3)
                        rec["roofline_frac"] = rec["roofline_ms"] / ms
                        if impl.startswith("optdsl fused"):
                            rec["launches_per_step"] = launches
                    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    records.append(rec)
                    torch.cuda.empty_cache()
                    print(_line(rec), flush=True)
                    _save(args, meta, tag, records)  # after every row: a run cut short keeps what it measured
                torch._dynamo.reset()
            del params
            torch.cuda.empty_cache()
    table = _table(_save(args, meta, tag, records), meta)
    print("\n" + table)
    _plot(meta["records"], meta, args.out / f"gpu-{tag}.png")
    return 0


def _save(args, meta, tag, records):
    """Write the JSON and Markdown results; with --append, merged into what the file held."""
    path = args.out / f"gpu-{tag}.json"
    if args.append and path.exists():
        old = json.loads(path.read_text())
        new = {_key(r) for r in records}
        kept = [r for r in old["records"] if _key(r) not in new]
        order = {k: i for i, k in enumerate(_key(r) for r in old["records"])}
        records = sorted(kept + records, key=lambda r: order.get(_key(r), len(order)))
        if meta["command"] not in old["command"]:
            meta["command"] = old["command"] + " && " + meta["command"]
    meta["records"] = records
    path.write_text(json.dumps(meta, indent=1) + "\n")
    (args.out / f"gpu-{tag}.md").write_text(_table(records, meta))
    return records


def _key(r):
    return r["suite"], r["dtype"], r["optimizer"], r["impl"]


def _line(r):
    if "error" in r:
        return f"{r['suite']:8s} {r['dtype']} {r['optimizer']:6s} {r['impl']:15s} error: {r['error']}"
    return (f"{r['suite']:8s} {r['dtype']} {r['optimizer']:6s} {r['impl']:15s} gpu {r['gpu_ms']:8.3f} ms  "
            f"cpu {r['cpu_ms']:8.3f} ms  roofline {100 * r['roofline_frac']:5.1f}%  warm-up {r['warmup_s']:.1f} s")


def _table(records, meta):
    lines = [f"# GPU benchmark: {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; `{meta['command']}`; "
             f"copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s (read + write).", "",
             "Per-step medians. `x fused` = torch fused=True time / this time; `x compile` = "
             "torch.compile time / this time (higher is better for us). bf16: torch keeps bf16 states, "
             "optdsl float32 states (more bytes).", "",
             "| suite | dtype | optimizer | impl | GPU ms | CPU ms | roofline % | x torch fused | x torch.compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["suite"], r["dtype"], r["optimizer"], r["impl"]): r for r in records}
    for r in records:
        if "error" in r:
            lines.append(f"| {r['suite']} | {r['dtype']} | {r['optimizer']} | {r['impl']} | error: "
                         f"{r['error'][:80]} | | | | |")
            continue
        key = (r["suite"], r["dtype"], r["optimizer"])
        ratio = {}
        for base in ("torch fused", "torch.compile"):
            b = by.get((*key, base))
            ratio[base] = f"{b['gpu_ms'] / r['gpu_ms']:.2f}" if b and "gpu_ms" in b else ""
        lines.append(f"| {r['suite']} | {r['dtype']} | {r['optimizer']} | {r['impl']} | {r['gpu_ms']:.3f} | "
                     f"{r['cpu_ms']:.3f} | {100 * r['roofline_frac']:.0f} | {ratio['torch fused']} | "
                     f"{ratio['torch.compile']} |")
    return "\n".join(lines) + "\n"


def _plot(records, meta, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    ok = [r for r in records if "gpu_ms" in r]
    panels = sorted({(r["suite"], r["dtype"]) for r in ok}, key=lambda k: (list(SUITES).index(k[0]), k[1]))
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    opts = list(dict.fromkeys(r["optimizer"] for r in ok))
    cols = 2
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(13, 3.2 * ((len(panels) + 1) // 2)),
                             squeeze=False)
    width = 0.8 / len(impls)
    for ax, (suite, dname) in zip(axes.flat, panels):
        for j, impl in enumerate(impls):
            ys = [next((r["gpu_ms"] for r in ok if (r["suite"], r["dtype"], r["optimizer"], r["impl"]) ==
                        (suite, dname, o, impl)), float("nan")) for o in opts]
            ax.bar([i + j * width for i in range(len(opts))], ys, width, label=impl)
        for i, o in enumerate(opts):
            roof = next((r["roofline_ms"] for r in ok if (r["suite"], r["dtype"], r["optimizer"]) ==
                         (suite, dname, o) and r["impl"] == "optdsl fused"), None)
            if roof:
                ax.hlines(roof, i - width / 2, i + 0.8 - width / 2, colors="k", linestyles="dashed")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(opts))], opts)
        ax.set_yscale("log")
        ax.set_title(f"{suite}, {dname} (dashed: roofline)")
        ax.set_ylabel("GPU ms per step")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"optimizer step on {meta['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
