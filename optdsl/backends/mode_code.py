"""ir.Mode → the body of the generated eval()/train(): one parameter at a time, in torch, in the
parameter's precision (float32 at least), written back into the parameter and its states."""
from __future__ import annotations

import sympy as sp

from .. import functions as fn
from .. import ir, quant
from ..sym import to_sympy
from .printers import CompiledPrinter, read_state_code


def context(prog: ir.Program, group_code: dict[str, str]) -> dict:
    """(mode name, the lines run for each parameter that has taken a step) per mode block."""
    keys = {s.name: s.saved_as for s in prog.states}
    codes = quant.codes(prog)
    out, copies = [], False
    for mode in prog.modes:
        env = {h.name: sp.Symbol(group_code[h.name]) for h in prog.hypers if not h.computed}
        shape = {sp.Symbol(n): sp.Symbol(code.replace("p.", "param.")) for n, code in ir.SIZES.items()}
        env.update({str(n): code for n, code in shape.items()})
        env[ir.P0] = sp.Symbol("p")
        tensors = {"p"}
        lines = ["p = param if param.dtype in _EXACT else param.float()"]
        read = {r for eq in mode.eqns for r in ir.refs(eq.expr)}
        names: dict[str, str] = {}  # SSA name -> its Python name in the body
        for s in prog.states:
            if ir.ssa_name(s.name, 0) in read:
                stored = f'state["{keys[s.name]}"]'
                if s.name in codes:
                    lines.append(f"{s.name} = {read_state_code(s.shape, codes[s.name].signed, stored, 'p')}")
                else:  # a bool state: read as it is kept
                    lines.append(f"{s.name} = {stored}")
                env[ir.ssa_name(s.name, 0)] = sp.Symbol(s.name)
                tensors.add(s.name)
        # Each SSA version a name of its own: not a state's (loaded above under its name: a local x's
        # version x·1 would print as x1 over a state x1), nor another version's (m1_·1 and m1·1).
        taken = {"p", "param", "state", "group", "self"} | {s.name for s in prog.states}
        scalars = {s.name for s in prog.states if s.shape == "scalar"}
        for eq in mode.eqns:
            value = to_sympy(eq.expr, env)
            # a reduction of a scalar is that scalar broadcast to p's shape (functions.py), as in a step
            reads = fn.reads_tensor({sp.Symbol(n) for n in tensors - scalars})
            value = fn.broadcast_scalars(value, lambda x: not reads(x)).xreplace(shape)
            name = _code_name(eq.out)
            while name in taken:
                name += "_"
            taken.add(name)
            names[eq.out] = name
            lines.append(f"{name} = {CompiledPrinter(tensors).doprint(value)}")
            env[eq.out] = sp.Symbol(name)
            if eq.kind == ir.TENSOR:
                tensors.add(name)
        for base, ssa in mode.outputs:
            if base == "p":
                lines.append(f"param.copy_({names[ssa]})")
            elif base not in codes:  # a bool state keeps whether the value is nonzero, as the step writes it
                lines.append(f'state["{keys[base]}"].copy_({names[ssa]} != 0)')
            else:  # requantised to the nearest level when it holds low-bit codes (lowbit.py.j2)
                lines.append(f'_copy_state(state["{keys[base]}"], {names[ssa]}, {codes[base].signed})')
                copies = True
        out.append((mode.name, lines))
    return dict(modes=out, copies_state=copies)


def _code_name(ssa: str) -> str:
    """An SSA name (p·1) as a Python name in the mode's body: p1, or m2_1 after a digit."""
    base, _, version = ssa.rpartition("\u00b7")
    if not base:
        return ssa
    return f"{base}{'_' if base[-1].isdigit() or base.endswith('_') else ''}{version}"
