"""Rewrites that save a pass over memory, each applied only where the ranges prove it exact.

    sqrt(c*x)        -> sqrt(c)*sqrt(x)          when c >= 0       (c a scalar)
    a / (k*x + e)    -> (a/k) / (x + e/k)        when k != 0       (k, e scalars)

Adam's `m / (sqrt(v / bc2) + eps)` so becomes `(sqrt(bc2) * m) / (sqrt(v) + eps * sqrt(bc2))`:
one temporary (`sqrt(v)`), the scalars folded into `addcdiv_`'s value, as fast as
a hand-fused implementation.
"""
from __future__ import annotations

import sympy as sp

from . import ir
from .functions import REDUCTIONS, rebuild
from .ranges import Interval, bound

def scalar_env(prog: ir.Program) -> dict[sp.Symbol, Interval]:
    env = {sp.Symbol(h.name): Interval(h.lo, h.hi, h.lo_closed and h.lo > float("-inf"),
                                       h.hi_closed and h.hi < float("inf")) for h in prog.hypers}
    env[sp.Symbol("t")] = Interval(1.0, float("inf"), True, False)
    return env


class Rewriter:
    def __init__(self, tensors: set[sp.Symbol], env: dict[sp.Symbol, Interval]):
        self.tensors, self.env = tensors, env

    def scalar(self, e: sp.Expr) -> bool:
        return not (e.free_symbols & self.tensors) and not any(
            type(a) in REDUCTIONS for a in sp.preorder_traversal(e))

    def split(self, e: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
        """(scalar factor, tensor factor) of a product."""
        if not isinstance(e, sp.Mul):
            return (e, sp.Integer(1)) if self.scalar(e) else (sp.Integer(1), e)
        s = [a for a in e.args if self.scalar(a)]
        return sp.Mul(*s), sp.Mul(*[a for a in e.args if not self.scalar(a)])

    def __call__(self, e: sp.Expr) -> sp.Expr:
        if e.is_Atom:
            return e
        e = rebuild(e, [self(a) for a in e.args])
        if isinstance(e, sp.Pow) and e.exp == sp.S.Half:
            c, x = self.split(e.base)
            if c != 1 and x != 1 and bound(c, self.env).nonnegative:
                return sp.sqrt(c) * sp.sqrt(x)
        if isinstance(e, sp.Pow) and e.exp == -1 and isinstance(e.base, sp.Add):
            tensor_terms = [a for a in e.base.args if not self.scalar(a)]
            if len(tensor_terms) == 1:
                k, x = self.split(tensor_terms[0])
                if k != 1 and bound(k, self.env).nonzero:
                    rest = [a / k for a in e.base.args if a is not tensor_terms[0]]
                    return 1 / (k * sp.Add(x, *rest))
        return e


def rewrite(e: sp.Expr, tensors: set[sp.Symbol], prog: ir.Program) -> sp.Expr:
    return Rewriter(tensors, scalar_env(prog))(e)
