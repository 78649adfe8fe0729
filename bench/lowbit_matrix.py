#!/usr/bin/env python
"""Matrix states (Gram matrices, their inverse roots, eigenbases) at low bit: measured, not assumed.

This is a benchmark, not a test. Run it from the repository root::

    python bench/lowbit_matrix.py [--steps 120] [--gpt-steps 200] [--out bench/results]

Shampoo (L, R, Li, Ri: d x d per axis of each matrix parameter) and SOAP (GL, GR: Gram matrices;
QL, QR: their eigenbases) on bench/lowbit_quality.py's two CPU tasks (charlm, the small GPT), the
same seeds and data for every row, with their states in float32 and at int8 (every float state of
4096+ numbers quantised, matrix states included: optdsl/quant.py's MATRIX_LOWBIT). Reported: the
final held-out loss, its change against float32 states, and the bytes the states take per parameter
as held in memory after the run (matrix states are nearly all of it: kept float32, an int8 run would
hold about as much as float32's). Shampoo's lr 0.1 (charlm 120 steps: 3.30 at 1e-2, 2.65 at 3e-2,
2.39 at 0.1); SOAP at its default 3e-3. Results go to ``<out>/lowbit_matrix.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generated import shampoo, soap  # noqa: E402
from lowbit_quality import measure  # noqa: E402

OPTIMIZERS = {"Shampoo": (shampoo.Shampoo, dict(lr=1e-1)), "SOAP": (soap.SOAP, dict(lr=3e-3))}
VARIANTS = {"float32": dict(state_dtype=None), "int8": dict(state_dtype="int8")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120, help="charlm steps")
    ap.add_argument("--gpt-steps", type=int, default=200)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for name in args.optimizers.split(","):
        cls, hypers = OPTIMIZERS[name]
        for variant in args.variants.split(","):
            kw = dict(hypers, foreach=False, **VARIANTS[variant])
            row = dict(optimizer=name, states=variant, **measure(cls, kw, args.steps, args.gpt_steps))
            row["seconds"] = round(row["seconds"], 1)
            rows.append(row)
            print(row, flush=True)
    base = {r["optimizer"]: r for r in rows if r["states"] == "float32"}
    for r in rows:
        for task in ("charlm", "gpt"):
            if task in r and task in base.get(r["optimizer"], {}):
                r[f"{task}_vs_float32"] = r[task] / base[r["optimizer"]][task] - 1
    result = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                  command=" ".join(["python", "bench/lowbit_matrix.py", *sys.argv[1:]]),
                  steps=args.steps, gpt_steps=args.gpt_steps, rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowbit_matrix.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "lowbit_matrix.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result):
    pct = lambda x: "" if x is None else f"{100 * x:+.2f}%"  # noqa: E731
    lines = [f"# Matrix states at low bit ({result['date']}, torch {result['torch']})", "",
             f"`{result['command']}`", "",
             f"Final held-out loss: charlm after {result['steps']} steps, GPT-style after {result['gpt_steps']} steps "
             "(same seeds); the change against the same optimizer's float32 states; the GPT run's state bytes per "
             "parameter as held in memory.", "",
             "| optimizer | states | charlm | vs float32 | gpt | vs float32 | gpt state B/param | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['optimizer']} | {r['states']} | {r.get('charlm', r.get('charlm_error', ''))!s:.10} | "
                     f"{pct(r.get('charlm_vs_float32'))} | {r.get('gpt', r.get('gpt_error', ''))!s:.10} | "
                     f"{pct(r.get('gpt_vs_float32'))} | {r.get('gpt_state_bytes_per_param', 0):.3f} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
