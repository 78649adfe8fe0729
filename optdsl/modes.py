"""Training modes: `on eval { ... }` and `on train { ... }` → ir.Mode, what the optimizer's eval()
and train() do to each parameter (Schedule-Free swaps p between its two points).

A mode block reads p, the parameter's states, hyperparameters and numbers, and assigns p, states
and locals; it runs per parameter that has taken a step, once per switch: eval() acts only in
training mode and train() only in evaluation mode (the group's `train_mode`, saved in state_dict()).
"""
from __future__ import annotations

from dataclasses import replace

from . import ast, ir
from .errors import SpecError

MODES = ("eval", "train")
_PER_STEP = ("g", "t", "loss")


def lower_modes(spec: ast.Spec, lowering_class, program: ir.Program) -> tuple[ir.Mode, ...]:
    """One ir.Mode per block; `lowering_class` is optdsl.lower's, which resolves names to SSA."""
    if not spec.modes:
        return ()
    names = [m.name for m in spec.modes]
    for m in spec.modes:
        if m.name not in MODES:
            raise SpecError(f"unknown mode '{m.name}'", m.name_span,
                            hint="a spec may say what 'on eval { ... }' and 'on train { ... }' do")
        if names.count(m.name) > 1:
            raise SpecError(f"'on {m.name}' is written twice", m.span, hint="merge the two blocks into one")
    if len(set(names)) == 1:
        other = "train" if names[0] == "eval" else "eval"
        raise SpecError(f"'on {names[0]}' without 'on {other}'", spec.modes[0].span,
                        hint=f"say what {other}() does too, so that the two switch p back and forth")
    states = {s.name for s in program.states}
    computed = {h.name for h in program.hypers if h.computed}
    out = []
    for m in spec.modes:
        block = replace(spec, body=m.body, modes=(), hypers=tuple(h for h in spec.hypers if h.name not in computed))
        lowering = lowering_class(block)
        lowering.random_where = f"'on {m.name}' runs between steps, with no generator to draw from"
        for item in m.body:
            if isinstance(item, ast.Block):
                raise SpecError(f"a '{item.kind}' block cannot stand inside 'on {m.name}'", item.span,
                                hint="write the statements out")
            _refuse(item.value, m.name, computed)
            lowering.statement(item)
        outputs = tuple((n, lowering.ssa(n, lowering.version[n])) for n in ["p", *sorted(states)]
                        if lowering.version.get(n, 0) > 0)
        out.append(ir.Mode(m.name, tuple(lowering.eqns), outputs))
    return tuple(out)


def _refuse(e: ast.Expr, mode: str, computed: set[str]) -> None:
    """A mode switch happens between steps: there is no gradient, step count, loss or group value."""
    if isinstance(e, ast.Name) and (e.id in _PER_STEP or e.id in computed):
        raise SpecError(f"'on {mode}' cannot read '{e.id}': it runs between steps", e.span,
                        hint="a mode block reads p, the states, hyperparameters and numbers")
    for child in (getattr(e, "args", ()) or ()) + tuple(
            x for x in (getattr(e, "left", None), getattr(e, "right", None), getattr(e, "operand", None)) if x):
        _refuse(child, mode, computed)
