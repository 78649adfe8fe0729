#!/usr/bin/env python
"""Name fuzzer (issue 12, item 2): every identifier the generated code uses, in every role a spec
can give a name, either steps exactly as the same spec under a harmless name does (for-loop,
foreach and fused paths, float64, bit for bit: the code differs in names alone) or is refused with a
located SpecError on the line that declares or assigns it.

The names: every identifier of the committed generated modules (names, parameters, functions,
imports, attributes, keywords), Python's builtins and keywords, and every one- and two-character
name of the alphabet. The red-team run of the last stop walked them in sorted order and stopped
before q; `cases()` interleaves them by first character, so any prefix of the list covers the
whole alphabet, and tests/test_names.py runs a derandomized sample (every first character, every
role, the fused path) in CI and a larger one under the explore profile. Tally:

    python tests/name_fuzz.py [--cases N] [--start K] [--show bug]
"""
from __future__ import annotations

import argparse
import ast as pyast
import builtins
import collections
import functools
import keyword
import os
import string
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused path's kernels on CPU tensors, as tests/conftest.py
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optdsl  # noqa: E402
from optdsl.errors import SpecError  # noqa: E402

FILENAME = "names.opt"
MODES = [dict(foreach=False), dict(foreach=True), dict(fused=True)]
SHAPES = {"rows state": [(3, 4), (2, 3, 5)]}  # the fused path keeps rows of matrices only
DEFAULT_SHAPES = [(3, 4), (5,)]
PLAIN = "zq_name"  # what each name stands beside: a name no template and no generated code uses

# The roles a spec gives a name, {n} where the name goes; every other name starts with zq_.
_BODY = "hyper zq_lr = 1e-2, zq_b = 0.9\nstate zq_m\nzq_m = lerp(zq_m, g, 1 - zq_b)\np -= zq_lr * zq_m / (1 + zq_b^t)\n"
ROLES = {
    "class": "optimizer {n}\n" + _BODY,
    "hyper": ("optimizer ZqX\nhyper zq_lr = 1e-2, {n} = 0.3\nstate zq_m\nzq_m = lerp(zq_m, g, 0.5)\n"
              "p -= zq_lr * max(abs(zq_m), {n}) * sign(zq_m) / (1 + norm(zq_m) * {n})\n"),
    "keyword": "optimizer ZqX\nhyper zq_lr = 1e-2 as {n}\np -= zq_lr * g\n",
    "state": "optimizer ZqX\nstate {n}\n{n} = lerp({n}, g, 0.5)\np -= 0.1 * {n}\n",
    "saved key": "optimizer ZqX\nstate zq_m as {n}\nzq_m = lerp(zq_m, g, 0.5)\np -= 0.1 * zq_m\n",
    "scalar state": ("optimizer ZqX\nstate {n}: scalar\n{n} = lerp({n}, norm(g), 0.5)\n"
                     "p -= 0.1 * g / (1 + {n})\n"),
    "rows state": ("optimizer ZqX\nstate {n}: rows\n{n} = lerp({n}, row_mean(g^2), 0.5)\n"
                   "p -= 0.1 * g * rsqrt({n} + 1e-8)\n"),
    "local": "optimizer ZqX\n{n} = g * 2 + norm(g)\np -= 0.01 * {n}\n",
    "input": "optimizer ZqX\ninput {n} = 0.5\np -= {n} * g\n",
    "group value": "optimizer ZqX\ngroup {n} = sum(g^2)\np -= 0.1 * g / (1 + {n})\n",
}


@functools.lru_cache(maxsize=None)
def names() -> tuple[str, ...]:
    """Every name of the pool, interleaved by first character (a, b, ..., z, A, ..., _, then the
    second name of each letter, ...), so that a prefix of any length covers the alphabet."""
    found: set[str] = set()
    for path in sorted((ROOT / "generated").glob("*.py")):
        for node in pyast.walk(pyast.parse(path.read_text(encoding="utf-8"))):
            for field in ("id", "arg", "attr", "name"):
                value = getattr(node, field, None)
                if isinstance(value, str):
                    found.add(value)
            if isinstance(node, pyast.alias):
                found.add((node.asname or node.name).split(".")[0])
    found |= set(dir(builtins)) | set(keyword.kwlist) | set(keyword.softkwlist)
    letters = string.ascii_letters + "_"
    found |= set(letters) | {a + b for a in letters for b in letters + string.digits}
    found = {n for n in found if n.isidentifier() and n.isascii() and len(n) <= 100 and not n.startswith("zq_")}
    by_first = collections.defaultdict(list)
    for n in sorted(found):
        by_first[n[0]].append(n)
    columns = [by_first[c] for c in letters if by_first[c]]
    return tuple(n for row in range(max(map(len, columns))) for col in columns if row < len(col) for n in [col[row]])


def cases() -> list[tuple[str, str]]:
    """(name, role) pairs: the names in interleaved order, each in the next role in turn."""
    roles = list(ROLES)
    return [(n, roles[i % len(roles)]) for i, n in enumerate(names())]


@dataclass
class Outcome:
    kind: str  # refused (a located SpecError where the name stands), same (steps as the plain spec), bug
    detail: str = ""


def _trajectory(cls: type, mode: dict, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    opt = cls(params, **mode)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    # the states in the order the step made them (their keys differ with the name: not sorted by key)
    return [p.detach().clone() for p in params] + [
        v.clone() for p in params for v in opt.state[p].values() if torch.is_tensor(v)]


@functools.lru_cache(maxsize=None)
def _plain(role: str, mode: str) -> tuple[torch.Tensor, ...]:
    text = ROLES[role].format(n="ZqPlain" if role == "class" else PLAIN)
    shapes = SHAPES.get(role, DEFAULT_SHAPES)
    return tuple(_trajectory(optdsl.compile(text, FILENAME), eval(mode), shapes))  # noqa: S307 - our dict's repr


def outcome(name: str, role: str, modes: list[dict] = MODES) -> Outcome:
    text = ROLES[role].format(n=name)
    where = next(i for i, line in enumerate(ROLES[role].split("\n"), 1) if "{n}" in line)  # its declaration
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cls = optdsl.compile(text, FILENAME)
        except SpecError as err:
            shown = str(err)
            if "this is a bug in optdsl" in shown or err.span is None or "^" not in shown:
                return Outcome("bug", f"unlocated or internal: {shown}")
            if err.line != where:  # a name is refused where it stands: the line that declares or assigns it
                return Outcome("bug", f"refused at line {err.line}, declared on {where}: {shown}")
            return Outcome("refused", shown.split("\n")[0])
        except Exception as err:  # noqa: BLE001 - any other failure is what we look for
            return Outcome("bug", f"compile: {type(err).__name__}: {err}")
        for mode in modes:
            try:
                got = _trajectory(cls, mode, SHAPES.get(role, DEFAULT_SHAPES))
            except Exception as err:  # noqa: BLE001
                return Outcome("bug", f"step {mode}: {type(err).__name__}: {err}")
            want = _plain(role, repr(mode))
            if len(got) != len(want) or not all(torch.equal(a, b) for a, b in zip(got, want)):
                return Outcome("bug", f"{mode}: steps differently from the spec with '{PLAIN}'")
    return Outcome("same")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=None, help="how many (name, role) pairs; default all")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--show", action="append", default=[], help="print each case of this kind")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    todo = cases()[args.start:][:args.cases]
    tally, firsts = collections.Counter(), set()
    began = time.perf_counter()
    for name, role in todo:
        out = outcome(name, role)
        tally[out.kind] += 1
        firsts.add(name[0])
        if out.kind in args.show:
            print(f"--- {role} {name!r}: {out.kind}: {out.detail}", flush=True)
    print(f"{len(todo)} (name, role) cases of {len(cases())}, first characters {len(firsts)}, "
          f"in {time.perf_counter() - began:.0f} s: " + ", ".join(f"{k} {tally[k]}" for k in ("refused", "same", "bug")))
    return 1 if tally["bug"] else 0


if __name__ == "__main__":
    sys.exit(main())
