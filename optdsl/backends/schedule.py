"""The order of a step's instructions on the torch paths: which run inside a branch (sink), and, on
the multi-tensor path, where the all-reduces of a sharded parameter's reductions go (order).

Both move instructions, and both decide from the instructions alone (what each binds, reads and
writes in place: optdsl/backends/instrs.py), not from their printed code, with one rule of what may
not pass what (Dependence); optdsl/backends/torch.py prints the result.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

from .. import ir
from .instrs import Instr


class Dependence:
    """Which instructions of a step may not pass each other: one binding or reading a name the other
    binds, or writing in place a tensor that may share memory (a view, an alias) with one the other
    reads or writes."""

    def __init__(self, instrs: list[Instr]):
        self.roots = _aliases(instrs)
        self._seen: dict[int, tuple[Instr, set[str], set[str], set[str], set[str]]] = {}

    def _facts(self, instr: Instr) -> tuple[set[str], set[str], set[str], set[str]]:
        """The values it touches, the tensors it may touch, those it writes in place, and those it binds
        (Instr's properties make their sets anew each time: asked once per instruction, not per pair)."""
        if id(instr) not in self._seen:
            binds = instr.binds
            names = binds | instr.reads
            self._seen[id(instr)] = (instr, names, self._rooted(names), self._rooted(instr.writes), binds)
        return self._seen[id(instr)][1:]

    def _rooted(self, names: set[str]) -> set[str]:
        return set().union(*(self.roots.get(n, {n}) for n in names))

    def between(self, a: Instr, b: Instr) -> bool:
        (names_a, memory_a, written_a, binds_a), (names_b, memory_b, written_b, binds_b) = self._facts(a), self._facts(b)
        return bool(names_a & names_b & (binds_a | binds_b) or written_a & memory_b or written_b & memory_a)


def _aliases(instrs: list[Instr]) -> dict[str, set[str]]:
    """Per name an instruction binds: every name whose tensors it may share memory with (ever),
    transitively (an alias of an alias)."""
    roots: dict[str, set[str]] = {}
    for instr in instrs:
        for out in instr.binds:
            roots.setdefault(out, {out}).update(() if instr.fresh else instr.binds | instr.reads)
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


# ---- the multi-tensor path's all-reduces ----
def order(instrs: list[Instr]) -> list[Instr | tuple[str, ...]]:
    """`instrs` in the order they run, with, where partial results must be made whole, the names of
    those that one all-reduce combines. A reduction over the list's tensors (an instruction the
    function table calls a whole-tensor or axis reduction) computes each rank's parts where it runs;
    their all-reduce (one for several reductions) waits while anything else can run: the
    instructions run in their order, except that one reading a result still partial waits for the
    next combine, and what does not depend on it goes first. So the reductions of one stage (those
    no other reduction's result feeds) share one all-reduce, as the fused path's stages do:
    Adafactor's rms(p) and the row and column means of g^2."""
    dep = Dependence(instrs)
    deps = [{j for j in range(k) if dep.between(instrs[j], instrs[k])} for k in range(len(instrs))]
    touches = [dep._facts(i)[0] for i in instrs]  # what each binds or reads
    out: list[Instr | tuple[str, ...]] = []
    pending: list[str] = []
    done: set[int] = set()
    while len(done) < len(instrs):
        ready = [k for k in range(len(instrs)) if k not in done and deps[k] <= done]
        free = [k for k in ready if not touches[k] & set(pending)]
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


def group_order(steps) -> list:
    """The group phase's statements (ir.GroupPhase.steps) in the order they run, the reductions over
    the group's tensors gathered into stages (a tuple: the reductions whose parts one all-reduce makes
    whole, _parts). A reduction's stage is one past the latest stage of the reductions its argument
    reads, through the host values between (Prodigy's two sums read none: one stage); a host value
    runs after the stage of the last reduction it reads. The statements are bound once each (SSA
    names, no tensor written), so this order computes what the written one does."""
    level: dict[str, int] = {}
    for step in steps:
        reduce = isinstance(step, ir.GroupReduce)
        level[step.out] = max((level.get(n, 0) for n in ir.refs(step.arg if reduce else step.expr)),
                              default=0) + reduce
    out: list = []
    for stage in range(max(level.values(), default=0) + 1):
        reductions = tuple(s for s in steps if isinstance(s, ir.GroupReduce) and level[s.out] == stage)
        out += [reductions] if reductions else []
        out += [s for s in steps if not isinstance(s, ir.GroupReduce) and level[s.out] == stage]
    return out


def staged(instrs: list[Instr]) -> list[Instr | tuple[str, ...]]:
    """order(), inside branches and kept loops too: the for-loop path's step of one DTensor parameter,
    whose stages (a tuple: the reductions one all-reduce makes whole) the printer hands to the
    generated _in_stages, which combines those of all the group's tensors at once. A branch's blocks
    are ordered on their own (a tensor that does not take it skips their stages); so is a kept loop's
    round, whose stages are handed out every round (the count is the group's hyperparameter: every
    tensor runs as many rounds), the last one before the round ends (what the next round reads)."""
    return [replace(item, blocks=tuple(tuple(staged(list(b))) for b in item.blocks))
            if isinstance(item, Instr) and item.op in ("branch", "loop") else item for item in order(instrs)]


def stages(items) -> int:
    """How many stages `staged`'s result hands out on its longest way through its branches, a kept
    loop's round counted once (it hands out its stages once per round: a count known at step time)."""
    return sum(1 if isinstance(item, tuple) else max(map(stages, item.blocks)) if item.op in ("branch", "loop")
               else 0 for item in items)


# ---- work that only one branch reads runs inside it ----
_PURE_SKIP = ("copy", "bind", "loop")  # writes into a tensor that outlives the step; a loop's names


def _movable(instr: Instr) -> bool:
    """A pure instruction that makes a fresh value: moving it into a branch changes nothing but
    whether it runs (not in place, not a copy, not a draw)."""
    return not instr.inplace and instr.op not in _PURE_SKIP and not (instr.row is not None and instr.row.random)


def sink(instrs) -> list[Instr]:
    """Move into a branch the instructions whose values only that branch reads, so that work the
    branch's condition skips is not done: a `repeat` counted by a hyperparameter unrolls to its
    bound, each round a branch on `count >= round` (Muon's Newton-Schulz rounds past ns_steps).
    An instruction moves past those between it and the branch only where it does not depend on them
    (Dependence): the instructions update buffers in place (unlike the fused path's matrix section,
    optdsl/backends/triton.py's _lazy_section, whose values are each bound once)."""
    out = [replace(i, blocks=tuple(tuple(sink(b)) for b in i.blocks)) if i.op == "branch" else i for i in instrs]
    reads = [i.reads for i in out]
    count = Counter(n for r in reads for n in r)  # how many instructions read each name
    dep = Dependence(out)
    b = 0
    while b < len(out):
        br = out[b]
        if br.op != "branch":
            b += 1
            continue
        blocks = [list(block) for block in br.blocks]
        for arm in (0, 1):
            wanted = {br.args[1 + arm].code}.union(*(x.reads for x in blocks[arm]))
            other_arm = {br.args[0].code, br.args[2 - arm].code}.union(*(x.reads for x in blocks[1 - arm]))
            for j in range(b - 1, -1, -1):
                ins = out[j]
                if not (_movable(ins) and ins.out in wanted and ins.out not in other_arm
                        and count[ins.out] == 1  # read by the branch alone
                        # and passing nothing between: an in-place write of what it reads (m.lerp_(g)
                        # after tanh(m)) would change its value
                        and not any(dep.between(x, ins) for x in out[j + 1:b])):
                    continue
                blocks[arm].insert(0, ins)
                wanted |= reads[j]
                for n in reads[j]:
                    if n in reads[b]:
                        count[n] -= 1
                reads[b] |= reads[j]
                del out[j], reads[j]
                b -= 1
        out[b] = replace(br, blocks=tuple(tuple(block) for block in blocks))
        b += 1
    return out
