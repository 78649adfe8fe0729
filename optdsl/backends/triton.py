"""The Triton backend: one fused multi-tensor kernel per step for element-wise specs.

Every tensor of a (device, dtype) group is covered by one launch: a table of
data pointers per operand (p, g, each state) and a block map (tensor, offset)
let each program find its slice, load p, g and the states once, compute the
whole update in registers and store p and the states once. Scalars that depend
only on hyperparameters are kernel arguments (a scheduler never recompiles);
those that depend on `t` come from a small per-tensor table, so `t` may differ
between the parameters of one launch.
"""
from __future__ import annotations

import sympy as sp

from ..sym import DEVICE, GROUP, PARAM, TENSOR, Plan
from .printers import HostPrinter, TritonPrinter


def unsupported(plan: Plan) -> str:
    """Why this plan has no fused kernel yet ('' when it has one)."""
    if any(d.level == DEVICE for d in plan.steps):
        return "whole-tensor reductions are not fused yet"
    return ""


def kernel_context(plan: Plan) -> dict:
    """What the template needs to print the kernel and its launcher."""
    prog = plan.program
    printer = TritonPrinter()
    tensor_steps = [d for d in plan.steps if d.level == TENSOR]
    used = set().union(*(d.expr.free_symbols for d in tensor_steps), *(e.free_symbols for _, e in plan.outputs))
    levels = plan.level_of()
    group_args = sorted((str(s) for s in used if levels.get(s) == GROUP), key=str)
    param_args = sorted((str(s) for s in used if levels.get(s) == PARAM), key=str)
    states = [s.name for s in prog.states]
    written = [(base, printer.doprint(e)) for base, e in plan.outputs if e != sp.Symbol(base)]
    t_elem = {"t": "t_", **{str(d.symbol): f"{d.symbol}_" for d in plan.param}}
    param_rows = []  # per-tensor scalars, host side: one value per tensor
    for name in param_args:
        if name == "t":
            param_rows.append("t")
            continue
        d = next(d for d in plan.param if str(d.symbol) == name)
        param_rows.append(f"[{HostPrinter(t_elem).doprint(d.expr)} for t_ in t]")
    return dict(
        tensor_steps=[(str(d.symbol), printer.doprint(d.expr)) for d in tensor_steps],
        written=written, states=states, group_args=group_args, param_args=param_args,
        param_rows=param_rows, param_defs=[str(d.symbol) for d in plan.param],
    )
