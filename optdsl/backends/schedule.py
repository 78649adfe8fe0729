"""The multi-tensor step's order: where its reductions' all-reduces go (a sharded parameter's).

A reduction over the list's tensors (an instruction the function table calls a whole-tensor or
axis reduction) computes each rank's parts where it runs; their all-reduce (one for several
reductions) waits while anything else can run. The instructions run in their order, except that
one reading a result still partial waits for the next combine, and what does not depend on it goes
first. So the reductions of one stage (those no other reduction's result feeds) share one
all-reduce, as the fused path's stages do: Adafactor's rms(p) and the row and column means of g^2.

Decided from the instructions alone (what each binds, reads and writes in place:
optdsl/backends/tensor_ops.py), not from their printed code; optdsl/backends/torch.py prints it.
"""
from __future__ import annotations

from .tensor_ops import Instr


def order(instrs: list[Instr]) -> list[Instr | tuple[str, ...]]:
    """`instrs` in the order they run, with, where partial results must be made whole, the names of
    those that one all-reduce combines. An instruction never passes one it depends on: one binding
    or reading a name it binds or reads, or writing in place a tensor that may share memory (a view,
    an alias) with one it reads or writes (and the reverse)."""
    names = [i.binds | i.reads for i in instrs]  # the values each touches
    roots = _aliases(instrs, names)

    def rooted(nm: set[str]) -> set[str]:
        return set().union(*(roots.get(n, {n}) for n in nm))
    memory = [rooted(nm) for nm in names]  # the tensors each may touch
    written = [rooted(i.writes) for i in instrs]  # the tensors each writes in place
    deps = [{j for j in range(k) if names[j] & names[k] & (instrs[j].binds | instrs[k].binds)
             or written[j] & memory[k] or written[k] & memory[j]} for k in range(len(instrs))]
    out: list[Instr | tuple[str, ...]] = []
    pending: list[str] = []
    done: set[int] = set()
    while len(done) < len(instrs):
        ready = [k for k in range(len(instrs)) if k not in done and deps[k] <= done]
        free = [k for k in ready if not names[k] & set(pending)]
        if not free:  # everything left waits for a partial result: combine them all
            out.append(tuple(pending))
            pending.clear()
            continue
        k = free[0]
        out.append(instrs[k])
        done.add(k)
        if instrs[k].whole:
            pending.append(instrs[k].out)
    if pending:
        out.append(tuple(pending))
    return out


def _aliases(instrs: list[Instr], names: list[set[str]]) -> dict[str, set[str]]:
    """Per name an instruction binds: every name whose tensors it may share memory with (ever),
    transitively (an alias of an alias)."""
    roots: dict[str, set[str]] = {}
    for instr, nm in zip(instrs, names):
        for out in instr.binds:
            roots.setdefault(out, {out}).update(() if instr.fresh else nm)
    for _ in range(len(instrs)):
        changed = False
        for rs in roots.values():
            more = set().union(*(roots.get(r, {r}) for r in rs))
            if not more <= rs:
                rs |= more
                changed = True
        if not changed:
            break
    return roots
