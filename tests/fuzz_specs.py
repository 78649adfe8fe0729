#!/usr/bin/env python
"""Mutation fuzzer over the shipped specs and random text, and the outcome of each case.

Each case is one text, made from a seed: a shipped spec with a few token- or line-level
mutations (rename or swap names, swap functions, operators and numbers, delete, duplicate or
swap lines and tokens, insert a word of the language), or random text. Its outcome is one of

  located     a SpecError with a location: file:line:col, the line and a caret
  stepped     it compiled, and the class stepped twice on parameters of every rank 0..3 its
              rules accept (and do not refuse: `rule COND refuse "why"`), float32 and float64,
              for-loop and foreach, without an exception;
              for a sample (--fused-every), also fused=True (the Triton kernels, interpreted on the
              CPU), whose parameters and states equal the for-loop path's (float64)
  documented  it compiled, and a step raised an error that names the spec's file and line
              (or one of the generated code's own documented messages, DOCUMENTED below)
  bug         anything else: an unlocated SpecError, "this is a bug in optdsl", a compiled
              module that does not import, or a raw exception at construction or step

tests/test_fuzz.py asserts that no case is a bug (derandomized, the "ci" profile); run this
file to tally many cases (reproducible: case i is seed i):

    python tests/fuzz_specs.py --cases 10000 [--start 0] [--show bug] [--fused-every 4]
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused path's kernels on CPU tensors, as tests/conftest.py
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optdsl  # noqa: E402
from optdsl import functions as F  # noqa: E402
from optdsl.errors import SpecError  # noqa: E402

FILENAME = "fuzz.opt"
SPEC_TEXTS = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "specs").glob("*.opt"))]
FUNCS = sorted(F.TABLE)
OPERATORS = ["+", "-", "*", "/", "^", "**", "<", "<=", ">", ">=", "==", "!=", "=", "+=", "-=", "*=", "/="]
NUMBERS = ["0", "1", "-1", "2", "0.5", ".5", "3.", "1e-8", "1e400", "1e-320", "inf", "64", "65", "0.999",
           "-0.8", "100", "7"]
WORDS = ["optimizer", "hyper", "state", "in", "inf", "p", "g", "t", "loss", "m", "v", "lr", "b1", "eps", "u", "x",
         "rule", "repeat", "every", "input", "scalar", "rows", "cols", "bool", "as", "only", "eager", "True",
         "False", "ndim", "numel", "nrows", "ncols", "{", "}", "(", ")", "[", "]", ",", ";", ":", "\n", "# c\n",
         '"doc"', "lambda", "class", "torch", "self", "step", "%", "and", "or", "cos", "!", "@"]
TOKEN = re.compile(r'\s+|#[^\n]*|"[^"\n]*"|\*\*|[-+*/]=|[<>=!]=|[A-Za-z_]\w*|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|.')
NAME = re.compile(r"[A-Za-z_]\w*")
NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
CHARS = "abglmptvxyz_019.e " + "\t\n;#()[]{},:=+-*/^<>!\""

# Errors the generated code raises on purpose, with a message that says what to do.
DOCUMENTED = ("no rule of ", "cannot run: ", "reads the loss: call step(closure)")
RANKS = [(), (7,), (3, 5), (2, 3, 4)]
# stepped too, beside those (not compared fused): an empty parameter of each zero axis (SM3 and Kron ended
# a step on one with torch.amax's raw error, which no case here reached)
EMPTY = [(0,), (3, 0), (0, 5), (2, 0, 4)]


# ---- the cases ----
def mutate(text: str, rng: random.Random) -> str:
    tokens = TOKEN.findall(text)
    for _ in range(rng.randint(1, 4)):
        solid = [i for i, tok in enumerate(tokens) if tok.strip() and not tok.startswith("#")]
        if not solid:
            break
        i = rng.choice(solid)
        names = sorted({tok for tok in tokens if NAME.fullmatch(tok)})
        op = rng.choice(["rename", "swap-names", "function", "operator", "number", "delete-line",
                         "duplicate-line", "swap-lines", "delete", "duplicate", "insert", "replace"])
        if op == "rename":
            pick = [j for j in solid if NAME.fullmatch(tokens[j])]
            if pick:
                old, new = tokens[rng.choice(pick)], rng.choice(names + WORDS[:16] + FUNCS)
                tokens = [new if tok == old else tok for tok in tokens]
        elif op == "swap-names" and len(names) > 1:
            a, b = rng.sample(names, 2)
            tokens = [b if tok == a else a if tok == b else tok for tok in tokens]
        elif op == "function":
            pick = [j for j in solid if tokens[j] in F.TABLE]
            if pick:
                tokens[rng.choice(pick)] = rng.choice(FUNCS)
        elif op == "operator":
            pick = [j for j in solid if tokens[j] in OPERATORS]
            if pick:
                tokens[rng.choice(pick)] = rng.choice(OPERATORS)
        elif op == "number":
            pick = [j for j in solid if NUMBER.fullmatch(tokens[j])]
            if pick:
                tokens[rng.choice(pick)] = rng.choice(NUMBERS)
        elif op in ("delete-line", "duplicate-line", "swap-lines"):
            lines = "".join(tokens).split("\n")
            a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
            if op == "delete-line":
                del lines[a]
            elif op == "duplicate-line":
                lines.insert(a, lines[a])
            else:
                lines[a], lines[b] = lines[b], lines[a]
            tokens = TOKEN.findall("\n".join(lines))
        elif op == "delete":
            del tokens[i]
        elif op == "duplicate":
            tokens.insert(i, tokens[i] + " ")
        elif op == "insert":
            tokens.insert(i, " " + rng.choice(WORDS + FUNCS + OPERATORS + NUMBERS) + " ")
        elif op == "replace":
            tokens[i] = rng.choice(WORDS + FUNCS + OPERATORS + NUMBERS)
    return "".join(tokens)


def case(seed: int) -> str:
    """The text of case `seed`: mostly mutated specs, some random text and token soup."""
    rng = random.Random(seed)
    kind = rng.random()
    if kind < 0.85:
        return mutate(rng.choice(SPEC_TEXTS), rng)
    if kind < 0.93:
        words = WORDS + FUNCS + OPERATORS + NUMBERS
        return "optimizer X\n" + " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
    return "".join(rng.choice(CHARS) for _ in range(rng.randint(0, 120)))


# ---- the outcome of one case ----
@dataclass
class Outcome:
    kind: str  # located, stepped, documented, bug
    detail: str = ""


class _Slow(BaseException):
    """Not an Exception: optdsl's compile turns any Exception it did not expect into 'this is a bug in
    optdsl', so a slow kron compile read as an internal error instead of as slow."""


@contextmanager
def time_limit(seconds: float):
    """A case that takes more than `seconds` of CPU time raises _Slow (main thread only). CPU time,
    not wall time: on a machine shared by several jobs kron's compile (5 s of CPU) took over 20 s."""
    def ring(*_):
        raise _Slow()
    old = signal.signal(signal.SIGPROF, ring)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def _located(err: SpecError) -> str:
    """'' when the error has a location and shows it, else what is missing."""
    shown = str(err)
    if "this is a bug in optdsl" in shown:
        return "internal error: " + shown
    if err.span is None:
        return "no location: " + shown
    if not shown.startswith(f"{FILENAME}:{err.line}:{err.column}: error: ") or "^" not in shown:
        return "no file:line:col or caret: " + shown
    return ""


def _documented(err: Exception) -> bool:
    text = str(err)
    return bool(re.search(rf"{re.escape(FILENAME)}:\d+", text)) or any(d in text for d in DOCUMENTED)


def _accepts(cls, p, defaults) -> bool:
    rule_of = getattr(cls, "_rule_of", None)
    if rule_of is None:
        return True
    try:
        rule_of(p, defaults)
    except RuntimeError as err:
        if "no rule of " in str(err):
            return False
        raise
    except ValueError as err:  # a rule that refuses what it takes (`rule COND refuse "why"`: Kron's rank >= 3)
        if REFUSES in str(err):
            return False
        raise
    return True


REFUSES = " refuses a parameter of shape "


def _defaults(cls, params, **kw) -> dict | None:
    """The optimizer's defaults, from one parameter its rules do not refuse (an optimizer given a refused
    parameter raises a ValueError when constructed: the fuzzer would step none of the others)."""
    for p in params:
        try:
            return cls([p], **kw).defaults
        except ValueError as err:
            if REFUSES not in str(err):
                raise
    return None


def step_all(cls) -> None:
    """Two steps on parameters of every rank the rules accept, both dtypes, for-loop and foreach."""
    for dtype in (torch.float32, torch.float64):
        gen = torch.Generator().manual_seed(0)
        for foreach in (False, True):
            params = [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)) for shape in RANKS + EMPTY]
            defaults = _defaults(cls, params, foreach=foreach)
            params = [p for p in params if defaults is not None and _accepts(cls, p, defaults)]
            if not params:
                continue
            opt = cls(params, foreach=foreach)
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
                opt.step(lambda: torch.tensor(1.5))


FUSED_TOL = 1e-9  # float64 relative: the kernels and the for-loop path round alike but for op order and CSE


def _differs(a: torch.Tensor, b: torch.Tensor, finite_only: bool = False) -> float:
    """The largest relative difference of two float64 tensors, nan where one has nan and the
    other not (infinities must match exactly); 0 when equal. finite_only: compare the elements
    finite on both sides alone."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return math.inf
    if finite_only:
        both = torch.isfinite(a) & torch.isfinite(b)
        a, b = a[both], b[both]
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return math.nan
    a, b = a[~nan_a], b[~nan_b]
    inf = torch.isinf(a) | torch.isinf(b)
    if not torch.equal(a[inf], b[inf]):
        return math.inf
    a, b = a[~inf], b[~inf]
    if not a.numel():
        return 0.0
    return ((a - b).abs() / (1 + torch.maximum(a.abs(), b.abs()))).max().item()


_DRAWS = re.compile(r"\b(%s)\s*\(" % "|".join(n for n, f in F.TABLE.items() if f.random))  # a draw in the text


def step_fused(cls, random: bool = False) -> str:
    """Two float64 steps on the fused path beside the for-loop path, on the ranks the rules accept:
    'agrees' or 'refused' (the spec says it cannot run fused, a documented error), else what differs.
    A spec that draws (randn(), rand()) is stepped but not compared: the kernels draw from a counter
    hash, the torch paths from the optimizer's generator, equal in distribution only ('random')."""
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in RANKS]
    defaults = _defaults(cls, [torch.nn.Parameter(x.clone()) for x in init], foreach=False)
    init = [x for x in init if defaults is not None and _accepts(cls, x, defaults)]
    if not init:
        return "refused"
    loop, fused = [torch.nn.Parameter(x.clone()) for x in init], [torch.nn.Parameter(x.clone()) for x in init]
    try:
        fused_opt = cls(fused, fused=True)
    except RuntimeError as err:
        if "cannot run: " in str(err):
            return "refused"
        raise
    loop_opt = cls(loop, foreach=False)
    # Once a parameter or a state holds nan or inf, the paths may differ there by design: the torch
    # paths skip a term whose coefficient is a hyperparameter at 0 (x + 0*p is x, as torch.optim
    # skips weight decay 0), the kernels compute it (0*nan is nan). Such a parameter is compared
    # where both sides are finite.
    went_wrong = [False] * len(loop)
    for _ in range(2):
        for a, b in zip(loop, fused):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            b.grad = a.grad.clone()
        loop_opt.step(lambda: torch.tensor(1.5))
        fused_opt.step(lambda: torch.tensor(1.5))
        for i, a in enumerate(loop):
            went_wrong[i] = went_wrong[i] or not all(
                bool(torch.isfinite(x).all()) for x in [a] + [v for v in loop_opt.state[a].values()
                                                              if torch.is_tensor(v) and v.is_floating_point()])
    if random:
        return "random"
    sensitivity = None  # measured only where the paths differ
    for i, (a, b) in enumerate(zip(loop, fused)):
        pairs = [("p", a, b)] + [(k, v, fused_opt.state[b].get(k)) for k, v in loop_opt.state[a].items()
                                 if torch.is_tensor(v) and v.is_floating_point()]
        for key, x, y in pairs:
            if y is None:
                return f"fused: state {key!r} of the shape-{tuple(a.shape)} parameter is missing"
            off = _differs(x, y, finite_only=went_wrong[i])
            if off <= FUSED_TOL:
                continue
            if sensitivity is None:
                sensitivity = _sensitivity(cls, init, seed=1)
            if not off <= SENSITIVITY_FACTOR * sensitivity[i].get(key, math.inf):
                return (f"fused: {key!r} of the shape-{tuple(a.shape)} parameter differs from the for-loop "
                        f"path's by {off:.3g} (relative)")
    return "conditioned" if sensitivity is not None else "agrees"


# Where the paths differ past FUSED_TOL, the spec may amplify rounding: `mod(sqrt(unit_mean(p^2)), 1e-12)`
# turns the last bit of a row mean, which the kernels and torch sum in other orders, into the fourth
# digit (fuzz seed 3972). Such a case is compared at its own condition: the for-loop path stepped again
# on inputs moved by 4 ulps shows how far rounding alone moves each result, and the fused path must be
# within SENSITIVITY_FACTOR times that. A well-conditioned spec moves by ~1e-15 there and keeps FUSED_TOL.
SENSITIVITY_FACTOR = 64
_NUDGE = 1 + 2.0 ** -50


def _sensitivity(cls, init, seed):
    """Per parameter, {p or state: relative difference} between two for-loop runs, one on inputs (the
    parameters' initial values and every gradient) scaled by 1 + 2^-50: what rounding-sized changes do."""
    runs = []
    for nudge in (1.0, _NUDGE):
        gen = torch.Generator().manual_seed(seed)
        [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in RANKS]  # the draws step_fused made
        params = [torch.nn.Parameter(x.clone() * nudge) for x in init]
        opt = cls(params, foreach=False)
        for _ in range(2):
            for q in params:
                q.grad = torch.randn(q.shape, generator=gen, dtype=torch.float64) * nudge
            opt.step(lambda: torch.tensor(1.5))
        runs.append([{"p": q.detach().clone(), **{k: v.clone() for k, v in opt.state[q].items()
                                                   if torch.is_tensor(v) and v.is_floating_point()}}
                     for q in params])
    return [{k: _differs(a[k], b[k], finite_only=True) for k in a if k in b} for a, b in zip(*runs)]


def outcome(text: str, limit: float = 20.0, fused: bool = False) -> Outcome:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with time_limit(limit):
                try:
                    compiled = optdsl.compile_source(text, FILENAME)
                except SpecError as err:
                    why = _located(err)
                    return Outcome("bug", why) if why else Outcome("located")
                try:
                    module = optdsl._module_from(compiled, text, FILENAME)
                    cls = getattr(module, compiled.program.name)
                except Exception as err:  # noqa: BLE001 - any failure here is the bug we look for
                    return Outcome("bug", f"import: {type(err).__name__}: {err}")
                try:
                    step_all(cls)
                    if fused:
                        said = step_fused(cls, random=bool(_DRAWS.search(re.sub(r"#[^\n]*", "", text))))
                        if said not in ("agrees", "conditioned", "refused", "random"):
                            return Outcome("bug", said)
                        return Outcome("stepped", f"fused {said}")
                except _Slow:
                    raise
                except Exception as err:  # noqa: BLE001
                    if _documented(err):
                        return Outcome("documented", f"{type(err).__name__}: {err}")
                    return Outcome("bug", f"step: {type(err).__name__}: {err}")
                return Outcome("stepped")
        except _Slow:
            return Outcome("bug", f"slow: more than {limit} s of CPU time")
        except RecursionError as err:
            return Outcome("bug", f"RecursionError: {err}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--limit", type=float, default=20.0, help="seconds of CPU time per case before it counts as a bug")
    ap.add_argument("--show", action="append", default=[], help="print each case of this kind (repeatable)")
    ap.add_argument("--fused-every", type=int, default=4, metavar="K",
                    help="also step every K-th case that steps on the fused path (0: never)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tally, bugs, fused = collections.Counter(), collections.Counter(), collections.Counter()
    began = time.perf_counter()
    for seed in range(args.start, args.start + args.cases):
        text = case(seed)
        out = outcome(text, args.limit, fused=bool(args.fused_every) and seed % args.fused_every == 0)
        tally[out.kind] += 1
        if out.detail.startswith("fused "):
            fused[out.detail] += 1
        if out.kind == "bug":
            bugs[re.sub(r"\d+", "N", out.detail.split("\n")[0])[:120]] += 1
        if out.kind in args.show:
            print(f"--- seed {seed}: {out.kind}: {out.detail}\n{text}\n", flush=True)
    took = time.perf_counter() - began
    print(f"{args.cases} cases (seeds {args.start}..{args.start + args.cases - 1}) in {took:.0f} s")
    for kind in ("located", "stepped", "documented", "bug"):
        print(f"  {kind:<11} {tally[kind]}")
        if kind == "stepped" and fused:
            print(f"    of which on the fused path too: {fused['fused agrees']} agree with the for-loop path, "
                  f"{fused['fused conditioned']} within their own condition (SENSITIVITY_FACTOR), "
                  f"{fused['fused refused']} refused fused=True (a documented error)")
    for what, n in bugs.most_common():
        print(f"    {n:>5}  {what}")
    return 1 if tally["bug"] else 0


if __name__ == "__main__":
    sys.exit(main())
