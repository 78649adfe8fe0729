#!/usr/bin/env python
"""CPU benchmark: one optimizer step of the generated AdamW / SGD(momentum) against torch.optim.

This is a benchmark, not a test. Run it from the repository root::

    python bench/bench_cpu.py [--steps 20] [--windows 7] [--threads N] [--out bench/results]

What it measures
----------------
The parameters are a list of float32 tensors shaped like a small transformer (token and
position embeddings, per-layer layer norms, fused qkv, attention output, two MLP matrices with
biases, a final layer norm and an untied LM head).  Every row of the table gets its own copy of
the same initial parameters and of the same (fixed) gradients, so all rows do the same work.
Each row does ``--warmup`` untimed steps, then ``--windows`` windows of ``--steps`` steps; the
windows of all rows are interleaved (row A window 1, row B window 1, ...) so that drift in the
machine's speed hits every row alike.  The reported number is the median over windows of the
time per step (``time.perf_counter``), with the minimum alongside.  ``ratio`` is
generated / torch for the same optimizer and the same path (foreach or per-tensor).

After the timed steps, the parameters of each generated row are compared with those of the
matching torch row (they started equal and saw identical gradients for the same number of
steps) and the largest absolute difference is printed, so that the rows are known to have
done equal work.

Results go to ``<out>/cpu.json`` and ``<out>/cpu.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
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

import generated.adamw as gen_adamw  # noqa: E402
import generated.sgd as gen_sgd  # noqa: E402


# --------------------------------------------------------------------------- model shapes

def transformer_shapes(d_model: int, n_layers: int, vocab: int, seq_len: int, mlp_mult: int):
    """(name, shape) for the parameters of a small GPT-style transformer."""
    d_ff = mlp_mult * d_model
    shapes = [("tok_emb", (vocab, d_model)), ("pos_emb", (seq_len, d_model))]
    for i in range(n_layers):
        shapes += [
            (f"l{i}.ln1.w", (d_model,)), (f"l{i}.ln1.b", (d_model,)),
            (f"l{i}.qkv.w", (3 * d_model, d_model)), (f"l{i}.qkv.b", (3 * d_model,)),
            (f"l{i}.out.w", (d_model, d_model)), (f"l{i}.out.b", (d_model,)),
            (f"l{i}.ln2.w", (d_model,)), (f"l{i}.ln2.b", (d_model,)),
            (f"l{i}.fc1.w", (d_ff, d_model)), (f"l{i}.fc1.b", (d_ff,)),
            (f"l{i}.fc2.w", (d_model, d_ff)), (f"l{i}.fc2.b", (d_model,)),
        ]
    shapes += [("ln_f.w", (d_model,)), ("ln_f.b", (d_model,)), ("lm_head.w", (vocab, d_model))]
    return shapes


def make_tensors(shapes, seed: int):
    """Initial parameter values and gradients (float32, contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    init, grads = [], []
    for name, shape in shapes:
        if name.endswith(".w") and len(shape) == 1:  # layer-norm gain
            p = torch.ones(shape) + 0.01 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # bias
            p = 0.01 * torch.randn(shape, generator=gen)
        else:
            p = torch.randn(shape, generator=gen) * (shape[-1] ** -0.5)
        init.append(p.float().contiguous())
        grads.append((1e-2 * torch.randn(shape, generator=gen)).float().contiguous())
    return init, grads


# --------------------------------------------------------------------------- rows

class Row:
    """One benchmarked configuration: its own parameter copies, grads and optimizer."""

    def __init__(self, key, optimizer, impl, foreach, factory, init, grads):
        self.key = key              # e.g. "adamw/foreach/generated"
        self.optimizer = optimizer  # "AdamW" | "SGD-momentum"
        self.impl = impl            # "generated" | "torch"
        self.foreach = foreach
        self.params = [torch.nn.Parameter(p.clone()) for p in init]
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.opt = factory(self.params, foreach)
        self.window_s: list[float] = []  # seconds per step, one entry per window
        self.steps_done = 0

    def run(self, n: int) -> float:
        step = self.opt.step
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        dt = time.perf_counter() - t0
        self.steps_done += n
        return dt


def build_rows(init, grads, args):
    a = dict(lr=args.adamw_lr, b1=0.9, b2=0.999, eps=1e-8, wd=args.adamw_wd)
    s = dict(lr=args.sgd_lr, momentum=0.9, dampening=0.0, wd=args.sgd_wd)

    factories = {
        ("AdamW", "generated"): lambda ps, fe: gen_adamw.AdamW(
            ps, a["lr"], (a["b1"], a["b2"]), a["eps"], a["wd"], foreach=fe),
        ("AdamW", "torch"): lambda ps, fe: torch.optim.AdamW(
            ps, lr=a["lr"], betas=(a["b1"], a["b2"]), eps=a["eps"], weight_decay=a["wd"],
            foreach=fe),
        ("SGD-momentum", "generated"): lambda ps, fe: gen_sgd.SGD(
            ps, s["lr"], s["momentum"], s["dampening"], s["wd"], False, foreach=fe),
        ("SGD-momentum", "torch"): lambda ps, fe: torch.optim.SGD(
            ps, lr=s["lr"], momentum=s["momentum"], dampening=s["dampening"],
            weight_decay=s["wd"], nesterov=False, foreach=fe),
    }
    rows = []
    paths = [True] if args.foreach_only else [True, False]
    for opt_name in ("AdamW", "SGD-momentum"):
        for fe in paths:
            for impl in ("generated", "torch"):
                key = f"{opt_name}/{'foreach' if fe else 'per-tensor'}/{impl}"
                rows.append(Row(key, opt_name, impl, fe, factories[(opt_name, impl)], init, grads))
    hypers = {"AdamW": a, "SGD-momentum": dict(s, nesterov=False)}
    return rows, hypers


# --------------------------------------------------------------------------- environment

def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per timing window (20)")
    ap.add_argument("--windows", type=int, default=7, help="timing windows per row (7)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per row first (5)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: leave torch's default)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results",
                    help="directory for cpu.json and cpu.md (bench/results)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512, help="rows of the position embedding")
    ap.add_argument("--mlp-mult", type=int, default=4)
    ap.add_argument("--adamw-lr", type=float, default=1e-3)
    ap.add_argument("--adamw-wd", type=float, default=1e-2)
    ap.add_argument("--sgd-lr", type=float, default=1e-2)
    ap.add_argument("--sgd-wd", type=float, default=0.0,
                    help="SGD weight decay (0, torch's default)")
    ap.add_argument("--foreach-only", action="store_true", help="skip the per-tensor rows")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    shapes = transformer_shapes(args.d_model, args.layers, args.vocab, args.seq_len, args.mlp_mult)
    init, grads = make_tensors(shapes, args.seed)
    n_params = sum(p.numel() for p in init)
    rows, hypers = build_rows(init, grads, args)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"CPU: {cpu_model()}")
    print(f"{len(shapes)} float32 tensors, {n_params / 1e6:.2f}M parameters "
          f"(d_model={args.d_model}, layers={args.layers}, vocab={args.vocab}); "
          f"{args.warmup} warm-up steps, {args.windows} windows x {args.steps} steps per row\n")

    load_before = loadavg()
    if load_before is not None and load_before[0] > (os.cpu_count() or 1):
        print(f"WARNING: 1-minute load average {load_before[0]:.1f} exceeds the "
              f"{os.cpu_count()} CPUs: other processes compete for the cores, timings will be "
              f"noisy (and with >1 torch thread, OpenMP waits can make every op many times "
              f"slower; try --threads 1).\n")

    # Warm-up (also creates the optimizer state lazily).
    for r in rows:
        r.run(args.warmup)
    # Timing windows, interleaved across rows.
    for w in range(args.windows):
        for r in rows:
            r.window_s.append(r.run(args.steps) / args.steps)
        print(f"  window {w + 1}/{args.windows} done", file=sys.stderr, flush=True)
    load_after = loadavg()
    print()

    # ---- results
    by_key = {r.key: r for r in rows}
    results = []
    for r in rows:
        med = statistics.median(r.window_s)
        rec = dict(key=r.key, optimizer=r.optimizer, impl=r.impl,
                   path="foreach" if r.foreach else "per-tensor",
                   median_ms=med * 1e3, min_ms=min(r.window_s) * 1e3,
                   windows_ms=[w * 1e3 for w in r.window_s], steps_done=r.steps_done)
        results.append(rec)
    for rec in results:
        rec["ratio_vs_torch"] = None
        if rec["impl"] == "generated":
            ref = next(x for x in results if x["optimizer"] == rec["optimizer"]
                       and x["path"] == rec["path"] and x["impl"] == "torch")
            rec["ratio_vs_torch"] = rec["median_ms"] / ref["median_ms"]
            rec["ratio_vs_torch_min"] = rec["min_ms"] / ref["min_ms"]

    # ---- sanity check: generated and torch parameters still agree
    checks = []
    for r in rows:
        if r.impl != "generated":
            continue
        ref = by_key[r.key.replace("/generated", "/torch")]
        assert r.steps_done == ref.steps_done
        max_abs = max((a - b).abs().max().item() for a, b in zip(r.params, ref.params))
        # Largest total change torch made to any parameter entry: the scale the diff is judged on.
        moved = max((a.detach() - p0).abs().max().item() for a, p0 in zip(ref.params, init))
        ok = all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(r.params, ref.params))
        checks.append(dict(key=r.key, against=ref.key, steps=r.steps_done, max_abs_diff=max_abs,
                           max_abs_update_torch=moved, diff_over_update=max_abs / moved,
                           allclose=ok, allclose_tol=dict(rtol=1e-5, atol=1e-5)))

    # ---- table
    header = ["optimizer", "path", "impl", "median ms/step", "min ms/step", "gen/torch (median)",
              "gen/torch (min)"]
    lines = []
    for rec in results:
        gen = rec["ratio_vs_torch"] is not None
        lines.append([rec["optimizer"], rec["path"], rec["impl"],
                      f"{rec['median_ms']:.3f}", f"{rec['min_ms']:.3f}",
                      f"{rec['ratio_vs_torch']:.2f}x" if gen else "",
                      f"{rec['ratio_vs_torch_min']:.2f}x" if gen else ""])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    fmt_row = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(cells, widths)))
    print(fmt_row(header))
    print("  ".join("-" * w for w in widths))
    for l in lines:
        print(fmt_row(l))
    print()
    for c in checks:
        print(f"check {c['key']} vs torch after {c['steps']} steps: max |diff| = "
              f"{c['max_abs_diff']:.3e} (largest total change torch made to a parameter: "
              f"{c['max_abs_update_torch']:.3e}) -> "
              f"{'OK' if c['allclose'] else 'MISMATCH'}")
    for rec in results:
        if rec["impl"] == "generated" and rec["path"] == "foreach":
            verdict = "within" if rec["ratio_vs_torch"] <= 1.1 else "NOT within"
            print(f"{rec['optimizer']} foreach: generated/torch = {rec['ratio_vs_torch']:.2f}x "
                  f"({verdict} 1.1x)")

    # ---- save
    args.out.mkdir(parents=True, exist_ok=True)
    numel_by_kind = {}
    for name, shape in shapes:
        kind = name.split(".", 1)[-1] if name.startswith("l") and name[1].isdigit() else name
        n = 1
        for d in shape:
            n *= d
        numel_by_kind.setdefault(kind, {"shape": list(shape), "count": 0, "numel_each": n})
        numel_by_kind[kind]["count"] += 1
    env = dict(
        torch_version=torch.__version__, python=platform.python_version(),
        platform=platform.platform(), cpu_model=cpu_model(), os_cpu_count=os.cpu_count(),
        torch_num_threads=torch.get_num_threads(),
        torch_num_interop_threads=torch.get_num_interop_threads(),
        loadavg_1_5_15_before=load_before, loadavg_1_5_15_after=load_after,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    payload = dict(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        environment=env,
        settings=dict(steps_per_window=args.steps, windows=args.windows, warmup=args.warmup,
                      threads_arg=args.threads, seed=args.seed, timer="time.perf_counter",
                      statistic="median over windows of (window time / steps)"),
        model=dict(d_model=args.d_model, layers=args.layers, vocab=args.vocab,
                   seq_len=args.seq_len, mlp_mult=args.mlp_mult, dtype="float32",
                   n_tensors=len(shapes), n_params=n_params, tensors=numel_by_kind),
        hyperparameters=hypers,
        results=results,
        sanity_checks=checks,
    )
    (args.out / "cpu.json").write_text(json.dumps(payload, indent=2) + "\n")

    md = [f"# CPU optimizer-step benchmark",
          "",
          f"- torch {env['torch_version']}, {env['torch_num_threads']} threads, "
          f"CPU: {env['cpu_model']}",
          f"- {len(shapes)} float32 tensors, {n_params:,} parameters (transformer d_model="
          f"{args.d_model}, {args.layers} layers, vocab {args.vocab})",
          f"- {args.warmup} warm-up steps, then {args.windows} windows x {args.steps} steps per "
          f"row, interleaved; median (and min) over windows of time per step",
          f"- AdamW: {hypers['AdamW']}; SGD: {hypers['SGD-momentum']}",
          f"- {env['date']}; load average (1 min) before/after: "
          f"{load_before[0] if load_before else 'n/a'} / {load_after[0] if load_after else 'n/a'}",
          "",
          "| " + " | ".join(header) + " |",
          "|" + "|".join(["---"] * 3 + ["---:"] * 4) + "|"]
    md += ["| " + " | ".join(l) + " |" for l in lines]
    md += ["", "Sanity check (generated vs torch parameters after the same steps):", ""]
    md += [f"- {c['key']}: max abs diff {c['max_abs_diff']:.3e} after {c['steps']} steps "
           f"(largest total change torch made to a parameter {c['max_abs_update_torch']:.3e}; "
           f"{'OK' if c['allclose'] else 'MISMATCH'})" for c in checks]
    (args.out / "cpu.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {args.out / 'cpu.json'} and {args.out / 'cpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
