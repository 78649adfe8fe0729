"""The spec as the user wrote it: small immutable records, each with its source span."""
from __future__ import annotations

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


Expr = Num | Name | Call | BinOp | Neg


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
    default: float
    range: Range | None
    span: Span


@dataclass(frozen=True)
class State:
    name: str
    init: Expr | None
    span: Span
    shape: str = "full"          # full (like p), scalar, rows or cols: see ir.STATE_SHAPES
    shape_span: Span | None = None


@dataclass(frozen=True)
class Assign:
    target: str
    op: str  # = += -= *= /=
    value: Expr
    span: Span
    target_span: Span


@dataclass(frozen=True)
class Block:
    kind: str               # "repeat" (arg: the count) or "every" (arg: the period)
    arg: Expr
    body: tuple[Assign | Block, ...]
    span: Span


@dataclass(frozen=True)
class Rule:
    cond: Expr | None       # over the shape built-ins and hyperparameters; None: every parameter
    states: tuple[State, ...]
    body: tuple[Assign | Block, ...]
    span: Span


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
    rules: tuple[Rule, ...] = ()
    inputs: tuple[Input, ...] = ()
