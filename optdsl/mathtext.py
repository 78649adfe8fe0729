"""A spec's statements as mathematics: Unicode for the terminal, LaTeX for docstrings."""
from __future__ import annotations

import re

import sympy as sp

from . import ir
from .sym import to_sympy


_ROUND = "\x00round of "  # a round's guard of a `repeat` a hyperparameter counts, for fold_repeats


def _round_guard(eq: ir.Eqn, counts: set[str]) -> str | None:
    """The counting hyperparameter when eq is a round's guard: x = where(count >= k, x_new, x_old)."""
    e = eq.expr
    if (isinstance(e, ir.Op) and e.op == "where" and isinstance(e.args[0], ir.Op) and e.args[0].op == "ge"
            and isinstance(e.args[0].args[0], ir.Ref) and e.args[0].args[0].name in counts
            and isinstance(e.args[0].args[1], ir.Const) and all(isinstance(a, ir.Ref) for a in e.args[1:])):
        return e.args[0].args[0].name
    return None


def statement_math(prog: ir.Program, latex: bool, rounds: bool = False) -> list[str]:
    """Each statement as mathematics, names without SSA versions (also the docstring's math).
    With `rounds`, a round's guard of a counted `repeat` is a marker line for fold_repeats."""
    counts = {h.name for h in prog.hypers if h.count} if rounds else set()
    env: dict[str, sp.Expr] = {n: sp.Symbol(n) for n in [h.name for h in prog.hypers] + ["t", "loss", *ir.SHAPE_BUILTINS]}
    env.update({ssa: sp.Symbol(base) for ssa, base in ir.source_names(prog).items() if ssa in prog.inputs})
    names = ir.source_names(prog)
    lines = []
    body = False  # in a kept loop's body (optdsl/ir.py): its lines indented under "repeat COUNT times:"
    with sp.evaluate(False):  # keep each statement's own shape and order
        for eq in prog.eqns:
            count = _round_guard(eq, counts)
            loop = ir.loop_parts(eq.expr)
            end = isinstance(eq.expr, ir.Op) and eq.expr.op == ir.LOOP_END
            if count or loop or end:  # a marker, a loop's head (once) or its end: no statement of the spec
                if count:
                    lines.append(_ROUND + count)
                elif loop and loop[1] == 0:
                    lines.append(f"&\\text{{repeat {loop[2]} times:}}" if latex else f"repeat {loop[2]} times:")
                body = bool(loop)
                env[eq.out] = sp.Symbol(eq.target)
                continue
            indent = ("\\quad " if latex else "  ") if body else ""
            value = to_sympy(eq.expr, env)
            if latex:
                try:
                    shown = sp.latex(value, order='none', mul_symbol='dot')
                except (RecursionError, TypeError):  # SymPy may fail on an unevaluated tanh(exp(...)), ...
                    with sp.evaluate(True):
                        shown = sp.latex(to_sympy(eq.expr, env), mul_symbol='dot')
                lines.append(f"{indent}{sp.latex(sp.Symbol(eq.target))} &\\leftarrow {shown}")
            else:
                lines.append(f"{indent}{eq.target} ← {_unicode(ir.format_expr(eq.expr, names=names))}")
            env[eq.out] = sp.Symbol(eq.target)
    return lines


def _inline(e: ir.Expr, values: dict[str, ir.Expr]) -> ir.Expr:
    """e with each reference to a name of `values` replaced by its expression."""
    if isinstance(e, ir.Ref) and e.name in values:
        return values[e.name]
    if isinstance(e, ir.Op):
        return ir.Op(e.op, tuple(_inline(a, values) for a in e.args), e.span)
    return e


def _lines(eqns, names: dict[str, str], latex: bool, inline: dict[str, ir.Expr] | None = None) -> list[str]:
    """One line `target ← value` per equation, names without SSA versions; `names` grows as it goes."""
    lines = []
    for eq in eqns:
        expr = _inline(eq.expr, inline or {})
        if latex:
            env = {n: sp.Symbol(names.get(n, n)) for n in ir.refs(expr)}
            with sp.evaluate(False):
                shown = sp.latex(to_sympy(expr, env), order="none", mul_symbol="dot")
            lines.append(f"{sp.latex(sp.Symbol(eq.target))} &\\leftarrow {shown}")
        else:
            lines.append(f"{eq.target} ← {_unicode(ir.format_expr(expr, names=names))}")
        names[eq.out] = eq.target
    return lines


def group_math(prog: ir.Program, latex: bool) -> list[str]:
    """The group statements as mathematics, each reduction over the group written where it is read."""
    phase = prog.group
    if phase is None:
        return []
    names = ir.source_names(prog) | {f"{s.name}.0": s.name for s in phase.states}  # a group state's old value
    reductions = {step.out: ir.Op(step.func, (step.arg,), step.span) for step in phase.steps
                  if isinstance(step, ir.GroupReduce)}
    eqns = [step for step in phase.steps if not isinstance(step, ir.GroupReduce)]
    return _lines(eqns, names, latex, reductions)


def mode_math(prog: ir.Program, latex: bool) -> list[tuple[str, list[str]]]:
    """(mode name, its statements as mathematics) for each `on eval`/`on train` block."""
    return [(m.name, _lines(m.eqns, dict(ir.source_names(prog)), latex)) for m in prog.modes]


_SUPERSCRIPT = str.maketrans("0123456789-t", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻ᵗ")


def _unicode(text: str) -> str:
    """Spec syntax, typeset a little: a·b, √(x), x², b₁ᵗ."""
    text = re.sub(r"\^(-?[0-9t])\b", lambda m: m.group(1).translate(_SUPERSCRIPT), text)
    return re.sub(r"\bsqrt\(", "√(", text.replace(" * ", "·"))  # rsqrt( stays rsqrt(


def fold_repeats(lines: list[str], latex: bool) -> list[str]:
    """Statements that repeat as a block (a `repeat N { }` loop, unrolled in the IR) shown once
    under "repeat N times", as the spec wrote them."""
    out, i = [], 0
    while i < len(lines):
        best = (1, 1)  # (block length, times)
        for k in range(1, (len(lines) - i) // 2 + 1):
            times = 1
            while lines[i + times * k:i + (times + 1) * k] == lines[i:i + k]:
                times += 1
            if times > 1 and k * times > best[0] * best[1]:
                best = (k, times)
        k, times = best
        body, what = lines[i:i + k], f"{times} times"
        if body[-1].startswith(_ROUND):  # the rounds of a `repeat` a hyperparameter counts, up to its bound
            body, what = body[:-1], f"{body[-1][len(_ROUND):]} times (at most {times})"
        if times == 1:
            out += [line for line in body if not line.startswith(_ROUND)]
        elif latex:
            out += [f"&\\text{{repeat {what}:}}"] + [f"\\quad {line}" for line in body]
        else:
            out += [f"repeat {what}:"] + [f"  {line}" for line in body]
        i += k * times
    return out
