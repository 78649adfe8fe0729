"""How long the slowest specs we know take to compile, at the limits that bound compiling.

Each family is a legal spec grown until the compiler refuses it (optdsl/sym.py MAX_DEPTH and MAX_WORK,
optdsl/lower.py MAX_STATEMENTS, MAX_RULES and MAX_HYPERS, optdsl/group.py MAX_GROUP_STATEMENTS,
optdsl/parse.py MAX_SPEC_CHARS): the largest
size it still compiles is timed, cold, in a fresh process (the first compile of a process also builds the Lark parser), and the refusal one size
up is timed too. Issue 12 asks every spec to compile in under 2 s on the project's machine (2 cores) or
be refused with a located error.

    python bench/compile_bounds.py            # table to stdout, bench/results/compile-bounds.{json,md}
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HEAD = "optimizer Bound\nhyper lr = 0.1\n"

# statements that each read the one before: once (nested), twice (shared), with the functions SymPy
# works hardest on (Min/Max compare arguments, Abs/sign/exp walk theirs, where splits cases)
CHAINS = {
    "max2": "max(sqrt(abs(x{i}) + 2) * g, x{i} / (abs(g) + 2))",
    "min2": "min(x{i} * g, x{i} + g)",
    "mix": "max(abs(x{i}), g) * sign(x{i} - g) + where(x{i} > 0, sqrt(abs(x{i})), g)",
    "div": "x{i} / (abs(x{i}) + 1) + g",
    "where2": "where(x{i} > g, x{i} * g, x{i} - g)",
    "sign": "sign(x{i}) * abs(g) + x{i}",
    "abs": "abs(x{i}) + g",
    "exp": "exp(-x{i}^2) * g",
    "clamp": "clamp(x{i} * g, -1, 1)",
    "lin": "x{i} * 0.5 + g",
}


def chain(kind: str, n: int, rules: int = 1) -> str:
    body = "x0 = g\n" + "".join(f"x{i + 1} = {CHAINS[kind].format(i=i)}\n" for i in range(n)) + f"m = x{n}\np -= lr * m\n"
    if rules == 1:
        return HEAD + "state m\n" + body
    return HEAD + "".join(f"rule numel == {r + 1} {{\nstate m\n{body}}}\n" for r in range(rules))


def wide(n: int, terms: int = 40) -> str:
    e = " + ".join(f"max(g, {k} * g)" for k in range(terms))
    return HEAD + "".join(f"x{i} = {e}\n" for i in range(n)) + "p -= lr * (" + " + ".join(f"x{i}" for i in range(n)) + ")\n"


FAMILIES = {f"chain {k}": (lambda n, k=k: chain(k, n)) for k in CHAINS}
FAMILIES.update({f"chain {k} x12 rules": (lambda n, k=k: chain(k, n, 12)) for k in ("max2", "mix", "div")})
FAMILIES["wide (40 max terms a statement)"] = wide


def long_lines(n: int) -> str:
    """n statements of 250-character sums, up to the limit on a spec's characters."""
    return HEAD + "".join(f"x{i} = " + " + ".join(f"g*{k}" for k in range(36)) + "\n" for i in range(n)) + (
        "p -= lr * (" + " + ".join(f"x{i}" for i in range(n)) + ")\n")


def hypers(n: int) -> str:
    return HEAD + "".join(f"hyper h{i} = {i}\n" for i in range(n)) + "p -= lr * g" + "".join(
        f" + h{i} * g" for i in range(n)) + "\n"


def group_chain(n: int) -> str:
    """n group statements (host scalars), each a max of the one before."""
    return HEAD + "state k: group\ngroup x0 = k + lr\n" + "".join(
        f"group x{i + 1} = max(sqrt(abs(x{i}) + 2) * lr, x{i} / (abs(lr) + 2))\n" for i in range(n)) + (
        f"group k = x{n}\np -= k * g\n")


FAMILIES["long lines (250 characters)"] = long_lines
FAMILIES["group statements, chain max2"] = group_chain
FAMILIES["hyperparameters, each read"] = hypers

_COMPILE = ("import sys, time\nfrom optdsl.errors import SpecError\nfrom optdsl.pipeline import compile_source\n"
            "text = sys.stdin.read()\nt = time.perf_counter()\ntry:\n    compile_source(text)\n    ok = 1\n"
            "except SpecError as e:\n    ok = 0\n    assert e.span is not None, e\n"
            "print(ok, time.perf_counter() - t)\n")


def cold(text: str, repeat: int = 3) -> tuple[bool, float]:
    """(compiled, median seconds of compile_source) over fresh processes."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", _COMPILE], input=text, capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        ok, seconds = out.stdout.split()
        runs.append((ok == "1", float(seconds)))
    return runs[0][0], statistics.median(s for _, s in runs)


def largest(make) -> int:
    """The largest n whose spec compiles (refusals are quick: found in process)."""
    from optdsl.errors import SpecError
    from optdsl.pipeline import compile_source

    def ok(n):
        try:
            compile_source(make(n))
            return True
        except SpecError:
            return False
    lo, hi = 1, 2
    while ok(hi) and hi < 4096:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    rows = []
    kron = (root / "specs" / "kron.opt").read_text()
    for name, make in [("specs/kron.opt", None), *FAMILIES.items()]:
        if make is None:
            n, (ok, t), (ok_up, t_up) = "-", cold(kron), (None, None)
        else:
            n = largest(make)
            (ok, t), (ok_up, t_up) = cold(make(n)), cold(make(n + 1))
        rows.append(dict(family=name, n=n, compiled=ok, seconds=round(t, 3),
                         refused_next=(not ok_up) if ok_up is not None else None,
                         refusal_seconds=round(t_up, 3) if t_up is not None else None))
        print(f"{name:36s} n={n!s:>5} {'compiles' if ok else 'REFUSED'} in {t:5.2f} s"
              + (f"; n+1 {'refused' if not ok_up else 'COMPILES'} in {t_up:5.2f} s" if t_up is not None else ""),
              flush=True)
    out = root / "bench" / "results"
    (out / "compile-bounds.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Compile time at the bounds", "",
             f"`python bench/compile_bounds.py` on {os.cpu_count()} cores: `compile_source` in a fresh process "
             "(the Lark parser built), median of 3.", "",
             "| family | largest n compiled | seconds | n+1 refused | seconds to refuse |", "|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['n']} | {r['seconds']:.2f} | {r['refused_next']} | "
              f"{r['refusal_seconds'] if r['refusal_seconds'] is not None else '-'} |" for r in rows]
    (out / "compile-bounds.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
