"""Which statement a step's shape error stands at (issue 12, item 3).

Some shapes only the parameter's shape decides (optdsl/shapes.py, decided_at_step): a `where` on the
host picking x or T(x), then matrix work. Torch raises where they do not fit, in code the plan has
rewritten (values inlined, shared, hoisted), so the failing line of a path is no spec statement. A
rule with such statements gets a second, plain form of its statements: one line per statement, in
the spec's order, on meta tensors (shapes, no numbers, no memory). The functional runs it only after
a step raised (the paths themselves are untouched: a step that runs pays nothing), parameter by
parameter, and the first statement that raises there is the one the ShapeError names: its
file:line:col, the line with a caret under it, the shapes of the values it reads.

Where a host condition reads a tensor's value (`where(norm(g) > 1, T(x), x)`), shapes alone cannot
pick the branch: the replay stops there, and the error names every candidate statement instead.
"""
from __future__ import annotations

import re

import sympy as sp

from .. import escape, ir, sym
from .. import functions as fn
from .. import shapes as shape_check
from ..errors import SpecError
from .printers import ShapePrinter, state_shape_code


def located(span, lines: list[str], filename: str) -> str | None:
    """'file:line:col: statement' and the line with a caret under the statement, as spec errors show it."""
    if span is None or not 1 <= span.line <= len(lines):
        return None
    line = lines[span.line - 1].expandtabs(1)
    end = span.end_column if span.end_line == span.line else len(line) + 1
    text = " ".join(line[span.column - 1:end - 1].split("#")[0].split())
    caret = " " * (span.column - 1) + "^" * max(1, end - span.column)
    return f"{filename}:{span.line}:{span.column}: {text}\n    {line.rstrip()}\n    {caret}"


# Functions whose printed form holds an argument twice (lerp's host form a + w*(b - a), unit_norm's
# axes of its operand): nested, a statement printed whole would double with every level, where the
# paths name such operands (sym._CopiedOperands). A replay that would print more is not made.
_COPIES = {fn.lerp: 0, fn.unit_mean: 0, fn.unit_norm: 0}
MAX_NODES = 400


def _printed_nodes(e: sp.Expr, memo: dict) -> int:
    """How many nodes e's printed form holds, each copy counted."""
    if e not in memo:
        n = 1 + sum(_printed_nodes(a, memo) for a in e.args)
        i = _COPIES.get(type(e))
        memo[e] = n + (_printed_nodes(e.args[i], memo) if i is not None else 0)
    return memo[e]


def context(prog: ir.Program, lines: list[str], filename: str, taken: set[str]) -> dict | None:
    """The replay of prog's statements for the template (None when no shape is decided at step):
    `body` its lines, `statements` the located text of each statement it marks, `shapes` the lines
    that make p's shape builtins, `states` (name, shape code) of its meta states."""
    if not shape_check.decided_at_step(prog):
        return None
    syms = sym.symbols_of(prog)
    tensors = {"p", "g"} | {s.name for s in prog.states}
    printer = ShapePrinter(tensors)
    printer.tensors = tensors  # the same set: names join it as statements make tensors
    names = ir.source_names(prog)
    taken = set(taken) | {str(s) for s in syms.values()} | {eq.target for eq in prog.eqns}
    env: dict[str, sp.Expr] = dict(syms)
    body, statements, count = [], [], 0
    holders = {"p", "g"} | {s.name for s in prog.states}  # what keeps its shape when assigned
    try:
        for eq in prog.eqns:
            value = sym.to_sympy(eq.expr, env)
            if _printed_nodes(value, {}) > MAX_NODES:  # bounded: the error names every candidate instead
                return None
            code = printer.doprint(value)
            while f"v{count}" in taken:
                count += 1
            name = f"v{count}"
            taken.add(name)
            reads_tensor = any(str(s) in tensors for s in value.free_symbols)
            if isinstance(eq.expr, ir.Op) and eq.expr.op in (ir.LOOP, ir.LOOP_END):  # a kept loop's carried
                body.append(f"{name} = {code}")  # value, no statement: the replay runs one round
                if reads_tensor:
                    tensors.add(name)
            elif reads_tensor:
                shown = located(eq.span, lines, filename)
                first = {}  # by the spec's name, the first value of it the statement reads
                for r in ir.refs(eq.expr):
                    if str(env.get(r, "")) in tensors:
                        first.setdefault(names.get(r, r), r)
                operands = list(first.values())
                pairs = ", ".join(f"({escape.literal(names.get(r, r))}, {env[r]})" for r in operands)
                pairs += "," if len(operands) == 1 else ""
                if shown is not None and shown not in statements:  # an unrolled loop's statement: once
                    statements.append(shown)
                body.append(f"n, values = {None if shown is None else statements.index(shown)}, ({pairs})")
                target = eq.target if eq.target in holders else None
                # p, g and a state keep their shape: torch writes a value into them (copy_, add_)
                body.append(f"{name} = {target}.copy_({code})" if target else f"{name} = {code}")
                tensors.add(name)
            else:
                body.append(f"{name} = {eq.target}.fill_({code})" if eq.target in holders else f"{name} = {code}")
                if eq.target in holders:
                    tensors.add(name)
            env[eq.out] = sp.Symbol(name)
    except SpecError:  # a statement SymPy cannot take alone: the error names every candidate instead
        return None
    from .torch import condition_code  # a factor state's kind: its condition on the step's hyperparameters
    states = [(s.name, state_shape_code(s.shape, diag=s.diag and condition_code(s.diag, prog, local=True)) or "p.shape")
              for s in prog.states]
    # the shape built-ins, and the sizes the broadcast rule counts where the statements read them
    hidden = [(n, code) for n, code in ir.HIDDEN_SIZES.items() if any(re.search(rf"\b{n}\b", line) for line in body)]
    return dict(body=body, statements=statements, states=states, shapes=list(ir.SHAPE_BUILTINS.items()) + hidden)
