"""The spec as the user wrote it: small immutable records, each with its source span."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import Span


# ---- expressions ----
@dataclass(frozen=True)
class Num:
    value: float
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Expr, ...]
    span: Span
    func_span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / ^ and the comparisons < <= > >= == !=
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: Expr
    span: Span


@dataclass(frozen=True)
class Index:
    """`Q[a]` (a state list's factor for axis a, in `for axis a`) or `d[a]` (axis a's size, in a state
    list's kind condition): optdsl/axes.py unrolls them away before anything else reads the spec."""
    name: str
    var: str
    span: Span


Expr = Num | Name | Call | BinOp | Neg | Index


# ---- declarations and statements ----
@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool
    span: Span

    def contains(self, x: float) -> bool:
        above = x >= self.lo if self.lo_closed else x > self.lo
        below = x <= self.hi if self.hi_closed else x < self.hi
        return above and below

    def __str__(self) -> str:
        def num(x: float) -> str:
            return {float("inf"): "inf", float("-inf"): "-inf"}.get(x, repr(x))
        return f"{'[' if self.lo_closed else '('}{num(self.lo)}, {num(self.hi)}{']' if self.hi_closed else ')'}"


@dataclass(frozen=True)
class Hyper:
    name: str
    default: float    # a flag's is 1.0 or 0.0
    range: Range | None
    span: Span
    keyword: str | None = None  # `as KEYWORD`: its constructor keyword and param_groups key
    flag: bool = False          # declared True/False: accepts booleans, reads as 1.0/0.0
    only: bool = False          # `only`: no value but the default is accepted
    keyword_span: Span | None = None
    optional: bool = False      # `= None`: None is the machine epsilon of p's dtype
    choices: tuple = ()         # `= None | "a" | "b"`: the values it takes; the math reads the index
    count: bool = False         # counts a `repeat` (Muon's ns_steps): a whole number, an int keyword

    def hi_whole(self) -> int:
        """The largest whole number in the range (0 when none, or unbounded): a `repeat` count's rounds."""
        r = self.range
        if r is None or not math.isfinite(r.hi) or r.hi < 1:
            return 0
        top = math.floor(r.hi)
        return top - 1 if top == r.hi and not r.hi_closed else top


@dataclass(frozen=True)
class HyperTuple:
    """`hyper betas = (b1, b2)`: declared hyperparameters passed as one tuple keyword."""
    keyword: str
    members: tuple[str, ...]
    span: Span
    member_spans: tuple[Span, ...]


@dataclass(frozen=True)
class State:
    name: str
    init: Expr | None
    span: Span
    shape: str = "full"          # full (like p), scalar, rows or cols: see ir.STATE_SHAPES
    shape_span: Span | None = None
    key: str | None = None  # `as KEY`: its key in state_dict()
    key_span: Span | None = None
    eager: bool = False     # made when the optimizer is, not at the parameter's first update
    diag: Expr | None = None  # a `factor(K)` state's condition for its diagonal kind (optdsl/axes.py)


@dataclass(frozen=True)
class StateList:
    """`state Q[a]: axis(a) if COND else gram(a) = INIT`: one factor per axis a of p, of the first kind
    where COND holds for that axis, else of the second (optdsl/axes.py makes them `Q0`, `Q1`, ...)."""
    name: str
    var: str
    kinds: tuple[str, str]  # ("axis", "gram") or ("gram", "axis")
    cond: Expr
    init: Expr | None
    span: Span
    key: str | None = None


@dataclass(frozen=True)
class Assign:
    target: str
    op: str  # = += -= *= /=
    value: Expr
    span: Span
    target_span: Span
    group: bool = False  # `group NAME = EXPR`: a group statement (optdsl/group.py)


@dataclass(frozen=True)
class Block:
    kind: str               # "repeat" (arg: the count), "every" (arg: the period) or "axis" (arg: its variable)
    arg: Expr
    body: tuple[Assign | Block, ...]
    span: Span


@dataclass(frozen=True)
class Rule:
    cond: Expr | None       # over the shape built-ins and hyperparameters; None: every parameter
    states: tuple[State, ...]
    body: tuple[Assign | Block, ...]
    span: Span
    refuse: str | None = None  # `rule COND refuse "why"`: the parameters it takes are refused, saying why
    # a rule optdsl/axes.py unrolled from a state list: the condition as written (None: none) and what this
    # rule fixes ("ndim == 3: Q0 gram(0), Q1 axis(1), Q2 gram(2)"), for what info, explain and errors show
    unrolled: tuple | None = None


@dataclass(frozen=True)
class Mode:
    """`on eval { ... }` / `on train { ... }`: what the optimizer's eval() or train() does."""
    name: str
    body: tuple[Assign | Block, ...]
    span: Span
    name_span: Span


@dataclass(frozen=True)
class Input:
    name: str
    default: float
    span: Span


@dataclass(frozen=True)
class Spec:
    name: str
    doc: str
    hypers: tuple[Hyper, ...]
    states: tuple[State, ...]
    body: tuple[Assign | Block, ...]
    name_span: Span
    tuples: tuple[HyperTuple, ...] = ()
    rules: tuple[Rule, ...] = ()
    inputs: tuple[Input, ...] = ()
    modes: tuple[Mode, ...] = ()
