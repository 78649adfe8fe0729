#!/usr/bin/env python
"""Low-bit optimizer states: bytes per parameter, and what they cost in loss.

This is a benchmark, not a test. Run it from the repository root::

    python bench/lowbit_quality.py [--steps 120] [--gpt-steps 200] [--out bench/results]

Bytes: the states of AdamW for one 4096x4096 parameter, as `optdsl info` counts them
(optdsl/info.py, codes plus scales), and as held in memory by a real optimizer after a step on
the GPT-style model below (sum of nbytes over every state tensor, `step` left out), per parameter.

Quality: the final held-out loss of two CPU tasks, the same seed and data for every row:
* ``charlm``: optdsl's own task (optdsl/plot.py), a character MLP on Alice in Wonderland, full
  batch, --steps steps. Only its 64x64 hidden matrix (4096 numbers) is large enough to be stored at
  low bit; the embedding and the output layer stay float32, as bitsandbytes would keep them.
* ``gpt``: a 2-layer GPT-style transformer (d=96, 4 heads, context 32) on the same text, batches
  of 32 windows drawn from a fixed generator, --gpt-steps steps; the held-out loss is taken over
  the last tenth of the text. Most of its parameters are in matrices of 9216+ numbers.
Optimizers AdamW, Lion, Adafactor, Muon at state_dtype None (float32), torch.bfloat16, "int8",
"int4", and "int4 dyn": int4 with the unsigned dynamic map instead of the linear one, the
measurement behind optdsl/quant.py's LINEAR4.

Results go to ``<out>/lowbit_quality.json`` and ``<out>/lowbit_quality.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from generated import adafactor, adamw, lion, muon  # noqa: E402
from optdsl import quant  # noqa: E402
from optdsl.info import memory  # noqa: E402
from optdsl.pipeline import compile_source  # noqa: E402
from optdsl.plot import _char_data, _charlm  # noqa: E402

OPTIMIZERS = {  # name: (module, class, hyperparameters for both tasks)
    "AdamW": (adamw, adamw.AdamW, dict(lr=3e-3)),
    "Lion": (lion, lion.Lion, dict(lr=3e-4)),
    "Adafactor": (adafactor, adafactor.Adafactor, dict(lr=1e-2)),
    "Muon": (muon, muon.Muon, dict(lr=2e-2, adam_lr=3e-3)),
}
BNB = {"AdamW": "AdamW8bit", "Lion": "Lion8bit"}  # bitsandbytes' classes, compared where it imports


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


STATE_DTYPES = {"float32": None, "bf16": torch.bfloat16, "int8": "int8", "int4": "int4", "int4 dyn": "int4"}


class _Int4Dynamic:
    """While active, `module`'s unsigned int4 map is the dynamic one (not LINEAR4's linear)."""

    def __init__(self, module, on):
        self.module, self.on = module, on

    def __enter__(self):
        if self.on:
            self.saved = self.module._LEVELS[("int4", False)]
            self.module._LEVELS[("int4", False)] = tuple(quant.dynamic_map(False, 4, 3))
            self.module._LEVEL_TENSORS.clear()

    def __exit__(self, *exc):
        if self.on:
            self.module._LEVELS[("int4", False)] = self.saved
            self.module._LEVEL_TENSORS.clear()


class GPT(torch.nn.Module):
    def __init__(self, vocab, d=96, heads=4, layers=2, context=32):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(context, d)
        layer = lambda: torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,  # noqa: E731
                                                          norm_first=True)
        self.blocks = torch.nn.ModuleList(layer() for _ in range(layers))
        self.norm, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h, src_mask=self.mask[:x.shape[1], :x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


def _gpt_data(context=32):
    train, heldout = _char_data(context=context)  # windows of context + 1 characters
    join = lambda d: torch.cat([d.inputs, d.targets[:, None]], dim=1)  # noqa: E731
    return join(train), join(heldout), train.vocab


def _gpt(cls, hypers, steps):
    train, heldout, vocab = _gpt_data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT(vocab)
    opt = cls(model.parameters(), **hypers)
    gen = torch.Generator().manual_seed(1)
    loss_fn = torch.nn.functional.cross_entropy
    losses = []
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (32,), generator=gen)]
        opt.zero_grad()
        out = model(batch[:, :-1])
        loss = loss_fn(out.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        held = heldout[::4]  # every 4th window: overlapping windows add little
        out = model(held[:, :-1])
        final = loss_fn(out.reshape(-1, vocab), held[:, 1:].reshape(-1)).item()
    state_bytes = sum(v.nbytes for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step")
    numel = sum(p.numel() for p in model.parameters())
    return final, losses[-1], state_bytes / numel


def measure(cls, kw, steps, gpt_steps) -> dict:
    """One row's numbers: charlm's final held-out loss after `steps`, the small GPT's held-out and
    train loss and state bytes per parameter after `gpt_steps`, and the seconds both took; a task
    that cannot run says why in its `*_error` field."""
    row, start = {}, time.perf_counter()
    try:
        row["charlm"] = _charlm(cls, kw, steps)[1][-1]
    except Exception as err:  # noqa: BLE001 - a row that cannot run says why
        row["charlm_error"] = f"{type(err).__name__}: {err}"
    try:
        row["gpt"], row["gpt_train"], row["gpt_state_bytes_per_param"] = _gpt(cls, kw, gpt_steps)
    except Exception as err:  # noqa: BLE001
        row["gpt_error"] = f"{type(err).__name__}: {err}"
    row["seconds"] = time.perf_counter() - start
    return row


def bytes_table():
    prog = compile_source((ROOT / "specs" / "adamw.opt").read_text())
    m = memory(prog, (4096, 4096))
    return {name: m.stored_bytes(dtype) / (4096 * 4096)
            for name, dtype in (("float32", None), ("bf16", "bfloat16"), ("int8", "int8"), ("int4", "int4"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120, help="charlm steps")
    ap.add_argument("--gpt-steps", type=int, default=200)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the optimizers' own generators (stochastic rounding) seed from torch.initial_seed()
    runs = []  # (optimizer, states, module or None, class, keywords)
    for opt_name in args.optimizers.split(","):
        module, cls, hypers = OPTIMIZERS[opt_name]
        runs += [(opt_name, dtype_name, module, cls, dict(hypers, state_dtype=dtype, foreach=False))
                 for dtype_name, dtype in STATE_DTYPES.items()]
        if opt_name in BNB and _bnb() is not None:  # bitsandbytes' own 8-bit optimizer, where it runs
            runs.append((opt_name, "bnb 8-bit", None, getattr(_bnb().optim, BNB[opt_name]), dict(hypers)))
    rows = []
    for opt_name, dtype_name, module, cls, kw in runs:
        row = dict(optimizer=opt_name, state_dtype=dtype_name)
        with _Int4Dynamic(module, dtype_name == "int4 dyn"):
            row.update(measure(cls, kw, args.steps, args.gpt_steps))
        rows.append(row)
        print(row, flush=True)
    base = {r["optimizer"]: r for r in rows if r["state_dtype"] == "float32"}
    for r in rows:
        for task in ("charlm", "gpt"):
            if task in r and task in base[r["optimizer"]]:
                r[f"{task}_vs_float32"] = r[task] / base[r["optimizer"]][task] - 1
    result = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                  command=" ".join(["python", "bench/lowbit_quality.py", *sys.argv[1:]]),
                  steps=args.steps, gpt_steps=args.gpt_steps, adamw_bytes_per_param=bytes_table(), rows=rows,
                  int4_unsigned_map="linear" if quant.LINEAR4 else "dynamic",
                  bitsandbytes=getattr(_bnb(), "__version__", None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowbit_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "lowbit_quality.md").write_text(markdown(result))
    draw(result, out / "lowbit_quality.png")
    print(markdown(result))


def draw(result, path):
    """Held-out loss against the same optimizer's float32 states, per task, per state_dtype."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    names = list(dict.fromkeys(r["optimizer"] for r in result["rows"]))
    dtypes = list(dict.fromkeys(r["state_dtype"] for r in result["rows"] if r["state_dtype"] != "float32"))
    for ax, task in zip(axes, ("charlm", "gpt")):
        width = 0.8 / len(dtypes)
        for j, d in enumerate(dtypes):
            ys = [next((100 * r.get(f"{task}_vs_float32", float("nan")) for r in result["rows"]
                        if r["optimizer"] == n and r["state_dtype"] == d), float("nan")) for n in names]
            ax.bar([i + j * width for i in range(len(names))], [max(min(y, 20), -20) for y in ys], width, label=d)
        ax.axhline(1, color="grey", lw=0.8, ls="--")
        ax.axhline(-1, color="grey", lw=0.8, ls="--")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
        ax.set_title(f"{task}: held-out loss vs float32 states (%, clipped at ±20)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _pct(x):
    return "" if x is None else f"{100 * x:+.2f}%"


def markdown(result):
    lines = [f"# Low-bit optimizer states ({result['date']}, torch {result['torch']})", "",
             f"`{result['command']}`", "",
             "AdamW state bytes per parameter (one 4096x4096 parameter, `optdsl info`):", "",
             "| float32 | bf16 | int8 | int4 |", "|---|---|---|---|",
             "| " + " | ".join(f"{v:.4f}" for v in result["adamw_bytes_per_param"].values()) + " |", "",
             f"Final held-out loss: charlm after {result['steps']} steps, GPT-style after {result['gpt_steps']} "
             "steps (same seeds); the change against the same optimizer's float32 states; the GPT run's "
             "state bytes per parameter as held in memory.", "",
             "| optimizer | states | charlm | vs float32 | gpt | vs float32 | gpt train | gpt state B/param |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        charlm = f"{r['charlm']:.4f}" if "charlm" in r else r.get("charlm_error", "")[:60]
        gpt = f"{r['gpt']:.4f}" if "gpt" in r else r.get("gpt_error", "")[:60]
        per = f"{r['gpt_state_bytes_per_param']:.3f}" if "gpt_state_bytes_per_param" in r else ""
        lines.append(f"| {r['optimizer']} | {r['state_dtype']} | {charlm} | {_pct(r.get('charlm_vs_float32'))} | "
                     f"{gpt} | {_pct(r.get('gpt_vs_float32'))} | {r.get('gpt_train', float('nan')):.4f} | {per} |")
    lines += ["", "`int4 dyn`: the unsigned int4 map dynamic instead of linear (no zero); optdsl ships "
              f"{result['int4_unsigned_map']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
