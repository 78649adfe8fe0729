"""Which saved states a step does not read under some hyperparameter at 0: torch.optim leaves such
states out of its state_dict (RMSprop's grad_avg when not centered, its momentum_buffer and SGD's
without momentum), so load_state_dict accepts them missing there and refuses them missing elsewhere.

For a state S and a hyperparameter h whose range holds 0 (a flag: False), S is unread at h = 0 when,
with h replaced by 0, S's step-start value reaches no output but S's own new value: not p, not
another state (directly or through the named values of matrix work and unrolled loops); and, h not
being a flag, not S's own either (S is overwritten: SGD's buffer at momentum 0). A number such as
lr at 0 keeps every state: it only pauses p, and the states matter again once a schedule moves it."""
from __future__ import annotations

import sympy as sp

from . import ir
from .functions import xreplace
from .sym import named_meanings


def _takes_zero(h: ir.Hyper) -> bool:
    if h.computed or h.optional or h.choices or h.only:
        return False
    if h.flag:
        return True
    above = h.lo < 0 or (h.lo == 0 and h.lo_closed)
    below = h.hi > 0 or (h.hi == 0 and h.hi_closed)
    return above and below


def unread_when(prog: ir.Program) -> dict[str, tuple[str, ...]]:
    """state name -> the hyperparameters at 0 of which the step does not read its saved value."""
    candidates = [h for h in prog.hypers if _takes_zero(h)]
    if not candidates or not prog.states:
        return {}
    _, syms, _, outputs, barriers = named_meanings(prog)
    # each expression's free symbols, taken once (SymPy walks the whole tree each time it is asked): an
    # expression that does not read h is its own value at h = 0
    free = [e.free_symbols for _, e in barriers] + [e.free_symbols for e in outputs.values()]
    exprs = [e for _, e in barriers] + list(outputs.values())
    found: dict[str, tuple[str, ...]] = {}
    for h in candidates:
        try:
            zero = {syms[h.name]: sp.Integer(0)}
            at_zero = [(xreplace(e, zero), None) if syms[h.name] in fs else (e, fs) for e, fs in zip(exprs, free)]
        except (TypeError, ValueError, ZeroDivisionError, RecursionError):  # pragma: no cover - SymPy's own
            continue
        reads = [fs if fs is not None else e.free_symbols for e, fs in at_zero]
        named = [(b, fs) for (b, _), fs in zip(barriers, reads)]
        outs = dict(zip(outputs, reads[len(barriers):]))
        for s in prog.states:
            s0 = syms[ir.ssa_name(s.name, 0)]
            reach = {s0}
            for b, fs in named:
                if fs & reach:
                    reach.add(b)
            if not any(fs & reach for base, fs in outs.items() if base != s.name or not h.flag):
                found[s.name] = found.get(s.name, ()) + (h.name,)
    return found
